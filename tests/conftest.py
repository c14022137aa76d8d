"""Test-session setup and the fixtures shared by the test modules.

Layout: the tests of `mmjax/<folder>/<module>.py` are in `tests/<folder>/`
(`mmjax/models/ops/` -> `tests/models/ops/`), in `test_<module>.py` or, for a
part of it, `test_<module>_<part>.py` (`mmjax/data/tario.py` ->
`tests/data/test_tario.py`; `mmjax/train/step.py` -> `tests/train/test_step.py`,
`test_step_state.py`, `test_step_multihost.py`); a file that exercises several
modules sits with the one it mainly tests. The launch scripts' tests are in
`tests/launch/`; the top-level modules' (`mmjax/registry.py`) and the package
layout's (`test_layout.py`) in `tests/` itself. There are no `__init__.py`
files: every test file's basename is unique across the tree.

Shared code: fixtures here (`mmjax_cache`, `mmjax_cache_dir`, `subprocess_env`,
`tiny_run`); plain helpers in `_helpers.py` (repository paths, the recipes,
`mesh_trainer`, `checkpoint_steps`, ...), webdataset shards in `_shards.py`,
multi-process runs in `_local.py`, imported as `from _helpers import ...`
(pytest puts tests/, this file's folder, on `sys.path`).

Session setup: 8 simulated CPU devices, set before jax starts, one
persistent XLA compilation cache for the session, and an offline Hugging Face
hub cache holding small tokenizers in the layouts of those the recipes name
(`clip`, `siglip`, `bert-base-uncased`, RoBERTa's, Vicuna's; `_hub.py`), so `recipe:tiny`
runs with its recipe's tokenizer and nothing is downloaded.

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

from _helpers import ROOT

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

FULL_OPTIMIZATION = {"test_tpu_compile", "test_bench", "test_matmul", "test_losses_sharded",
                     "test_xla_shard_swap", "test_eval"}
_FAST_COMPILE = os.environ.get("MMJAX_TEST_FULL_XLA", "") in ("", "0")
if _FAST_COMPILE:  # read at `import jax`, here and in the `mmjax` subprocesses of tests
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"

_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="mmjax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture(autouse=True, scope="session")
def _recipe_hub_cache(tmp_path_factory):
    """`HF_HUB_CACHE` (inherited by subprocesses) -> the session's offline hub cache of
    the recipes' tokenizers (`_hub.recipe_hub_cache`), downloads off."""
    from _hub import recipe_hub_cache
    os.environ["HF_HUB_CACHE"] = recipe_hub_cache(tmp_path_factory.mktemp("hf"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield


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
def mmjax_cache_dir(tmp_path_factory) -> str:
    """The session's cache of built-in shards (a `MMJAX_CACHE` folder; one per
    pytest-xdist worker): the tests that train on the built-in data share it,
    so each set is written once."""
    return str(tmp_path_factory.getbasetemp() / "mmjax_cache")


@pytest.fixture
def mmjax_cache(mmjax_cache_dir, monkeypatch) -> str:
    """`MMJAX_CACHE` set to `mmjax_cache_dir` for the test (for a whole module:
    `pytestmark = pytest.mark.usefixtures("mmjax_cache")`); returns the folder."""
    monkeypatch.setenv("MMJAX_CACHE", mmjax_cache_dir)
    return mmjax_cache_dir


@pytest.fixture
def subprocess_env(mmjax_cache) -> dict:
    """Environment of an `mmjax` child process (`python -m mmjax.cli ...`): this
    checkout on PYTHONPATH, the session's built-in shard cache, CPU only, and
    no XLA_FLAGS (one CPU device, not the 8 simulated ones of this process)."""
    return {**os.environ, "PYTHONPATH": ROOT, "MMJAX_CACHE": mmjax_cache, "XLA_FLAGS": "",
            "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, mmjax_cache_dir):
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
                mp.setenv("MMJAX_CACHE", mmjax_cache_dir)
                runs[key] = (workdir, train(load_config(f"{key}:tiny"), str(workdir)))
        return runs[key]

    return run
