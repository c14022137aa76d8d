"""Per-device memory of a large train step, from the target accelerator's own compiler.

Learn of an out-of-memory before renting a pod: the train step (forward,
backward, AdamW update, donated state) is compiled for a TPU slice by libtpu
(deviceless, no TPU needed) or for GPU nodes by the CUDA plugin, with the state
and batch abstract (nothing is allocated). Prints a markdown table per mesh:
parameters, per-device state, argument (state + batch), output, temp, total,
whether it fits the chip's HBM, and compile time; the same report as
`mmjax compile`, several meshes in one table.

Default: SigLIP ViT-L/14 (image 224, patch 14, width 1024, depth 24, heads 16,
MLP 4096; text width 1024, depth 24, heads 16, length 64; bfloat16; scan +
remat "dots_no_batch"), built from configs/siglip_b16.py, global batch 16384
on data=8 x fsdp=8 of a v5p-128 (64 chips).

    python benchmarks/aot_memory.py
    python benchmarks/aot_memory.py --target h100x8:8 --mesh data=8,fsdp=8 --batch 8192
    python benchmarks/aot_memory.py --config configs/clip_b16.py:tiny --target v5p-16 \
        --mesh data=8 --mesh fsdp=8 --json out.json
"""
import argparse
import json
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
DEFAULT_TARGET = "v5p-128"


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
    p.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"accelerator to compile for (see `mmjax compile --list-targets`); "
                        f"default {DEFAULT_TARGET}")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(rest)
    args.overrides = overrides
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    meshes = args.mesh or ([DEFAULT_MESH] if args.config is None else [None])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host only traces

    import jax
    from mmjax.perf.bench import aot_table, mesh_overrides
    from mmjax.perf.compile import compile_for_target
    from mmjax.config.loading import load_config
    from mmjax.errors import ConfigError
    from mmjax.perf.targets import TargetError, parse_target

    spec = args.config or DEFAULT_CONFIG
    base = [] if args.config else DEFAULT_OVERRIDES
    batch = args.batch or (None if args.config else DEFAULT_BATCH)
    rows, names = [], []
    try:
        target = parse_target(args.target)
        for mesh in meshes:
            config = load_config(spec, base + args.overrides + mesh_overrides(mesh, batch))
            report = compile_for_target(config, target)
            rows.append(dict(report, **report["memory"]))
            names.append(args.config or DEFAULT_NAME)
            print(f"compiled {names[-1]} on {report['mesh']} in {report['compile_s']:.0f} s",
                  file=sys.stderr, flush=True)
    except (ConfigError, TargetError, ValueError) as e:
        sys.exit(f"aot_memory.py: {str(e).splitlines()[0]}")
    print(f"Per-device memory of the train step compiled for {target.name} "
          f"({target.chip.device_kind}, {target.chip.hbm_bytes / 2**30:.2f} GiB HBM), "
          f"jax {jax.__version__}\n")
    print(aot_table(rows, names))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([dict(r, name=n) for r, n in zip(rows, names)], f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
