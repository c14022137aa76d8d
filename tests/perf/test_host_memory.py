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
