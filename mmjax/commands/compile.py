"""`mmjax compile`: compile the train step for a TPU slice or GPU nodes with the
target's own compiler and report memory, fit, FLOPs and collectives
(`mmjax.perf.compile`)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from mmjax.commands.util import error_text, fail, split_overrides, user_errors
from mmjax.perf.compile import compile_for_target, format_report, max_batch, misfit_line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmjax compile", description="Compile the train step for a TPU slice or GPU "
        "nodes with the target's own compiler (no accelerator needed) and report memory, "
        "fit, FLOPs and collectives. Config keys: --config.a.b=value.")
    p.add_argument("--config", default="clip_tiny", help="recipe file (configs/X.py[:arg]) or name")
    p.add_argument("--target", default=None,
                   help="v5p-256, v5litepod-16, v6e-64, v4-8, tpu:v5p:4x4x8, h100x8[:nodes], ...")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    p.add_argument("--max-batch", action="store_true",
                   help="find the largest global batch that fits (several compiles)")
    p.add_argument("--hbm-gib", type=float, default=None,
                   help="memory per device to fit in (default: the chip's HBM)")
    p.add_argument("--sources", type=int, default=0, metavar="N",
                   help="also print the N largest collectives by the JAX operation each "
                   "came from (its op_name: forward or backward, which layer or loss)")
    p.add_argument("--hlo", default=None, metavar="PATH",
                   help="also write the compiled step's optimized HLO text to PATH")
    p.add_argument("--list-targets", action="store_true", help="print the named targets")
    return p


def compile_command(argv: list[str]) -> int:
    """Runs `mmjax compile` with `argv` (without the subcommand); returns the exit code."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host only traces; targets compile
    from mmjax.perf.targets import TargetError, hbm_bytes, list_targets, parse_target
    rest, overrides = split_overrides(list(argv))
    args = _parser().parse_args(rest)
    if args.list_targets:
        print("\n".join(list_targets()))
        return 0
    if not args.target:
        return fail("mmjax compile needs --target (e.g. v5p-16, h100x8); see --list-targets.")
    # Every compile goes to the target's compiler: a persistent cache
    # (JAX_COMPILATION_CACHE_DIR) would skip it, hiding compile time and the
    # partitioner's warnings, and deviceless executables cannot be read back.
    import jax
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        from mmjax.config import load_config
        from mmjax.config.schema import check_model
        target = parse_target(args.target)
        hbm_bytes(target, args.hbm_gib)  # a bad XLA_CLIENT_MEM_FRACTION: usage error, first
        config = load_config(args.config, overrides)
        check_model(config, tokenizer=False)  # compiling reads no text
        if args.max_batch:
            best, reports = max_batch(config, target, args.hbm_gib)
            report = next((r for r in reversed(reports) if r["batch"] == best), reports[-1])
            report = dict(report, max_batch=best)
        else:
            report = compile_for_target(config, target, args.hbm_gib, args.hlo)
    except TargetError as e:
        return fail(str(e))
    except user_errors() as e:
        return fail(error_text(e))
    print(format_report(report, args.sources))
    if args.max_batch:
        print(f"largest global batch that fits: {report['max_batch'] or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    if not report["fits"]:
        print(f"mmjax: {misfit_line(report)}", file=sys.stderr)
        return 1
    return 0
