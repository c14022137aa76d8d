"""Per-device temp memory of the contrastive losses vs number of devices.

Compiles forward+backward (`jax.jit(jax.value_and_grad(loss))`) at a fixed
local batch b on meshes of 1, 2, 4, 8 devices (sub-meshes of 8 simulated
CPU devices, or of the real devices when there are enough) and prints
`compiled.memory_analysis().temp_size_in_bytes` per device in MiB:

- sigmoid (ring): `sigmoid_contrastive_loss`, blocks passed with ppermute;
- softmax (all-gather): `softmax_contrastive_loss`, local rows vs gathered columns;
- sigmoid (all-gather baseline): the same sigmoid loss with `axis_names=()`,
  left to the partitioner, which gathers the texts into `[b, B]` logits.

Exits non-zero if the ring's 8-device memory exceeds 1.5x its 1-device
memory. Usage: `python benchmarks/loss_memory.py [--local-batch 1024 --dim 512]`.
"""
import argparse
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

# Run from a checkout without installing: make the repo root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (device count must be set before jax starts)
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from mmjax.losses import (sigmoid_contrastive_loss,  # noqa: E402
                          softmax_contrastive_loss)

DEVICE_COUNTS = (1, 2, 4, 8)
MAX_RING_GROWTH = 1.5

LOSSES = {
    "sigmoid (ring)": lambda zi, zt, s, b: sigmoid_contrastive_loss(zi, zt, s, b),
    "softmax (all-gather)": lambda zi, zt, s, b: softmax_contrastive_loss(zi, zt, s),
    "sigmoid (all-gather baseline)":
        lambda zi, zt, s, b: sigmoid_contrastive_loss(zi, zt, s, b, axis_names=()),
}


def temp_mib(loss, n, local_batch, dim):
    """Per-device temp MiB of the compiled value_and_grad on n devices."""
    mesh = jax.make_mesh((n, 1, 1), ("data", "fsdp", "tensor"),
                         axis_types=(AxisType.Auto,) * 3,
                         devices=jax.devices()[:n])
    feats = jax.ShapeDtypeStruct((n * local_batch, dim), jnp.float32,
                                 sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(
            feats, feats, scalar, scalar).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args(argv)
    if jax.device_count() < max(DEVICE_COUNTS):
        sys.exit(f"loss_memory.py needs {max(DEVICE_COUNTS)} devices, found "
                 f"{jax.device_count()}; unset XLA_FLAGS or set "
                 f"--xla_force_host_platform_device_count=8 (CPU).")
    table = {name: [temp_mib(fn, n, args.local_batch, args.dim) for n in DEVICE_COUNTS]
             for name, fn in LOSSES.items()}

    print(f"Per-device temp memory (MiB), forward+backward, local batch "
          f"b={args.local_batch}, D={args.dim}, float32, "
          f"{jax.devices()[0].platform} backend\n")
    print("| loss | " + " | ".join(f"{n} dev" for n in DEVICE_COUNTS) + " |")
    print("|---|" + "---:|" * len(DEVICE_COUNTS))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in row) + " |")

    ring = table["sigmoid (ring)"]
    growth = ring[-1] / ring[0]
    print(f"\nring memory at {DEVICE_COUNTS[-1]} devices / 1 device: {growth:.2f}x "
          f"(limit {MAX_RING_GROWTH}x)")
    if growth > MAX_RING_GROWTH:
        print("FAIL: the sigmoid ring's per-device memory grows with device count.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
