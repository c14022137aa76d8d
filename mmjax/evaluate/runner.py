"""Evaluation runner: the config's `evals` section on a checkpoint or imported weights.

Used by `mmjax train` (periodically and at the end) and by `mmjax eval`:

    mmjax eval --config configs/clip_tiny.py --workdir DIR [--step N]
    mmjax eval --hf /path/to/clip [--config.evals.zeroshot.shards=...]

Results go to `DIR/eval/step_<N>.json` and TensorBoard (`DIR/eval/tensorboard`).
Zero-shot top-1 is stored under the key `top1` as a fraction in [0, 1].
With `report=OUT` (`mmjax eval --report OUT`) the evaluators also keep
per-example details (predictions, rankings, a few media re-read from the eval
stream) and process 0 writes the HTML page of `mmjax.evaluate.report` to
`OUT/index.html`; without it they gather nothing beyond their metrics.

In a multi-process job every process calls `run_evals`: each reads the whole
eval stream, runs the model on its share of the batches (batch i on process
i % P), and the per-example results are gathered on the host, so every
process returns the metrics a single-process run gives; process 0 writes them.
"""
from __future__ import annotations

import contextlib
import json
import logging
from typing import Any, Iterable, Optional

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


# How many examples of each kind the report shows.
REPORT_EXAMPLES = 8     # misclassified zero-shot examples, captioning / VQA samples
REPORT_QUERIES = 5      # retrieval queries each way


def _preview(config: Any, x: Any) -> Optional[np.ndarray]:
    """uint8 `[h, w, 3]` picture of one media row (None: no preview; see `report.preview`)."""
    from mmjax.evaluate.report import preview
    d = config.data.train
    return preview(x, d.mean, d.std)


def _stream_rows(config: Any, section: Any, positions: Iterable[int], **overrides) -> dict:
    """The valid rows at stream `positions` (index among the valid rows of the whole
    eval stream, as `Share.rows()` counts them): `{position: {field: row}}`.

    Re-reads `_batches(config, section, **overrides)` in order and stops after the
    largest position; the report's media are read so (on process 0, after ranking)
    rather than kept from the evaluation pass."""
    want = {int(p) for p in positions}
    out: dict = {}
    if not want:
        return out
    last, pos = max(want), 0
    with contextlib.closing(_batches(config, section, **overrides)) as batches:
        for batch in batches:
            valid = np.asarray(batch["valid"], bool)
            for i in np.flatnonzero(valid):
                if pos in want:
                    out[pos] = {k: np.asarray(v[i]) for k, v in batch.items()
                                if tuple(getattr(v, "shape", ())[:1]) == valid.shape}
                pos += 1
            if pos > last:
                break
    return out


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


def _zeroshot(config, model, variables, tokenizer, details: Optional[dict] = None) -> dict:
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
    if details is not None and jax.process_index() == 0:
        pred = np.asarray(topk)[:, 0]
        wrong = np.flatnonzero(pred != labels)[:REPORT_EXAMPLES]
        rows = _stream_rows(config, zs, wrong)
        key = _media(config)
        details["zeroshot"] = dict(
            predictions=pred, labels=np.asarray(labels), classnames=list(classnames),
            examples=[dict(index=int(p), prediction=int(pred[p]), label=int(labels[p]),
                           media=_preview(config, rows[p][key]) if p in rows else None)
                      for p in wrong])
    return {"zeroshot/top1": m["top1"], "zeroshot/top5": m["top5"],
            "zeroshot/mean_per_class_recall": m["mean_per_class_recall"],
            "zeroshot/n": m["n"], "zeroshot/num_classes": len(classnames), "top1": m["top1"]}


def _retrieval(config, model, variables, tokenizer, details: Optional[dict] = None) -> dict:
    from mmjax.evaluate.retrieval import (dense_groups, blip2_rerank_recall, itc_similarity,
                                          retrieval_embeddings, retrieval_recall)
    section = config.evals.retrieval
    key = section.get("caption_key") or config.data.train.caption_key
    rerank = int(section.get("rerank_k") or 0)
    if rerank and not get_family(config).itm_rerank:
        raise EvalError(f"config.evals.retrieval.rerank_k={rerank}: model {config.model.name!r} "
                        "has no image-text matching head; set it to 0.")
    # A plain member ("txt") holds one caption: no pad rows to embed.
    per_image = int(section.get("num_captions") or 5) if ":" in key else 1
    group_key = str(section.get("group_key") or "")
    stream = dict(text_format="caption_list", caption_key=key, num_captions=per_image,
                  group_key=group_key)
    share = Share(_batches(config, section, **stream))
    img, txt, owner, *extra = retrieval_embeddings(
        model, variables, share, pad_id=tokenizer.pad_id, key=_media(config),
        inputs=bool(rerank), groups=bool(group_key))
    inputs, groups = (extra[:2], extra[2:]) if rerank else ([], extra)
    rows = share.rows()
    img, *image_side = combine(rows, img, *inputs[:1], *groups)
    image_tokens, groups = (image_side[:1], image_side[1:]) if rerank else ([], image_side)
    groups = groups[0] if groups else None
    # Captions follow their image; the stream position of the image is its
    # index in the combined image array.
    txt, text_to_image, *text_ids = combine(rows[owner], txt, rows[owner], *inputs[1:])
    if not len(img):
        raise EvalError(f"config.evals.retrieval.shards={section.shards!r} yielded no valid "
                        "samples.")
    img, txt = l2_normalize(img), l2_normalize(txt)
    by = ""
    if group_key:
        missing = int((groups < 0).sum())
        by = (f" (hits by {group_key}: {len(np.unique(groups[groups >= 0]))} groups"
              + (f"; {missing} samples without it count alone)" if missing else ")"))
    m = retrieval_recall(img, txt, text_to_image, groups=groups)
    _info("retrieval i2t R@1 %.2f%% t2i R@1 %.2f%% over %d examples%s",
          100 * m["i2t_r1"], 100 * m["t2i_r1"], m["n_images"], by)
    out = {f"retrieval/{k}": v for k, v in m.items()}
    if rerank:
        r = blip2_rerank_recall(model, variables, image_tokens[0], text_ids[0],
                                itc_similarity(img, txt), text_to_image, k=rerank,
                                batch_size=int(config.evals.batch_size), groups=groups)
        _info("retrieval re-ranked by ITM (top %d): i2t R@1 %.2f%% t2i R@1 %.2f%%%s", rerank,
              100 * r["i2t_r1"], 100 * r["t2i_r1"], by)
        out.update({f"retrieval/itm_{k}": v for k, v in r.items() if not k.startswith("n_")})
    if details is not None and jax.process_index() == 0:
        details["retrieval"] = _retrieval_details(config, section, stream, img, txt,
                                                  np.asarray(text_to_image), tokenizer)
        if groups is not None:
            details["retrieval"].update(groups=dense_groups(groups, len(img)).tolist(),
                                        group_key=group_key)
    return out


def _host_similarity(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """`retrieval.similarity` on the host: `[N, M]` (max over queries for `[N, Q, E]`)."""
    if img.ndim == 3:
        return np.einsum("nqe,me->nqm", img, txt).max(axis=1)
    return img @ txt.T


def _retrieval_details(config, section, stream: dict, img, txt, t2i: np.ndarray,
                       tokenizer) -> dict:
    """The report's retrieval examples: the top-5 images of the first captions and
    the top-5 captions of the first images (by embedding similarity), the
    thumbnails and caption texts they show re-read from the stream."""
    img, txt = np.asarray(img, np.float32), np.asarray(txt, np.float32)
    k = min(5, len(img), len(txt))
    captions = np.arange(min(REPORT_QUERIES, len(txt)))
    images = np.arange(min(REPORT_QUERIES, len(img)))
    top_images = np.argsort(-_host_similarity(img, txt[captions]).T, axis=1,
                            kind="stable")[:, :k]                            # [q, k]
    top_texts = np.argsort(-_host_similarity(img[images], txt), axis=1,
                           kind="stable")[:, :k]                              # [q, k]
    shown_captions = sorted(set(captions.tolist()) | set(top_texts.reshape(-1).tolist()))
    owners = sorted(set(images.tolist()) | set(top_images.reshape(-1).tolist())
                    | set(t2i[captions].tolist()) | set(t2i[shown_captions].tolist()))
    rows = _stream_rows(config, section, owners, **stream)
    media = _media(config)
    texts = {}
    for c in shown_captions:
        owner = int(t2i[c])
        nth = c - int(np.searchsorted(t2i, owner, side="left"))  # captions follow their image
        ids = np.asarray(rows[owner]["text"]) if owner in rows else np.zeros((0, 1), np.int32)
        ids = ids[None] if ids.ndim == 1 else ids
        ids = ids[(ids != tokenizer.pad_id).any(-1)]             # as retrieval_embeddings
        texts[c] = tokenizer.decode(ids[nth]) if nth < len(ids) else "?"
    return dict(
        text_to_image=t2i,
        text_to_image_queries=[dict(caption=int(c), top=top_images[i].tolist())
                               for i, c in enumerate(captions)],
        image_to_text_queries=[dict(image=int(i), top=top_texts[n].tolist())
                               for n, i in enumerate(images)],
        media={int(i): _preview(config, rows[i][media]) if i in rows else None for i in owners},
        captions=texts, ranked_by="embedding similarity (before any ITM re-ranking)"
        if section.get("rerank_k") else "embedding similarity")


def _vqa(config, model, variables, tokenizer, details: Optional[dict] = None) -> dict:
    from mmjax.evaluate.vqa import vqa_answers, vqa_report
    section = config.evals.vqa
    types, baseline = None, None
    if section.shards == "synthetic":
        from mmjax.data import synthetic
        types = {q: t for t, q in synthetic.QUESTIONS.items()}
        baseline = synthetic.majority_answer_baselines(
            "train", num_samples=int(config.synthetic.train_samples))["majority_answer"]
    length = int(section.get("max_len") or 0)
    stream = dict(text_format="dialog", caption_key=section.text_key,
                  **({"max_len": length} if length else {}))
    share = Share(_batches(config, section, **stream))
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
    if details is not None and jax.process_index() == 0:
        details["vqa"] = _vqa_details(config, section, stream, answers, tokenizer)
    m = vqa_report(answers, typed=bool(types), baseline_answer=baseline)
    _info("VQA accuracy %.2f%% on %d questions%s; e.g. %s", 100 * m["vqa_accuracy"],
          m["count"], "" if baseline is None else
          f" (majority answer {baseline!r}: {100 * m['baseline_accuracy']:.2f}%)",
          m["examples"][:2])
    return {f"vqa/{k}" if not k.startswith("vqa") else k: v for k, v in m.items()}


def _vqa_details(config, section, stream: dict, answers: dict, tokenizer) -> dict:
    """The per-question records of `_vqa` with each one's score, and the media of the
    first questions: the stream is re-read and every valid row's dialog split as
    `vqa_answers` splits it (questions are numbered in stream order)."""
    from mmjax.data.dialog import split_dialog, system_ids
    from mmjax.evaluate.vqa import vqa_accuracy
    system = system_ids(tokenizer, config.data.train.get("dialog_template", "qa"))
    want = min(REPORT_EXAMPLES, len(answers["prediction"]))
    media, key, q = {}, _media(config), 0
    with contextlib.closing(_batches(config, section, **stream)) as batches:
        for batch in batches:
            for i in np.flatnonzero(np.asarray(batch["valid"], bool)):
                turns = split_dialog(batch["text"][i], batch["loss_mask"][i], tokenizer.bos_id,
                                     tokenizer.eos_id, system)
                picture = _preview(config, np.asarray(batch[key][i])) if turns else None
                for _ in turns:
                    if q < want:
                        media[q] = picture
                    q += 1
            if q >= want:
                break
    return dict(**{f: list(answers[f]) for f in ("prediction", "answer", "question", "type")},
                score=[vqa_accuracy(p, [a]) for p, a in zip(answers["prediction"],
                                                             answers["answer"])],
                media=media)


def _captioning(config, model, variables, tokenizer, details: Optional[dict] = None) -> dict:
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
    if details is not None and jax.process_index() == 0:
        rows = _stream_rows(config, cap, range(min(REPORT_EXAMPLES, len(preds))))
        details["captioning"] = dict(
            predictions=[preds[i] for i in range(len(preds))], references=list(refs),
            media={i: _preview(config, r[media]) for i, r in sorted(rows.items())})
    return {"captioning/bleu4": m["bleu4"], "captioning/cider": m["cider"],
            "captioning/n": len(preds)}


def _grounding(config, model, variables, tokenizer, details: Optional[dict] = None) -> dict:
    """Pointing game of `mmjax.evaluate.grounding.grounding_eval`; its examples (maps
    drawn over images) go to the report."""
    from mmjax.evaluate.grounding import grounding_eval
    metrics, info = grounding_eval(config, model, variables, tokenizer)
    if details is not None and jax.process_index() == 0:
        details["grounding"] = {"examples": list((info or {}).get("examples") or [])}
    return metrics


# name -> evaluator(config, model, variables, tokenizer, details=None) -> flat metrics;
# `details` (a dict, only when a report is asked for) receives its per-example results
# under the evaluator's name on process 0 (see `report.write_report`).
EVALUATORS = {"zeroshot": _zeroshot, "retrieval": _retrieval, "captioning": _captioning,
              "vqa": _vqa, "grounding": _grounding}


def run_evals(config: Any, model: Any, variables: Any, mesh: Any = None, *, step: int = 0,
              workdir: Optional[str] = None, report: Optional[str] = None,
              report_info: Optional[dict] = None) -> dict:
    """Run the evaluators enabled in `config.evals` (a section is on when its
    `shards` is set); returns flat `{name: value}` and writes
    `workdir/eval/step_<N>.json`.

    `report`: a local folder for the HTML report (`report.write_report`: the
    metrics, per-example details, the training curves of `workdir`);
    `report_info`: extra `{name: value}` rows for its Run table (e.g. the recipe).

    In a multi-process job every process must call it (with its part of
    sharded `variables`); all return the same results, process 0 writes them
    (and the report, from the gathered per-example results).
    """
    tokenizer = build_tokenizer(config.data.train.tokenizer, int(config.data.train.max_len))
    # Each process evaluates on its first local device with a host copy of the parameters.
    variables = host_variables(variables)
    results: dict = {}
    details: Optional[dict] = {"media_kind": _media(config)} if report else None
    for name in enabled_evaluators(config):  # ConfigError for one the family lacks
        evaluator = EVALUATORS[name]
        results.update(evaluator(config, model, variables, tokenizer, details)
                       if details is not None else evaluator(config, model, variables, tokenizer))
    if workdir and jax.process_index() == 0 and results:
        wd.write_text(wd.join(workdir, "eval", f"step_{step}.json"),
                      json.dumps({"step": step, **results}, indent=1))
    if report and jax.process_index() == 0 and results:
        from mmjax.evaluate.report import write_report
        write_report(report, results, details, config=config, workdir=workdir, step=step,
                     info=report_info)
    return results
