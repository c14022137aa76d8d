"""Run a test file as N local JAX processes through launch/local.py."""
import os
import subprocess
import sys

from _helpers import ROOT, TESTS


def run_local_processes(script: str, out_dir, processes: int = 2,
                        devices_per_process: int = 2) -> None:
    """Runs `python script out_dir` in `processes` local processes (jax.distributed
    on 127.0.0.1, `devices_per_process` CPU devices each); fails the test with
    the tail of their output when any of them fails. The repository and tests/
    are on their PYTHONPATH (`script` may import the helper modules)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS])}
    cmd = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--processes",
           str(processes), "--devices-per-process", str(devices_per_process),
           "--timeout", "240", "--", sys.executable, os.path.abspath(script), str(out_dir)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
