"""Per-device memory of a large train step, compiled ahead of time on simulated devices.

Learn of an out-of-memory before renting a pod: the train step (forward,
backward, AdamW update, donated state) is compiled for N simulated CPU
devices with the state and batch kept abstract (ShapeDtypeStructs carrying
their shardings), so nothing is allocated. Prints a markdown table per mesh:
parameters, per-device state, argument (state + batch), output, temp, total
and XLA's peak, generated-code size (not reported by the CPU compiler) and
compile time. Numbers come from the CPU compiler: an estimate of what a
TPU/GPU compiler needs, typically close for the state and within a small
factor for temporaries.

Default: SigLIP ViT-L/14 (image 224, patch 14, width 1024, depth 24, heads 16,
MLP 4096; text width 1024, depth 24, heads 16, length 64; bfloat16; scan +
remat "dots_no_batch"), built from configs/siglip_b16.py, global batch 16384
on data=8 x fsdp=8 (64 devices).

    python benchmarks/aot_memory.py
    python benchmarks/aot_memory.py --mesh data=8,fsdp=8 --mesh data=64 --batch 8192
    python benchmarks/aot_memory.py --config configs/clip_b16.py:tiny --devices 8 \
        --mesh data=8 --mesh fsdp=8 --json out.json
"""
import argparse
import json
import math
import os
import sys

# Run from a checkout without installing: make the repo root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_CONFIG = "configs/siglip_b16.py"
DEFAULT_NAME = "SigLIP L/14 (siglip_b16 + overrides)"
DEFAULT_OVERRIDES = [
    "model.image.patch_size=14", "model.image.width=1024", "model.image.depth=24",
    "model.image.heads=16", "model.text.width=1024", "model.text.depth=24",
    "model.text.heads=16", "model.text.embed_dim=1024", "model.text.max_len=64",
    "data.train.max_len=64", "data.train.image_size=224", "model.image.image_size=224",
    "model.dtype=bfloat16", "model.image.scan=true", "model.text.scan=true",
    "model.image.remat=dots_no_batch", "model.text.remat=dots_no_batch",
]
DEFAULT_MESH = "data=8,fsdp=8"
DEFAULT_BATCH = 16384


def parse_args(argv):
    rest = [a for a in argv if not a.startswith("--config.")]
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None,
                   help=f"recipe (configs/X.py[:arg]); default {DEFAULT_NAME}")
    p.add_argument("--mesh", action="append", default=None,
                   help=f"AXIS=SIZE list, repeatable (one row each); default {DEFAULT_MESH}")
    p.add_argument("--batch", type=int, default=None,
                   help=f"global batch; default {DEFAULT_BATCH} (the recipe's with --config)")
    p.add_argument("--devices", type=int, default=None,
                   help="simulated devices; default the largest mesh's size")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(rest)
    args.overrides = overrides
    return args


def mesh_size(text):
    """Devices a `--mesh` needs, or None when an axis is -1 (fills)."""
    sizes = [int(part.split("=", 1)[1]) for part in text.split(",") if "=" in part]
    return None if -1 in sizes else math.prod(sizes)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    meshes = args.mesh or ([DEFAULT_MESH] if args.config is None else [None])
    devices = args.devices or max((mesh_size(m) or 0) if m else 0 for m in meshes)
    if not devices:
        sys.exit("aot_memory.py: give --devices N when a --mesh axis is -1 or no --mesh is given.")
    # The device count is fixed when jax starts, so set it before the import.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ["JAX_PLATFORMS"] = "cpu"

    import jax
    from mmjax.train.bench import aot_memory_report, aot_table, mesh_overrides
    from mmjax.train.config_utils import ConfigError, load_config

    spec = args.config or DEFAULT_CONFIG
    base = [] if args.config else DEFAULT_OVERRIDES
    batch = args.batch or (None if args.config else DEFAULT_BATCH)
    rows, names = [], []
    for mesh in meshes:
        try:
            config = load_config(spec, base + args.overrides + mesh_overrides(mesh, batch))
            need = mesh_size(mesh) if mesh else None
            rows.append(aot_memory_report(config, jax.devices()[:need] if need else None))
        except (ConfigError, ValueError) as e:
            sys.exit(f"aot_memory.py: {str(e).splitlines()[0]}")
        names.append(args.config or DEFAULT_NAME)
        print(f"compiled {names[-1]} on {rows[-1]['mesh']} in {rows[-1]['compile_s']:.0f} s",
              file=sys.stderr, flush=True)
    print(f"Per-device memory of the train step (AOT compile, {devices} simulated "
          f"{jax.devices()[0].platform} devices, jax {jax.__version__})\n")
    print(aot_table(rows, names))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([dict(r, name=n) for r, n in zip(rows, names)], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
