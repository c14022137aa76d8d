#!/usr/bin/env python
"""Start N local JAX processes of one job on this machine (CPU or GPUs).

    python launch/local.py --processes 2 --devices-per-process 2 -- \
        mmjax train --config configs/clip_tiny.py --workdir /tmp/run

Each process gets MMJAX_COORDINATOR / MMJAX_NUM_PROCESSES / MMJAX_PROCESS_ID
(which `mmjax train` passes to `jax.distributed.initialize`), and on CPU
`--xla_force_host_platform_device_count` simulated devices. Output lines are
prefixed with the process id; if one process fails the others are stopped.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, coordinator: str, n: int, i: int, devices: int | None,
                platform: str) -> dict:
    env = dict(base, MMJAX_COORDINATOR=coordinator, MMJAX_NUM_PROCESSES=str(n),
               MMJAX_PROCESS_ID=str(i))
    if platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        if devices:
            flags = [f for f in env.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count")]
            env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    elif platform == "gpu" and devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i * devices + d) for d in range(devices))
    return env


def _pump(stream, prefix: str):
    for line in iter(stream.readline, b""):
        sys.stdout.write(f"{prefix}{line.decode(errors='replace')}")
        sys.stdout.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=None,
                   help="CPU: simulated devices; GPU: GPUs per process")
    p.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--timeout", type=float, default=None, help="seconds before all are killed")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give the command after --, e.g. -- mmjax train --config ...")
    coordinator = f"127.0.0.1:{args.port or free_port()}"
    procs, pumps = [], []
    for i in range(args.processes):
        env = process_env(os.environ, coordinator, args.processes, i, args.devices_per_process,
                          args.platform)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        t = threading.Thread(target=_pump, args=(proc.stdout, f"[p{i}] "), daemon=True)
        t.start()
        procs.append(proc)
        pumps.append(t)
    code = 0
    try:
        for proc in procs:
            rc = proc.wait(timeout=args.timeout)
            if rc != 0 and code == 0:
                code = rc
                for other in procs:
                    if other.poll() is None:
                        other.terminate()
    except subprocess.TimeoutExpired:
        code = 124
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for t in pumps:
            t.join(timeout=5)
    return code


if __name__ == "__main__":
    sys.exit(main())
