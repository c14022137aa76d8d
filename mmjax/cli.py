"""`mmjax train | eval | shards | bench | convert`.

    mmjax train [--config configs/X.py[:arg]] [--workdir DIR] [--config.a.b=value ...]
    mmjax eval --config configs/X.py --workdir DIR [--step N]
    mmjax eval --hf PATH [--config.evals.zeroshot.shards=...]
    mmjax shards --images DIR --captions FILE --out DIR | --synthetic ...
    mmjax generate --workdir DIR --image PATH [--prompt "question"] [--step N]
"""
from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CONFIG = "clip_tiny"


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    rest, overrides = [], []
    for a in argv:
        if a.startswith("--config."):
            overrides.append(a[len("--config."):])
        else:
            rest.append(a)
    return rest, overrides


def _fail(msg: str) -> int:
    print(f"mmjax: error: {msg}".splitlines()[0] if os.environ.get("MMJAX_DEBUG") is None
          else f"mmjax: error: {msg}", file=sys.stderr)
    return 2


def _error_text(e: BaseException) -> str:
    """The message of `e` as written (str() of a KeyError adds quotes around it)."""
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        return e.args[0]
    return str(e)


def _user_errors() -> tuple:
    """Exceptions that mean "fix your config / data / paths": shown as one line.

    Set MMJAX_DEBUG=1 to get the full traceback instead.
    """
    if os.environ.get("MMJAX_DEBUG"):
        return ()
    from mmjax.data.pipeline import DataError
    from mmjax.evaluate.runner import EvalError
    from mmjax.train.config_utils import ConfigError
    from mmjax.train.checkpoint import CheckpointError
    from mmjax.train.loop import TrainingError
    from mmjax.train.workdir import WorkdirBusy
    return (ConfigError, TrainingError, EvalError, DataError, CheckpointError, WorkdirBusy,
            FileNotFoundError, ValueError, KeyError)


def train_main(argv: list[str]) -> int:
    rest, overrides = _split_overrides(argv)
    p = argparse.ArgumentParser(prog="mmjax train", description="Train a recipe.")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="recipe file (configs/X.py[:arg]) or name; default clip_tiny")
    p.add_argument("--workdir", default=None,
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
    if "zeroshot/top1" in result:
        print(f"zero-shot top-1 on held-out data: {100 * result['zeroshot/top1']:.1f}% "
              f"(top-5 {100 * result['zeroshot/top5']:.1f}%, chance "
              f"{100 / result['zeroshot/num_classes']:.1f}%)")
    return 0


def eval_main(argv: list[str]) -> int:
    rest, overrides = _split_overrides(argv)
    p = argparse.ArgumentParser(prog="mmjax eval", description="Evaluate a checkpoint.")
    p.add_argument("--config", default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--hf", default=None, help="a Hugging Face CLIP/SigLIP folder instead")
    args = p.parse_args(rest)
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": train_main, "eval": eval_main, "shards": _shards, "bench": _bench,
                "generate": _generate}
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd = argv[0]
    if cmd not in commands:
        return _fail(f"unknown command {cmd!r}; choose one of {sorted(commands)}")
    return commands[cmd](argv[1:])


def _shards(argv):
    from mmjax.data.writer import shards_command
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


if __name__ == "__main__":
    sys.exit(main())
