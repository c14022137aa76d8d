"""Exact resume after SIGKILL, and a checkpoint on SIGTERM (real `mmjax train` processes)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from _helpers import checkpoint_steps

TOTAL = 24


def _cmd(workdir, total=TOTAL, every=3, config="clip_tiny:tiny"):
    return [sys.executable, "-m", "mmjax.cli", "train", "--config", config,
            "--workdir", str(workdir), f"--config.total_steps={total}",
            f"--config.checkpoint_every={every}", "--config.log_every=1",
            "--config.synthetic.train_samples=400"]


def _wait_for_checkpoint(proc, workdir, min_step, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(s >= min_step for s in checkpoint_steps(workdir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def _final_params(workdir, step):
    import orbax.checkpoint as ocp
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(path)
    import jax
    return jax.tree.leaves(restored["params"]), int(np.asarray(restored["step"]))


# Images, audio (log-mel and SpecAugment on device), video (frames sampled per segment)
# and a one-tower model (MLM masks and ITM negatives drawn from the step's rng).
@pytest.mark.parametrize("config", ["clip_tiny:tiny", "clap_tiny:tiny", "video_clip_tiny:tiny",
                                    "one_tower_tiny:tiny"])
def test_sigkill_then_resume_is_bitwise_exact(tmp_path, subprocess_env, config):
    """Killed after a checkpoint and restarted, a run ends with the very parameters of an
    uninterrupted run: same data order, augmentation and step randomness."""
    ref, run = tmp_path / "ref", tmp_path / "killed"
    # The uninterrupted reference and the run to kill run side by side (own workdirs;
    # the built-in shards' cache is safe to fill from two processes).
    reference = subprocess.Popen(_cmd(ref, config=config), env=subprocess_env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(_cmd(run, config=config), env=subprocess_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_checkpoint(proc, run, 6)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        _, err = reference.communicate(timeout=600)
        assert reference.returncode == 0, err[-3000:]
    finally:
        for p in (proc, reference):
            if p.poll() is None:
                p.kill()
    assert TOTAL not in checkpoint_steps(run), "the run finished before it was killed"
    out = subprocess.run(_cmd(run, config=config), env=subprocess_env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from step" in out.stdout

    a, step_a = _final_params(ref, TOTAL)
    b, step_b = _final_params(run, TOTAL)
    assert step_a == step_b == TOTAL
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_saves_a_checkpoint_before_exit(tmp_path, subprocess_env):
    run = tmp_path / "preempted"
    proc = subprocess.Popen(_cmd(run, total=100_000, every=1000), env=subprocess_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        log = ""
        while "step 3/" not in log and time.time() < deadline:  # training is under way
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            log += line
        assert "step 3/" in log, log[-3000:]
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest[-3000:]
    assert "exiting for preemption" in rest
    steps = checkpoint_steps(run)
    assert len(steps) == 1 and 3 <= steps[0] < 1000  # not a scheduled checkpoint step
    _, step = _final_params(run, steps[0])
    assert step == steps[0]
