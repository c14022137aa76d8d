"""The unmasked tail of a run with patch dropout (`unmasked_tuning_steps`, FLIP's unmasked
tuning): which step ran is read back from the run's own records, its logged losses
against both step functions rerun from the checkpoint before each step (the very
programs the run compiled, read back from the session's compilation cache).
That the unmasked step sees every patch and the other drops some is
tests/models/test_flops.py's (their matmuls)."""
import json
import shutil

import jax
import numpy as np

from mmjax.config.loading import load_config
from mmjax.data.batch import make_global_batch
from mmjax.data.pipeline import build_train_iterator
from mmjax.families import model_train_flops
from mmjax.train import sharding as shd
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.loop import train
from mmjax.train.step import build_trainer, unmasked_config


def _rows(workdir):
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def _losses(trainer, state, batch):
    """The loss of the run's dropping step and of its unmasked step from `state` on
    `batch` (`step` donates its state: each gets a copy)."""
    return {unmasked: float(trainer.step(jax.tree.map(lambda x: x.copy(), state), batch,
                                         unmasked=unmasked)[1]["loss"])
            for unmasked in (False, True)}


def test_last_steps_train_unmasked_also_after_a_resume_in_the_tail(tmp_path, mmjax_cache_dir,
                                                                   monkeypatch):
    """4 steps with patch dropout 0.5, the last 2 unmasked: the logged loss of step 1 is
    the dropping step's rerun from the initial state on the first batch, that of step 4
    the unmasked step's from checkpoint 3 on its batch, and at both states the two steps'
    losses differ; the logged model FLOPs switch with them. Resumed from checkpoint 3,
    inside the tail, step 4 is unmasked again: the uninterrupted run's loss."""
    monkeypatch.setenv("MMJAX_CACHE", mmjax_cache_dir)
    overrides = ["total_steps=4", "unmasked_tuning_steps=2", "model.image.patch_dropout=0.5",
                 "checkpoint_every=3", "evals.zeroshot.shards=", "evals.retrieval.shards="]
    config = load_config("clip_tiny:tiny", overrides)
    train(config, str(tmp_path))  # (resolves the built-in shards in `config`)
    rows = _rows(tmp_path)
    masked, full = model_train_flops(config), model_train_flops(unmasked_config(config))
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and masked < full
    assert [r["step_flops"] for r in rows] == [masked, masked, full, full]

    trainer = build_trainer(config)
    assert [trainer.unmasked(s) for s in range(4)] == [False, False, True, True]
    ckpt = Checkpointer(str(tmp_path))
    data = build_train_iterator(trainer.family.data_config(config),
                                shd.local_batch_size(int(config.batch_size), trainer.mesh),
                                media=trainer.media)

    def next_batch():
        local = next(data)
        return make_global_batch({k: local[k] for k in trainer.family.batch_keys(config)},
                                 trainer.batch_sharding)
    try:
        first = _losses(trainer, trainer.init_state(int(config.seed)), next_batch())
        state, data_state, _ = trainer.restore(ckpt, 3)
        data.set_state(data_state)
        last = _losses(trainer, state, next_batch())
    finally:
        data.close()
        ckpt.close()
    for losses, logged, unmasked in ((first, rows[0]["loss"], False),
                                     (last, rows[3]["loss"], True)):
        assert abs(losses[False] - losses[True]) > 1e-3 * abs(logged), losses
        np.testing.assert_allclose(logged, losses[unmasked], rtol=1e-5)

    shutil.rmtree(tmp_path / "checkpoints" / "4")
    train(load_config("clip_tiny:tiny", overrides), str(tmp_path))  # resumes from step 3
    again = _rows(tmp_path)
    assert [r["step"] for r in again] == [1, 2, 3, 4] and again[3]["step_flops"] == full
    np.testing.assert_allclose(again[3]["loss"], rows[3]["loss"], rtol=1e-6)
