"""mmjax: train, evaluate and run image-text models.

    mmjax train [--config configs/X.py[:arg]] [--workdir DIR] [--config.a.b=value ...]
    mmjax eval --workdir DIR [--step N] [--config configs/X.py] [--config.a.b=value ...]
    mmjax eval --hf PATH [--config.evals.zeroshot.shards=...]
    mmjax generate --workdir DIR --image PATH [--prompt "question"] [--step N] [--max-new-tokens N]
    mmjax shards --images DIR --captions FILE --out DIR | --synthetic [--split S] [--num-samples N] --out DIR
    mmjax bench [--config configs/X.py[:arg]] [--steps N] [--aot] [--config.a.b=value ...]
    mmjax compile --config configs/X.py[:arg] --target v5p-256|h100x8|... [--max-batch] [--json PATH]
    mmjax --version

`mmjax COMMAND --help` describes a command's options; `--config.a.b=value`
overrides any key of the recipe's config (train, eval, bench, compile).
"""
from __future__ import annotations

import argparse
import os
import sys

from mmjax.cli_util import error_text as _error_text
from mmjax.cli_util import fail as _fail
from mmjax.cli_util import split_overrides as _split_overrides
from mmjax.cli_util import user_errors as _user_errors

DEFAULT_CONFIG = "clip_tiny"


def train_main(argv: list[str]) -> int:
    rest, overrides = _split_overrides(argv)
    p = argparse.ArgumentParser(
        prog="mmjax train",
        usage="mmjax train [--config RECIPE] [--workdir DIR] [--config.KEY=VALUE ...]",
        description="Train a recipe; rerunning the same command resumes from the latest "
                    "checkpoint in the workdir.",
        epilog="--config.a.b=value sets any key of the recipe's config, e.g. "
               "--config.batch_size=64 --config.optim.lr=1e-3 "
               "--config.data.train.shards='/data/{00000..00099}.tar'; a mistyped key is "
               "an error naming it.")
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="RECIPE",
                   help="recipe file (configs/X.py[:arg]) or name; default clip_tiny")
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="checkpoints and logs; default ./mmjax_runs/<recipe>")
    args = p.parse_args(rest)
    from mmjax.train.config_utils import load_config
    from mmjax.train.loop import train
    try:
        config = load_config(args.config, overrides)
        name = os.path.basename(args.config.split(":")[0]).removesuffix(".py")
        workdir = args.workdir or os.path.join("mmjax_runs", name)
        result = train(config, workdir)
    except _user_errors() as e:
        return _fail(_error_text(e))
    import jax
    if "zeroshot/top1" in result and jax.process_index() == 0:  # one line per job
        shards = config.evals.zeroshot.shards
        where = ("held-out built-in data (evals.zeroshot.shards=synthetic)"
                 if shards == "synthetic" else f"evals.zeroshot.shards={shards}")
        print(f"zero-shot top-1 on {where}: {100 * result['zeroshot/top1']:.1f}% "
              f"(top-5 {100 * result['zeroshot/top5']:.1f}%, chance "
              f"{100 / result['zeroshot/num_classes']:.1f}%)")
    return 0


def eval_main(argv: list[str]) -> int:
    rest, overrides = _split_overrides(argv)
    p = argparse.ArgumentParser(
        prog="mmjax eval",
        usage="mmjax eval (--workdir DIR | --hf PATH) [--step N] [--config RECIPE] "
              "[--config.KEY=VALUE ...]",
        description="Evaluate a training run's checkpoint (or imported weights) with the "
                    "evaluations its config enables; results go to DIR/eval/step_<N>.json.",
        epilog="--config.a.b=value sets any config key, e.g. "
               "--config.evals.zeroshot.shards=PATTERN (zero-shot), "
               "--config.evals.retrieval.shards=PATTERN (retrieval), "
               "--config.evals.captioning.shards=PATTERN (CoCa, BLIP-2), "
               "--config.evals.vqa.shards=PATTERN (VisionLM); 'synthetic' selects the "
               "held-out built-in data.")
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="a training run's folder (its config.json and checkpoints)")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="checkpoint step to evaluate; default the latest")
    p.add_argument("--config", default=None, metavar="RECIPE",
                   help="recipe file (configs/X.py[:arg]) or name, instead of the run's "
                        "config.json")
    p.add_argument("--hf", default=None, metavar="PATH",
                   help="a Hugging Face CLIP/SigLIP folder to evaluate instead of a run")
    args = p.parse_args(rest)
    if args.workdir and not args.hf and "://" not in args.workdir \
            and not os.path.isdir(args.workdir):
        return _fail(f"--workdir {args.workdir}: no such folder")
    from mmjax.evaluate.runner import eval_command
    try:
        results = eval_command(args.config, args.workdir, args.step, args.hf, overrides)
    except _user_errors() as e:
        return _fail(_error_text(e))
    import jax
    if jax.process_index() == 0:  # every process holds the same results
        for k, v in sorted(results.items()):
            print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


def version() -> str:
    """mmjax's installed version (package metadata), or 'unknown' from a bare checkout."""
    from importlib import metadata
    try:
        return metadata.version("mmjax")
    except metadata.PackageNotFoundError:
        return "unknown"


def skip_unusable_tpu_backend() -> bool:
    """Keep JAX from starting libtpu as a backend on a host that has no TPU.

    libtpu comes with the `test` and `tpu` extras (for deviceless TPU compiles);
    on a CPU host JAX still tries it as a backend, and its failed start prints
    `INVALID_ARGUMENT ... TPU_WORKER_HOSTNAMES` lines before anything else.
    Only where JAX would end on the CPU anyway: JAX_PLATFORMS unset, no TPU chip
    on this host (JAX's own check of the PCI bus), no GPU plugin installed, and
    no backend started yet. `mmjax compile` loads libtpu by itself for its
    targets, so it is unaffected. Returns whether it chose the CPU.
    """
    import importlib.metadata
    import jax
    from jax._src import hardware_utils, xla_bridge
    if (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
            or xla_bridge.backends_are_initialized()):
        return False
    if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
        return False
    if list(importlib.metadata.entry_points(group="jax_plugins")):
        return False  # a GPU (or other) plugin: JAX's own choice
    jax.config.update("jax_platforms", "cpu")
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "eval", "generate", "bench", "shards"):
        skip_unusable_tpu_backend()
    commands = {"train": train_main, "eval": eval_main, "shards": _shards, "bench": _bench,
                "generate": _generate, "compile": _compile}
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"mmjax {version()}")
        return 0
    cmd = argv[0]
    if cmd not in commands:
        return _fail(f"unknown command {cmd!r}; choose one of {sorted(commands)}")
    return commands[cmd](argv[1:])


def _shards(argv):
    from mmjax.commands.shards import shards_command
    return shards_command(argv)


def _generate(argv):
    from mmjax.evaluate.generate import generate_command
    try:
        return generate_command(argv)
    except _user_errors() as e:
        return _fail(_error_text(e))


def _bench(argv):
    from mmjax.train.bench import bench_command
    return bench_command(argv)


def _compile(argv):
    from mmjax.train.compile_report import compile_command
    return compile_command(argv)


if __name__ == "__main__":
    sys.exit(main())
