"""`mmjax eval`: evaluate a training run's checkpoint, or imported Hugging Face
weights, with the evaluations its config enables (`mmjax.evaluate.runner`).

    mmjax eval --workdir DIR [--step N] [--config configs/X.py] [--config.a.b=value ...]
    mmjax eval --hf /path/to/clip [--config.evals.zeroshot.shards=...]

`--report OUT` also writes an HTML page of the results, `OUT/index.html`
(`mmjax.evaluate.report`): metrics, examples of each evaluation, training curves.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional

import ml_collections

from mmjax import workdir as wd
from mmjax.commands.util import error_text, fail, split_overrides, user_errors
from mmjax.config import apply_override, base_config, load_config
from mmjax.config.schema import check_vocabulary
from mmjax.data.tokenizers import build_tokenizer
from mmjax.evaluate.runner import EvalError, run_evals
from mmjax.train import multihost
from mmjax.train.checkpoint import CheckpointError, Checkpointer
from mmjax.train.step import build_trainer


def eval_command(argv: list[str]) -> int:
    rest, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(
        prog="mmjax eval",
        usage="mmjax eval (--workdir DIR | --hf PATH) [--step N] [--config RECIPE] "
              "[--report OUT] [--config.KEY=VALUE ...]",
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
    p.add_argument("--report", default=None, metavar="OUT",
                   help="also write an HTML report to OUT/index.html (a local folder; open "
                        "the file in a browser): metrics, examples, training curves")
    args = p.parse_args(rest)
    if args.report and "://" in args.report and not args.report.startswith("file://"):
        return fail(f"--report {args.report}: give a local folder")
    if args.workdir and not args.hf and "://" not in args.workdir \
            and not os.path.isdir(args.workdir):
        return fail(f"--workdir {args.workdir}: no such folder")
    try:
        results = evaluate_run(args.config, args.workdir, args.step, args.hf, overrides,
                               report=args.report)
    except user_errors() as e:
        return fail(error_text(e))
    import jax
    if jax.process_index() == 0:  # every process holds the same results
        for k, v in sorted(results.items()):
            print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
        if args.report:
            print(f"report: {os.path.join(_local(args.report), 'index.html')}")
    return 0


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def _with_defaults(saved: dict) -> ml_collections.ConfigDict:
    """A run's saved config with the keys added to mmjax since it was saved, at
    their defaults (`base_config`), so they can be read and overridden."""
    def merge(base, new):
        out = dict(base)
        for k, v in new.items():
            out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(
                base.get(k), dict) else v
        return out
    return ml_collections.ConfigDict(merge(base_config().to_dict(), saved))


def evaluate_run(config_spec: Optional[str], workdir: Optional[str], step: Optional[int],
                 hf_path: Optional[str], overrides: list[str],
                 report: Optional[str] = None) -> dict:
    """`mmjax eval`: evaluate a workdir checkpoint or a Hugging Face folder
    (in one process, or in every process of a job started as for `mmjax train`);
    with `report` (a local folder) process 0 also writes `report/index.html`."""
    multihost.join()  # (the timeouts of config.multihost's defaults)
    report = _local(report) if report else None
    if hf_path:
        return _eval_hf(hf_path, config_spec, overrides, report)
    config, trainer, state, step = load_run(config_spec, workdir, step, overrides)
    saved = wd.join(workdir, "config.json")
    info = {"recipe": config_spec if config_spec else f"as saved in {saved}"}
    results = run_evals(config, trainer.model, {"params": state["params"]}, trainer.mesh, step=step,
                        workdir=workdir, report=report, report_info=info)
    if not results:
        raise EvalError(nothing_to_evaluate(f"{workdir} (step {step})"))
    return {"step": step, **results}


def load_run(config_spec: Optional[str], workdir: Optional[str], step: Optional[int],
             overrides: list[str]) -> tuple:
    """A training run's config (`config_spec`, else its saved config.json with
    `overrides`), trainer, restored state and step (`step`, default the latest).
    Raises EvalError naming what is missing."""
    if not workdir:
        raise EvalError("give --workdir DIR (a training run) or --hf PATH")
    saved = wd.join(workdir, "config.json")
    if config_spec is None:
        if not wd.exists(saved):
            raise EvalError(f"{workdir}: no config.json; pass --config configs/X.py")
        config = _with_defaults(json.loads(wd.read_text(saved))["config"])
        for o in overrides:
            apply_override(config, o)
    else:
        config = load_config(config_spec, overrides)
    check_vocabulary(config)  # the tokenizer x the model's vocabulary, before it is built

    ckpt_dir = wd.join(workdir, "checkpoints")
    if not wd.isdir(ckpt_dir):
        raise EvalError(f"{workdir}: no checkpoints (looked in {ckpt_dir}); train first")
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise EvalError(f"{workdir}: no checkpoint in {ckpt_dir}; train first")
        trainer = build_trainer(config)
        try:
            # The data position is not needed (nothing continues the stream), so a
            # run saved by a job of another process count loads as well.
            state, _, step = trainer.restore(ckpt, step, reset_stream=True)
        except CheckpointError as e:
            raise EvalError(str(e)) from None
    finally:
        ckpt.close()
    return config, trainer, state, step


def nothing_to_evaluate(what: str) -> str:
    """The message for a config that enables no evaluation of `what`."""
    return (f"nothing to evaluate for {what}: its config enables no evaluation; ask for one "
            "with --config.evals.zeroshot.shards=PATTERN (two-tower models), "
            "--config.evals.retrieval.shards=PATTERN, --config.evals.captioning.shards=PATTERN "
            "(CoCa, BLIP-2) or --config.evals.vqa.shards=PATTERN (VisionLM); 'synthetic' is "
            "the held-out built-in data")


def _eval_hf(path: str, config_spec: Optional[str], overrides: list[str],
             report: Optional[str] = None) -> dict:
    config, model, variables, kind = load_hf(path, overrides)
    results = run_evals(config, model, variables, step=0, workdir=None, report=report,
                        report_info={"weights": f"{kind} (Hugging Face) from {path}"})
    if not results:
        raise EvalError(nothing_to_evaluate(path))
    return results


def load_hf(path: str, overrides: list[str]) -> tuple:
    """A Hugging Face CLIP / SigLIP folder as `(config, model, variables, model_type)`:
    a two-tower config describing the model, its tokenizer.json when present,
    with `overrides`. Raises EvalError for an unsupported model or tokenizer."""
    from mmjax.convert import hf
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        kind = json.load(f).get("model_type")
    loaders = {"clip": hf.load_clip, "siglip": hf.load_siglip}
    if kind not in loaders:
        raise EvalError(f"{path}: model_type {kind!r} is not supported by `mmjax eval --hf` "
                        f"(supported: {sorted(loaders)})")
    model, variables = loaders[kind](path)
    config = base_config()
    config.model = ml_collections.ConfigDict(dict(name="two_tower", contrastive=model.contrastive,
                                                  image=dict(model.image), text=dict(model.text)))
    config.data.train.image_size = model.image["image_size"]
    config.data.train.max_len = model.text["max_len"]
    tok = os.path.join(path, "tokenizer.json")
    config.data.train.tokenizer = f"hf:{tok}" if os.path.exists(tok) else "bytes"
    if kind == "siglip":
        config.data.train.mean = (0.5, 0.5, 0.5)
        config.data.train.std = (0.5, 0.5, 0.5)
    for o in overrides:
        apply_override(config, o)
    tokenizer = build_tokenizer(config.data.train.tokenizer, int(config.data.train.max_len))
    if tokenizer.vocab_size > model.text["vocab_size"]:
        raise EvalError(f"{path}: tokenizer {config.data.train.tokenizer!r} has "
                        f"{tokenizer.vocab_size} tokens but the model only "
                        f"{model.text['vocab_size']}; put the model's tokenizer.json in the "
                        "folder or pass --config.data.train.tokenizer=hf:PATH")
    return config, model, variables, kind
