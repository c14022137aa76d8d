"""Evaluation runner: the config's `evals` section on a checkpoint or imported weights.

Used by `mmjax train` (periodically and at the end) and by `mmjax eval`:

    mmjax eval --config configs/clip_tiny.py --workdir DIR [--step N]
    mmjax eval --hf /path/to/clip [--config.evals.zeroshot.shards=...]

Results go to `DIR/eval/step_<N>.json` and TensorBoard (`DIR/eval/tensorboard`).
Zero-shot top-1 is stored under the key `top1` as a fraction in [0, 1].
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import jax
import ml_collections

from mmjax.data.pipeline import build_eval_iterator
from mmjax.data.tokenizers import build_tokenizer
from mmjax.train import workdir as wd
from mmjax.evaluate.zeroshot import zero_shot_classifier, zero_shot_evaluate

log = logging.getLogger("mmjax")


class EvalError(RuntimeError):
    """An evaluation request that cannot run (message names the cause)."""


def _cache_dir() -> str:
    return os.environ.get("MMJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mmjax"))


def _zeroshot_data(config: Any) -> tuple[Any, list[str]]:
    """(eval data config, classnames) for `config.evals.zeroshot`."""
    zs = config.evals.zeroshot
    data = ml_collections.ConfigDict(config.data.train.to_dict())
    data.workers = 0
    if zs.shards == "synthetic":
        from mmjax.data import synthetic
        data.shards = "::".join(synthetic.ensure_synthetic_shards(
            _cache_dir(), "test", num_samples=int(config.synthetic.test_samples),
            image_size=int(config.synthetic.image_size),
            samples_per_shard=int(config.synthetic.samples_per_shard), seed=0))
    else:
        data.shards = zs.shards
    if zs.classnames == "synthetic":
        from mmjax.data.synthetic import CLASSNAMES
        classnames = list(CLASSNAMES)
    else:
        from mmjax.evaluate.templates import resolve_classnames
        classnames = resolve_classnames(zs.classnames)
    return data, classnames


def run_evals(config: Any, model: Any, variables: Any, mesh: Any = None, *, step: int = 0,
              workdir: Optional[str] = None) -> dict:
    """Run the configured evaluators; returns flat `{name: value}` (and writes files)."""
    if jax.process_count() > 1:
        log.warning("evals inside a multi-process job are not run; use `mmjax eval` on the "
                    "checkpoint from one process")
        return {}
    zs = config.evals.zeroshot
    data_cfg, classnames = _zeroshot_data(config)
    tokenizer = build_tokenizer(config.data.train.tokenizer, int(config.data.train.max_len))
    # Evaluate on this process's devices; parameters are replicated for eval.
    variables = jax.device_get(variables)
    classifier = zero_shot_classifier(model, variables, classnames, zs.templates, tokenizer,
                                      batch_size=int(config.evals.batch_size))
    batches = build_eval_iterator(data_cfg, int(config.evals.batch_size))
    try:
        limit = int(zs.get("max_samples", 0) or 0)
        seen = 0

        def limited():
            nonlocal seen
            for b in batches:
                yield b
                seen += len(b["label"])
                if limit and seen >= limit:
                    return
        metrics = zero_shot_evaluate(model, variables, classifier, limited())
    finally:
        batches.close()
    results = {"zeroshot/top1": metrics["top1"], "zeroshot/top5": metrics["top5"],
               "zeroshot/mean_per_class_recall": metrics["mean_per_class_recall"],
               "zeroshot/n": metrics["n"], "zeroshot/num_classes": len(classnames),
               "top1": metrics["top1"]}
    log.info("eval step %d: zero-shot top-1 %.2f%% top-5 %.2f%% on %d images (%d classes)",
             step, 100 * metrics["top1"], 100 * metrics["top5"], metrics["n"], len(classnames))
    if workdir and jax.process_index() == 0:
        wd.write_text(wd.join(workdir, "eval", f"step_{step}.json"),
                      json.dumps({"step": step, **results}, indent=1))
    return results


def eval_command(config_spec: Optional[str], workdir: Optional[str], step: Optional[int],
                 hf_path: Optional[str], overrides: list[str]) -> dict:
    """`mmjax eval`: evaluate a workdir checkpoint or a Hugging Face folder."""
    from mmjax.train.config_utils import load_config
    if hf_path:
        return _eval_hf(hf_path, config_spec, overrides)
    if not workdir:
        raise EvalError("give --workdir DIR (a training run) or --hf PATH")
    saved = wd.join(workdir, "config.json")
    if config_spec is None:
        if not wd.exists(saved):
            raise EvalError(f"{workdir}: no config.json; pass --config configs/X.py")
        config = ml_collections.ConfigDict(json.loads(wd.read_text(saved))["config"])
        from mmjax.train.config_utils import apply_override
        for o in overrides:
            apply_override(config, o)
    else:
        config = load_config(config_spec, overrides)

    from mmjax.models import build
    from mmjax.train import sharding as shd
    from mmjax.train.checkpoint import CheckpointError, Checkpointer
    from mmjax.train.optimizer import build_optimizer
    from mmjax.train.step import Trainer
    ckpt_dir = wd.join(workdir, "checkpoints")
    if not wd.isdir(ckpt_dir):
        raise EvalError(f"{workdir}: no checkpoints (looked in {ckpt_dir}); train first")
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise EvalError(f"{workdir}: no checkpoint in {ckpt_dir}; train first")
        model = build(config.model)
        mesh = shd.make_mesh(config.mesh)
        tx, schedule = build_optimizer(config.optim, int(config.total_steps))
        trainer = Trainer(config, model, tx, schedule, mesh)
        try:
            state, _, step = ckpt.restore(step, trainer.abstract_state)
        except CheckpointError as e:
            raise EvalError(str(e)) from None
    finally:
        ckpt.close()
    return {"step": step, **run_evals(config, model, {"params": state["params"]}, mesh,
                                      step=step, workdir=workdir)}


def _eval_hf(path: str, config_spec: Optional[str], overrides: list[str]) -> dict:
    from mmjax.convert import hf
    from mmjax.train.config_utils import apply_override
    from mmjax.train.defaults import base_config
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        kind = json.load(f).get("model_type")
    loaders = {"clip": hf.load_clip, "siglip": hf.load_siglip}
    if kind not in loaders:
        raise EvalError(f"{path}: model_type {kind!r} is not supported by `mmjax eval --hf` "
                        f"(supported: {sorted(loaders)})")
    model, variables = loaders[kind](path)
    config = base_config()
    config.data.train.image_size = model.image["image_size"]
    config.data.train.max_len = model.text["max_len"]
    tok = os.path.join(path, "tokenizer.json")
    config.data.train.tokenizer = f"hf:{tok}" if os.path.exists(tok) else "bytes"
    if kind == "siglip":
        config.data.train.mean = (0.5, 0.5, 0.5)
        config.data.train.std = (0.5, 0.5, 0.5)
    for o in overrides:
        apply_override(config, o)
    return run_evals(config, model, variables, step=0, workdir=None)
