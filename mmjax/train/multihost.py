"""Multi-process jobs: joining the job, agreeing to stop, failing together.

A pod job is N processes running one program. Whatever one process learns
alone (a SIGTERM, an exception, a peer that vanished) must either become a
decision of all of them at a known point of the step, or lead every process
to the same exit within a bounded time:

- `join`: `jax.distributed.initialize` with the timeouts of
  `config.multihost`; one line says which process waits for how many where,
  and a process still waiting after `init_timeout_s` exits with one line
  instead of JAX's abort.
- `StopAgreement`: SIGTERM sets a local flag; every step, the flags of all
  processes are max-reduced on the mesh (dispatched asynchronously, read one
  step later), so every process learns of the stop at the same step, saves
  it and exits 0. A second SIGTERM, or no stop within
  `preemption_deadline_s`, exits at once (the last complete checkpoint
  stays).
- `agree_on_error`: process 0 alone runs a start-up check (reading and
  writing `config.json`, taking the workdir lock) and every process raises
  the same error, or none.
- `fail_fast`: an exception in one process of a job (its own error, or a
  collective that failed because a peer died) prints one line and ends the
  process at once with `os._exit`, skipping JAX's shutdown barrier, which
  would wait for the peers (300 s) while they wait in a collective for it.
  The peers' next collective then fails within seconds and they do the same.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from mmjax.errors import UserError

log = logging.getLogger("mmjax")

# Exit status of a process that stopped because the job cannot go on as one
# (a peer was lost, the job did not start, a stop was not agreed in time):
# rerun the job to resume from the last complete checkpoint (EX_TEMPFAIL).
EXIT_RERUN = 75
EXIT_SIGTERM = 128 + signal.SIGTERM

# The defaults of `config.multihost` (mmjax/config/defaults.py), for callers without a config.
DEFAULTS = dict(init_timeout_s=300, heartbeat_timeout_s=100, shutdown_timeout_s=60,
                peer_timeout_s=30, preemption_deadline_s=300, stop_check_every=1)


def options(config: Any = None) -> dict:
    """`config.multihost` over `DEFAULTS` (a config without the section gets the defaults)."""
    section = config.get("multihost") if config is not None else None
    out = dict(DEFAULTS)
    if section:
        out.update({k: section[k] for k in DEFAULTS if k in section})
    return out


class JobStartError(UserError, RuntimeError):
    """The processes of a job did not all join within `config.multihost.init_timeout_s`."""


def _flush() -> None:
    for h in logging.getLogger("mmjax").handlers + logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            h.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def exit_now(line: str, code: int) -> None:
    """Print `mmjax: error: <line>` on stderr and end this process at once.

    `os._exit` skips Python's and JAX's shutdown: JAX's would wait at a
    barrier for peers that are gone, or that wait for this process.
    """
    _flush()
    print(f"mmjax: error: {line}", file=sys.stderr, flush=True)
    os._exit(code)


def _coordinator_from_env() -> Optional[tuple[str, int, int]]:
    env = os.environ
    if env.get("MMJAX_COORDINATOR"):
        return (env["MMJAX_COORDINATOR"], int(env["MMJAX_NUM_PROCESSES"]),
                int(env["MMJAX_PROCESS_ID"]))
    return None


def _auto_detected() -> bool:
    env = os.environ
    return (int(env.get("SLURM_NTASKS", "1")) > 1
            or bool(env.get("TPU_WORKER_HOSTNAMES", "").count(","))
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def join(config: Any = None) -> None:
    """Join the multi-process job that the environment describes (no-op for one process).

    Explicit: MMJAX_COORDINATOR (host:port), MMJAX_NUM_PROCESSES, MMJAX_PROCESS_ID.
    Auto-detected by JAX: SLURM (SLURM_NTASKS > 1), Cloud TPU pods, Open MPI.
    Timeouts from `config.multihost` (`init_timeout_s`, `heartbeat_timeout_s`,
    `shutdown_timeout_s`). While waiting, one line says for whom and where; a
    process whose job has not started after `init_timeout_s` exits with
    status `EXIT_RERUN` and one line naming the coordinator and the key.
    """
    if jax.distributed.is_initialized():
        return
    explicit = _coordinator_from_env()
    if explicit is None and not _auto_detected():
        return
    opts = options(config)
    timeout = int(opts["init_timeout_s"])
    if explicit:
        address, n, i = explicit
        where = f"process {i} of {n}: "
        log.info("%swaiting for all %d processes at %s (up to %d s, "
                 "config.multihost.init_timeout_s)", where, n, address, timeout)
        args = dict(coordinator_address=address, num_processes=n, process_id=i)
    else:
        address, where = "the auto-detected coordinator", ""
        log.info("waiting for the processes of this job (auto-detected cluster; up to %d s, "
                 "config.multihost.init_timeout_s)", timeout)
        args = {}
    joined = threading.Event()

    def watchdog():
        if not joined.wait(timeout):
            exit_now(f"{where}the job did not start: not every process joined at {address} "
                     f"within {timeout} s (config.multihost.init_timeout_s); check that all "
                     "processes were started with the same coordinator and process count, "
                     "then rerun", EXIT_RERUN)
    threading.Thread(target=watchdog, name="mmjax-join-watchdog", daemon=True).start()
    # JAX's own timeout is set past the watchdog's, so the line above is what a user sees.
    jax.distributed.initialize(**args, initialization_timeout=timeout + 30,
                               heartbeat_timeout_seconds=int(opts["heartbeat_timeout_s"]),
                               shutdown_timeout_seconds=int(opts["shutdown_timeout_s"]))
    joined.set()
    log.info("%sjoined: %d processes, %d devices", where, jax.process_count(),
             jax.device_count())


# ---------------------------------------------------------------- start-up agreement

_ERROR_BYTES = 4096


def agree_on_error(check: Callable[[], Any]) -> Any:
    """Run `check()` on process 0 only; every process raises the UserError it
    raised (same type when known, else UserError), or none does.

    For start-up work that touches shared files (`config.json`, the workdir
    lock): the others never read a file process 0 may be writing, and no
    process goes on alone to a collective the others will not reach.
    Returns `check()`'s result on process 0, None elsewhere.
    """
    if jax.process_count() == 1:
        return check()
    from jax.experimental import multihost_utils
    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = check()
        except UserError as e:
            error = e
    text = (f"{type(error).__module__}:{type(error).__qualname__}:{error}" if error else "")
    blob = np.zeros(_ERROR_BYTES, np.uint8)
    raw = text.encode()[:_ERROR_BYTES]
    blob[:len(raw)] = np.frombuffer(raw, np.uint8)
    blob = np.asarray(multihost_utils.broadcast_one_to_all(blob))
    if error is not None:
        raise error
    text = bytes(blob).rstrip(b"\0").decode(errors="replace")
    if text:
        module, name, message = text.split(":", 2)
        raise _error_class(module, name)(message)
    return result


def _error_class(module: str, name: str) -> type:
    import importlib
    try:
        cls = getattr(importlib.import_module(module), name)
        if isinstance(cls, type) and issubclass(cls, UserError):
            return cls
    except Exception:  # noqa: BLE001 - fall back to the base class
        pass
    return UserError


# ---------------------------------------------------------------- stop agreement

class StopAgreement:
    """SIGTERM on any process -> every process stops after the same step.

    `should_stop()` is called by every process once per step, after the
    step is dispatched. Every `stop_check_every` steps it dispatches a max-
    reduction of the processes' local flags over the mesh and returns the
    result of the previous one, so the host never waits for the device (the
    previous step has finished by then). Every process therefore reads the
    same value at the same step. One process: the local flag, no collective.

    A second SIGTERM, or no agreed stop within `preemption_deadline_s` of the
    first, ends the process at once (`EXIT_SIGTERM`) with one line naming the
    last complete checkpoint (`status.kept()`).
    """

    def __init__(self, mesh: Optional[jax.sharding.Mesh], every: int = 1,
                 deadline_s: float = 300.0,
                 status: Optional["RunStatus"] = None):
        self.requested = False   # this process was asked to stop (SIGTERM)
        self.stopping = False    # the job agreed to stop after the current step
        self.every = max(int(every), 1)
        self.deadline_s = float(deadline_s)
        self.status = status or RunStatus()
        self._pending = None
        self._calls = 0
        self._reduce = None
        if jax.process_count() > 1 and mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec as P
            self._sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
            self._local_devices = sum(d.process_index == jax.process_index()
                                      for d in mesh.devices.flat)
            self._reduce = jax.jit(lambda flags: flags.max(),
                                   out_shardings=NamedSharding(mesh, P()))
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            self._give_up("a second SIGTERM")
            return
        self.requested = True
        log.info("SIGTERM received: the job saves a checkpoint at a step all processes "
                 "agree on, then exits")
        if self.deadline_s > 0:
            timer = threading.Timer(self.deadline_s, self._give_up,
                                    args=(f"no agreed stop within {self.deadline_s:g} s "
                                          "(config.multihost.preemption_deadline_s)",))
            timer.daemon = True
            timer.start()

    def _give_up(self, why: str) -> None:
        exit_now(f"{_who()}stopping now after {why}, without saving; {self.status.kept()}",
                 EXIT_SIGTERM)

    def should_stop(self) -> bool:
        """Whether every process stops after the step just dispatched (same answer on all)."""
        self._calls += 1
        if self._reduce is None:
            self.stopping = self.requested
        elif self._calls % self.every == 0:
            flags = np.full((self._local_devices,), int(self.requested), np.int32)
            new = self._reduce(jax.make_array_from_process_local_data(self._sharding, flags))
            previous, self._pending = self._pending, new
            self.stopping = (previous is not None
                             and bool(np.asarray(previous.addressable_data(0))))
        return self.stopping

    def close(self) -> None:
        """Give SIGTERM back to its previous handler; once a stop was agreed, a
        late SIGTERM (the notice reaching this host after the job decided to
        stop) is logged and ignored while the process finishes its exit."""
        if self.stopping:
            signal.signal(signal.SIGTERM, lambda *_: log.info(
                "SIGTERM received: the job is already stopping"))
        else:
            signal.signal(signal.SIGTERM, self._old)


# ---------------------------------------------------------------- failing together

def _who() -> str:
    return f"process {jax.process_index()}: " if jax.process_count() > 1 else ""


# Words of a failed cross-process collective or coordination call (gloo on CPU,
# NCCL on GPU, the coordination service): the peer is gone, not this process's fault.
_PEER_MARKS = ("gloo", "connection reset", "connection refused", "broken pipe",
               "socket closed", "connection closed", "nccl", "coordination", "heartbeat",
               "task died", "another task", "deadline_exceeded", "unavailable:", "barrier")


class PeerLostError(RuntimeError):
    """A collective or coordination call failed because another process is gone."""


def is_peer_failure(e: BaseException) -> bool:
    """Whether `e` (or an exception it was raised from) is a failed collective or
    coordination call: a lost peer. Only meaningful in a multi-process job."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, PeerLostError):
            return True
        if not isinstance(e, UserError):
            text = f"{type(e).__name__}: {e}".lower()
            if any(m in text for m in _PEER_MARKS):
                return True
        e = e.__cause__ or e.__context__
    return False


_FAILED_KEY = "mmjax/failed/"


def _ask_coordinator(fn: Callable[[Any], Any], seconds: float = 5.0) -> Any:
    """`fn(client)` on JAX's coordination client, or None if there is none, it
    fails or it takes longer than `seconds` (the coordinator may be the lost peer)."""
    from jax._src import distributed
    client = distributed.global_state.client
    if client is None:
        return None
    out: list = []

    def ask():
        with contextlib.suppress(Exception):
            out.append(fn(client))
    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(seconds)
    return out[0] if out else None


def lost_processes() -> list[int]:
    """Processes the coordination service no longer sees (best effort, <= 5 s)."""
    n = jax.process_count()
    live = _ask_coordinator(lambda c: c.get_live_nodes(list(range(n))))
    return sorted(set(range(n)) - set(live)) if live is not None else []


def _publish_failure(line: str) -> None:
    """Leave this process's one-line reason where the others look when their collective fails."""
    _ask_coordinator(lambda c: c.key_value_set(f"{_FAILED_KEY}{jax.process_index()}", line),
                     seconds=2.0)


def _peer_reports() -> dict[int, str]:
    """Reasons left by processes that stopped on their own error (`_publish_failure`)."""
    got = _ask_coordinator(lambda c: c.key_value_dir_get(_FAILED_KEY)) or []
    out = {}
    for key, value in got:
        with contextlib.suppress(ValueError):
            out[int(key.rsplit("/", 1)[-1])] = value
    return out


_ALIVE_KEY = "mmjax/alive/"
_DONE_KEY = "mmjax/done/"


class PeerWatch:
    """A peer that is gone while this process waits in a collective for it.

    A collective whose peer died does not always fail: gloo raises when an open
    connection closes, but a collective that still has to set up its connection
    (or a peer that hangs, or a host that vanished) waits, and JAX's own
    heartbeat ends the process only with a C++ abort after
    `heartbeat_timeout_s`. So every process bumps a counter in the
    coordination service's key-value store every `every_s` seconds (a
    background thread, so a long step or compile does not stop it), and
    watches the others' counters with its own clock: a peer whose counter has
    not moved for `timeout_s` (`config.multihost.peer_timeout_s`), and that did
    not say it finished (`done()`), is lost: one line, exit `EXIT_RERUN`. A
    peer that stopped on its own error (`fail_fast` leaves its reason in the
    store) ends the job at the next beat, quoting the reason. A coordination
    service that stops answering for `timeout_s` means process 0 (which runs
    it) is lost.
    """

    def __init__(self, status: "RunStatus", timeout_s: float, every_s: float = 2.0):
        self.status, self.timeout_s, self.every_s = status, float(timeout_s), every_s
        self._stop = threading.Event()
        self._thread = None
        if jax.process_count() > 1 and self.timeout_s > 0:
            self._thread = threading.Thread(target=self._run, name="mmjax-peer-watch",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        me, n = jax.process_index(), jax.process_count()
        beat, seen, heard = 0, {}, time.monotonic()
        last_move = {i: time.monotonic() for i in range(n) if i != me}
        while not self._stop.wait(self.every_s):
            beat += 1
            _ask_coordinator(lambda c: c.key_value_set(f"{_ALIVE_KEY}{me}", str(beat),
                                                       allow_overwrite=True), seconds=2.0)
            got = _ask_coordinator(lambda c: (c.key_value_dir_get(_ALIVE_KEY),
                                              c.key_value_dir_get(_DONE_KEY),
                                              c.key_value_dir_get(_FAILED_KEY)), seconds=2.0)
            now = time.monotonic()
            if self._stop.is_set():
                return
            if got is None:
                if now - heard > self.timeout_s:
                    self._lost([0], "the coordination service, run by process 0, has not "
                                    f"answered for {self.timeout_s:g} s")
                continue
            heard = now
            alive, done, failed = got
            failed = {int(k.rsplit("/", 1)[-1]): v for k, v in failed}
            failed.pop(me, None)
            if failed:  # a peer stopped on its own error: no need to wait for silence
                i, reason = sorted(failed.items())[0]
                self._exit(f"stopping {self.status.where()}: process {i} failed ({reason}); "
                           f"{self.status.kept()}")
            finished = {int(k.rsplit("/", 1)[-1]) for k, _ in done}
            for key, value in alive:
                i = int(key.rsplit("/", 1)[-1])
                if i in last_move and seen.get(i) != value:
                    seen[i], last_move[i] = value, now
            silent = [i for i, t in last_move.items()
                      if i not in finished and now - t > self.timeout_s]
            if silent:
                self._lost(silent, f"no sign of life for {self.timeout_s:g} s "
                                   "(config.multihost.peer_timeout_s)")

    def _lost(self, who: list[int], why: str) -> None:
        self._exit(f"lost process {', '.join(map(str, who))} {self.status.where()} ({why}); "
                   f"{self.status.kept()}")

    def _exit(self, line: str) -> None:
        if not self._stop.is_set():
            exit_now(f"{_who()}{line}", EXIT_RERUN)

    def done(self) -> None:
        """This process finished (trained to the end, or stopped and saved): the
        others must not take its silence for a loss. Stops the watch."""
        self._stop.set()
        if self._thread is not None:
            _ask_coordinator(lambda c: c.key_value_set(f"{_DONE_KEY}{jax.process_index()}",
                                                       "1", allow_overwrite=True), seconds=2.0)


class RunStatus:
    """What a failure line reports: the step reached and the last complete checkpoint."""

    def __init__(self):
        self.step: Optional[int] = None
        self.saving: Optional[int] = None  # the step whose checkpoint is being written
        self.last_checkpoint: Callable[[], Optional[int]] = lambda: None

    def where(self) -> str:
        if self.saving is not None:
            return f"while saving checkpoint {self.saving}"
        return f"at step {self.step}" if self.step is not None else "at start-up"

    def kept(self) -> str:
        try:
            last = self.last_checkpoint()
        except Exception:  # noqa: BLE001
            last = None
        return (f"the last complete checkpoint is step {last}; rerun the job to resume from it"
                if last is not None else "there is no complete checkpoint yet; rerun the job")


def fail_fast(e: BaseException, status: RunStatus) -> None:
    """In a multi-process job, end this process now with one line about `e`.

    Returns (so the caller re-raises) in a one-process run. A lost peer
    (`is_peer_failure`) exits `EXIT_RERUN`; this process's own error exits 2
    for a UserError (one line, as the command line prints it), 130 for Ctrl-C,
    else 1 with the traceback (a bug).
    """
    if jax.process_count() == 1 or isinstance(e, SystemExit):
        return
    if isinstance(e, KeyboardInterrupt):
        exit_now(f"{_who()}interrupted {status.where()}; {status.kept()}", 130)
    if is_peer_failure(e):
        reports = {i: r for i, r in _peer_reports().items() if i != jax.process_index()}
        if reports:
            i, reason = sorted(reports.items())[0]
            exit_now(f"{_who()}stopping {status.where()}: process {i} failed ({reason}); "
                     f"{status.kept()}", EXIT_RERUN)
        lost = lost_processes()
        whom = (f"lost process {', '.join(map(str, lost))}" if lost
                else "lost contact with another process of the job")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        exit_now(f"{_who()}{whom} {status.where()} ({first}); {status.kept()}", EXIT_RERUN)
    if isinstance(e, UserError) and not os.environ.get("MMJAX_DEBUG"):
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        _publish_failure(first[:500])
        exit_now(f"{_who()}{first} ({status.where()}; the other processes stop too)", 2)
    import traceback
    _flush()
    traceback.print_exception(e)
    _publish_failure(f"{type(e).__name__}: {e}".splitlines()[0][:500])
    exit_now(f"{_who()}stopped by the error above {status.where()}; {status.kept()}", 1)
