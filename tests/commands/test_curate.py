"""`mmjax curate`: scores equal the model's own on the same pairs, the kept set is the
global top fraction, bad samples are skipped and counted, a killed job resumes without
redoing a shard, and two processes write what one writes."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from _helpers import ROOT
from _shards import make_image, sample_members, write_tar
from mmjax import cli
from mmjax.data.tario import ShardReadError, iter_tar_samples

pytestmark = pytest.mark.usefixtures("mmjax_cache")

WORDS = ["red", "blue", "green", "circle", "square", "cross", "small", "large"]


def _caption(rng) -> str:
    return " ".join(rng.choice(WORDS, 4))


def _shards(root, num: int, per: int, size=(40, 40), bad: bool = False) -> list[str]:
    """`num` shards of `per` image-caption pairs; with `bad`, shard 0 also holds a
    corrupt image and a sample without caption, and the last shard is cut short."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(num):
        members = []
        for j in range(per):
            members += sample_members(f"s{i}/k{j:03d}", _caption(rng),
                                      make_image(100 * i + j, *size))
            members.append((f"s{i}/k{j:03d}.json", json.dumps({"url": f"u{i}-{j}"}).encode()))
        if bad and i == 0:
            members += sample_members("s0/corrupt", "a red circle", b"\xff\xd8 not a jpeg")
            members += sample_members("s0/nocaption", None, make_image(7))
        path = os.path.join(root, f"part-{i:03d}.tar")
        write_tar(path, members)
        paths.append(path)
    if bad:  # the last shard breaks inside its last sample's image
        data = open(paths[-1], "rb").read()
        open(paths[-1], "wb").write(data[:len(data) - 10240 - 1500])
    return paths


def _members(path) -> dict:
    """{key: members} of a shard, up to where it breaks."""
    out = {}
    with open(path, "rb") as f:
        try:
            for _, key, m in iter_tar_samples(f):
                out[key] = m
        except ShardReadError:
            pass
    return out


@pytest.fixture(scope="module")
def run(tiny_run):
    return str(tiny_run(os.path.join(ROOT, "configs", "clip_tiny.py"))[0])


@pytest.fixture(scope="module")
def curated(run, tmp_path_factory):
    """One in-process curate of 3 shards with bad samples, keeping half."""
    root = tmp_path_factory.mktemp("curate")
    paths = _shards(str(root / "in"), 3, 8, bad=True)
    out = str(root / "out")
    assert cli.main(["curate", "--workdir", run, "--shards", str(root / "in" / "part-*.tar"),
                     "--out", out, "--keep-fraction", "0.5", "--batch-size", "5",
                     "--quiet"]) == 0
    return root, paths, out


def _table(out) -> list[dict]:
    return [json.loads(line) for p in sorted(glob.glob(os.path.join(out, "scores", "*.jsonl")))
            for line in open(p)]


def test_scores_are_the_models_cosines_and_the_best_half_is_kept(run, curated):
    import jax.numpy as jnp
    from mmjax.commands.eval import load_run
    from mmjax.data.pipeline import build_eval_iterator
    from mmjax.families import get_family
    root, paths, out = curated
    config, trainer, state, _ = load_run(None, run, None, [])
    family = get_family(config)
    data = family.data_config(config)
    data.shards = "::".join(paths)
    data.workers = 0
    data.max_bad_fraction = 1.0
    model, variables = trainer.model, {"params": state["params"]}
    img, txt = [], []
    for batch in build_eval_iterator(data, 4, process_index=0, process_count=1,
                                     media=family.media(config.model)):
        valid = np.asarray(batch["valid"], bool)
        img.append(np.asarray(model.apply(variables, jnp.asarray(batch["image"]),
                                          method="encode_image"))[valid])
        txt.append(np.asarray(model.apply(variables, jnp.asarray(batch["text"]),
                                          method="encode_text"))[valid])
    img, txt = np.concatenate(img), np.concatenate(txt)
    expected = np.sum(img * txt, -1) / np.linalg.norm(img, axis=-1) / np.linalg.norm(txt, axis=-1)
    table = _table(out)
    # 8 + 8 good pairs, and the 7 of the cut shard read before the break.
    assert len(table) == len(expected) == 23
    np.testing.assert_allclose([r["clip"] for r in table], expected, rtol=1e-4, atol=1e-5)
    assert 0.05 < np.std(expected)  # the scores differ between pairs

    summary = json.load(open(os.path.join(out, "curate.json")))["summary"]
    assert summary["bad"] == {"corrupt_image": 1, "no_caption": 1, "truncated_tar": 1}
    order = np.argsort(-expected, kind="stable")
    best = {table[i]["key"] for i in order[:12]}  # round(0.5 * 23)
    written = {}
    for p in paths:
        written.update(_members(os.path.join(out, os.path.basename(p))))
    assert set(written) == best and summary["kept"] == 12
    sizes = json.load(open(os.path.join(out, "sizes.json")))
    assert sum(sizes.values()) == 12
    # Kept samples: every member as it was, the scores added to the JSON.
    originals = {}
    for p in paths:
        originals.update(_members(p))
    for key, members in written.items():
        assert set(members) == set(originals[key])
        for ext in members:
            if ext != "json":
                assert members[ext] == originals[key][ext]
        doc = json.loads(members["json"])
        assert doc["url"] == json.loads(originals[key]["json"])["url"]
        row = next(r for r in table if r["key"] == key)
        assert doc["curate"] == {"clip": row["clip"]}
        assert doc["curate"]["clip"] >= summary["threshold"]


def test_itm_score_is_the_match_probability():
    """BLIP-2 stage 1's ITM probability and best-query cosine, on a model built from
    its recipe (random weights), equal `model.apply` of the same pairs."""
    import jax
    import jax.numpy as jnp
    from mmjax.config.loading import load_config
    from mmjax.evaluate.curate import available_scores, pair_score_fn
    from mmjax.families import get_family
    from mmjax.models.jitted import model_method
    config = load_config(os.path.join(ROOT, "configs", "blip2_stage1.py") + ":tiny")
    from mmjax.models import build
    family = get_family(config)
    model = build(config.model)
    images, text = family.sample_inputs(config, batch=3)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=images.shape), images.dtype)
    text = jnp.asarray(rng.integers(3, 200, size=text.shape), text.dtype)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, text)
    assert available_scores(model) == ("clip", "itm")
    got = jax.jit(pair_score_fn(model, ("clip", "itm")))(variables, images, text)
    tokens = jax.jit(model_method(model, "image_tokens"))(variables, images)
    logits = np.asarray(jax.jit(model_method(model, "itm_logits"))(variables, tokens, text),
                        np.float64)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(got["itm"], p[:, 1], rtol=1e-5, atol=1e-6)
    q = np.asarray(jax.jit(model_method(model, "encode_image"))(variables, images))  # [B, Q, E]
    t = np.asarray(jax.jit(model_method(model, "encode_text"))(variables, text))
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    t = t / np.linalg.norm(t, axis=-1, keepdims=True)
    np.testing.assert_allclose(got["clip"], np.einsum("bqe,be->bq", q, t).max(1), rtol=1e-5,
                               atol=1e-6)


def test_duplicates_keep_the_best_of_each_group():
    from mmjax.evaluate.curate import duplicates, keep_mask
    rng = np.random.default_rng(1)
    base = rng.normal(size=(5, 16))
    emb = np.concatenate([base, base[[0, 0, 3]] + 1e-3 * rng.normal(size=(3, 16))])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    scores = np.array([0.1, 0.5, 0.2, 0.9, 0.3, 0.7, 0.05, 0.8])
    dup = duplicates(emb, scores, 0.99, block=3)
    # Group {0, 5, 6}: 5 scores best; group {3, 7}: 3 scores best.
    assert dup.tolist() == [True, False, False, False, False, False, True, True]
    keep, thr = keep_mask(scores, keep_fraction=0.5, drop=dup)
    assert keep.tolist() == [False, True, False, True, True, True, False, False]
    assert thr == 0.3


def _cli(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "mmjax.cli", "curate"] + args, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_killed_curate_resumes_without_redoing_a_shard(run, tmp_path, subprocess_env):
    _shards(str(tmp_path / "in"), 10, 6, size=(400, 400))
    args = ["--workdir", run, "--shards", str(tmp_path / "in" / "part-*.tar"),
            "--keep-fraction", "0.5", "--batch-size", "2", "--quiet"]
    out = tmp_path / "out"
    proc = _cli(args + ["--out", str(out)], subprocess_env)
    deadline = time.monotonic() + 120
    while not glob.glob(str(out / "scores" / "*.scored.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "scores" / "*.scored.json"))}
    assert 0 < len(done) < 10  # killed part-way through the scores
    proc = _cli(args + ["--out", str(out)], subprocess_env)
    assert proc.wait(timeout=180) == 0, proc.stdout.read()
    for p, mtime in done.items():  # finished shards were not scored again
        assert os.stat(p).st_mtime_ns == mtime
    assert len(glob.glob(str(out / "scores" / "*.scored.json"))) == 10
    # Two processes (one share of the shards each) write what the resumed run wrote:
    # same shards byte for byte, same scores table.
    two = tmp_path / "two"
    launch = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--processes", "2",
         "--devices-per-process", "1", "--timeout", "200", "--", sys.executable, "-m",
         "mmjax.cli", "curate"] + args + ["--out", str(two)],
        env=subprocess_env, capture_output=True, text=True, timeout=240)
    assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-2000:]
    names = sorted(n for n in os.listdir(two) if n.endswith(".tar"))
    assert len(names) == 10
    for name in names:
        assert (out / name).read_bytes() == (two / name).read_bytes(), name
    assert len(_table(str(two))) == 60 and _table(str(out)) == _table(str(two))
    kept = [json.load(open(d / "curate.json"))["summary"]["kept"] for d in (out, two)]
    assert kept == [30, 30]


def test_clear_errors(run, tmp_path, capsys):
    from _helpers import cli_error_line
    assert "--keep-fraction" in cli_error_line(
        ["curate", "--workdir", run, "--shards", "x.tar", "--out", str(tmp_path)], capsys)
    assert "no files match" in cli_error_line(
        ["curate", "--workdir", run, "--shards", str(tmp_path / "none-*.tar"), "--out",
         str(tmp_path / "o"), "--threshold", "0.2"], capsys)
