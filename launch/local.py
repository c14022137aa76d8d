#!/usr/bin/env python
"""Start N local JAX processes of one job on this machine (CPU or GPUs).

    python launch/local.py --processes 2 --devices-per-process 2 -- \
        mmjax train --config configs/clip_tiny.py --workdir /tmp/run

Each process gets MMJAX_COORDINATOR / MMJAX_NUM_PROCESSES / MMJAX_PROCESS_ID
(which `mmjax train` passes to `jax.distributed.initialize`), and on CPU
`--xla_force_host_platform_device_count` simulated devices. Output lines are
prefixed with the process id.

The launcher watches every process at once. When one fails (a non-zero
status or a signal) it says which and how (the process that failed first on
its own, not one that stopped because of it, status 75), stops the others
(SIGTERM, then SIGKILL after --grace seconds) and exits with that status. SIGTERM, SIGINT
and SIGHUP sent to the launcher go to every process (a preemption notice
reaches the whole job); a second one, or --grace seconds without an exit,
kills them. No process is left behind: each runs in its own process group,
which is killed as a whole before the launcher exits.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


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


def describe(rc: int) -> str:
    """'exited with status 1' / 'was killed by SIGKILL' for a Popen return code."""
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def exit_code(rc: int) -> int:
    """The shell's convention: 128 + N for a process killed by signal N."""
    return 128 - rc if rc < 0 else rc


# `mmjax train`'s status for "stopped because another process of the job failed"
# (mmjax.train.multihost.EXIT_RERUN): a consequence, never the cause to report.
EXIT_RERUN = 75


def root_cause(codes: list) -> tuple[int, int]:
    """`(process, return code)` to report among finished processes: a process killed
    by a signal or failing on its own comes before one that stopped because of it."""
    failed = [(i, rc) for i, rc in enumerate(codes) if rc not in (None, 0)]
    own = [f for f in failed if f[1] != EXIT_RERUN]
    return (own or failed)[0]


def _pump(stream, prefix: str, lock: threading.Lock):
    for line in iter(stream.readline, b""):
        with lock:
            sys.stdout.write(f"{prefix}{line.decode(errors='replace')}")
            sys.stdout.flush()


def say(msg: str) -> None:
    print(f"[launch] {msg}", file=sys.stderr, flush=True)


class Job:
    """The N processes of one job, watched together."""

    def __init__(self, cmd: list[str], n: int, devices: int | None, platform: str,
                 port: int | None, grace: float):
        self.grace = grace
        self.procs: list[subprocess.Popen] = []
        self.pumps: list[threading.Thread] = []
        self.signalled: float | None = None  # time the launcher forwarded a signal
        lock = threading.Lock()
        coordinator = f"127.0.0.1:{port or free_port()}"
        for i in range(n):
            env = process_env(os.environ, coordinator, n, i, devices, platform)
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            t = threading.Thread(target=_pump, args=(proc.stdout, f"[p{i}] ", lock),
                                 daemon=True)
            t.start()
            self.procs.append(proc)
            self.pumps.append(t)
        say(f"{n} processes, coordinator {coordinator}, pids "
            f"{' '.join(str(p.pid) for p in self.procs)}")

    def signal_all(self, sig: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass

    def forward(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signalled is not None:
            say(f"second {name}: killing every process")
            self.signal_all(signal.SIGKILL)
            return
        self.signalled = time.monotonic()
        say(f"{name} received: passed to every process (they save a checkpoint and exit)")
        self.signal_all(signum)

    def run(self, timeout: float | None) -> int:
        start = time.monotonic()
        failed: tuple[int, int] | None = None  # (process, return code) of the first failure
        stopping_since: float | None = None
        while True:
            codes = [p.poll() for p in self.procs]
            if failed is None and any(rc not in (None, 0) for rc in codes):
                codes = self._settle(codes)
                i, rc = root_cause(codes)
                failed = (i, rc)
                running = [j for j, c in enumerate(codes) if c is None]
                say(f"process {i} {describe(rc)}"
                    + (f"; stopping process {', '.join(map(str, running))}" if running else ""))
                self.signal_all(signal.SIGTERM)
                stopping_since = time.monotonic()
            if all(c is not None for c in codes):
                break
            now = time.monotonic()
            since = stopping_since if stopping_since is not None else self.signalled
            if since is not None and now - since > self.grace:
                say(f"processes still running {self.grace:g} s after SIGTERM: killing them")
                self.signal_all(signal.SIGKILL)
                stopping_since = self.signalled = now + 1e9  # once
            if timeout is not None and now - start > timeout and failed is None:
                say(f"--timeout {timeout:g} s reached: killing every process")
                self.signal_all(signal.SIGKILL)
                failed = (-1, 124)
            time.sleep(0.05)
        for t in self.pumps:
            t.join(timeout=5)
        if failed is None:
            return 0
        i, rc = failed
        return 124 if i < 0 else exit_code(rc)

    def _settle(self, codes: list, seconds: float = 1.0) -> list:
        """Return codes after up to `seconds` more: processes that stop because a peer
        failed (status 75) exit within a second of it, and the report should name
        the one that failed first, not the first one this loop happened to see."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and any(c is None for c in codes):
            time.sleep(0.05)
            codes = [p.poll() for p in self.procs]
        return codes

    def cleanup(self) -> None:
        """Kill what is left (each process group: a wrapper's children too)."""
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=None,
                   help="CPU: simulated devices; GPU: GPUs per process")
    p.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--timeout", type=float, default=None, help="seconds before all are killed")
    p.add_argument("--grace", type=float, default=60.0,
                   help="seconds the processes get after a SIGTERM before SIGKILL (default 60)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give the command after --, e.g. -- mmjax train --config ...")
    job = Job(cmd, args.processes, args.devices_per_process, args.platform, args.port,
              args.grace)
    old = {s: signal.signal(s, job.forward) for s in (signal.SIGTERM, signal.SIGINT,
                                                       signal.SIGHUP)}
    try:
        return job.run(args.timeout)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        job.cleanup()


if __name__ == "__main__":
    sys.exit(main())
