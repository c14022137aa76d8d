"""Multi-process jobs under what pods do: preemption notices on some hosts, a
killed peer, an error on one host, a racing start, a late peer, a launcher
that is signalled. Real local processes (launch/local.py, jax.distributed
on 127.0.0.1 with gloo), real signals, every wait bounded.

The training jobs run `mmjax train` (the command line's entry point) on
`clip_tiny:tiny` in 2 processes x 2 CPU devices, 40 steps, checkpoints every
10; each step takes at least STEP_DELAY s (a sleep in the child's data
iterator), so a signal lands in the middle of training. Every interrupted
job is rerun and must end bitwise equal to the uninterrupted one.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from _helpers import ROOT, TESTS, checkpoint_steps, process_alive
STEPS, EVERY, STEP_DELAY = 40, 10, 0.12
OVERRIDES = [f"--config.total_steps={STEPS}", f"--config.checkpoint_every={EVERY}",
             "--config.log_every=1", "--config.evals.zeroshot.shards=",
             "--config.evals.retrieval.shards=", "--config.multihost.init_timeout_s=120"]


# ------------------------------------------------------------------ child side

def _child_train(workdir, out_dir, fail_process, fail_step, extra=()):
    """`mmjax train` with each data batch delayed by STEP_DELAY; process
    `fail_process` raises a DataError at its `fail_step`-th batch (-1: never);
    `extra`: more `--config.KEY=VALUE` arguments."""
    from mmjax import cli
    from mmjax.data.counters import DataError
    from mmjax.train import loop
    pid_file = os.path.join(out_dir, f"pid_{os.environ['MMJAX_PROCESS_ID']}")
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    build = loop.build_train_iterator

    class Slow:
        def __init__(self, inner):
            self.inner, self.n = inner, 0

        def __next__(self):
            time.sleep(STEP_DELAY)
            self.n += 1
            if (int(os.environ["MMJAX_PROCESS_ID"]) == fail_process and self.n == fail_step):
                raise DataError("shard 3 of this host is unreadable (a test's data error)")
            return next(self.inner)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    loop.build_train_iterator = lambda *a, **k: Slow(build(*a, **k))
    kill_at = [int(e.split("=")[1]) for e in extra if e.startswith("kill_at_save=")]
    if kill_at and int(os.environ["MMJAX_PROCESS_ID"]) == 1:
        # Process 1 dies (a real SIGKILL) as it starts writing checkpoint `kill_at`.
        from mmjax.train.checkpoint import Checkpointer
        save = Checkpointer.save

        def dying_save(self, step, *a, **k):
            if step == kill_at[0]:
                os.kill(os.getpid(), signal.SIGKILL)
            return save(self, step, *a, **k)
        Checkpointer.save = dying_save
    extra = [e for e in extra if not e.startswith("kill_at_save=")]
    sys.exit(cli.main(["train", "--config", "clip_tiny:tiny", "--workdir", workdir]
                      + OVERRIDES + list(extra)))


def _child_race(out_dir, iterations):
    """The start-up check of `mmjax train` (`check_workdir`) on `iterations`
    fresh workdirs, each twice (create, then resume with a changed key), with
    a random delay before each and a slow disk: every write of a workdir file
    stalls 20 ms after opening it, the window in which a reader of a file
    written in place sees it empty."""
    from mmjax.train import multihost
    multihost.join()
    import jax
    from mmjax import workdir as wd
    from mmjax.config.loading import load_config
    from mmjax.train.loop import check_workdir

    real_open = open

    class SlowFile:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            time.sleep(0.02)
            return self.f.write(text)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def slow_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return SlowFile(f) if "w" in mode else f
    wd.open = slow_open  # the module's writes and reads go through it
    import logging
    logging.getLogger("mmjax").setLevel(logging.ERROR)  # (200 "resuming with a changed config")
    rng = np.random.RandomState(jax.process_index())
    config = load_config("clip_tiny:tiny")
    for it in range(iterations):
        workdir = os.path.join(out_dir, "runs", str(it))
        for lr in (1e-3, 2e-3):
            with config.unlocked():
                config.optim.lr = lr
            time.sleep(rng.uniform(0, 0.03))
            check_workdir(config, workdir)
    with open(os.path.join(out_dir, f"race_ok_{jax.process_index()}"), "w") as f:
        f.write(str(iterations))


# ------------------------------------------------------------------ test side

def _launch(args, out_dir, grace=20):
    """Start launch/local.py (2 processes x 2 CPU devices) running this file's child `args`
    (tests/ on the PYTHONPATH too: the child imports `_helpers`)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS,
                                                        os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--processes", "2",
           "--devices-per-process", "2", "--grace", str(grace), "--",
           sys.executable, os.path.abspath(__file__), *map(str, args)]
    log = open(os.path.join(out_dir, "launch.log"), "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _finish(proc, out_dir, timeout=240):
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("job did not finish:\n" + _log(out_dir)[-4000:])
    return rc, _log(out_dir)


def _log(out_dir):
    with open(os.path.join(out_dir, "launch.log")) as f:
        return f.read()


def _train_job(workdir, out_dir, fail_process=-1, fail_step=-1, extra=(), grace=20):
    os.makedirs(out_dir, exist_ok=True)
    return _launch(["train", workdir, out_dir, fail_process, fail_step, *extra], out_dir,
                   grace=grace)


def _wait_for_step(workdir, proc, out_dir, step, timeout=180):
    """Block until metrics.jsonl reports `step` (the job is mid-training)."""
    path = os.path.join(workdir, "metrics.jsonl")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, "job ended early:\n" + _log(out_dir)[-3000:]
        if os.path.exists(path):
            with open(path) as f:
                steps = [json.loads(l)["step"] for l in f if l.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s:\n" + _log(out_dir)[-3000:])


def _pids(out_dir):
    return [int(open(os.path.join(out_dir, f"pid_{i}")).read()) for i in range(2)]


def _params(workdir):
    from mmjax.train.checkpoint import Checkpointer
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        params, step = ckpt.restore_params_to_host(None)
    finally:
        ckpt.close()
    return params, step


def _assert_same_run(workdir, reference):
    import jax
    got, step = _params(workdir)
    want, want_step = _params(reference)
    assert step == want_step == STEPS
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-process run of STEPS steps."""
    base = tmp_path_factory.mktemp("reference")
    workdir = str(base / "run")
    rc, log = _finish(_train_job(workdir, str(base / "out")), str(base / "out"))
    assert rc == 0, log[-3000:]
    return workdir


def _resume_and_compare(workdir, out_dir, reference):
    rc, log = _finish(_train_job(workdir, out_dir), out_dir)
    assert rc == 0, log[-3000:]
    assert "resumed from step" in log
    _assert_same_run(workdir, reference)
    ref, got = _losses(reference), _losses(workdir)
    assert all(got[s] == ref[s] for s in ref if s in got) and set(got) == set(ref)


@pytest.mark.parametrize("apart", [None, 4.0], ids=["one_process", "both_4s_apart"])
def test_sigterm_on_some_processes_saves_one_step_and_resumes(tmp_path, reference, apart):
    """SIGTERM to process 0 only, or to process 0 then process 1 `apart` s later
    (an ssh loop over workers): both processes save the same step and exit 0;
    the rerun resumes there and ends bitwise equal to the uninterrupted run."""
    workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
    proc = _train_job(workdir, out)
    _wait_for_step(workdir, proc, out, 6)
    p0, p1 = _pids(out)
    os.kill(p0, signal.SIGTERM)
    if apart:
        time.sleep(apart)
        if process_alive(p1):
            os.kill(p1, signal.SIGTERM)
    rc, log = _finish(proc, out, timeout=120)
    assert rc == 0, log[-3000:]
    saved = {line.split("checkpoint at step ")[1].split()[0]
             for line in log.splitlines() if "exiting for preemption" in line}
    assert len(saved) == 1 and sum("exiting for preemption" in l for l in log.splitlines()) == 2
    step = int(saved.pop())
    assert 6 <= step < STEPS and str(step) in os.listdir(os.path.join(workdir, "checkpoints"))
    _resume_and_compare(workdir, str(tmp_path / "out2"), reference)


def test_killed_peer_stops_the_job_with_one_line_and_rerun_resumes(tmp_path, reference):
    """SIGKILL of process 1 mid-training: process 0 exits non-zero within 60 s
    with one line (the step, the lost process, the last checkpoint); the
    launcher names the killed process; the rerun resumes and matches."""
    workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
    # The launcher's grace outlasts peer_timeout_s (30 s): where process 0's collective
    # waits instead of failing (seen once on a loaded machine), its peer watch names
    # the lost process before the launcher would kill it.
    proc = _train_job(workdir, out, grace=45)
    _wait_for_step(workdir, proc, out, EVERY + 3)
    # ... and checkpoint EVERY is complete: a kill during its (asynchronous) save is the
    # other test's case (`test_peer_lost_while_saving_is_not_a_storage_error`)
    end = time.monotonic() + 60
    while EVERY not in checkpoint_steps(workdir) and time.monotonic() < end:
        time.sleep(0.05)
    assert EVERY in checkpoint_steps(workdir), _log(out)[-3000:]
    p0, p1 = _pids(out)
    os.kill(p1, signal.SIGKILL)
    killed = time.monotonic()
    rc, log = _finish(proc, out, timeout=120)
    took = time.monotonic() - killed
    assert took < 60, (took, log[-3000:])
    assert rc != 0 and "process 1 was killed by SIGKILL" in log
    lines = [l for l in log.splitlines() if l.startswith("[p0] mmjax: error: process 0:")]
    assert len(lines) == 1, log[-3000:]
    assert "rerun the job to resume" in lines[0] and "checkpoint is step" in lines[0], lines
    assert "Traceback" not in log, log[-3000:]
    assert not process_alive(p0) and not process_alive(p1)
    _resume_and_compare(workdir, str(tmp_path / "out2"), reference)


def test_peer_lost_while_saving_is_not_a_storage_error(tmp_path):
    """Process 1 is killed as checkpoint 20 starts. Process 0's collective then
    either fails, or (seen in about half the runs) waits with no error, and
    process 0's peer watch finds process 1 silent for `peer_timeout_s`; either
    way one line names the step being saved (not the previous one), a lost
    peer (not the disk) and the last complete checkpoint."""
    workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
    proc = _train_job(workdir, out, extra=[f"kill_at_save={2 * EVERY}",
                                           "--config.multihost.peer_timeout_s=10"])
    start = time.monotonic()
    rc, log = _finish(proc, out, timeout=200)
    assert rc == 137 and "process 1 was killed by SIGKILL" in log, log[-3000:]  # 128 + 9
    lines = [l for l in log.splitlines() if l.startswith("[p0] mmjax: error:")]
    assert len(lines) == 1, log[-3000:]
    assert f"while saving checkpoint {2 * EVERY}" in lines[0], lines
    assert f"the last complete checkpoint is step {EVERY}" in lines[0], lines
    assert "free" not in lines[0] and "could not write" not in lines[0], lines
    # Either the collective fails (gloo: "Connection closed by peer") or it waits and
    # the peer watch finds process 1 silent for peer_timeout_s: both are one line.
    assert ("lost contact with another process" in lines[0]
            or ("lost process 1" in lines[0] and "peer_timeout_s" in lines[0])), lines
    assert time.monotonic() - start < 120, log[-3000:]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(EVERY)]


def test_preemption_deadline_when_a_peer_hangs(tmp_path):
    """Process 1 hangs (SIGSTOP) and process 0 gets SIGTERM: no step can be
    agreed on, so after config.multihost.preemption_deadline_s process 0 exits
    143 with one line naming the last complete checkpoint; the launcher then
    stops the hung process (SIGTERM, SIGKILL after --grace)."""
    workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
    proc = _train_job(workdir, out, extra=["--config.multihost.preemption_deadline_s=5"],
                      grace=3)
    _wait_for_step(workdir, proc, out, EVERY + 2)  # a checkpoint exists
    p0, p1 = _pids(out)
    os.kill(p1, signal.SIGSTOP)
    os.kill(p0, signal.SIGTERM)
    signalled = time.monotonic()
    rc, log = _finish(proc, out, timeout=90)
    assert time.monotonic() - signalled < 40, log[-3000:]
    assert rc == 143 and "process 0 exited with status 143" in log, log[-3000:]
    lines = [l for l in log.splitlines() if l.startswith("[p0] mmjax: error:")]
    assert len(lines) == 1, log[-3000:]
    assert ("no agreed stop within 5 s (config.multihost.preemption_deadline_s)" in lines[0]
            and f"the last complete checkpoint is step {EVERY}" in lines[0]), lines
    assert not process_alive(p0) and not process_alive(p1)


def test_error_on_one_process_stops_the_others_within_a_minute(tmp_path):
    """A data error on process 1 only: process 1 prints its error as one line,
    process 0 stops within 60 s with one line naming process 1's reason."""
    workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
    proc = _train_job(workdir, out, fail_process=1, fail_step=5)
    start = time.monotonic()
    rc, log = _finish(proc, out, timeout=200)
    assert rc != 0, log[-3000:]
    errors = [l for l in log.splitlines() if "mmjax: error:" in l]
    p1 = [l for l in errors if l.startswith("[p1]")]
    p0 = [l for l in errors if l.startswith("[p0]")]
    assert len(p1) == 1 and "shard 3 of this host is unreadable" in p1[0], log[-3000:]
    assert len(p0) == 1 and "process 1 failed" in p0[0] and "unreadable" in p0[0], log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert time.monotonic() - start < 200
    # Process 1 failed at its 5th batch; the survivor stopped in seconds, not 300 s.
    assert "exited with status 2" in log


def test_config_json_race_at_start_up(tmp_path):
    """200 start-ups of a 2-process job (fresh workdir, then a resume with a
    changed key) on a slow disk with random delays: no process reads a
    half-written config.json, and every workdir ends with a valid one."""
    n = 200
    rc, log = _finish(_launch(["race", str(tmp_path), n], str(tmp_path)), str(tmp_path))
    assert rc == 0, log[-3000:]
    assert all(open(tmp_path / f"race_ok_{i}").read() == str(n) for i in range(2))
    for it in range(n):
        saved = json.load(open(tmp_path / "runs" / str(it) / "config.json"))
        assert saved["config"]["optim"]["lr"] == 2e-3 and len(saved["config_history"]) == 1


def test_peer_that_never_starts(tmp_path):
    """Process 0 of a 2-process job whose process 1 never starts: one line says
    it waits, then one line names the coordinator and the timeout key, and the
    process exits (75) in about init_timeout_s, not after 300 s of silence."""
    env = {**os.environ, "MMJAX_COORDINATOR": "127.0.0.1:%d" % _free_port(),
           "MMJAX_NUM_PROCESSES": "2", "MMJAX_PROCESS_ID": "0", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "mmjax.cli", "train", "--workdir",
                          str(tmp_path / "run"), "--config.multihost.init_timeout_s=8"],
                         env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    took = time.monotonic() - start
    out = run.stdout + run.stderr
    assert run.returncode == 75, out[-3000:]
    assert "process 0 of 2: waiting for all 2 processes at 127.0.0.1:" in out
    errors = [l for l in out.splitlines() if l.startswith("mmjax: error:")]
    assert len(errors) == 1 and "config.multihost.init_timeout_s" in errors[0], out[-3000:]
    assert 8 <= took < 60 and "Check failure" not in out, (took, out[-3000:])


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resume_with_another_process_count_is_an_error(tmp_path, reference, capsys):
    """A 2-process run resumed by 1 process: the data positions cannot be split
    exactly, so it stops with one error naming reset_stream_on_resume (no
    silent replay); with the key set, it resumes and trains on."""
    from mmjax import cli
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    args = ["train", "--config", "clip_tiny:tiny", "--workdir", workdir,
            f"--config.total_steps={STEPS + 1}", "--config.evals.zeroshot.shards=",
            "--config.evals.retrieval.shards=", "--config.log_every=1"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "written by a job of 2 processes, this one has 1" in err, err
    assert "config.data.train.reset_stream_on_resume=True" in err, err
    assert cli.main(args + ["--config.data.train.reset_stream_on_resume=True"]) == 0
    assert max(_losses(workdir)) == STEPS + 1


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "train":
        _child_train(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]),
                     sys.argv[6:])
    elif kind == "race":
        _child_race(sys.argv[2], int(sys.argv[3]))
