"""Evaluation runner: the config's `evals` section on a checkpoint or imported weights.

Used by `mmjax train` (periodically and at the end) and by `mmjax eval`:

    mmjax eval --config configs/clip_tiny.py --workdir DIR [--step N]
    mmjax eval --hf /path/to/clip [--config.evals.zeroshot.shards=...]

Results go to `DIR/eval/step_<N>.json` and TensorBoard (`DIR/eval/tensorboard`).
Zero-shot top-1 is stored under the key `top1` as a fraction in [0, 1].

In a multi-process job every process calls `run_evals`: each reads the whole
eval stream, runs the model on its share of the batches (batch i on process
i % P), and the per-example results are gathered on the host, so every
process returns the metrics a single-process run gives; process 0 writes them.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Optional

import jax
import numpy as np

from mmjax.data.pipeline import build_eval_iterator
from mmjax.data.tokenizers import build_tokenizer
from mmjax import workdir as wd
from mmjax.evaluate.gather import Share, combine, host_variables
from mmjax.evaluate.metrics import classification_metrics
from mmjax.families import get_family
from mmjax.evaluate.retrieval import BatchRunner, l2_normalize
from mmjax.models.jitted import model_method
from mmjax.evaluate.zeroshot import class_prompts, prompt_ensemble, zero_shot_predictions
from mmjax.config.schema import enabled_evaluators
from mmjax.errors import UserError

log = logging.getLogger("mmjax")


class EvalError(UserError, RuntimeError):
    """An evaluation request that cannot run (message names the cause)."""


def _eval_data(config: Any, shards: str, **overrides) -> Any:
    """Eval data config: the train data's decoding with `shards` ("synthetic" =
    the held-out built-in split), read once in order with center crops."""
    data = get_family(config).data_config(config, **overrides)
    data.workers = 0
    if shards == "synthetic":
        from mmjax.data.builtin import builtin_shards
        data.shards = "::".join(builtin_shards(config, "test", _media(config)))
    else:
        data.shards = shards
    return data


def _classnames(config: Any, spec: Any) -> list[str]:
    if spec == "synthetic":
        from mmjax.data.builtin import builtin_classnames
        return builtin_classnames(_media(config))
    from mmjax.evaluate.templates import resolve_classnames
    return resolve_classnames(spec)


def _media(config: Any) -> str:
    """The modality of the model's media tower (its batch key)."""
    return get_family(config).media(config.model)


def _info(msg: str, *args) -> None:
    if jax.process_index() == 0:
        log.info(msg, *args)


# ---------------------------------------------------------------- evaluators


def _batches(config: Any, section: Any, **overrides):
    """Eval batches of `section.shards`, stopping after `section.max_samples` (0 = all).

    Every process reads all of them (see `Share`). A `tfds:NAME[@SPLIT]`
    source reads a prepared TFDS dataset from `evals.tfds_data_dir`."""
    if str(section.shards).startswith("tfds:"):
        from mmjax.data.tfds_source import tfds_batches
        d = config.data.train
        it = tfds_batches(_tfds_source(config, section), output=d.output, mean=d.mean,
                          std=d.std)
    else:
        it = build_eval_iterator(_eval_data(config, section.shards, **overrides),
                                 int(config.evals.batch_size), process_index=0, process_count=1,
                                 media=_media(config))
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


def _tfds_source(config: Any, section: Any):
    """The `TfdsEvalSource` of an evals section whose `shards` is "tfds:NAME[@SPLIT]"."""
    from mmjax.data.tfds_source import parse_tfds_spec, tfds_eval_source
    try:
        name, split = parse_tfds_spec(str(section.shards))
        return tfds_eval_source(name, split, data_dir=config.evals.get("tfds_data_dir") or None,
                                image_size=int(config.data.train.image_size),
                                batch_size=int(config.evals.batch_size))
    except (ImportError, FileNotFoundError, ValueError) as e:
        raise EvalError(f"config.evals: shards={section.shards!r}, tfds_data_dir="
                        f"{config.evals.get('tfds_data_dir')!r}: {e}") from None


def _classifier(config, model, variables, tokenizer, classnames) -> np.ndarray:
    """`zero_shot_classifier`, with the prompt chunks shared out over processes."""
    prompts, num_classes = class_prompts(classnames, config.evals.zeroshot.templates)
    size = int(config.evals.batch_size)
    runner = BatchRunner(model_method(model, "encode_text"), None, variables,
                         rows=min(size, len(prompts)))
    share = Share([prompts[s:s + size] for s in range(0, len(prompts), size)])
    embs = [np.asarray(runner(np.asarray(tokenizer(chunk), np.int32)), np.float32)
            for chunk in share]
    emb, = combine(share.rows(), np.concatenate(embs) if embs else np.zeros(0, np.float32))
    return prompt_ensemble(emb, num_classes)


def _zeroshot(config, model, variables, tokenizer) -> dict:
    zs = config.evals.zeroshot
    if zs.classnames == "tfds":
        if not str(zs.shards).startswith("tfds:"):
            raise EvalError(f"config.evals.zeroshot.classnames='tfds' needs a TFDS source "
                            f"(shards='tfds:NAME[@SPLIT]'), got shards={zs.shards!r}")
        classnames = _tfds_source(config, zs).classnames
    else:
        classnames = _classnames(config, zs.classnames)
    classifier = _classifier(config, model, variables, tokenizer, classnames)
    share = Share(_batches(config, zs))
    topk, labels = zero_shot_predictions(model, variables, classifier, share,
                                         key=_media(config))
    if not share.counts:
        raise EvalError(f"config.evals.zeroshot.shards={zs.shards!r} yielded no batches.")
    topk, labels = combine(share.rows(), topk, labels)
    m = classification_metrics(topk, labels, len(classnames))
    _info("zero-shot top-1 %.2f%% top-5 %.2f%% on %d examples (%d classes)",
          100 * m["top1"], 100 * m["top5"], m["n"], len(classnames))
    return {"zeroshot/top1": m["top1"], "zeroshot/top5": m["top5"],
            "zeroshot/mean_per_class_recall": m["mean_per_class_recall"],
            "zeroshot/n": m["n"], "zeroshot/num_classes": len(classnames), "top1": m["top1"]}


def _retrieval(config, model, variables, tokenizer) -> dict:
    from mmjax.evaluate.retrieval import (blip2_rerank_recall, itc_similarity,
                                          retrieval_embeddings, retrieval_recall)
    section = config.evals.retrieval
    key = section.get("caption_key") or config.data.train.caption_key
    rerank = int(section.get("rerank_k") or 0)
    if rerank and not get_family(config).itm_rerank:
        raise EvalError(f"config.evals.retrieval.rerank_k={rerank}: model {config.model.name!r} "
                        "has no image-text matching head; set it to 0.")
    # A plain member ("txt") holds one caption: no pad rows to embed.
    per_image = int(section.get("num_captions") or 5) if ":" in key else 1
    share = Share(_batches(config, section, text_format="caption_list", caption_key=key,
                            num_captions=per_image))
    img, txt, owner, *inputs = retrieval_embeddings(
        model, variables, share, pad_id=tokenizer.pad_id, key=_media(config),
        inputs=bool(rerank))
    rows = share.rows()
    img, *image_tokens = combine(rows, img, *inputs[:1])
    # Captions follow their image; the stream position of the image is its
    # index in the combined image array.
    txt, text_to_image, *text_ids = combine(rows[owner], txt, rows[owner], *inputs[1:])
    if not len(img):
        raise EvalError(f"config.evals.retrieval.shards={section.shards!r} yielded no valid "
                        "samples.")
    img, txt = l2_normalize(img), l2_normalize(txt)
    m = retrieval_recall(img, txt, text_to_image)
    _info("retrieval i2t R@1 %.2f%% t2i R@1 %.2f%% over %d examples",
          100 * m["i2t_r1"], 100 * m["t2i_r1"], m["n_images"])
    out = {f"retrieval/{k}": v for k, v in m.items()}
    if rerank:
        r = blip2_rerank_recall(model, variables, image_tokens[0], text_ids[0],
                                itc_similarity(img, txt), text_to_image, k=rerank,
                                batch_size=int(config.evals.batch_size))
        _info("retrieval re-ranked by ITM (top %d): i2t R@1 %.2f%% t2i R@1 %.2f%%", rerank,
              100 * r["i2t_r1"], 100 * r["t2i_r1"])
        out.update({f"retrieval/itm_{k}": v for k, v in r.items() if not k.startswith("n_")})
    return out


def _vqa(config, model, variables, tokenizer) -> dict:
    from mmjax.evaluate.vqa import vqa_answers, vqa_report
    section = config.evals.vqa
    types, baseline = None, None
    if section.shards == "synthetic":
        from mmjax.data import synthetic
        types = {q: t for t, q in synthetic.QUESTIONS.items()}
        baseline = synthetic.majority_answer_baselines(
            "train", num_samples=int(config.synthetic.train_samples))["majority_answer"]
    length = int(section.get("max_len") or 0)
    share = Share(_batches(config, section, text_format="dialog", caption_key=section.text_key,
                           **({"max_len": length} if length else {})))
    answers = vqa_answers(get_family(config).answerer(model, variables), share, tokenizer,
                          media=_media(config),
                          max_new_tokens=int(section.max_new_tokens), question_types=types,
                          chunk=int(config.evals.batch_size),
                          template=config.data.train.get("dialog_template", "qa"))
    # Key: the stream index of each question's batch (a stable sort keeps the
    # order of the questions within it).
    fields = ("prediction", "answer", "question", "type")
    batch = np.asarray(share.own, np.int32)[np.asarray(answers["batch"], np.int64)]
    answers = dict(zip(fields, combine(batch, *[answers[f] for f in fields])))
    m = vqa_report(answers, typed=bool(types), baseline_answer=baseline)
    _info("VQA accuracy %.2f%% on %d questions%s; e.g. %s", 100 * m["vqa_accuracy"],
          m["count"], "" if baseline is None else
          f" (majority answer {baseline!r}: {100 * m['baseline_accuracy']:.2f}%)",
          m["examples"][:2])
    return {f"vqa/{k}" if not k.startswith("vqa") else k: v for k, v in m.items()}


def _captioning(config, model, variables, tokenizer) -> dict:
    from mmjax.evaluate.metrics import caption_scores
    cap = config.evals.captioning
    try:
        caption = get_family(config).captioner(model, variables, int(cap.beam_size))
    except UserError as e:
        raise EvalError(str(e)) from None
    media = _media(config)
    preds, refs = [], []
    share = Share(_batches(config, cap))
    for batch in share:
        valid = np.asarray(batch.get("valid", np.ones(len(batch["text"]), bool)), bool)
        texts = caption(np.asarray(batch[media]), tokenizer, int(cap.max_len))
        for i in np.flatnonzero(valid):
            preds.append(texts[i])
            refs.append(tokenizer.decode(np.asarray(batch["text"][i])))
    preds, refs = combine(share.rows(), preds, refs)
    preds = dict(enumerate(preds))  # keys 0..n-1 in stream order, as the scorers iterate
    m = caption_scores(preds, {k: [r] for k, r in enumerate(refs)})
    _info("captioning BLEU-4 %.3f CIDEr %.3f on %d examples; e.g. %r", m["bleu4"], m["cider"],
          len(preds), preds.get(0))
    return {"captioning/bleu4": m["bleu4"], "captioning/cider": m["cider"],
            "captioning/n": len(preds)}


EVALUATORS = {"zeroshot": _zeroshot, "retrieval": _retrieval, "captioning": _captioning,
              "vqa": _vqa}


def run_evals(config: Any, model: Any, variables: Any, mesh: Any = None, *, step: int = 0,
              workdir: Optional[str] = None) -> dict:
    """Run the evaluators enabled in `config.evals` (a section is on when its
    `shards` is set); returns flat `{name: value}` and writes
    `workdir/eval/step_<N>.json`.

    In a multi-process job every process must call it (with its part of
    sharded `variables`); all return the same results, process 0 writes them.
    """
    tokenizer = build_tokenizer(config.data.train.tokenizer, int(config.data.train.max_len))
    # Each process evaluates on its first local device with a host copy of the parameters.
    variables = host_variables(variables)
    results: dict = {}
    for name in enabled_evaluators(config):  # ConfigError for one the family lacks
        results.update(EVALUATORS[name](config, model, variables, tokenizer))
    if workdir and jax.process_index() == 0 and results:
        wd.write_text(wd.join(workdir, "eval", f"step_{step}.json"),
                      json.dumps({"step": step, **results}, indent=1))
    return results
