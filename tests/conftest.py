"""Test-session setup: 8 simulated CPU devices, set before jax starts, and one
persistent XLA compilation cache for the session.

Single-device computations run on device 0; sharding tests build meshes over
all 8. Multi-process tests start their own subprocesses.

CPU programs compile at XLA's lowest optimization level
(`jax_disable_most_optimizations`): the suite is compile-bound (tiny models, a
few steps each), and this compiles them about a third faster. Tests about what
the compiler produces (HLO, memory figures, TPU compiles) and the few whose time
goes to running, not compiling (a 150-step training run), compile at full
optimization (`FULL_OPTIMIZATION`); `MMJAX_TEST_FULL_XLA=1` runs every test so.

Many tests run the same small job (`mmjax train --config clip_tiny:tiny`, in
this process or in `mmjax` subprocesses that inherit the environment): the
cache lets each compiled program be built once per session. pytest-xdist
workers (the README's `-n 2`) inherit it from the main process, which removes
it at the end. It starts empty in a fresh directory, so no result depends on an
earlier session; a compile whose result is read back is the same executable
(the cache key is the program, the compile options and the jaxlib/XLA version).
"""
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

FULL_OPTIMIZATION = {"test_tpu_compile", "test_bench", "test_linear", "test_losses_sharded",
                     "test_xla_shard_swap", "test_eval_runner"}
_FAST_COMPILE = os.environ.get("MMJAX_TEST_FULL_XLA", "") in ("", "0")
if _FAST_COMPILE:  # read at `import jax`, here and in the `mmjax` subprocesses of tests
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"

_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="mmjax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture(autouse=True, scope="module")
def _xla_optimization(request):
    """Full XLA optimization for the modules of `FULL_OPTIMIZATION` (module-scoped,
    so it also covers their module-scoped fixtures, which run before any test)."""
    if not _FAST_COMPILE or request.module.__name__.rsplit(".", 1)[-1] not in FULL_OPTIMIZATION:
        yield
        return
    import jax
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(autouse=True)
def _mmjax_logger():
    """Every test starts and ends with the "mmjax" logger as at start-up (no
    handler, records propagate to the root logger, where pytest's `caplog`
    listens): `train()` gives it a stdout handler and stops propagation
    (`setup_logging`), which would otherwise hide the records of tests that run
    after it in the same process, an order pytest-xdist changes."""
    import logging
    log = logging.getLogger("mmjax")

    def reset():
        log.handlers.clear()
        log.propagate = True
        log.setLevel(logging.NOTSET)
    reset()
    yield
    reset()


def pytest_unconfigure(config):
    if _CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """`tiny_run(recipe) -> (workdir, result)`: `mmjax.train.loop.train` of
    `recipe:tiny` (a configs/ file path), run once per session and shared by the
    tests that only read its workdir (metrics, checkpoints, stage-1 sources)."""
    runs = {}

    def run(recipe):
        key = os.path.realpath(recipe)
        if key not in runs:
            from mmjax.config.loading import load_config
            from mmjax.train.loop import train
            workdir = tmp_path_factory.mktemp(os.path.basename(key)[:-3])
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("MMJAX_CACHE", str(tmp_path_factory.getbasetemp() / "mmjax_cache"))
                runs[key] = (workdir, train(load_config(f"{key}:tiny"), str(workdir)))
        return runs[key]

    return run
