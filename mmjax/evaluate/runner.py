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
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mmjax.data.pipeline import build_eval_iterator
from mmjax.data.tokenizers import build_tokenizer
from mmjax.train import workdir as wd
from mmjax.evaluate.metrics import classification_metrics
from mmjax.evaluate.retrieval import BatchRunner, l2_normalize, model_method
from mmjax.evaluate.zeroshot import class_prompts, prompt_ensemble, zero_shot_predictions
from mmjax.errors import UserError

log = logging.getLogger("mmjax")


class EvalError(UserError, RuntimeError):
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


def _info(msg: str, *args) -> None:
    if jax.process_index() == 0:
        log.info(msg, *args)


# ---------------------------------------------------------------- several processes


def _host_variables(variables: Any) -> Any:
    """A full NumPy copy of `variables` on every process.

    Arrays sharded over several processes (FSDP train state) are all-gathered
    (every process must call this). We copy rather than evaluate on the
    sharded global arrays so each process runs its batches on its own device
    with the very programs of a single-process run: results match it exactly,
    no collective runs per batch (processes may take different numbers of
    batches), and the Python-driven decoding loops of captioning / VQA need
    no lockstep. The cost is one parameter copy per host, which single-device
    evaluation needs anyway.
    """
    leaves, treedef = jax.tree.flatten(variables)
    spread = [i for i, a in enumerate(leaves)
              if isinstance(a, jax.Array) and not a.is_fully_addressable]
    for i in spread:  # one leaf at a time: the replicated temporary stays small
        leaves[i] = multihost_utils.process_allgather(leaves[i], tiled=True)
    return jax.device_get(jax.tree.unflatten(treedef, leaves))


class _Share:
    """This process's share of a stream of eval batches: batch i goes to
    process i % P.

    Every process reads the whole stream (same batches, padding and
    `max_samples` cut as a single process) and hands on only its own batches,
    so each example is evaluated once, in the same batch as in a
    single-process run. Items are batch dicts (rows: the True entries of
    "valid") or sequences (rows: all entries).
    """

    def __init__(self, items):
        self.items = items
        self.own: list[int] = []      # stream index of each batch handed on, in order
        self.counts: list[int] = []   # valid rows of every batch of the stream

    def __iter__(self):
        p, n = jax.process_index(), jax.process_count()
        for i, item in enumerate(self.items):
            self.counts.append(int(np.sum(item["valid"])) if isinstance(item, dict)
                               and "valid" in item else len(item))
            if i % n == p:
                self.own.append(i)
                yield item

    def rows(self) -> np.ndarray:
        """int32 `[n]`: for each valid row of this process's batches (in the
        order handed on), its index among the valid rows of the whole stream
        (= its position in a single-process run). Call after iterating."""
        start = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        return np.concatenate([np.zeros(0, np.int32)] + [
            np.arange(start[i], start[i + 1], dtype=np.int32) for i in self.own])


def _allgather(x: np.ndarray) -> np.ndarray:
    """The rows of every process, process 0's first: `[n_p, ...]` -> `[sum n_p, ...]`.

    A fixed-shape host collective: row counts and trailing sizes are
    gathered first, then every process's rows zero-padded to the largest
    shape. Trailing dims may differ (shorter ones come back zero-padded) and a
    process without rows may pass shape `[0]`; the dtype must be the same
    everywhere (no 64-bit types: JAX moves them as 32-bit).
    """
    x = np.asarray(x)
    head = np.full(8, -1, np.int32)  # [rows, trailing dims..., -1 ...]
    head[0] = len(x)
    if len(x):
        if x.ndim > len(head):
            raise ValueError(f"cannot gather a {x.ndim}-d array (at most {len(head)} dims)")
        head[1:x.ndim] = x.shape[1:]
    heads = multihost_utils.process_allgather(head)                         # [P, 8]
    counts = heads[:, 0]
    if not counts.any():
        return x
    shapes = heads[counts > 0, 1:]
    trailing = tuple(int(d) for d in shapes.max(0)[:int((shapes[0] >= 0).sum())])
    buf = np.zeros((int(counts.max()),) + trailing, x.dtype)
    if len(x):
        buf[tuple(slice(0, d) for d in x.shape)] = x
    every = multihost_utils.process_allgather(buf)                         # [P, n, ...]
    return np.concatenate([every[p, :c] for p, c in enumerate(counts)])


def _encode_strings(texts: list[str]) -> np.ndarray:
    """uint8 `[n, 4 + W]`: little-endian byte length, then the UTF-8 bytes."""
    data = [t.encode("utf-8") for t in texts]
    out = np.zeros((len(data), 4 + max([len(d) for d in data], default=0)), np.uint8)
    for i, d in enumerate(data):
        out[i, :4] = np.frombuffer(np.uint32(len(d)).tobytes(), np.uint8)
        out[i, 4:4 + len(d)] = np.frombuffer(d, np.uint8)
    return out


def _decode_strings(rows: np.ndarray) -> list[str]:
    sizes = rows[:, :4].copy().view("<u4")[:, 0] if len(rows) else []
    return [bytes(r[4:4 + int(n)]).decode("utf-8") for r, n in zip(rows, sizes)]


def _combine(keys: np.ndarray, *columns):
    """Per-row results of every process, in single-process order.

    `keys` int `[n]` orders the rows (the stream position from
    `_Share.rows()`, or the stream index of the batch a row came from; a
    stable sort keeps the order of rows with equal keys). Columns are arrays
    `[n, ...]` or lists of n strings; they come back in the same kinds.
    """
    if jax.process_count() == 1:
        return columns
    order = np.argsort(_allgather(np.asarray(keys, np.int32)), kind="stable")
    out = []
    for c in columns:
        if isinstance(c, list):
            every = _decode_strings(_allgather(_encode_strings(c)))  # one gather per column
            out.append([every[i] for i in order])
        else:
            out.append(_allgather(c)[order])
    return out


# ---------------------------------------------------------------- evaluators


def _batches(config: Any, section: Any, **overrides):
    """Eval batches of `section.shards`, stopping after `section.max_samples` (0 = all).

    Every process reads all of them (see `_Share`). A `tfds:NAME[@SPLIT]`
    source reads a prepared TFDS dataset from `evals.tfds_data_dir`."""
    if str(section.shards).startswith("tfds:"):
        from mmjax.data.tfds_source import tfds_batches
        d = config.data.train
        it = tfds_batches(_tfds_source(config, section), output=d.output, mean=d.mean,
                          std=d.std)
    else:
        it = build_eval_iterator(_eval_data(config, section.shards, **overrides),
                                 int(config.evals.batch_size), process_index=0, process_count=1)
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
    share = _Share([prompts[s:s + size] for s in range(0, len(prompts), size)])
    embs = [np.asarray(runner(np.asarray(tokenizer(chunk), np.int32)), np.float32)
            for chunk in share]
    emb, = _combine(share.rows(), np.concatenate(embs) if embs else np.zeros(0, np.float32))
    return prompt_ensemble(emb, num_classes)


def _zeroshot(config, model, variables, tokenizer) -> dict:
    zs = config.evals.zeroshot
    if zs.classnames == "tfds":
        if not str(zs.shards).startswith("tfds:"):
            raise EvalError(f"config.evals.zeroshot.classnames='tfds' needs a TFDS source "
                            f"(shards='tfds:NAME[@SPLIT]'), got shards={zs.shards!r}")
        classnames = _tfds_source(config, zs).classnames
    else:
        classnames = _classnames(zs.classnames)
    classifier = _classifier(config, model, variables, tokenizer, classnames)
    share = _Share(_batches(config, zs))
    topk, labels = zero_shot_predictions(model, variables, classifier, share)
    if not share.counts:
        raise EvalError(f"config.evals.zeroshot.shards={zs.shards!r} yielded no batches.")
    topk, labels = _combine(share.rows(), topk, labels)
    m = classification_metrics(topk, labels, len(classnames))
    _info("zero-shot top-1 %.2f%% top-5 %.2f%% on %d images (%d classes)",
          100 * m["top1"], 100 * m["top5"], m["n"], len(classnames))
    return {"zeroshot/top1": m["top1"], "zeroshot/top5": m["top5"],
            "zeroshot/mean_per_class_recall": m["mean_per_class_recall"],
            "zeroshot/n": m["n"], "zeroshot/num_classes": len(classnames), "top1": m["top1"]}


def _retrieval(config, model, variables, tokenizer) -> dict:
    from mmjax.evaluate.retrieval import retrieval_embeddings, retrieval_recall
    section = config.evals.retrieval
    key = section.get("caption_key") or config.data.train.caption_key
    # A plain member ("txt") holds one caption: no pad rows to embed.
    per_image = int(section.get("num_captions") or 5) if ":" in key else 1
    share = _Share(_batches(config, section, text_format="captions", caption_key=key,
                            num_captions=per_image))
    img, txt, owner = retrieval_embeddings(model, variables, share, pad_id=tokenizer.pad_id)
    rows = share.rows()
    img, = _combine(rows, img)
    # Captions follow their image; the stream position of the image is its
    # index in the combined image array.
    txt, text_to_image = _combine(rows[owner], txt, rows[owner])
    if not len(img):
        raise EvalError(f"config.evals.retrieval.shards={section.shards!r} yielded no valid "
                        "samples.")
    m = retrieval_recall(l2_normalize(img), l2_normalize(txt), text_to_image)
    _info("retrieval i2t R@1 %.2f%% t2i R@1 %.2f%% over %d images",
          100 * m["i2t_r1"], 100 * m["t2i_r1"], m["n_images"])
    return {f"retrieval/{k}": v for k, v in m.items()}


def _vqa(config, model, variables, tokenizer) -> dict:
    from mmjax.evaluate.vqa import vqa_answers, vqa_report
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
    share = _Share(_batches(config, section, text_format="dialog", caption_key=section.text_key))
    answers = vqa_answers(model, variables, share, tokenizer,
                          max_new_tokens=int(section.max_new_tokens), question_types=types,
                          chunk=int(config.evals.batch_size),
                          template=config.data.train.get("dialog_template", "qa"))
    # Key: the stream index of each question's batch (a stable sort keeps the
    # order of the questions within it).
    fields = ("prediction", "answer", "question", "type")
    batch = np.asarray(share.own, np.int32)[np.asarray(answers["batch"], np.int64)]
    answers = dict(zip(fields, _combine(batch, *[answers[f] for f in fields])))
    m = vqa_report(answers, typed=bool(types), baseline_answer=baseline)
    _info("VQA accuracy %.2f%% on %d questions%s; e.g. %s", 100 * m["vqa_accuracy"],
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
    preds, refs = [], []
    share = _Share(_batches(config, cap))
    for batch in share:
        valid = np.asarray(batch.get("valid", np.ones(len(batch["text"]), bool)), bool)
        images = np.asarray(batch["image"])
        if isinstance(model, VisionLM):
            texts = _vlm_captions(model, variables, images, tokenizer, int(cap.max_len))
        else:
            texts = captioning.generate_captions(
                make[type(model)](model, variables, images), len(images), tokenizer,
                int(cap.max_len), beam_size=int(cap.beam_size))
        for i in np.flatnonzero(valid):
            preds.append(texts[i])
            refs.append(tokenizer.decode(np.asarray(batch["text"][i])))
    preds, refs = _combine(share.rows(), preds, refs)
    preds = dict(enumerate(preds))  # keys 0..n-1 in stream order, as the scorers iterate
    m = caption_scores(preds, {k: [r] for k, r in enumerate(refs)})
    _info("captioning BLEU-4 %.3f CIDEr %.3f on %d images; e.g. %r", m["bleu4"], m["cider"],
          len(preds), preds.get(0))
    return {"captioning/bleu4": m["bleu4"], "captioning/cider": m["cider"],
            "captioning/n": len(preds)}


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
    variables = _host_variables(variables)
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
    """`mmjax eval`: evaluate a workdir checkpoint or a Hugging Face folder
    (in one process, or in every process of a job started as for `mmjax train`)."""
    from mmjax.train.config_utils import load_config
    from mmjax.train.runtime import maybe_initialize_distributed
    maybe_initialize_distributed()
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
    results = run_evals(config, model, {"params": state["params"]}, mesh, step=step,
                        workdir=workdir)
    if not results:
        raise EvalError(nothing_to_evaluate(f"{workdir} (step {step})"))
    return {"step": step, **results}


def nothing_to_evaluate(what: str) -> str:
    """The message for a config that enables no evaluation of `what`."""
    return (f"nothing to evaluate for {what}: its config enables no evaluation; ask for one "
            "with --config.evals.zeroshot.shards=PATTERN (two-tower models), "
            "--config.evals.retrieval.shards=PATTERN, --config.evals.captioning.shards=PATTERN "
            "(CoCa, BLIP-2) or --config.evals.vqa.shards=PATTERN (VisionLM); 'synthetic' is "
            "the held-out built-in data")


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
    results = run_evals(config, model, variables, step=0, workdir=None)
    if not results:
        raise EvalError(nothing_to_evaluate(path))
    return results
