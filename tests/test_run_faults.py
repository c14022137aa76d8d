"""Run-side faults of `mmjax train`: two runs on one workdir, a full disk while
checkpointing, bad config values, logs after a resume (real training runs)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from mmjax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", "clip_tiny:tiny"]
# Lines the CUDA / TPU plugins of this environment print at `import jax`, whatever mmjax does.
PLUGIN_NOISE = re.compile(r"^(WARNING: All log messages before absl|[IWEF]\d{4} \d\d:\d\d:\d\d)")


@pytest.fixture
def env(tmp_path_factory, monkeypatch):
    cache = str(tmp_path_factory.getbasetemp() / "mmjax_cache")
    monkeypatch.setenv("MMJAX_CACHE", cache)
    return {**os.environ, "PYTHONPATH": ROOT, "MMJAX_CACHE": cache, "XLA_FLAGS": "",
            "JAX_PLATFORMS": "cpu"}


def _train_cmd(workdir, *extra):
    return [sys.executable, "-m", "mmjax.cli", "train", *TINY, "--workdir", str(workdir), *extra]


def _steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def _mmjax_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip() and not PLUGIN_NOISE.match(ln)]


def _one_error_line(code, err):
    lines = _mmjax_lines(err)
    assert code == 2 and len(lines) == 1, (code, lines[:20])
    assert lines[0].startswith("mmjax: error: "), lines
    return lines[0]


# ------------------------------------------------------------------ 1. one run per workdir

def test_second_train_on_a_busy_workdir_exits_2_with_one_line(tmp_path, env, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen(_train_cmd(run, "--config.total_steps=100000",
                                        "--config.checkpoint_every=200",
                                        "--config.keep_checkpoints=50", "--config.log_every=100"),
                             env=env, stdout=open(tmp_path / "first.log", "w"),
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not _steps(run):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.1)
        assert _steps(run), "the first run wrote no checkpoint"

        capsys.readouterr()
        code = cli.main(["train", *TINY, "--workdir", str(run), "--config.total_steps=3"])
        msg = _one_error_line(code, capsys.readouterr().err)
        assert str(run) in msg and f"pid {first.pid}" in msg and "in use" in msg, msg
        holder = json.loads((run / ".lock").read_text())
        assert holder["pid"] == first.pid and holder["host"] and holder["started"]

        # Evaluating a run while it trains is read-only and needs no lock.
        assert cli.main(["eval", "--workdir", str(run)]) == 0
        out = capsys.readouterr().out
        assert "step: " in out and "zeroshot/top1" in out, out
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # SIGKILL leaves the lock file behind but not the lock: the next run takes it and resumes.
    last = max(_steps(run))
    third = subprocess.run(_train_cmd(run, f"--config.total_steps={last + 2}",
                                      "--config.checkpoint_every=200"),
                           env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"resumed from step {last}" in third.stdout
    assert last + 2 in _steps(run)
