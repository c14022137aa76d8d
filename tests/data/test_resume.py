"""Resume refuses a data stream other than the one the checkpoint was saved with.

Through `mmjax train` (in this process): a run checkpoints at step 2, then is
resumed with a changed shard list (same count), data seed or shuffle buffer
(one-line error naming the key), or with `reset_stream_on_resume=True`
(resumes with a fresh stream). Unchanged resumes are covered by
tests/train/test_loop_resume.py.
"""
import json
import logging
import os
import shutil

import pytest

from _helpers import checkpoint_steps, cli_error_line, mmjax_log
from _shards import write_dataset
from mmjax import cli
from mmjax.data import pipeline


def _args(workdir, shards, total, *extra):
    return ["train", "--config", "clip_tiny:tiny", "--workdir", str(workdir),
            f"--config.data.train.shards={shards}", f"--config.total_steps={total}",
            "--config.checkpoint_every=2", "--config.evals.zeroshot.shards=",
            "--config.evals.retrieval.shards=", *extra]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(root, workdir with a checkpoint at step 2, pattern of its 4 shards)."""
    root = tmp_path_factory.mktemp("resume_stream")
    for name in ("a", "b"):
        (root / name).mkdir()
        write_dataset(root / name, 4, 8, prefix=name)
    shards = str(root / "a" / "a-{000..003}.tar")
    run = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMJAX_CACHE", str(root / "cache"))
        assert cli.main(_args(run, shards, 2)) == 0
    assert checkpoint_steps(run) == [2]
    return root, run, shards


@pytest.fixture
def run_copy(saved, tmp_path):
    root, run, shards = saved
    shutil.copytree(run, tmp_path / "run")
    return root, tmp_path / "run", shards


def test_changed_shard_list_of_same_count_is_refused(run_copy, capsys):
    root, run, _ = run_copy
    other = str(root / "b" / "b-{000..003}.tar")
    msg = cli_error_line(_args(run, other, 4), capsys)
    assert "config.data.train.shards" in msg and "reset_stream_on_resume" in msg, msg
    assert "a-000.tar" in msg and "b-000.tar" in msg, msg
    assert checkpoint_steps(run) == [2]


def test_reordered_shard_list_is_refused(run_copy, capsys):
    root, run, _ = run_copy
    reordered = "::".join(str(root / "a" / f"a-{i:03d}.tar") for i in (0, 2, 1, 3))
    msg = cli_error_line(_args(run, reordered, 4), capsys)
    assert "config.data.train.shards" in msg and "differ in names or order" in msg, msg


@pytest.mark.parametrize("key,old,new", [("seed", 0, 1), ("shuffle_buffer", 16, 8)])
def test_changed_data_seed_or_shuffle_buffer_is_refused(run_copy, capsys, key, old, new):
    _, run, shards = run_copy
    msg = cli_error_line(_args(run, shards, 4, f"--config.data.train.{key}={new}"), capsys)
    assert f"config.data.train.{key} changed from {old} to {new}" in msg, msg
    assert "reset_stream_on_resume" in msg, msg


def test_reset_stream_on_resume_keeps_train_state_and_restarts_the_stream(run_copy):
    root, run, _ = run_copy
    other = str(root / "b" / "b-{000..003}.tar")
    with mmjax_log(logging.WARNING) as records:
        code = cli.main(_args(run, other, 4, "--config.data.train.reset_stream_on_resume=true"))
    assert code == 0
    assert checkpoint_steps(run)[-1] == 4
    messages = [r.getMessage() for r in records]
    warnings = [m for m in messages if "reset_stream_on_resume" in m]
    assert len(warnings) == 1 and "fresh" in warnings[0], messages
    data = json.load(open(os.path.join(run, "checkpoints", "4", "data", "metadata")))
    state = data["processes"][0]
    assert state["batches"] == 2  # the fresh stream gave steps 3 and 4
    assert state["stream"]["first_shard"].endswith("b-000.tar")


def _iterator(pattern):
    cfg = pipeline.default_data_config()
    cfg.update(dict(shards=pattern, image_size=24, workers=0, shuffle_buffer=4,
                    tokenizer="bytes"))
    return pipeline.build_train_iterator(cfg, 3, process_index=0, process_count=1)


def _state_and_next(pattern, n=3):
    it = _iterator(pattern)
    try:
        [next(it) for _ in range(n)]
        state = json.loads(json.dumps(it.get_state()))
        return state, [next(it)["label"].tolist() for _ in range(n)]
    finally:
        it.close()


def _resume(pattern, state, n=3):
    it = _iterator(pattern)
    try:
        it.set_state(state)
        return [next(it)["label"].tolist() for _ in range(n)]
    finally:
        it.close()


def test_state_without_stream_identity_still_resumes(tmp_path):
    write_dataset(tmp_path, 4, 5)
    pattern = str(tmp_path / "shard-*.tar")
    state, reference = _state_and_next(pattern)
    del state["stream"]  # as saved before the stream identity was recorded
    with mmjax_log(logging.WARNING) as records:
        assert _resume(pattern, state) == reference
    messages = [r.getMessage() for r in records]
    assert len(messages) == 1 and "identity" in messages[0], messages
    state["num_shards"] = 5
    with pytest.raises(pipeline.StreamMismatchError, match="data.train.shards has 4 shards"):
        _resume(pattern, state)


def test_moved_shards_resume_at_the_saved_position(tmp_path):
    (tmp_path / "a").mkdir()
    write_dataset(tmp_path / "a", 4, 5)
    state, reference = _state_and_next(str(tmp_path / "a" / "shard-*.tar"))
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    with mmjax_log(logging.WARNING) as records:
        assert _resume(str(tmp_path / "moved" / "shard-*.tar"), state) == reference
    messages = [r.getMessage() for r in records]
    assert len(messages) == 1 and "moved" in messages[0], messages
