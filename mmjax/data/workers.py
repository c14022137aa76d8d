"""Loader workers: one worker's pipeline, and the processes that run them.

``WorkerPipeline`` is stream -> shuffle buffer -> decode -> batch for one
worker; it runs in a worker process (``worker_main``, started by
``WorkerProcesses``) or in the training process when ``data.train.workers=0``.
Worker processes end by themselves when the process that started them dies
(``exit_with_parent``).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import traceback

from mmjax.data.assign import ShardStream, seeded
from mmjax.data.bad import BadSample
from mmjax.data.counters import Counters, DataError
from mmjax.data.samples import SampleParser, make_tokenizer, stack_rows


class WorkerPipeline:
    """One worker's whole pipeline: stream -> shuffle buffer -> decode -> batch.

    Runs inside a worker process, or in the main process when workers=0.
    ``state``: a ``state()`` to continue from (None: the start).
    """

    def __init__(self, options, worker: int, state: dict | None = None):
        self.o, self.worker = options, worker
        self.counters = Counters(options, state)
        parser = SampleParser(options, self.counters, make_tokenizer(options))
        self.stream = ShardStream(options, worker, self.counters, parser)
        self.buffer: list = []
        self.draws = 0
        if state is not None:
            self.stream.set_position(state)
            self.draws = state["draws"]
            self.buffer = self.stream.read_refs(state["buffer"])

    def state(self) -> dict:
        """JSON-serializable state of this worker: stream position, shuffle
        RNG counter ``draws``, the buffer as ``[pass, shard, index]``
        references, ``stats`` (counts by reason) and ``seen``."""
        return {**self.stream.position(), "draws": self.draws,
                "buffer": [[p, s, i] for p, s, i, *_ in self.buffer],
                "stats": dict(self.counters.counts), "seen": self.counters.seen}

    def _next_raw(self):
        size = self.o.shuffle_buffer
        if size <= 1:
            return self.stream.next()
        while len(self.buffer) < size:
            item = self.stream.next()
            if item is None:
                break
            self.buffer.append(item)
        if not self.buffer:
            return None
        j = int(seeded(self.o.seed, 11, self.o.process_index, self.worker,
                       self.draws).integers(len(self.buffer)))
        self.draws += 1
        item, self.buffer[j] = self.buffer[j], self.buffer[-1]
        self.buffer.pop()
        return item

    def next_sample(self):
        """Next decoded sample ``(media array, tokens [L], label, group)``, e.g. an
        image uint8 ``[S, S, 3]``; None at the end (eval)."""
        o = self.o
        while True:
            raw = self._next_raw()
            if raw is None:
                return None
            pass_id, shard, index, (ext, data), tokens, label, group = raw
            rng = seeded(o.seed, pass_id, shard, index)
            try:
                array = o.media.decode(data, ext, rng, o)
            except BadSample as e:
                self.counters.bad(e.reason, o.paths[shard], f"sample {index}: {e}")
                continue
            self.counters.counts["ok"] += 1
            return array, tokens, label, group

    def next_batch(self, batch_size: int):
        """A dict of numpy arrays with up to ``batch_size`` rows (see
        ``samples.stack_rows``), or None at the end (eval). Training batches
        are always full."""
        rows = []
        while len(rows) < batch_size:
            sample = self.next_sample()
            if sample is None:
                break
            rows.append(sample)
        if not rows:
            return None
        return stack_rows(rows, self.o)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent(parent_pid: int | None, period: float = 0.25):
    """Makes this worker process end when the process that started it dies
    (e.g. a SIGKILLed trainer), instead of blocking on a queue nobody reads.

    Linux: the kernel sends SIGKILL on the parent's death (``PR_SET_PDEATHSIG``;
    strictly, on the exit of the parent's thread that started the worker: the
    iterator starts its workers from the thread that iterates). Everywhere, as
    well: a daemon thread that exits the process within ``period`` seconds once
    the parent is gone (``os.getppid()`` changed, or multiprocessing's parent
    sentinel closed). ``parent_pid``: the trainer's pid when it is this
    process's parent (spawn, fork), to catch a parent that died before the
    watch began; None under forkserver, whose server process is the parent
    (it exits when the trainer does). With the workers gone, multiprocessing's
    resource tracker (started for the queues' semaphores) sees its pipe close
    and exits too.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watch below still applies
    watched = os.getppid()
    parent = mp.parent_process()

    def parent_gone() -> bool:
        return os.getppid() != watched or (parent is not None and not parent.is_alive())

    if (parent_pid is not None and watched != parent_pid) or parent_gone():
        os._exit(1)  # the parent died before the death signal was armed

    def watch():
        while not parent_gone():
            time.sleep(period)
        os._exit(1)

    threading.Thread(target=watch, name="mmjax-data-parent-watch", daemon=True).start()


def worker_main(options, worker, state, batch_size, out_q, stop, parent_pid=None):
    """Worker process loop: put ("batch", batch, state) until told to stop.
    Ends by itself when its parent process dies (``exit_with_parent``)."""
    try:
        exit_with_parent(parent_pid)
        pipe = WorkerPipeline(options, worker, state)
        while not stop.is_set():
            batch = pipe.next_batch(batch_size)
            item = ("end", None, pipe.state()) if batch is None else ("batch", batch, pipe.state())
            while not stop.is_set():
                try:
                    out_q.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue
            if batch is None:
                return
    except BaseException as e:  # report everything to the main process
        msg = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        try:
            out_q.put(("error", msg, None), timeout=5)
        except Exception:
            pass


class WorkerProcesses:
    """``options.num_workers`` processes running ``worker_main``, each with
    its own queue of up to ``options.prefetch`` batches of ``batch_size`` rows.

    ``states``: per worker, a ``WorkerPipeline.state()`` to continue from, or None.
    """

    def __init__(self, options, states: list, batch_size: int):
        ctx = mp.get_context(options.start_method)
        parent = os.getpid() if ctx.get_start_method() != "forkserver" else None
        self._stop = ctx.Event()
        self._procs: list = []
        self._queues: list = []
        try:
            for w in range(options.num_workers):
                q = ctx.Queue(maxsize=max(1, options.prefetch))
                self._queues.append(q)
                p = ctx.Process(target=worker_main, name=f"mmjax-data-{w}", daemon=True,
                                args=(options, w, states[w], batch_size, q, self._stop, parent))
                p.start()
                self._procs.append(p)
        except BaseException:
            self.close()  # the ones already started
            raise

    def get(self, w: int):
        """``(kind, batch, state)`` from worker ``w``: kind "batch", "end" or
        "error" (then ``batch`` is the worker's traceback)."""
        while True:
            try:
                return self._queues[w].get(timeout=1.0)
            except queue.Empty:
                if not self._procs[w].is_alive():
                    try:
                        return self._queues[w].get(timeout=1.0)
                    except queue.Empty:
                        raise DataError(f"data worker {w} exited unexpectedly "
                                        f"(exit code {self._procs[w].exitcode})") from None

    def close(self):
        """Stops the processes (safe to call twice)."""
        if self._stop is not None:
            self._stop.set()
        for q in self._queues:
            try:
                while True:
                    q.get_nowait()
            except (queue.Empty, OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=2)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2)
        for q in self._queues:
            q.close()
            q.cancel_join_thread()
        self._procs, self._queues, self._stop = [], [], None
