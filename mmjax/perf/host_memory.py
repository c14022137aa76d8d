"""Host memory reuse for steps that run on the CPU.

XLA's CPU runtime allocates each execution's temporary buffer (all of a train
step's activations: 0.85 GiB for the small CLIP of `benchmarks/cpu_train_step.py`)
with `malloc` from a worker thread and frees it when the step ends. glibc serves
an allocation that large from a thread's own arena with a fresh `mmap` every
time, so the kernel maps and zeroes every page again on every step: 217,000
page faults and 0.3-0.4 s of system time per step of that CLIP, a third of the
step. `reuse_host_memory` makes glibc keep such memory in the process and hand
it out again (one arena for all threads, no `mmap` for large blocks, no
trimming of the heap's top), so from the second step on the buffer is reused
without a single fault. Memory freed this way is kept by the process (its
resident size stays at its peak), which is what a training process wants.

It must run before JAX starts its thread pools (before `import jax` is best):
`mmjax train`, `eval`, `bench`, `generate`, `explain` and `curate` call it
first; a program that runs mmjax's steps itself can call it at its start.
`MMJAX_HOST_MALLOC=default` leaves glibc as it is. Other C libraries (musl,
macOS) are left alone.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8


@functools.cache
def reuse_host_memory() -> bool:
    """Keep freed host memory for reuse (glibc): one arena, no mmap'd blocks, no trim.

    Returns True when the settings were applied (now or by an earlier call),
    False on a non-glibc system or with `MMJAX_HOST_MALLOC=default`.
    """
    ok = False
    if (os.environ.get("MMJAX_HOST_MALLOC", "reuse") != "default"
            and sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = all(libc.mallopt(param, value) == 1 for param, value in (
                (_M_ARENA_MAX, 1),             # every thread allocates from the main heap,
                (_M_MMAP_MAX, 0),              # which grows by brk, never by mmap,
                (_M_TRIM_THRESHOLD, 2**31 - 1),  # and keeps what was freed at its top
                (_M_TOP_PAD, 64 << 20)))       # growing 64 MiB at a time
        except (OSError, AttributeError):
            ok = False
    return ok
