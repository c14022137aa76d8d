"""`mmjax eval`: reproduces the training run's zero-shot accuracy; clear one-line errors."""
import json
import os

import pytest

from mmjax import cli
from mmjax.train.config_utils import load_config
from mmjax.train.loop import train


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MMJAX_CACHE", str(tmp_path_factory.getbasetemp() / "mmjax_cache"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short clip_tiny run on the built-in data (small, so the test stays quick)."""
    os.environ["MMJAX_CACHE"] = str(tmp_path_factory.getbasetemp() / "mmjax_cache")
    workdir = tmp_path_factory.mktemp("clip_tiny")
    overrides = ["total_steps=150", "batch_size=64", "log_every=50", "checkpoint_every=75",
                 "synthetic.train_samples=3000", "synthetic.test_samples=240",
                 "synthetic.samples_per_shard=500", "data.train.workers=0",
                 "optim.warmup_steps=20"]
    config = load_config("clip_tiny", overrides)
    result = train(config, str(workdir))
    return workdir, result, overrides


def test_trained_model_classifies_held_out_images(trained):
    _, result, _ = trained
    assert result["zeroshot/n"] == 240
    assert result["zeroshot/top1"] > 3 / 24  # chance is 1/24


def test_runner_reproduces_training_accuracy(trained, capsys):
    workdir, result, overrides = trained
    argv = ["eval", "--config", "clip_tiny", "--workdir", str(workdir)]
    argv += [f"--config.{o}" for o in overrides]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"top1: {result['zeroshot/top1']:.4f}" in out
    saved = json.load(open(os.path.join(workdir, "eval", "step_150.json")))
    assert saved["top1"] == pytest.approx(result["zeroshot/top1"], abs=1e-9)
    # An earlier step evaluates too, from its own checkpoint.
    assert cli.main(argv + ["--step", "75"]) == 0
    assert os.path.exists(os.path.join(workdir, "eval", "step_75.json"))


def _one_line_error(argv, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_missing_step_is_one_line(trained, capsys):
    workdir, _, overrides = trained
    msg = _one_line_error(["eval", "--config", "clip_tiny", "--workdir", str(workdir),
                           "--step", "99"] + [f"--config.{o}" for o in overrides], capsys)
    assert "step 99" in msg and "75" in msg and "150" in msg


def test_workdir_without_checkpoint_is_one_line(tmp_path, capsys):
    msg = _one_line_error(["eval", "--config", "clip_tiny", "--workdir", str(tmp_path)], capsys)
    assert "no checkpoint" in msg and str(tmp_path) in msg
