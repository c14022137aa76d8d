"""Cost of the per-step stop agreement (SIGTERM on any process -> all stop at
one step) on the default job (`configs/clip_tiny.py`) in 2 local processes.

    python benchmarks/stop_agreement.py [--rounds 3] [--steps 200] [--devices 1]
    python benchmarks/stop_agreement.py --micro [--calls 2000] [--devices 1]

Runs the job through launch/local.py with `config.multihost.stop_check_every=1`
(the default: a max-reduction of one int32 per device every step) and with
`stop_check_every=1000000` (no agreement within the run), alternating A B A B
so drift of the machine's speed hits both. The figure is the mean step time of
process 0 over the logged intervals after the first (`metrics.jsonl`
`step_time`, so start-up and compiles are left out); evals are off.

`--micro` times the agreement alone: 2 local processes build the default
job's mesh and call `StopAgreement.should_stop()` (dispatch the reduction,
read the previous one) `--calls` times; the figure is its cost per step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run(every: int, steps: int, devices: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = os.path.join(tmp, "run")
        cmd = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--processes", "2",
               "--devices-per-process", str(devices), "--", sys.executable, "-m", "mmjax.cli",
               "train", "--workdir", workdir, f"--config.total_steps={steps}",
               "--config.checkpoint_every=1000000", "--config.evals.zeroshot.shards=",
               "--config.evals.retrieval.shards=", f"--config.multihost.stop_check_every={every}"]
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": ROOT})
        if run.returncode != 0:
            raise SystemExit(run.stdout[-3000:] + run.stderr[-2000:])
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    times = [r["step_time"] for r in rows if "step_time" in r][1:]  # after the compile
    return statistics.mean(times)


def _micro_child(calls: int) -> None:
    import time

    import jax

    from mmjax.train import multihost
    from mmjax.train import sharding as shd
    from mmjax.config.loading import load_config
    multihost.join()
    mesh = shd.make_mesh(load_config("clip_tiny").mesh)
    stop = multihost.StopAgreement(mesh)
    for _ in range(50):  # compile and warm up
        stop.should_stop()
    start = time.perf_counter()
    for _ in range(calls):
        stop.should_stop()
    per_call = (time.perf_counter() - start) / calls
    stop.close()
    if jax.process_index() == 0:
        print(f"MICRO {per_call * 1e6:.1f}", flush=True)


def micro(calls: int, devices: int) -> float:
    cmd = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--processes", "2",
           "--devices-per-process", str(devices), "--", sys.executable, os.path.abspath(__file__),
           "--micro-child", str(calls)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    if run.returncode != 0:
        raise SystemExit(run.stdout[-3000:] + run.stderr[-2000:])
    return float([l for l in run.stdout.splitlines() if "MICRO" in l][0].split()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--micro-child"]:
        _micro_child(int(sys.argv[2]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--devices", type=int, default=1, help="CPU devices per process")
    p.add_argument("--micro", action="store_true", help="time the agreement alone")
    p.add_argument("--b-first", action="store_true", dest="b_first",
                   help="run the no-agreement arm first in each pair")
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args()
    if args.micro:
        runs = [micro(args.calls, args.devices) for _ in range(args.rounds)]
        print(f"stop agreement per step (2 processes): median {statistics.median(runs):.1f} us "
              f"(runs: {', '.join(f'{r:.1f}' for r in runs)})")
        return
    a, b = [], []
    for r in range(args.rounds):
        if args.b_first:
            b.append(one_run(1_000_000, args.steps, args.devices))
            a.append(one_run(1, args.steps, args.devices))
        else:
            a.append(one_run(1, args.steps, args.devices))
            b.append(one_run(1_000_000, args.steps, args.devices))
        print(f"round {r + 1}: every step {a[-1] * 1e3:.1f} ms, none {b[-1] * 1e3:.1f} ms, "
              f"ratio {a[-1] / b[-1]:.4f}", flush=True)
    ratios = [x / y for x, y in zip(a, b)]
    print(f"median step time: agreement every step {statistics.median(a) * 1e3:.1f} ms, "
          f"none {statistics.median(b) * 1e3:.1f} ms; median ratio {statistics.median(ratios):.4f} "
          f"(min {min(ratios):.4f}, max {max(ratios):.4f})")


if __name__ == "__main__":
    main()
