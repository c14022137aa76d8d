"""`mmjax train`: train a recipe in a workdir (rerunning resumes), then print its
zero-shot accuracy when the recipe evaluates it."""
from __future__ import annotations

import argparse
import os

from mmjax.commands.util import error_text, fail, split_overrides, user_errors
from mmjax.config import load_config
from mmjax.config.schema import help_config
from mmjax.train import loop

DEFAULT_CONFIG = "clip_tiny"


def train_command(argv: list[str]) -> int:
    rest, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(
        prog="mmjax train",
        usage="mmjax train [--config RECIPE] [--workdir DIR] [--config.KEY=VALUE ...] "
              "[--help-config]",
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
    p.add_argument("--help-config", action="store_true",
                   help="print every key of the recipe (with the overrides) with its value and "
                        "description, and exit")
    args = p.parse_args(rest)
    try:
        config = load_config(args.config, overrides)
        if args.help_config:
            print(help_config(config))
            return 0
        name = os.path.basename(args.config.split(":")[0]).removesuffix(".py")
        workdir = args.workdir or os.path.join("mmjax_runs", name)
        result = loop.train(config, workdir)
    except user_errors() as e:
        return fail(error_text(e))
    import jax
    if "zeroshot/top1" in result and jax.process_index() == 0:  # one line per job
        shards = config.evals.zeroshot.shards
        where = ("held-out built-in data (evals.zeroshot.shards=synthetic)"
                 if shards == "synthetic" else f"evals.zeroshot.shards={shards}")
        print(f"zero-shot top-1 on {where}: {100 * result['zeroshot/top1']:.1f}% "
              f"(top-5 {100 * result['zeroshot/top5']:.1f}%, chance "
              f"{100 / result['zeroshot/num_classes']:.1f}%)")
    return 0
