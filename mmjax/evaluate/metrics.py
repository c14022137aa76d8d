"""Host-side evaluation metrics: classification accuracy, recall@k, BLEU-4, CIDEr-D.

Everything here takes NumPy arrays (or Python dicts of strings) already on
the host; the heavy similarity work happens on device in `zeroshot` and
`retrieval`, which hand over top-k indices or ranks.

Captioning scores use the Bleu and Cider scorers of `pycocoevalcap` (pure
Python; its `Cider` is the CIDEr-D variant of the COCO caption server). The
server's PTB tokenizer needs Java, so captions are tokenized here instead:
lowercase, apostrophes removed ("don't" -> "dont"), every other character
that is not a letter, digit or whitespace replaced by a space, then split on
whitespace. Scores are therefore close to, not identical with, the server's.
"""
from __future__ import annotations

import re
from typing import Hashable, Mapping, Sequence

import numpy as np

from mmjax.errors import ConfigError


def classification_metrics(topk: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Top-1, top-5 and mean per-class recall from ranked predictions.

    Args:
      topk: int `[N, K]` class indices sorted by decreasing score (K >= 1;
        top-5 uses the first min(5, K) columns).
      labels: int `[N]` true labels in `[0, num_classes)`.
      num_classes: C.

    Returns:
      dict(top1, top5, mean_per_class_recall, n): fractions in [0, 1];
      `mean_per_class_recall` averages the top-1 recall over the classes that
      occur in `labels`. All metrics are 0.0 when N == 0.
    """
    topk = np.asarray(topk)
    labels = np.asarray(labels).astype(np.int64)
    if topk.ndim != 2 or topk.shape[0] != labels.shape[0]:
        raise ValueError(f"topk must be [N, K] and labels [N]; got {topk.shape} and "
                         f"{labels.shape}.")
    n = int(labels.shape[0])
    if n == 0:
        return dict(top1=0.0, top5=0.0, mean_per_class_recall=0.0, n=0)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ConfigError(f"labels must lie in [0, {num_classes}) (one per class name); found "
                          f"{labels.min()}..{labels.max()}. Check evals.zeroshot.classnames.")
    hit1 = topk[:, 0] == labels
    hit5 = np.any(topk[:, :5] == labels[:, None], axis=1)
    count = np.bincount(labels, minlength=num_classes)
    correct = np.bincount(labels, weights=hit1, minlength=num_classes)
    present = count > 0
    return dict(top1=float(hit1.mean()), top5=float(hit5.mean()),
                mean_per_class_recall=float(np.mean(correct[present] / count[present])), n=n)


def recall_at_k(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Fraction of queries whose (0-based) rank is below k, for each k.

    Args:
      ranks: int `[N]`: number of candidates scored strictly higher than the
        best correct one (0 = retrieved first).
      ks: the cut-offs.

    Returns:
      {k: fraction in [0, 1]} (0.0 for an empty `ranks`).
    """
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return {int(k): 0.0 for k in ks}
    return {int(k): float(np.mean(ranks < k)) for k in ks}


_APOSTROPHES = re.compile(r"['\u2019`]")
_NON_WORD = re.compile(r"[^\w\s]|_")


def tokenize_caption(text: str) -> str:
    """Lowercase, drop apostrophes, other punctuation -> space, single spaces.

    "A man's Bike-ride, at dusk." -> "a mans bike ride at dusk"
    """
    text = _APOSTROPHES.sub("", str(text).lower())
    return " ".join(_NON_WORD.sub(" ", text).split())


def caption_scores(predictions: Mapping[Hashable, str],
                   references: Mapping[Hashable, Sequence[str]]) -> dict:
    """Corpus BLEU-4 and CIDEr-D of predicted captions (pycocoevalcap scorers).

    Args:
      predictions: id -> one predicted caption.
      references: id -> list of reference captions (at least one each); must
        have exactly the ids of `predictions`.

    Returns:
      dict(bleu4, cider, n). BLEU-4 is in [0, 1]; CIDEr-D is on the usual
      scale (x10 folded in, so good COCO models score around 1.0-1.4). CIDEr's
      IDF comes from the references of this set, so it needs several images to
      be meaningful (one image gives 0).
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("captioning metrics need the `pycocoevalcap` package: "
                          "pip install pycocoevalcap") from e
    if set(predictions) != set(references):
        missing = sorted(map(str, set(references) - set(predictions)))[:5]
        extra = sorted(map(str, set(predictions) - set(references)))[:5]
        raise ValueError(f"caption_scores: predictions and references must have the same ids; "
                         f"without prediction: {missing}, without references: {extra}.")
    if not predictions:
        raise ValueError("caption_scores: no captions to score.")
    res, gts = {}, {}
    for key in predictions:
        refs = references[key]
        if isinstance(refs, str) or not refs:
            raise ValueError(f"caption_scores: references[{key!r}] must be a non-empty list of "
                             "strings.")
        res[key] = [tokenize_caption(predictions[key])]
        gts[key] = [tokenize_caption(r) for r in refs]
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return dict(bleu4=float(bleu[3]), cider=float(cider), n=len(res))
