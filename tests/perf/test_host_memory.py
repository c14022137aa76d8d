"""`mmjax.perf.host_memory.reuse_host_memory`: XLA's per-execution temporary
buffer is reused instead of being mapped and zeroed by the kernel on every call.

Each case runs in a fresh process (the setting must precede JAX's threads): a
jitted function whose compiled temporary buffer is 96 MiB runs a few times, and
the process's minor page faults of each call are read from `getrusage`
(their median over 9 calls)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc only")

SCRIPT = r"""
import json, os, resource, sys
if sys.argv[1] == "reuse":
    from mmjax.perf.host_memory import reuse_host_memory
    assert reuse_host_memory()
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_platforms", "cpu")

@jax.jit
def f(x, w):
    h = jnp.tanh(x @ w)            # [2048, 4096] f32: 32 MiB, kept for the next two
    g = jnp.sin(h) @ w.T           # each a temporary of the compiled program
    return (jnp.cos(h) @ w.T + g).sum(), h.sum()

rng = np.random.RandomState(0)
x = jnp.asarray(rng.randn(2048, 1024).astype(np.float32) / 32)
w = jnp.asarray(rng.randn(1024, 4096).astype(np.float32) / 32)
temp = f.lower(x, w).compile().memory_analysis().temp_size_in_bytes
for _ in range(3):
    out = jax.block_until_ready(f(x, w))
per_call = []
for _ in range(9):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = jax.block_until_ready(f(x, w))
    per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
faults = sorted(per_call)[4]  # the median: the kernel itself may unmap a page now and then
print(json.dumps(dict(faults=faults, temp_pages=temp / os.sysconf("SC_PAGE_SIZE"),
                      out=[float(v) for v in out])))
"""


def _run(mode):
    env = dict(os.environ, MMJAX_HOST_MALLOC="reuse", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_step_buffers_are_reused_without_page_faults():
    plain, reuse = _run("plain"), _run("reuse")
    assert reuse["temp_pages"] * 4096 >= 64 << 20  # the program does hold a large temporary
    # glibc as shipped maps the temporary afresh on every call (fewer faults only where the
    # kernel backs it with huge pages); reused, not one page of it faults again
    assert reuse["faults"] < 0.02 * reuse["temp_pages"], (plain, reuse)
    assert reuse["faults"] <= plain["faults"], (plain, reuse)
    assert reuse["out"] == plain["out"]  # the same numbers, bit for bit


def test_default_leaves_glibc_alone():
    code = ("import os; os.environ['MMJAX_HOST_MALLOC'] = 'default'\n"
            "from mmjax.perf.host_memory import reuse_host_memory\n"
            "print(reuse_host_memory(), reuse_host_memory())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["False", "False"]


ENTRY = r"""
import os, sys
print("tunables", os.environ.get("GLIBC_TUNABLES"), os.getpid(), flush=True)
sys.argv = ["mmjax", "bench", "--help"]
if "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", ""):
    # the restarted process: a large block from glibc's malloc (not NumPy's allocator,
    # which asks for huge pages itself) is backed by huge pages
    import ctypes
    from mmjax.perf.host_memory import reuse_host_memory
    reuse_host_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    block = libc.malloc(ctypes.c_size_t(64 << 20))
    ctypes.memset(block, 7, 64 << 20)  # every page touched
    huge = sum(int(l.split()[1]) for l in open("/proc/self/smaps_rollup")
               if l.startswith("AnonHugePages"))
    print("huge_kib", huge, ctypes.string_at(block + (40 << 20), 1)[0], flush=True)
from mmjax.cli import main
main()
"""


@pytest.mark.skipif(__import__("mmjax.perf.host_memory", fromlist=["x"]).hugepage_environ({})
                    is None, reason="needs glibc >= 2.35 and transparent huge pages")
def test_cli_restarts_itself_once_with_heap_on_huge_pages():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
    env.update(MMJAX_HOST_MALLOC="reuse", JAX_PLATFORMS="cpu", GLIBC_TUNABLES="glibc.rtld.nns=4")
    proc = subprocess.run([sys.executable, "-c", ENTRY], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.split() for line in proc.stdout.splitlines()]
    runs = [line for line in lines if line[:1] == ["tunables"]]
    # started twice, same process id: first as given, then with the tunable appended
    assert [r[1] for r in runs] == ["glibc.rtld.nns=4", "glibc.rtld.nns=4:glibc.malloc.hugetlb=1"]
    assert runs[0][2] == runs[1][2]
    huge = [line for line in lines if line[:1] == ["huge_kib"]]
    assert int(huge[0][1]) >= 32 << 10, proc.stdout  # at least half the buffer in 2 MiB pages
    assert huge[0][2] == "7"
    assert "usage" in proc.stdout.lower()  # the command itself ran (its help)

    # without the restart the same block is on 4 KiB pages (the check above means something)
    code = ENTRY.replace('if "glibc.malloc.hugetlb=1" in', 'if True or').replace("main()", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert int(out[out.index("huge_kib") + 1]) < 8 << 10, out

    # opted out: one start, no tunable added
    env["MMJAX_HOST_MALLOC"] = "no-hugepages"
    out = subprocess.run([sys.executable, "-c", ENTRY], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert [line.split()[1] for line in out.splitlines() if line.startswith("tunables")] \
        == ["glibc.rtld.nns=4"]


def test_unknown_host_malloc_mode_is_named():
    code = ("import os; os.environ['MMJAX_HOST_MALLOC'] = 'huge'\n"
            "from mmjax.perf.host_memory import reuse_host_memory\nreuse_host_memory()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "MMJAX_HOST_MALLOC='huge'" in proc.stderr
    # the command line says it in one line, before anything starts
    env = dict(os.environ, MMJAX_HOST_MALLOC="huge")
    proc = subprocess.run([sys.executable, "-m", "mmjax.cli", "train", "--workdir", "/nonexistent"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("mmjax: error: MMJAX_HOST_MALLOC='huge'"), proc.stderr
    assert "Traceback" not in proc.stderr
