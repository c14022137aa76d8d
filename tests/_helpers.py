"""Test helpers shared by the test modules (plain functions and constants; the
shared fixtures are in conftest.py). Import as `from _helpers import ...`:
tests/ is on `sys.path` in pytest (conftest.py's folder) and on the
PYTHONPATH of the test files that run as child processes (`_local`)."""
import contextlib
import glob
import logging
import os

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)  # the repository root
# The recipes (configs/*.py) and their names, for parametrized tests.
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
CONFIG_IDS = [os.path.basename(c)[:-3] for c in CONFIGS]


def checkpoint_steps(workdir) -> list[int]:
    """The steps of the checkpoints in `workdir` (sorted; [] before the first)."""
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def mesh_trainer(config, mesh_shape=(1, 1, 1), devices=None):
    """`mmjax.train.step.build_trainer` on a (data, fsdp, tensor) = `mesh_shape`
    mesh of the first prod(mesh_shape) of `devices` (default: `jax.devices()`),
    whatever `config.mesh` says (`config` itself is left as it is)."""
    import math

    import jax
    from mmjax.train.sharding import MESH_AXES
    from mmjax.train.step import build_trainer
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.mesh.update(dict(zip(MESH_AXES, mesh_shape)))
    devices = list(jax.devices() if devices is None else devices)
    return build_trainer(config, devices[:math.prod(mesh_shape)])


def process_alive(pid: int) -> bool:
    """The process exists and is not a zombie (dead, waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def cli_error_line(args, capsys) -> str:
    """`mmjax.cli.main(args)` exits 2 with one line on stderr: that line."""
    from mmjax import cli
    capsys.readouterr()
    code = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


@contextlib.contextmanager
def mmjax_log(level=logging.NOTSET, logger_level=None):
    """The records (`logging.LogRecord`) of `level` or above logged to the "mmjax"
    loggers while inside, from a handler on the "mmjax" logger itself: `train()`
    stops its propagation to the root logger, where `caplog` listens.
    `logger_level`: the "mmjax" logger's level meanwhile (default: as it is)."""
    records = []
    handler = logging.Handler(level)
    handler.emit = records.append
    logger = logging.getLogger("mmjax")
    old_level = logger.level
    logger.addHandler(handler)
    if logger_level is not None:
        logger.setLevel(logger_level)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        if logger_level is not None:
            logger.setLevel(old_level)
