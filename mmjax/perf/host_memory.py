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

Huge pages. A step's buffers are far larger than the processor's TLB covers in
4 KiB pages; backed by 2 MiB transparent huge pages the same step runs faster
(the CLIP of `benchmarks/cpu_train_step.py` 10-15%, the default job 5%;
BENCHMARKS.md, "Host memory"). glibc (>= 2.35) asks the kernel for them
on its heap only when the tunable `glibc.malloc.hugetlb=1` is in the environment
when the process starts, so `mmjax train` / `eval` / `bench` / `generate` /
`explain` / `curate` start themselves once more with it (`restart_with_hugepages`,
the same process id and arguments) where the kernel offers transparent huge
pages (`/sys/kernel/mm/transparent_hugepage/enabled` not `never`).
`MMJAX_HOST_MALLOC=no-hugepages` keeps the reuse without them; a
`glibc.malloc.hugetlb` already in `GLIBC_TUNABLES` is left as it is.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
HUGEPAGES = "glibc.malloc.hugetlb=1"  # glibc >= 2.35: madvise(MADV_HUGEPAGE) what malloc maps
MODES = ("reuse", "no-hugepages", "default")  # MMJAX_HOST_MALLOC


def _mode(environ: dict | None = None) -> str:
    """`MMJAX_HOST_MALLOC` of `environ` (default `os.environ`); unset is "reuse"."""
    mode = (os.environ if environ is None else environ).get("MMJAX_HOST_MALLOC", "reuse")
    if mode not in MODES:
        raise ValueError(f"MMJAX_HOST_MALLOC={mode!r}; choose one of {MODES} (unset = reuse)")
    return mode


def _glibc() -> tuple[int, ...] | None:
    name, ver = platform.libc_ver()
    if not sys.platform.startswith("linux") or name != "glibc":
        return None
    try:
        return tuple(int(v) for v in ver.split(".")[:2])
    except ValueError:
        return None


def transparent_hugepages() -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or
    None where it has none (not Linux, no THP support)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


@functools.cache
def reuse_host_memory() -> bool:
    """Keep freed host memory for reuse (glibc): one arena, no mmap'd blocks, no trim.

    Returns True when the settings were applied (now or by an earlier call),
    False on a non-glibc system or with `MMJAX_HOST_MALLOC=default`.
    """
    ok = False
    if _mode() != "default" and _glibc() is not None:
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


def hugepage_environ(environ: dict | None = None) -> dict | None:
    """`environ` (default `os.environ`) with `glibc.malloc.hugetlb=1` added to
    `GLIBC_TUNABLES`, or None where a process started with it would gain nothing:
    not glibc >= 2.35, no transparent huge pages in the kernel, `MMJAX_HOST_MALLOC`
    other than `reuse`, or `glibc.malloc.hugetlb` already set. An unknown
    `MMJAX_HOST_MALLOC` raises ValueError naming it."""
    env = dict(os.environ if environ is None else environ)
    if _mode(env) != "reuse":
        return None
    if (_glibc() or (0,)) < (2, 35) or transparent_hugepages() not in ("always", "madvise"):
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in tunables:
        return None
    env["GLIBC_TUNABLES"] = f"{tunables}:{HUGEPAGES}" if tunables else HUGEPAGES
    return env


def restart_with_hugepages() -> None:
    """Start this process again, with the same interpreter, arguments and process id
    (`os.execve`), with glibc's heap on transparent huge pages (`hugepage_environ`).

    Only for a program's entry point before it has done anything (mmjax's CLI
    calls it first); returns without a change where `hugepage_environ` gives None,
    the original command line is unknown, or the exec fails. The started process
    sees `glibc.malloc.hugetlb` in its environment and does not restart again;
    processes it starts (data workers) inherit the setting."""
    env = hugepage_environ()
    argv = list(getattr(sys, "orig_argv", None) or [])
    if env is None or not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        return
