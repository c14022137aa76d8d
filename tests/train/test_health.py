"""The training-health line: one warning when the loss has not moved from its first
step's value for `health.patience` log rows after the warmup (real tiny runs, and the
rule on made-up rows)."""
from __future__ import annotations

import json

from _helpers import mmjax_log
from mmjax import cli
from mmjax.config.loading import load_config
from mmjax.train.health import LossHealth

TINY = ["--config", "clip_tiny:tiny", "--config.evals.zeroshot.shards=",
        "--config.evals.retrieval.shards="]


def _health_lines(records):
    return [r.getMessage() for r in records
            if r.levelname == "WARNING" and r.getMessage().startswith("training health")]


def test_rule_counts_rows_after_the_warmup_and_warns_once():
    config = load_config("clip_tiny", ["optim.warmup_steps=20", "optim.lr=0.001"])
    h = LossHealth(config, patience=3, tolerance=0.05)
    h.first_step(4.0)
    # During the warmup nothing counts, however flat.
    assert [h.update(s, {"loss": 4.0}) for s in (5, 10, 15)] == [None] * 3
    # A row that moved (by more than 5%) resets the count.
    assert h.update(20, {"loss": 4.1}) is None and h.update(25, {"loss": 4.1}) is None
    assert h.update(30, {"loss": 3.7}) is None
    assert h.update(35, {"loss": 4.19}) is None and h.update(40, {"loss": 3.85}) is None
    msg = h.update(45, {"loss": 4.0, "grad_norm": 0.03, "lr": 0.001})
    assert msg is not None and "steps 35-45" in msg and "grad_norm 0.03" in msg
    for key in ("optim.lr=0.001", "optim.warmup_steps=20", "batch_size=128",
                "ln(batch) = 4.852", "data.train.mean/std", "health.patience=0"):
        assert key in msg, (key, msg)
    assert h.update(50, {"loss": 4.0}) is None  # once per run
    off = LossHealth(config, patience=0, tolerance=0.05)
    off.first_step(4.0)
    assert all(off.update(s, {"loss": 4.0}) is None for s in range(20, 100, 5))


def test_a_run_that_cannot_learn_says_so_and_a_learning_run_does_not(tmp_path, mmjax_cache):
    """lr = 0: the loss stays at its start (batch noise only) -> one warning naming
    optim.lr; the same run with the recipe's learning rate moves and stays quiet."""
    common = [*TINY, "--config.total_steps=24", "--config.log_every=4",
              "--config.optim.warmup_steps=4", "--config.batch_size=32"]
    with mmjax_log() as records:
        assert cli.main(["train", *common, "--workdir", str(tmp_path / "stuck"),
                         "--config.optim.lr=0"]) == 0
    (line,) = _health_lines(records)
    assert "optim.lr=0 (now 0.00e+00)" in line and "for 3 log rows" in line, line
    with mmjax_log() as records:
        assert cli.main(["train", *common, "--workdir", str(tmp_path / "ok"),
                         "--config.optim.lr=0.003"]) == 0
    assert _health_lines(records) == []
    losses = [json.loads(ln)["loss"] for ln in
              (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.95 * losses[0]  # it did move: the check is not just silent
