"""`mmjax bench`: time the train step of a recipe (or, with `--aot`, compile it
and report per-device memory). The measuring is `mmjax.perf.bench`."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import jax

from mmjax.commands.util import error_text, fail, split_overrides, user_errors
from mmjax.config import load_config
from mmjax.config.schema import check_model
from mmjax.errors import UserError
from mmjax.perf.bench import (aot_memory_report, aot_table, format_bench, mesh_overrides,
                              run_bench)

_CHILD_ENV = "MMJAX_BENCH_AOT_CHILD"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmjax bench", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="clip_tiny", help="recipe file (configs/X.py[:arg]) or name")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s per device for MFU (default: device table)")
    p.add_argument("--no-pipeline", action="store_true", help="skip the input-pipeline timing")
    p.add_argument("--aot", action="store_true",
                   help="only compile and report per-device memory (nothing is allocated)")
    p.add_argument("--devices", type=int, default=None,
                   help="--aot: devices to compile for (simulated CPU devices if fewer exist)")
    p.add_argument("--mesh", default=None, help="--aot: e.g. data=8,fsdp=8,tensor=1")
    p.add_argument("--batch", type=int, default=None, help="global batch (config.batch_size)")
    return p


def _aot_command(args, overrides: list[str], argv: list[str]) -> int:
    wanted = args.devices
    if wanted is not None and wanted < 1:
        raise UserError(f"--devices must be >= 1, got {wanted}.")
    if wanted is not None and jax.device_count() < wanted:
        if os.environ.get(_CHILD_ENV):
            raise UserError(f"--devices {wanted}: only {jax.device_count()} devices exist even "
                            f"with simulated CPU devices; unset XLA_FLAGS and JAX_PLATFORMS.")
        # The device count is fixed when jax starts: run again with N CPU devices.
        env = dict(os.environ, JAX_PLATFORMS="cpu", **{_CHILD_ENV: "1"})
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={wanted}"])
        return subprocess.run([sys.executable, "-m", "mmjax.cli", "bench", *argv], env=env,
                              check=False).returncode
    config = load_config(args.config, overrides + mesh_overrides(args.mesh, args.batch))
    check_model(config)
    devices = jax.devices()[:wanted] if wanted else None
    report = aot_memory_report(config, devices)
    print(f"AOT compile of the train step on {report['devices']} {jax.devices()[0].platform} "
          "devices (per-device bytes from compiled.memory_analysis())\n")
    print(aot_table([report], [args.config]))
    return 0


def bench_command(argv: list[str]) -> int:
    """Runs `mmjax bench` with `argv` (without the subcommand); returns the exit code."""
    rest, overrides = split_overrides(list(argv))
    args = _parser().parse_args(rest)
    try:
        if args.aot:
            return _aot_command(args, overrides, list(argv))
        if args.devices or args.mesh:
            raise UserError("--devices and --mesh go with --aot; to time on another mesh use "
                            "--config.mesh.data=... --config.mesh.fsdp=...")
        config = load_config(args.config, overrides + mesh_overrides(None, args.batch))
        check_model(config)
        result = run_bench(config, args.steps, args.warmup, args.peak_flops,
                           pipeline=not args.no_pipeline)
    except user_errors() as e:
        return fail(error_text(e))
    if jax.process_index() == 0:
        print(format_bench(result, args.config, args.steps))
    return 0
