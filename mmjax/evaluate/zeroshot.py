"""Zero-shot image classification with prompt-ensembled text classifiers.

    classifier = zero_shot_classifier(model, variables, classnames,
                                      "imagenet80", tokenizer)          # [C, E]
    metrics = zero_shot_evaluate(model, variables, classifier, batches)
    # {"top1": 0.63, "top5": 0.88, "mean_per_class_recall": 0.62, "n": 50000}

The classifier follows CLIP: for each class, every template's text embedding
is L2-normalized, the T embeddings are averaged, and the mean re-normalized.
Images are scored by cosine similarity; for BLIP-2 (image embedding
`[B, Q, E]`, one per query) the score is the max over queries.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mmjax.errors import MissingFieldError
from mmjax.evaluate.metrics import classification_metrics
from mmjax.evaluate.retrieval import BatchRunner, l2_normalize
from mmjax.models.jitted import model_method, per_model
from mmjax.evaluate.templates import resolve_classnames, resolve_templates


def class_prompts(classnames: Union[str, Sequence[str]],
                  templates: Union[str, Sequence[str]]) -> tuple[list[str], int]:
    """The C*T prompts of a prompt-ensembled classifier, class-major (prompt
    `c * T + t` is template t of class c), and C. Arguments as in
    `zero_shot_classifier`."""
    classnames = resolve_classnames(classnames)
    templates = resolve_templates(templates)
    return [t.format(c) for c in classnames for t in templates], len(classnames)


def prompt_ensemble(prompt_emb: np.ndarray, num_classes: int) -> np.ndarray:
    """Class embeddings `[C, E]` from the `[C*T, E]` embeddings of `class_prompts`:
    per class the mean of the T L2-normalized rows, re-normalized."""
    emb = l2_normalize(prompt_emb)
    return l2_normalize(emb.reshape(num_classes, emb.shape[0] // num_classes, -1).mean(axis=1))


def zero_shot_classifier(model: Any, variables: Any, classnames: Union[str, Sequence[str]],
                         templates: Union[str, Sequence[str]], tokenizer: Callable,
                         batch_size: int = 256, mesh: Optional[Mesh] = None) -> np.ndarray:
    """Class embeddings `[C, E]` (unit rows) from prompt templates.

    Args:
      model, variables: a model with `encode_text(ids [B, L]) -> [B, E]`.
      classnames: list of C names (label i = entry i) or a file path
        (see `resolve_classnames`).
      templates: T format strings, or any spec `resolve_templates` accepts
        ("imagenet80", "simple", a file, ...).
      tokenizer: callable list[str] -> int32 `[N, L]`.
      batch_size: prompts encoded per jitted call (the last call is padded).
      mesh: optional mesh with a "data" axis to split the prompts over.

    Returns:
      float32 NumPy `[C, E]`: per class, mean of the T normalized template
      embeddings, re-normalized.
    """
    prompts, num_classes = class_prompts(classnames, templates)
    runner = BatchRunner(model_method(model, "encode_text"), mesh, variables,
                         rows=min(batch_size, len(prompts)))
    embs = []
    for start in range(0, len(prompts), batch_size):
        ids = np.asarray(tokenizer(prompts[start:start + batch_size]), np.int32)
        embs.append(runner(ids))
    return prompt_ensemble(np.concatenate(embs), num_classes)


def zero_shot_scores(image_emb: jax.Array, classifier: jax.Array) -> jax.Array:
    """Cosine scores `[B, C]` of image embeddings `[B, E]` (or `[B, Q, E]`, max
    over queries) against unit class embeddings `[C, E]`."""
    emb = image_emb.astype(jnp.float32)
    emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    if emb.ndim == 3:
        return jnp.einsum("bqe,ce->bqc", emb, classifier).max(axis=1)
    return emb @ classifier.T


@per_model(maxsize=16)
def _topk_fn(model: Any, k: int) -> Callable:
    """Stable `f((variables, classifier), images) -> top-k class ids [b, k]`: the
    same function for the same or an equal model and k (`per_model`)."""
    encode = model_method(model, "encode_image")

    def topk(params, images):
        variables, classifier = params
        scores = zero_shot_scores(encode(variables, images), classifier)
        return jax.lax.top_k(scores, k)[1]
    return topk


def zero_shot_predictions(model: Any, variables: Any, classifier, batches: Iterable,
                          mesh: Optional[Mesh] = None, key: str = "image"
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k class ids and labels of the valid rows of `batches`.

    Arguments as in `zero_shot_evaluate`; `key` is the batch field the model
    encodes ("image", "audio", "video"). Returns `(topk int32 [n, K], labels
    int32 [n])` with K = min(5, C), rows in batch order; n = 0 when the data
    yields nothing.
    """
    classifier = jnp.asarray(classifier, jnp.float32)
    k = min(5, classifier.shape[0])
    runner = BatchRunner(_topk_fn(model, k), mesh, (variables, classifier))
    preds, labels = [np.zeros((0, k), np.int32)], [np.zeros((0,), np.int32)]
    for batch in batches:
        if "label" not in batch:
            raise MissingFieldError(f"zero-shot batches need a 'label' field; got {sorted(batch)}.")
        topk = runner(np.asarray(batch[key]))
        label = np.asarray(batch["label"])
        if batch.get("valid") is not None:
            valid = np.asarray(batch["valid"], bool)
            topk, label = topk[valid], label[valid]
        preds.append(np.asarray(topk, np.int32))
        labels.append(np.asarray(label, np.int32))
    return np.concatenate(preds), np.concatenate(labels)


def zero_shot_evaluate(model: Any, variables: Any, classifier, batches: Iterable,
                       mesh: Optional[Mesh] = None) -> dict:
    """Top-1 / top-5 accuracy and mean per-class recall of a zero-shot classifier.

    Args:
      model, variables: a model with `encode_image(images) -> [B, E]` or
        `[B, Q, E]`.
      classifier: `[C, E]` from `zero_shot_classifier`.
      batches: iterable of dicts with "image" `[b, H, W, 3]` float32, "label"
        int `[b]` and optionally "valid" `[b]` bool (False rows, e.g. the
        padding of a last batch, are excluded).
      mesh: optional mesh with a "data" axis to split each batch over.

    Returns:
      dict(top1, top5, mean_per_class_recall, n): fractions in [0, 1] and the
      number of evaluated images.
    """
    seen = []

    def counted(it):
        for batch in it:
            seen.append(1)
            yield batch
    topk, labels = zero_shot_predictions(model, variables, classifier, counted(batches), mesh)
    if not seen:
        raise ValueError("zero_shot_evaluate: the data yielded no batches.")
    return classification_metrics(topk, labels, int(np.shape(classifier)[0]))
