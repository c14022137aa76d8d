"""Trainer: sharded = unsharded, every recipe runs, LiT freezes, clear config errors."""
import json
import os

import jax
import numpy as np
import pytest

from _helpers import CONFIG_IDS, CONFIGS, cli_error_line, mesh_trainer
from mmjax import cli
from mmjax.families import get_family
from mmjax.train.checkpoint import Checkpointer
from mmjax.config.loading import load_config
from mmjax.data.tokenizers import token_ids
from mmjax.train.step import build_trainer

pytestmark = pytest.mark.usefixtures("mmjax_cache")


def _batches(config, n, seed=0):
    """`n` random batches with every field of the config's `family.batch_spec`, in its
    shape and dtype: the media (images, audio or video), text rows `[BOS] ids EOS pad..`
    in the ids of the recipe's tokenizer
    (`[B, L]`, or `[B, Q, L]` questions for VQA), and for VQA `answer_ids` int32 in
    [-1, A) with a valid first id per question and `answer_scores` float32 in [0, 1]."""
    rng = np.random.RandomState(seed)
    b = config.batch_size
    spec = get_family(config).batch_spec(config, b)
    text_shape = spec.get("text", ((b, config.data.train.max_len), np.int32))[0]
    l = text_shape[-1]
    answers = len(config.model.get("answers") or ())
    ids = token_ids(config.data.train.tokenizer, l)  # the recipe's tokenizer's
    out = []
    for _ in range(n):
        text = rng.randint(3, min(200, ids["vocab_size"]), text_shape).astype(np.int32)
        rows = text.reshape(-1, l)
        rows[:, 0] = ids["bos_id"] if ids["bos_id"] is not None else rows[:, 0]
        for row, length in zip(rows, rng.randint(4, l, len(rows))):  # EOS then padding
            row[length] = ids["eos_id"]
            row[length + 1:] = ids["pad_id"]
        batch = {"text": text}
        for key, (shape, dtype) in spec.items():
            if key == "text":
                continue
            if key == "answer_ids":
                ids = rng.randint(-1, answers, shape).astype(np.int32)
                ids[..., 0] = rng.randint(0, answers, shape[:-1])
                batch[key] = ids
            elif key == "answer_scores":
                batch[key] = rng.uniform(0, 1, shape).astype(np.float32)
            else:
                batch[key] = (rng.randint(0, 256, shape).astype(np.uint8) if dtype == np.uint8
                              else rng.randn(*shape).astype(np.float32))
            assert batch[key].shape == tuple(shape) and batch[key].dtype == dtype, key
        out.append(batch)
    return out


def _host_state(config):
    """Host copy of the state initialized on one device, with `_perturbed`
    parameters: every mesh below starts from this very state (put onto its
    shardings), so no test compiles an init per mesh."""
    state = jax.device_get(mesh_trainer(config, (1, 1, 1)).init_state(0))
    state["params"] = _perturbed(state["params"])
    return state


def _grads(config, mesh_shape, batch, state, trainer=None):
    """Loss and gradients of the public step's objective on one mesh (host numpy),
    at the host `state` put onto that mesh's shardings (`trainer`: reuse its
    compiled function instead of building one for `mesh_shape`)."""
    trainer = trainer or mesh_trainer(config, mesh_shape)
    state = jax.device_put(state, trainer.state_sharding)
    loss, _, grads = trainer.grads(state, jax.device_put(batch, trainer.batch_sharding))
    return float(loss), jax.device_get(grads), trainer, state


def _one_ulp(params, seed):
    """`params` with every float32 element moved by one unit in the last place
    (x * (1 +- 2^-23), random sign): the smallest change float32 can represent."""
    rng = np.random.RandomState(seed)

    def one(x):
        x = np.asarray(x)
        if x.dtype != np.float32:
            return x
        return (x * (1 + np.float32(2.0 ** -23) * rng.choice([-1, 1], x.shape))).astype(x.dtype)
    return jax.tree.map(one, params)


def _noise_floor(config, batch, state, ref, trainer, draws=2):
    """Per-leaf float32 noise floor of the single-device gradient `ref`: the
    largest relative change of each leaf over `draws` one-ulp perturbations of
    the parameters (`_one_ulp`), path -> relative change.

    A leaf whose gradient is a small sum of large cancelling terms (a bias
    behind a normalization, a cross-attention query bias) changes by ~1e-4 of
    itself under a one-ulp change; a well-conditioned one by ~1e-6. Any
    reordering of float32 sums (another mesh, another CPU's vector width) moves
    a leaf by about as much: on every recipe of GRAD_RECIPES and both meshes
    (AMD EPYC Zen 4, full XLA optimization) the sharded error was at most 1.5x
    this floor, except scalar leaves a few ulps off (ULPS covers them); coca_b16's
    `norm_cross` bias, 1.1e-4 off on a Zen 3 host, has a floor of 9.2e-5 here.
    The suite also runs these tests under `XLA_FLAGS=--xla_cpu_max_isa=SSE4_2`
    (.ci/run; README, "Numerics on every CPU").
    """
    floor = {}
    for seed in range(draws):
        perturbed = dict(state, params=_one_ulp(state["params"], seed))
        for path, (err, _) in _leaf_errors(_grads(config, None, batch, perturbed,
                                                  trainer)[1], ref).items():
            floor[path] = max(floor.get(path, 0.0), err)
    return floor


# Sharded gradient leaf vs single device: within FLOOR_FACTOR x the leaf's measured
# noise floor (`_noise_floor`), plus ULPS units of float32 rounding of the leaf itself
# (a scalar leaf such as SigLIP's logit bias has a zero floor and a one-ulp error).
FLOOR_FACTOR, ULPS = 4.0, 64


def _perturbed(params, scale=0.1, seed=0):
    """`params` with N(0, scale) noise added to every kernel, embedding and query.

    At the init itself some gradients are tiny residues of cancelling sums (the
    tiny BLIP-2's query outputs barely depend on the image, so its ITC gradient
    is ~1e-3 float32 noise, as a permuted batch on one device shows); a step
    away from it every gradient is well conditioned (permuted batch: < 1e-6)."""
    rng = np.random.RandomState(seed)

    def one(path, x):
        name = jax.tree_util.keystr(path)
        if any(k in name for k in ("kernel", "embedding", "query_tokens", "probe", "posemb")):
            return x + (scale * rng.randn(*x.shape)).astype(x.dtype)
        return x
    return jax.tree_util.tree_map_with_path(one, params)


def _leaf_errors(grads, ref):
    """Per-leaf relative error ||g - ref|| / ||ref|| (path -> (error, ||ref||))."""
    flat = {jax.tree_util.keystr(p): np.float64(g)
            for p, g in jax.tree_util.tree_leaves_with_path(grads)}
    out = {}
    for p, r in jax.tree_util.tree_leaves_with_path(ref):
        r = np.float64(r)
        norm = np.linalg.norm(r)
        out[jax.tree_util.keystr(p)] = (np.linalg.norm(flat[jax.tree_util.keystr(p)] - r)
                                        / max(norm, 1e-30), norm)
    return out


# Every recipe with its own `scan` setting (tiny sizes, float32); the (2, 2, 2) mesh
# puts FSDP and tensor parallelism together, where XLA's partitioner once swapped
# batch shards (tests/models/test_xla_shard_swap.py).
GRAD_RECIPES = [("clip_b16", "tiny"), ("siglip_b16", "tiny"), ("lit_b16", "tiny"),
                ("coca_b16", "tiny"), ("blip2_stage1", "tiny"), ("blip2_stage2", "tiny"),
                ("llava", "finetune,tiny"), ("clap_tiny", "tiny"), ("video_clip_tiny", "tiny"),
                ("one_tower_tiny", "tiny"), ("one_tower_tiny", "shared,tiny"),
                ("one_tower_tiny", "vqa,tiny")]


# (1, 4, 2) (no data parallelism) for one recipe of each family, to keep the suite short.
SECOND_MESH = ("clip_b16", "coca_b16", "blip2_stage1", "llava")


@pytest.mark.numerics
@pytest.mark.parametrize("recipe,arg", GRAD_RECIPES,
                         ids=[r if a == "tiny" else f"{r}:{a}" for r, a in GRAD_RECIPES])
def test_sharded_gradients_equal_single_device(recipe, arg):
    """Gradients (not Adam-normalized updates, which hide a 1% error) of the step's
    loss on (2, 2, 2) (and (1, 4, 2), `SECOND_MESH`) meshes vs one device: each
    trained leaf within its measured float32 noise floor (`_noise_floor`, x
    FLOOR_FACTOR, + ULPS ulps). Random images and texts at a random point near the init
    (`_perturbed`), so no gradient is degenerate except the ones that are zero in
    exact arithmetic (attention key biases: softmax is invariant to a per-row
    shift), which are checked against the global gradient scale instead. A
    sharding defect (a swapped batch shard, a missing reduction) moves every
    leaf by 1e-3 or more; the floors are 1e-7..1e-4."""
    config = load_config(f"{recipe}:{arg}", ["batch_size=16"])
    with config.unlocked():  # (the CPU recipes have no dtype key: float32 already)
        config.model.dtype = "float32"
    batch = _batches(config, 1, seed=1)[0]
    state = _host_state(config)
    ref_loss, ref, single, _ = _grads(config, (1, 1, 1), batch, state)
    floor = _noise_floor(config, batch, state, ref, single)
    global_norm = np.sqrt(sum(np.sum(np.float64(g) ** 2) for g in jax.tree.leaves(ref)))
    assert np.isfinite(ref_loss) and global_norm > 0
    for shape in [(2, 2, 2)] + ([(1, 4, 2)] if recipe in SECOND_MESH else []):
        loss, grads, trainer, _ = _grads(config, shape, batch, state)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        _assert_leaves_within_floor(grads, ref, floor, global_norm, config, shape)
        # The mesh really shards: FSDP and tensor parallelism both hold weights.
        specs = [str(s.spec) for s in jax.tree.leaves(trainer.state_sharding["params"])]
        assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs)


def _assert_leaves_within_floor(grads, ref, floor, global_norm, config, shape):
    """Every trained leaf of `grads` within FLOOR_FACTOR x its noise floor (+ ULPS) of
    `ref`; frozen leaves zero; leaves zero in exact arithmetic against the global scale."""
    frozen = list(config.optim.freeze)
    checked = 0
    for path, (err, norm) in _leaf_errors(grads, ref).items():
        if any(path.startswith(f"['{f}']") for f in frozen):
            assert norm == 0.0, path  # frozen: no gradient at all
            continue
        if norm <= 1e-6 * global_norm:  # zero in exact arithmetic
            assert err * norm <= 1e-6 * global_norm, (shape, path, err, norm)
            continue
        limit = FLOOR_FACTOR * floor[path] + ULPS * np.finfo(np.float32).eps
        assert err <= limit, (shape, path, err, norm, floor[path])
        checked += 1
    assert checked >= 10


@pytest.mark.numerics
def test_sharded_gradients_with_patch_dropout_equal_single_device():
    """Patch dropout (`model.image.patch_dropout`, FLIP) draws each image's mask from the
    step's key, so a (2, 2, 2) mesh drops the very patches one device drops: loss and
    gradients agree as in the test above. (That the step drops patches at all, and which
    ones, is shown by tests/models/test_flops.py, the step's matmuls over the kept
    patches, and tests/train/test_loop_unmasked_tuning.py, its loss against the unmasked
    step's.)"""
    config = load_config("clip_b16:tiny", ["batch_size=16", "model.dtype=float32",
                                           "model.image.patch_dropout=0.5"])
    batch = _batches(config, 1, seed=1)[0]
    state = _host_state(config)
    ref_loss, ref, single, _ = _grads(config, (1, 1, 1), batch, state)
    floor = _noise_floor(config, batch, state, ref, single)
    global_norm = np.sqrt(sum(np.sum(np.float64(g) ** 2) for g in jax.tree.leaves(ref)))
    loss, grads, _, _ = _grads(config, (2, 2, 2), batch, state)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    _assert_leaves_within_floor(grads, ref, floor, global_norm, config, (2, 2, 2))


@pytest.mark.numerics
def test_sharded_bfloat16_gradients_as_accurate_as_single_device():
    """bfloat16 compute (on CPU: bf16 x bf16 -> f32 GEMMs with a custom backward) on
    (2, 2, 2) and (8, 1, 1) meshes: measured against the float32 gradient of the
    same parameters and batch, every leaf is as close as the single-device bfloat16
    gradient is (measured: 3% global relative error on one device, sharded leaves
    within 1.1x of it). Exact sharding is proven in float32 above; this checks that
    the sharded bfloat16 step loses no precision that one device keeps."""
    # The byte tokenizer's vocabulary and ids: the batch and model the bounds were
    # measured on.
    on_bytes = ["data.train.tokenizer=bytes", "model.text.vocab_size=259",
                "model.text.eos_id=2", "model.text.pad_id=0"]
    c32 = load_config("clip_b16:tiny", ["batch_size=16", "model.dtype=float32"] + on_bytes)
    c16 = load_config("clip_b16:tiny", ["batch_size=16", "model.dtype=bfloat16"] + on_bytes)
    batch = _batches(c32, 1, seed=1)[0]
    state = _host_state(c32)  # float32 parameters in both (bfloat16 is the compute dtype)
    _, truth, _, _ = _grads(c32, (1, 1, 1), batch, state)
    one = _leaf_errors(_grads(c16, (1, 1, 1), batch, state)[1], truth)
    norm = np.sqrt(sum(n ** 2 for _, n in one.values()))
    base = np.sqrt(sum((e * n) ** 2 for e, n in one.values())) / norm
    assert 0 < base < 0.1  # bfloat16 rounding, not float32 and not garbage
    for shape in [(2, 2, 2), (8, 1, 1)]:
        errs = _leaf_errors(_grads(c16, shape, batch, state)[1], truth)
        total = np.sqrt(sum((e * n) ** 2 for e, n in errs.values())) / norm
        assert total <= 1.15 * base, (shape, total, base)
        for path, (err, n) in errs.items():
            if n > 1e-3 * norm:
                assert err <= 1.3 * one[path][0] + 1e-3, (shape, path, err, one[path][0])


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_every_recipe_runs_tiny(path, tiny_run):
    config = load_config(f"{path}:tiny")
    workdir, result = tiny_run(path)
    lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    assert [l["step"] for l in lines] == [1, 2, 3]
    assert all(np.isfinite(l["loss"]) for l in lines)
    for name in config.objectives:
        assert np.isfinite(lines[-1][f"loss/{name}"])
    if config.model.name == "vision_lm":
        if config.data.train.text_format == "dialog":
            assert result["vqa/count"] == 4 * 5 and 0.0 <= result["vqa_accuracy"] <= 1.0
        else:
            assert result["captioning/n"] == 8 and result["captioning/bleu4"] >= 0.0
    elif config.model.name == "one_tower" and config.model.experts == "shared":
        assert "zeroshot/top1" not in result  # a ViLT stack has no dual mode to rank with
    else:
        assert 0.0 <= result["zeroshot/top1"] <= 1.0
        assert 0.0 <= result["retrieval/t2i_r1"] <= result["retrieval/t2i_r5"] <= 1.0
    if config.model.name in ("coca", "blip2_stage1"):
        assert result["captioning/n"] == 8 and result["captioning/bleu4"] >= 0.0
    if config.model.name == "one_tower" and config.model.experts == "multiway":
        assert 0.0 <= result["retrieval/itm_t2i_r1"] <= result["retrieval/itm_t2i_r5"] <= 1.0
    evaluated = any(k.split("/")[0] in ("zeroshot", "retrieval", "vqa", "vqa_accuracy",
                                        "captioning", "top1") for k in result)
    assert os.path.exists(workdir / "eval" / "step_3.json") == evaluated
    # Frozen groups provably do not change; the rest does.
    frozen = list(config.optim.freeze)
    if frozen:
        trainer = build_trainer(config)  # (config.total_steps is 3)
        init = jax.device_get(trainer.init_state(int(config.seed))["params"])
        ckpt = Checkpointer(str(workdir), async_save=False)
        final, _, step = trainer.restore(ckpt)
        ckpt.close()
        final = jax.device_get(final["params"])
        assert step == 3
        for group in init:
            same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(init[group]),
                                                             jax.tree.leaves(final[group])))
            assert same == (group in frozen), group


def test_mistyped_config_key_is_one_line(capsys, tmp_path):
    msg = cli_error_line(["train", "--config", "clip_tiny:tiny", "--workdir", str(tmp_path),
                          "--config.optim.lrr=0.1"], capsys)
    assert "config.optim.lrr" in msg and "config.optim.lr" in msg


def test_missing_shard_pattern_is_one_line(capsys, tmp_path):
    shards = f"{tmp_path}/nothing-{{000..009}}.tar"
    msg = cli_error_line(["train", "--config", "clip_tiny:tiny", "--workdir", str(tmp_path),
                          f"--config.data.train.shards={shards}"], capsys)
    assert "data.train.shards" in msg and "nothing-" in msg


def test_workdir_of_another_config_is_one_line(capsys, tmp_path):
    assert cli.main(["train", "--config", "clip_tiny:tiny", "--workdir", str(tmp_path)]) == 0
    capsys.readouterr()
    msg = cli_error_line(["train", "--config", "clip_tiny:tiny", "--workdir", str(tmp_path),
                          "--config.model.text.width=32"], capsys)
    assert "another config" in msg and "config.model.text.width" in msg


def test_tokenizer_larger_than_vocab_is_rejected(capsys, tmp_path):
    msg = cli_error_line(["train", "--config", "clip_tiny:tiny", "--workdir", str(tmp_path),
                          "--config.model.text.vocab_size=100"], capsys)
    assert "vocab_size" in msg
