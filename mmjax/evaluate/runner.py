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
import numpy as np

from mmjax.data.pipeline import build_eval_iterator
from mmjax.data.tokenizers import build_tokenizer
from mmjax.train import workdir as wd
from mmjax.evaluate.zeroshot import zero_shot_classifier, zero_shot_evaluate

log = logging.getLogger("mmjax")


class EvalError(RuntimeError):
    """An evaluation request that cannot run (message names the cause)."""


def _cache_dir() -> str:
    return os.environ.get("MMJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mmjax"))


def _eval_data(config: Any, shards: str, **overrides) -> Any:
    """Eval data config: the train data's decoding with `shards` ("synthetic" =
    the held-out built-in split), read once in order with center crops."""
    data = ml_collections.ConfigDict(config.data.train.to_dict())
    data.update(overrides)
    data.workers = 0
    if shards == "synthetic":
        from mmjax.data import synthetic
        data.shards = "::".join(synthetic.ensure_synthetic_shards(
            _cache_dir(), "test", num_samples=int(config.synthetic.test_samples),
            image_size=int(config.synthetic.image_size),
            samples_per_shard=int(config.synthetic.samples_per_shard), seed=0))
    else:
        data.shards = shards
    return data


def _classnames(spec: Any) -> list[str]:
    if spec == "synthetic":
        from mmjax.data.synthetic import CLASSNAMES
        return list(CLASSNAMES)
    from mmjax.evaluate.templates import resolve_classnames
    return resolve_classnames(spec)


def _batches(config: Any, section: Any, **overrides):
    """Eval batches of `section.shards`, stopping after `section.max_samples` (0 = all)."""
    it = build_eval_iterator(_eval_data(config, section.shards, **overrides),
                             int(config.evals.batch_size))
    limit, seen = int(section.get("max_samples", 0) or 0), 0
    try:
        for batch in it:
            valid = np.asarray(batch.get("valid", np.ones(len(batch["text"]), bool)), bool)
            if limit:  # keep exactly `limit` real rows
                valid = valid & (np.cumsum(valid) + seen <= limit)
            batch = dict(batch, valid=valid)
            seen += int(valid.sum())
            yield batch
            if limit and seen >= limit:
                return
    finally:
        it.close()


def _zeroshot(config, model, variables, tokenizer) -> dict:
    zs = config.evals.zeroshot
    classnames = _classnames(zs.classnames)
    classifier = zero_shot_classifier(model, variables, classnames, zs.templates, tokenizer,
                                      batch_size=int(config.evals.batch_size))
    m = zero_shot_evaluate(model, variables, classifier, _batches(config, zs))
    log.info("zero-shot top-1 %.2f%% top-5 %.2f%% on %d images (%d classes)",
             100 * m["top1"], 100 * m["top5"], m["n"], len(classnames))
    return {"zeroshot/top1": m["top1"], "zeroshot/top5": m["top5"],
            "zeroshot/mean_per_class_recall": m["mean_per_class_recall"],
            "zeroshot/n": m["n"], "zeroshot/num_classes": len(classnames), "top1": m["top1"]}


def _retrieval(config, model, variables, tokenizer) -> dict:
    from mmjax.evaluate.retrieval import retrieval_evaluate
    section = config.evals.retrieval
    key = section.get("caption_key") or config.data.train.caption_key
    # A plain member ("txt") holds one caption: no pad rows to embed.
    per_image = int(section.get("num_captions") or 5) if ":" in key else 1
    batches = _batches(config, section, text_format="captions", caption_key=key,
                       num_captions=per_image)
    m = retrieval_evaluate(model, variables, batches, pad_id=tokenizer.pad_id)
    log.info("retrieval i2t R@1 %.2f%% t2i R@1 %.2f%% over %d images",
             100 * m["i2t_r1"], 100 * m["t2i_r1"], m["n_images"])
    return {f"retrieval/{k}": v for k, v in m.items()}


def _vqa(config, model, variables, tokenizer) -> dict:
    from mmjax.evaluate.vqa import vqa_evaluate
    from mmjax.models import VisionLM
    section = config.evals.vqa
    if not isinstance(model, VisionLM):
        raise EvalError(f"config.evals.vqa: {type(model).__name__} does not generate text; use "
                        "a VisionLM recipe (llava, blip2_stage2) or set evals.vqa.shards=''.")
    types, baseline = None, None
    if section.shards == "synthetic":
        from mmjax.data import synthetic
        types = {q: t for t, q in synthetic.QUESTIONS.items()}
        baseline = synthetic.majority_answer_baselines(
            "train", num_samples=int(config.synthetic.train_samples))["majority_answer"]
    m = vqa_evaluate(model, variables, _batches(config, section, text_format="dialog",
                                                caption_key=section.text_key),
                     tokenizer, max_new_tokens=int(section.max_new_tokens),
                     question_types=types, baseline_answer=baseline,
                     chunk=int(config.evals.batch_size))
    log.info("VQA accuracy %.2f%% on %d questions%s; e.g. %s", 100 * m["vqa_accuracy"],
             m["count"], "" if baseline is None else
             f" (majority answer {baseline!r}: {100 * m['baseline_accuracy']:.2f}%)",
             m["examples"][:2])
    return {f"vqa/{k}" if not k.startswith("vqa") else k: v for k, v in m.items()}


def _vlm_captions(model, variables, images, tokenizer, max_len: int) -> list[str]:
    from mmjax.evaluate.vqa import answer_questions, caption_prompt, image_embeds
    return answer_questions(model, variables, image_embeds(model, variables, images),
                            [caption_prompt(tokenizer)] * len(images), tokenizer,
                            max_new_tokens=max_len, width=1, chunk=len(images))


def _captioning(config, model, variables, tokenizer) -> dict:
    from mmjax.evaluate import captioning
    from mmjax.evaluate.metrics import caption_scores
    from mmjax.models import Blip2Stage1, CoCa, VisionLM
    cap = config.evals.captioning
    make = {CoCa: captioning.coca_logits_fn, Blip2Stage1: captioning.blip2_itg_logits_fn}
    if isinstance(model, VisionLM) and int(cap.beam_size) != 1:
        raise EvalError("config.evals.captioning.beam_size: VisionLM captioning is greedy; "
                        "set it to 1.")
    if type(model) not in make and not isinstance(model, VisionLM):
        raise EvalError(f"config.evals.captioning: {type(model).__name__} has no captioning "
                        "head; use a CoCa or BLIP-2 recipe or set evals.captioning.shards=''.")
    preds, refs = {}, {}
    for batch in _batches(config, cap):
        valid = np.asarray(batch.get("valid", np.ones(len(batch["text"]), bool)), bool)
        images = np.asarray(batch["image"])
        if isinstance(model, VisionLM):
            texts = _vlm_captions(model, variables, images, tokenizer, int(cap.max_len))
        else:
            texts = captioning.generate_captions(
                make[type(model)](model, variables, images), len(images), tokenizer,
                int(cap.max_len), beam_size=int(cap.beam_size))
        for i in np.flatnonzero(valid):
            key = len(preds)
            preds[key] = texts[i]
            refs[key] = [tokenizer.decode(np.asarray(batch["text"][i]))]
    m = caption_scores(preds, refs)
    log.info("captioning BLEU-4 %.3f CIDEr %.3f on %d images; e.g. %r", m["bleu4"], m["cider"],
             len(preds), preds.get(0))
    return {"captioning/bleu4": m["bleu4"], "captioning/cider": m["cider"],
            "captioning/n": len(preds)}


def run_evals(config: Any, model: Any, variables: Any, mesh: Any = None, *, step: int = 0,
              workdir: Optional[str] = None) -> dict:
    """Run the evaluators enabled in `config.evals` (a section is on when its
    `shards` is set); returns flat `{name: value}` and writes
    `workdir/eval/step_<N>.json`."""
    if jax.process_count() > 1:
        log.warning("evals inside a multi-process job are not run; use `mmjax eval` on the "
                    "checkpoint from one process")
        return {}
    tokenizer = build_tokenizer(config.data.train.tokenizer, int(config.data.train.max_len))
    # Evaluate on this process's devices; parameters are replicated for eval.
    variables = jax.device_get(variables)
    ev = config.evals
    results: dict = {}
    from mmjax.models import VisionLM
    if ev.zeroshot.get("shards") and not isinstance(model, VisionLM):
        results.update(_zeroshot(config, model, variables, tokenizer))
    if ev.get("retrieval") and ev.retrieval.get("shards"):
        results.update(_retrieval(config, model, variables, tokenizer))
    if ev.get("captioning") and ev.captioning.get("shards"):
        results.update(_captioning(config, model, variables, tokenizer))
    if ev.get("vqa") and ev.vqa.get("shards"):
        results.update(_vqa(config, model, variables, tokenizer))
    if workdir and jax.process_index() == 0 and results:
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
            state, _, step = trainer.restore(ckpt, step)
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
    tokenizer = build_tokenizer(config.data.train.tokenizer, int(config.data.train.max_len))
    if tokenizer.vocab_size > model.text["vocab_size"]:
        raise EvalError(f"{path}: tokenizer {config.data.train.tokenizer!r} has "
                        f"{tokenizer.vocab_size} tokens but the model only "
                        f"{model.text['vocab_size']}; put the model's tokenizer.json in the "
                        "folder or pass --config.data.train.tokenizer=hf:PATH")
    return run_evals(config, model, variables, step=0, workdir=None)
