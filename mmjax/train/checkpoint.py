"""Checkpoints: orbax train state (async) + per-process data iterator state.

Layout of `workdir/`:
  config.json                 the run's config (checked on resume)
  checkpoints/<step>/state    orbax PyTree (params, opt_state, step, rng); frozen
                              parameters loaded from `config.init` sources are left out
  checkpoints/<step>/data     JSON: one data-iterator state per process, and the
                              `frozen_sources` those parameters come from
Orbax writes each step into a temporary folder (`<step>.orbax-checkpoint-tmp*`)
and renames it when complete, so an interrupted save is never listed; resume
picks the latest complete step. A save that fails (disk full, quota, a
vanished mount) stops the run with one CheckpointError line saying which step,
where, why and how much space is free; the temporary folder is removed and the
previous complete checkpoint is left as it was. A training run also removes
temporary folders left by a process killed while saving (`remove_partial`).
Restoring takes the target shardings of the current mesh, so a run can
resume on a different mesh.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import re
import shutil
import sys
import time
import traceback
import warnings
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mmjax import workdir as wd
from mmjax.errors import UserError

log = logging.getLogger("mmjax")


class CheckpointError(UserError, RuntimeError):
    pass


TMP_MARK = ".orbax-checkpoint-tmp"


def _quiet_orbax_failures() -> None:
    """Keep orbax's echoes of one failed save off stderr (installed once per process).

    When a background write fails, orbax logs the same exception with its
    traceback from every thread that waits on it, asyncio reports the write
    tasks it never collected, and tensorstore callbacks arriving after orbax
    closed its event loop print "Event loop is closed" tracebacks (hundreds
    for a large state). The failure itself reaches `Checkpointer` as an
    exception and is reported once, as a CheckpointError. MMJAX_DEBUG=1 keeps
    all of it.
    """
    if os.environ.get("MMJAX_DEBUG") or getattr(_quiet_orbax_failures, "done", False):
        return
    _quiet_orbax_failures.done = True

    def orbax_error(record: logging.LogRecord) -> bool:
        return (record.levelno < logging.ERROR
                or f"{os.sep}orbax{os.sep}" not in (record.pathname or ""))

    def orbax_task(record: logging.LogRecord) -> bool:
        # asyncio's "Future exception was never retrieved" names orbax only in the
        # traceback of the exception it carries.
        if record.levelno < logging.ERROR:
            return True
        if "orbax" in record.getMessage():
            return False
        tb = record.exc_info[2] if record.exc_info else None
        return not any(f"{os.sep}orbax{os.sep}" in frame.filename
                       for frame in traceback.extract_tb(tb))

    logging.getLogger("absl").addFilter(orbax_error)
    logging.getLogger("asyncio").addFilter(orbax_task)
    previous = sys.unraisablehook

    def unraisable(args):
        if isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == \
                "Event loop is closed":
            return
        previous(args)

    sys.unraisablehook = unraisable


def _reason(e: BaseException) -> str:
    """'no space left on device' style reason of a failed write, else its first line."""
    code = e.errno if isinstance(e, OSError) and e.errno else None
    text = str(e)
    if code is None:
        m = re.search(r"os_error_code='?(\d+)", text)
        code = int(m.group(1)) if m else None
    if code is None and "No space left on device" in text:
        code = errno.ENOSPC
    if code is not None:
        return os.strerror(code).lower()
    first = (text.strip().splitlines() or [type(e).__name__])[0]
    return first if len(first) <= 300 else first[:300] + "..."


def _megabytes(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB" if n < 2 ** 30 else f"{n / 2 ** 30:.1f} GiB"


# Replica-parallel saving (each replica of a replicated array writes a slice of
# it) costs one compiled slice program per array shape; below this many bytes
# per replica the split saves less write time than it costs.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


@functools.lru_cache(maxsize=None)  # once per process
def _register_array_handler() -> None:
    """jax.Array saving: replica-parallel only for slices of 1 MiB or more.

    Orbax splits every replicated array over its replicas by default, which
    compiles a slice program per array shape at the first save of a run (96
    programs, ~3 s on a 2-core CPU, for the tiny CLIP; several seconds more for
    larger trees of small leaves). Large arrays of pod runs are still split.
    Registered in orbax's default type-handler registry (the one
    `StandardSave` uses); the handler is orbax's own with this one option set.
    """
    absl_log = logging.getLogger("absl")  # orbax warns about every override
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(
                min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES), override=True)
    finally:
        absl_log.setLevel(level)


class Checkpointer:
    """Save / restore `(state, data_states)` under `workdir/checkpoints`."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = wd.join(wd.resolve(workdir), "checkpoints")
        _quiet_orbax_failures()
        _register_array_handler()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save),
            item_names=("state", "data"))
        self._pending: Optional[int] = None  # step of the save in flight
        self._failed: Optional[Exception] = None

    def partial(self) -> list[str]:
        """Temporary folders of unfinished saves (local workdirs only)."""
        if wd.is_remote(self.directory) or not os.path.isdir(self.directory):
            return []
        return sorted(os.path.join(self.directory, n) for n in os.listdir(self.directory)
                      if TMP_MARK in n)

    def remove_partial(self) -> list[str]:
        """Delete the temporary folders of unfinished saves; returns them.

        Only for the process that owns the workdir (the training run holding
        its lock, process 0): a reader such as `mmjax eval` must not touch
        the save a live run is writing.
        """
        removed = self.partial()
        if not removed:
            return []
        # After a failed save, orbax's other writes may still land and recreate the
        # folder: remove until it has stayed gone for a moment (a few seconds at most).
        for _ in range(25):
            for path in self.partial():
                shutil.rmtree(path, ignore_errors=True)
            time.sleep(0.2)
            if not self.partial():
                break
        return removed

    def _failure(self, step: Optional[int], e: BaseException) -> CheckpointError:
        """One-line CheckpointError for a failed save; removes its temporary folder."""
        if self._failed is not None:
            return self._failed
        step = self._pending if self._pending is not None else step
        from mmjax.train.multihost import PeerLostError, is_peer_failure
        if jax.process_count() > 1 and is_peer_failure(e):
            # Not the storage: a peer died during the save's collectives / barriers.
            self._failed = PeerLostError(f"checkpoint {step} was not completed: another "
                                         f"process of the job is gone ({_reason(e)})")
            return self._failed
        # The failed save leaves orbax's other write coroutines unawaited; Python would
        # report each at exit ("coroutine ... was never awaited") under the one-line error.
        if not os.environ.get("MMJAX_DEBUG"):
            warnings.filterwarnings("ignore", category=RuntimeWarning,
                                    message=r"coroutine '.*' was never awaited")
        removed = self.remove_partial() if jax.process_index() == 0 else []
        free = ""
        if not wd.is_remote(self.directory):
            try:
                free = f", {_megabytes(shutil.disk_usage(self.directory).free)} free there"
            except OSError:
                pass
        try:
            self.manager.reload()
            last = self.manager.latest_step()
        except Exception:  # noqa: BLE001 - the message must not fail in turn
            last = None
        kept = (f"the last complete checkpoint is step {last} (rerun to resume from it)"
                if last is not None else "there is no complete checkpoint yet")
        gone = "; its partial folder was removed" if removed else ""
        self._failed = CheckpointError(
            f"could not write checkpoint {step} in {self.directory}: {_reason(e)}{free}"
            f"{gone}; {kept}")
        return self._failed

    def last_complete_step(self) -> Optional[int]:
        """The newest complete checkpoint, read from the folder itself (no orbax
        call, no collective: safe in a failure report after a peer is lost)."""
        try:
            if wd.is_remote(self.directory):
                return self.manager.latest_step()
            names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
        except Exception:  # noqa: BLE001 - a report must not fail
            return None
        steps = [int(n) for n in names if n.isdigit()]
        return max(steps) if steps else None

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, data_state: Optional[dict], force: bool = False,
             frozen_sources: Optional[dict] = None) -> bool:
        """Start saving `state` at `step` (async). Every process calls this.

        `data_state` is this process's iterator state; the states of all
        processes are gathered so each one can restore its own.
        `frozen_sources` (prefix -> `config.init` source) records where the
        parameters left out of `state` come from.
        """
        if self._pending is not None:
            self.wait()  # a failure of the previous save names that step, not this one
        payload = {"process_count": jax.process_count(), "frozen_sources": frozen_sources or {}}
        if jax.process_count() > 1:
            import json
            blob = json.dumps(data_state).encode()
            lengths = multihost_utils.process_allgather(np.array([len(blob)], np.int64))
            size = int(np.max(lengths))
            padded = np.zeros(size, np.uint8)
            padded[:len(blob)] = np.frombuffer(blob, np.uint8)
            gathered = multihost_utils.process_allgather(padded)
            payload["processes"] = [json.loads(bytes(gathered[i][:int(lengths[i][0])]).decode())
                                    for i in range(jax.process_count())]
        else:
            payload["processes"] = [data_state]
        try:
            started = self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(payload)),
                force=force)
        except Exception as e:  # noqa: BLE001 - this or the previous (async) save failed
            raise self._failure(step, e) from e
        if started:
            self._pending = step
        return started

    def resolve_step(self, step: Optional[int]) -> int:
        """`step`, or the latest one when None; CheckpointError when absent."""
        steps = self.all_steps()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint in {self.directory}")
        elif step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                  f"available steps: {steps or 'none'}")
        return step

    def restore_params_to_host(self, step: Optional[int]) -> tuple[dict, int]:
        """`(params as numpy, step)`: only the parameters, on the host, whatever
        mesh wrote them (used to start another run from this one)."""
        step = self.resolve_step(step)
        reader = ocp.CheckpointManager(self.directory, item_names=("state", "data"), item_handlers={
            "state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})
        try:
            meta = reader.item_metadata(step)["state"]
            meta = getattr(meta, "tree", meta)
            cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
            target = {"params": jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), meta["params"])}
            restored = reader.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True)))
        finally:
            reader.close()
        return jax.tree.map(np.asarray, restored["state"]["params"]), step

    def restore(self, step: Optional[int], abstract_state: Any,
                reset_stream: bool = False) -> tuple[dict, Optional[dict], int]:
        """`(state, this process's data state, step)`; `step=None` = latest.

        Each process's data position is its own share of the stream, so a job
        with another process count cannot continue it exactly: that is a
        StreamMismatchError naming the key, unless `reset_stream`
        (`config.data.train.reset_stream_on_resume`), which gives no data
        state (the stream starts fresh from its seed).
        """
        step = self.resolve_step(step)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        data = restored["data"]
        data_state = None
        if data and data.get("process_count") == jax.process_count():
            data_state = data["processes"][jax.process_index()]
        elif data and not reset_stream:
            from mmjax.data.resume import StreamMismatchError
            raise StreamMismatchError(
                f"checkpoint {step} in {self.directory} was written by a job of "
                f"{data.get('process_count')} processes, this one has {jax.process_count()}: "
                "each process's data position is its own share of the stream, so it cannot "
                "be continued exactly. Rerun with the original process count, or set "
                "config.data.train.reset_stream_on_resume=True to keep the train state and "
                "start a fresh data stream (it replays data from the seed).")
        return restored["state"], data_state, step

    def wait(self) -> None:
        """Wait for the save in flight; CheckpointError (one line) if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._failure(None, e) from e
        self._pending = None

    def close(self) -> None:
        """Finish the save in flight and release orbax. A failure already
        reported by `save`/`wait` is not raised again."""
        try:
            if self._failed is None:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001
                if self._failed is None:
                    raise
            if self._failed is not None and jax.process_index() == 0:
                self.remove_partial()  # anything written after the failure was reported
