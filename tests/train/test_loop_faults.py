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

from _helpers import checkpoint_steps, mmjax_log
from mmjax import cli
from mmjax.commands.util import error_text

TINY = ["--config", "clip_tiny:tiny"]
# Lines the CUDA / TPU plugins of this environment print at `import jax`, whatever mmjax does.
PLUGIN_NOISE = re.compile(r"^(WARNING: All log messages before absl|[IWEF]\d{4} \d\d:\d\d:\d\d)")


def _train_cmd(workdir, *extra):
    return [sys.executable, "-m", "mmjax.cli", "train", *TINY, "--workdir", str(workdir), *extra]


def _mmjax_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip() and not PLUGIN_NOISE.match(ln)]


def _one_error_line(code, err):
    lines = _mmjax_lines(err)
    assert code == 2 and len(lines) == 1, (code, lines[:20])
    assert lines[0].startswith("mmjax: error: "), lines
    return lines[0]


# ------------------------------------------------------------------ 1. one run per workdir

def test_second_train_on_a_busy_workdir_exits_2_with_one_line(tmp_path, subprocess_env, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen(_train_cmd(run, "--config.total_steps=100000",
                                        "--config.checkpoint_every=200",
                                        "--config.keep_checkpoints=50", "--config.log_every=100"),
                             env=subprocess_env, stdout=open(tmp_path / "first.log", "w"),
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not checkpoint_steps(run):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.1)
        assert checkpoint_steps(run), "the first run wrote no checkpoint"

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
    last = max(checkpoint_steps(run))
    third = subprocess.run(_train_cmd(run, f"--config.total_steps={last + 2}",
                                      "--config.checkpoint_every=200"),
                           env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"resumed from step {last}" in third.stdout
    assert last + 2 in checkpoint_steps(run)


# ------------------------------------------------------------------ 2. disk full while saving

def _mount_tmpfs(path, size) -> bool:
    """A real small filesystem (needs root and a kernel that lets us mount)."""
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    return proc.returncode == 0


# Without a mountable filesystem: the filesystem refuses orbax's writes into the
# temporary folder of checkpoint 6 with ENOSPC, as a full disk does.
ENOSPC_ON_STEP_6 = """
import errno, sys
from etils.epath import gpath
_open = gpath._GPath.open
def _open_full(self, mode="r", **kw):
    if ("w" in mode or "a" in mode) and "/checkpoints/6.orbax-checkpoint-tmp" in str(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))
    return _open(self, mode, **kw)
gpath._GPath.open = _open_full
from mmjax.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("disk", ["small_filesystem", "refused_writes"])
def test_disk_full_while_checkpointing(tmp_path, subprocess_env, disk):
    fs = tmp_path / "fs"
    mounted = disk == "small_filesystem" and _mount_tmpfs(fs, "3m")  # one tiny checkpoint fits
    run = fs / "run"
    prefix = [sys.executable, "-m", "mmjax.cli"]
    failing = prefix if mounted else [sys.executable, "-c", ENOSPC_ON_STEP_6]
    try:
        first = subprocess.run(prefix + _train_cmd(run)[3:], env=subprocess_env,
                               capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr[-3000:]
        assert checkpoint_steps(run) == [3]

        full = subprocess.run(failing + _train_cmd(run, "--config.total_steps=6")[3:],
                              env=subprocess_env, capture_output=True, text=True, timeout=300)
        assert full.returncode != 0
        lines = _mmjax_lines(full.stderr)
        assert len(lines) == 1 and "Traceback" not in full.stderr, full.stderr[-5000:]
        msg = lines[0]
        assert msg.startswith("mmjax: error: could not write checkpoint 6 in "
                              f"{run / 'checkpoints'}: no space left on device"), msg
        assert "free there" in msg and "last complete checkpoint is step 3" in msg, msg
        leftovers = [n for n in os.listdir(run / "checkpoints") if "orbax-checkpoint-tmp" in n]
        assert leftovers == [] and checkpoint_steps(run) == [3]

        # The previous checkpoint is intact: with space again the same command resumes from it.
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=16m", str(fs)], check=True)
        again = subprocess.run(prefix + _train_cmd(run, "--config.total_steps=6")[3:],
                               env=subprocess_env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resumed from step 3" in again.stdout
        assert 6 in checkpoint_steps(run)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(fs)], capture_output=True)


# ------------------------------------------------------------------ 3. config values

@pytest.mark.parametrize("override, words", [
    ("batch_size=0", ["config.batch_size=0", "integer >= 1"]),
    ("total_steps=-5", ["config.total_steps=-5", "integer >= 1"]),
    ("optim.lr=fast", ["config.optim.lr", "'fast'", "number >= 0"]),
    ("optim.b2=1.5", ["config.optim.b2=1.5", ">= 0 and < 1"]),
    ("mesh.fsdp=0", ["config.mesh.fsdp=0", "-1", "integer >= 1"]),
])
def test_bad_numeric_value_is_one_line_naming_key_and_range(override, words, tmp_path, capsys,
                                                            mmjax_cache):
    code = cli.main(["train", *TINY, "--workdir", str(tmp_path / "run"), f"--config.{override}"])
    msg = _one_error_line(code, capsys.readouterr().err)
    assert all(w in msg for w in words), msg
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training


def test_resume_with_another_batch_size_warns_and_records_it(tmp_path, mmjax_cache):
    run = tmp_path / "run"
    assert cli.main(["train", *TINY, "--workdir", str(run)]) == 0
    with mmjax_log() as records:
        assert cli.main(["train", *TINY, "--workdir", str(run), "--config.batch_size=16",
                         "--config.total_steps=4"]) == 0
    lines = [(r.levelname, r.getMessage()) for r in records]
    warnings = [m for level, m in lines if level == "WARNING" and "changed config" in m]
    assert len(warnings) == 1 and "config.batch_size 8 -> 16" in warnings[0], lines
    assert "config.total_steps 3 -> 4" in warnings[0]
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["batch_size"] == 16 and saved["config"]["total_steps"] == 4
    (entry,) = saved["config_history"]
    assert entry["changes"]["config.batch_size"] == [8, 16] and entry["date"]


# ------------------------------------------------------------------ 4. logs and messages

def test_resumed_run_drops_log_rows_past_the_restored_checkpoint(tmp_path, mmjax_cache):
    import shutil
    run = tmp_path / "run"
    cmd = ["train", *TINY, "--workdir", str(run), "--config.total_steps=6",
           "--config.checkpoint_every=3"]
    assert cli.main(cmd) == 0
    # As after a process killed between step 6's log row and its checkpoint:
    # rows 1-6 are written, the latest complete checkpoint is step 3.
    shutil.rmtree(run / "checkpoints" / "6")
    rows = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]
    assert cli.main(cmd) == 0
    rows = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(run / "eval")) == ["step_6.json"]


def test_non_finite_loss_advice_fits_the_config(tmp_path, capsys, mmjax_cache):
    code = cli.main(["train", *TINY, "--workdir", str(tmp_path / "a"), "--config.optim.lr=1e30"])
    msg = _one_error_line(code, capsys.readouterr().err)
    assert "non-finite loss at step" in msg
    assert "enable config.optim.clip_norm" not in msg  # it is on (1.0) by default
    assert "config.optim.lr (now 1e+30)" in msg and "config.optim.clip_norm (now 1)" in msg, msg


def test_quoted_values_keep_their_closing_quote(tmp_path, capsys):
    code = cli.main(["train", *TINY, "--workdir", str(tmp_path / "a"),
                     "--config.data.train.flip=maybe"])
    msg = _one_error_line(code, capsys.readouterr().err)
    assert msg.endswith("expected true/false, got 'maybe'"), msg
    # KeyError messages are printed as raised, without the quotes str() adds.
    assert error_text(KeyError("batches need a 'label' field")) == \
        "batches need a 'label' field"
