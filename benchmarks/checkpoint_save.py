"""First checkpoint save of a run: wall time and XLA compiles, mmjax's array
handler (small replicated arrays written whole) vs orbax's default (every
replicated array split over its replicas, one compiled slice program per shape).

    python benchmarks/checkpoint_save.py [--config clip_tiny:tiny] [--devices 8]

Each variant runs in its own process (compiles are cached per process).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _one(config_name: str, devices: int, split_all: bool) -> None:
    import logging
    import tempfile

    import jax

    from mmjax.models import build
    from mmjax.train import checkpoint
    from mmjax.train import sharding as shd
    from mmjax.config.loading import load_config
    from mmjax.train.optimizer import build_optimizer
    from mmjax.train.step import Trainer

    if split_all:  # orbax's default: replica-parallel for every array
        checkpoint.REPLICA_PARALLEL_MIN_BYTES = 0
    config = load_config(config_name)
    mesh = shd.make_mesh({"data": devices, "fsdp": 1, "tensor": 1}, jax.devices()[:devices])
    tx, schedule = build_optimizer(config.optim, int(config.total_steps))
    state = Trainer(config, build(config.model), tx, schedule, mesh).init_state(0)
    jax.block_until_ready(state)
    compiles = []
    handler = logging.Handler()
    handler.emit = lambda r: compiles.append(1) if "Finished XLA compilation" in r.getMessage() else None
    logging.getLogger("jax").addHandler(handler)
    ckpt = checkpoint.Checkpointer(tempfile.mkdtemp(), async_save=False)
    with jax.log_compiles():
        t0 = time.perf_counter()
        ckpt.save(1, state, {})
        ckpt.wait()
        seconds = time.perf_counter() - t0
    ckpt.close()
    leaves = len(jax.tree.leaves(state))
    name = "orbax default (split every array)" if split_all else "mmjax (split >= 1 MiB slices)"
    print(f"| {name} | {leaves} | {len(compiles)} | {seconds:.2f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="clip_tiny:tiny")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--worker", choices=("mmjax", "orbax"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _one(args.config, args.devices, args.worker == "orbax")
        return 0
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
    print(f"{args.config}, {args.devices} CPU devices, data-parallel (state replicated)\n")
    print("| handler | arrays | XLA compiles | first save (s) |\n|---|---:|---:|---:|")
    for worker in ("orbax", "mmjax", "orbax", "mmjax"):
        out = subprocess.run([sys.executable, __file__, "--config", args.config, "--devices",
                              str(args.devices), "--worker", worker], env=env,
                             capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
