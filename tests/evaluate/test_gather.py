"""Evaluators inside a multi-process job: 2 local processes give the metrics of 1.

A tiny CoCa with fixed random parameters is evaluated by `run_evals` on the
built-in held-out set (zero-shot, retrieval, captioning). Each child process
(launch/local.py, 2 CPU devices each) holds the parameters as global arrays
spread over both processes, as an FSDP train state is; the pytest process
runs the same call alone with host parameters. Batches of 8 rows make the
splits uneven: zero-shot sees 1 batch (process 1 gets none), retrieval 5,
captioning 3, grounding 3 (the pointing game's 20 phrases). Both runs also
write the HTML report (`report=`): process 0 writes it from the gathered
results, and its tables and media are the single-process report's.
"""
import json
import os
import sys

import numpy as np

from _local import run_local_processes

STEP = 7


def _setup(params_file=None):
    """Config, model and host variables (initialized with seed 0, or read from
    `params_file`, which saves the children a compilation)."""
    import jax
    import flax.linen as nn
    from flax import serialization
    from mmjax.models import build
    from mmjax.config.loading import load_config
    config = load_config("coca_b16:tiny", [
        "evals.batch_size=8", "synthetic.test_samples=36", "synthetic.samples_per_shard=16",
        "evals.zeroshot.max_samples=8", "evals.captioning.max_samples=20",
        "evals.captioning.max_len=6", "model.dtype=float32",
        "evals.grounding.shards=synthetic", "evals.grounding.num_images=10",
        "evals.retrieval.group_key=json:scene"])
    model = build(config.model)
    if params_file is not None:
        with open(params_file, "rb") as f:
            return config, model, serialization.msgpack_restore(f.read())
    s, l = config.data.train.image_size, config.data.train.max_len
    variables = jax.jit(model.init)(jax.random.key(0), np.zeros((2, s, s, 3), np.float32),
                                    np.ones((2, l), np.int32))
    return config, model, jax.device_get(nn.meta.unbox(variables))  # plain arrays, as in a state


def _spread(variables):
    """Global arrays over all 4 devices of the job: first axis split where it
    divides, else replicated; none is fully addressable from one process."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))

    def put(x):
        spec = P("fsdp") if x.ndim and x.shape[0] % 4 == 0 else P()
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec),
                                            lambda idx: x[idx])
    return jax.tree.map(put, variables)


def _child(out_dir):
    from mmjax.train.multihost import join
    join()
    import jax
    assert jax.process_count() == 2 and jax.device_count() == 4
    from mmjax.evaluate.gather import combine as _combine
    from mmjax.evaluate.runner import run_evals
    i = jax.process_index()
    config, model, variables = _setup(os.path.join(out_dir, "params.msgpack"))
    spread = _spread(variables)
    assert not any(a.is_fully_addressable for a in jax.tree.leaves(spread))
    results = run_evals(config, model, spread, step=STEP,
                        workdir=os.path.join(out_dir, f"workdir_{i}"),
                        report=os.path.join(out_dir, f"report_{i}"))
    # The gather itself, on rows whose order a random model's metrics may not
    # reveal: stream positions 0..4 held out of order, strings of different
    # lengths (one empty, one not ASCII); then a column only process 1 has.
    keys = [np.array([3, 0, 2], np.int32), np.array([4, 1], np.int32)][i]
    words = [["drei", "null", "zwei"], ["vier \u00fcber", ""]][i]
    got_keys, emb, got_words = _combine(keys, keys, keys[:, None] * np.ones((1, 3 + i), np.float32),
                                        words)
    only = np.arange(4 * i, dtype=np.int32).reshape(2 * i, 2)
    got_only, = _combine(np.arange(2 * i, dtype=np.int32), only)
    results["gathered"] = dict(keys=got_keys.tolist(), emb=emb.tolist(), words=got_words,
                               only=got_only.tolist())
    with open(os.path.join(out_dir, f"results_{i}.json"), "w") as f:
        json.dump(results, f)


def test_two_processes_give_single_process_metrics(tmp_path, monkeypatch):
    from flax import serialization
    from mmjax.evaluate.runner import run_evals
    monkeypatch.setenv("MMJAX_CACHE", str(tmp_path / "cache"))
    config, model, variables = _setup()
    (tmp_path / "params.msgpack").write_bytes(serialization.msgpack_serialize(variables))
    run_local_processes(__file__, tmp_path)
    per_process = [json.load(open(tmp_path / f"results_{i}.json")) for i in range(2)]
    assert per_process[0] == per_process[1]
    gathered = per_process[0].pop("gathered")
    per_process[1].pop("gathered")
    assert gathered["keys"] == [0, 1, 2, 3, 4]
    assert gathered["words"] == ["null", "", "zwei", "drei", "vier \u00fcber"]
    # Rows keep their values; the narrower rows of process 0 come back zero-padded.
    assert gathered["emb"] == [[k] * 3 + [0 if k in (0, 2, 3) else k] for k in range(5)]
    assert gathered["only"] == [[0, 1], [2, 3]]
    # Only process 0 writes the eval file.
    saved = json.load(open(tmp_path / "workdir_0" / "eval" / f"step_{STEP}.json"))
    assert saved == {"step": STEP, **per_process[0]}
    assert not (tmp_path / "workdir_1" / "eval").exists()

    single = json.loads(json.dumps(run_evals(config, model, variables, step=STEP,
                                             report=str(tmp_path / "report_single"))))
    # Each example counted once: the sizes of a single-process run.
    assert single["zeroshot/n"] == 8 and single["retrieval/n_images"] == 36
    assert single["retrieval/n_texts"] == 36 and single["captioning/n"] == 20
    assert single["grounding/n"] == 20  # 3 chunks of 8 phrases: process 1 computes one
    assert set(single) == set(per_process[0])
    # Same examples, same programs, same order: every metric equal, not just close.
    assert per_process[0] == single
    # The random model is not degenerate: some retrieval hits, some wrong.
    assert 0 < single["retrieval/t2i_r5"] < 1
    # Hits by scene (evals.retrieval.group_key), the groups gathered with the images:
    # the by-group recall of the single-process embeddings, and above the plain one.
    plain_config = config.copy_and_resolve_references()
    plain_config.evals.retrieval.group_key = ""
    for other in ("zeroshot", "captioning", "grounding"):
        plain_config.evals[other].shards = ""
    plain = run_evals(plain_config, model, variables, step=STEP)
    assert all(single[k] >= plain[k] for k in plain if k.startswith("retrieval/"))
    assert any(single[k] > plain[k] for k in plain if k.startswith("retrieval/"))

    # One report, from process 0, with the single-process report's content: the
    # same metrics table (the eval file's pairs, as `mmjax eval` prints them) and
    # the same example tables and thumbnails.
    assert not (tmp_path / "report_1").exists()
    from mmjax.evaluate.report import read_report
    two, one = read_report(tmp_path / "report_0"), read_report(tmp_path / "report_single")
    assert two.tables["metrics"][1:] == one.tables["metrics"][1:]
    assert {row[0]: row[1] for row in two.tables["metrics"][1:]} == {
        k: f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in saved.items()}
    shown = {"confusion", "confused-pairs", "retrieval-t2i", "retrieval-i2t", "captioning",
             "grounding"}
    assert shown <= set(one.tables)
    assert {k: v for k, v in two.tables.items() if k != "run-info"} == {
        k: v for k, v in one.tables.items() if k != "run-info"}
    media = [src for src in one.images if src.startswith("media/")]
    assert media and media == [src for src in two.images if src.startswith("media/")]
    for src in media:
        assert (tmp_path / "report_0" / src).read_bytes() == \
            (tmp_path / "report_single" / src).read_bytes(), src


if __name__ == "__main__":
    _child(sys.argv[1])
