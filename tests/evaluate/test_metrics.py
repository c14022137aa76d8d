"""Evaluation metrics vs independent computations on hand-made cases.

- retrieval recall@k: similarity matrices built with known ranks, and random
  embeddings vs a brute-force NumPy argsort ranking;
- top-1 / top-5 / mean per-class recall of the zero-shot evaluator vs NumPy;
- BLEU-4 / CIDEr-D vs pycocoevalcap's scorers called directly;
- prompt templates and class-name resolution.
"""
import flax.linen as nn
import jax
import numpy as np
import pytest

from mmjax.evaluate.metrics import (caption_scores, classification_metrics, recall_at_k,
                                    tokenize_caption)
from mmjax.evaluate.retrieval import retrieval_ranks, retrieval_recall
from mmjax.evaluate.templates import (IMAGENET80, resolve_classnames, resolve_templates)
from mmjax.evaluate.zeroshot import zero_shot_evaluate

KS = (1, 5, 10)


# ----------------------------------------------------------------- retrieval


def _brute_force_recall(sim, text_to_image, ks=KS):
    """LAVIS-style ranking: sort every row of the full matrix."""
    n, m = sim.shape
    i2t, t2i = np.empty(n), np.empty(m)
    for i in range(n):
        order = np.argsort(-sim[i])
        i2t[i] = min(np.flatnonzero(order == j)[0] for j in np.flatnonzero(text_to_image == i))
    for j in range(m):
        order = np.argsort(-sim[:, j])
        t2i[j] = np.flatnonzero(order == text_to_image[j])[0]
    out = {f"i2t_r{k}": float(np.mean(i2t < k)) for k in ks}
    out.update({f"t2i_r{k}": float(np.mean(t2i < k)) for k in ks})
    return out


def _captions(rng, n, per_image):
    """text_to_image for n images with per_image[i] captions, captions shuffled."""
    t2i = np.repeat(np.arange(n), per_image)
    return t2i[rng.permutation(len(t2i))]


def test_recall_image_to_text_with_designed_ranks():
    rng = np.random.default_rng(0)
    n = 24
    t2i = _captions(rng, n, rng.integers(1, 4, n))
    m = len(t2i)
    target = rng.integers(0, 15, n)   # rank of each image's best caption
    sim = np.zeros((n, m), np.float32)
    for i in range(n):
        own = rng.permutation(np.flatnonzero(t2i == i))
        others = rng.permutation(np.flatnonzero(t2i != i))
        # target[i] foreign captions, then the best own caption, then the rest.
        order = list(others[:target[i]]) + [own[0]] + list(rng.permutation(
            np.concatenate([own[1:], others[target[i]:]])))
        sim[i, order] = np.arange(m, 0, -1)     # distinct, exact in float32
    # text_emb = identity makes image_emb @ text_emb.T equal to `sim`.
    image_emb, text_emb = sim, np.eye(m, dtype=np.float32)
    i2t, _ = retrieval_ranks(image_emb, text_emb, t2i, block=5)
    np.testing.assert_array_equal(i2t, target)
    got = retrieval_recall(image_emb, text_emb, t2i, KS, block=7)
    for k in KS:
        assert got[f"i2t_r{k}"] == pytest.approx(np.mean(target < k))


def test_recall_text_to_image_with_designed_ranks():
    rng = np.random.default_rng(1)
    n = 30
    t2i = _captions(rng, n, 2)
    m = len(t2i)
    target = rng.integers(0, 14, m)   # rank of each caption's image
    sim = np.zeros((n, m), np.float32)
    for j in range(m):
        others = rng.permutation(np.delete(np.arange(n), t2i[j]))
        order = list(others[:target[j]]) + [t2i[j]] + list(others[target[j]:])
        sim[order, j] = np.arange(n, 0, -1)
    _, t2i_ranks = retrieval_ranks(sim, np.eye(m, dtype=np.float32), t2i, block=8)
    np.testing.assert_array_equal(t2i_ranks, target)
    got = retrieval_recall(sim, np.eye(m, dtype=np.float32), t2i, KS, block=64)
    for k in KS:
        assert got[f"t2i_r{k}"] == pytest.approx(np.mean(target < k))


@pytest.mark.parametrize("block", [3, 16, 1000])
def test_recall_random_embeddings_vs_brute_force(block):
    rng = np.random.default_rng(2)
    n, e = 37, 8
    t2i = _captions(rng, n, rng.integers(1, 6, n))
    img = rng.standard_normal((n, e)).astype(np.float32)
    txt = rng.standard_normal((len(t2i), e)).astype(np.float32)
    got = retrieval_recall(img, txt, t2i, KS, block=block)
    expected = _brute_force_recall(img.astype(np.float64) @ txt.T.astype(np.float64), t2i)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
    assert got["n_images"] == n and got["n_texts"] == len(t2i)


def test_recall_multi_query_images_use_max_over_queries():
    rng = np.random.default_rng(3)
    n, q, e = 20, 4, 6
    t2i = _captions(rng, n, 3)
    img = rng.standard_normal((n, q, e)).astype(np.float32)
    txt = rng.standard_normal((len(t2i), e)).astype(np.float32)
    sim = np.einsum("nqe,me->nqm", img.astype(np.float64), txt).max(axis=1)
    got = retrieval_recall(img, txt, t2i, KS, block=6)
    for key, value in _brute_force_recall(sim, t2i).items():
        assert got[key] == pytest.approx(value), key


def test_recall_rejects_images_without_captions():
    with pytest.raises(ValueError, match="no caption"):
        retrieval_recall(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)[:2],
                         np.array([0, 1]))


def test_recall_at_k_counts():
    assert recall_at_k(np.array([0, 1, 4, 5, 9, 10]), (1, 5, 10)) == {
        1: 1 / 6, 5: 3 / 6, 10: 5 / 6}


# ----------------------------------------------------------------- classification


class _Fixed(nn.Module):
    """`encode_image` returns its input flattened: the "images" are embeddings."""
    queries: int = 0

    def encode_image(self, x):
        b = x.shape[0]
        return x.reshape(b, self.queries, -1) if self.queries else x.reshape(b, -1)


def _numpy_classification(logits, labels):
    order = np.argsort(-logits, axis=1)
    top1 = np.mean(order[:, 0] == labels)
    top5 = np.mean([labels[i] in order[i, :5] for i in range(len(labels))])
    recalls = [np.mean(order[labels == c, 0] == c) for c in np.unique(labels)]
    return top1, top5, np.mean(recalls)


@pytest.mark.parametrize("queries,devices", [(0, 1), (3, 1), (3, 4)])
def test_zero_shot_metrics_vs_numpy(queries, devices):
    rng = np.random.default_rng(4)
    c, e, n = 12, 8, 70
    classifier = rng.standard_normal((c, e)).astype(np.float32)
    classifier /= np.linalg.norm(classifier, axis=1, keepdims=True)
    emb = rng.standard_normal((n, max(queries, 1), e)).astype(np.float32)
    # Some images are made easy so that accuracies are far from 0 and 1.
    labels = rng.integers(0, c, n)
    emb[: n // 2, 0] += 3 * classifier[labels[: n // 2]]
    unit = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    logits = np.einsum("nqe,ce->nqc", unit.astype(np.float64), classifier).max(axis=1)
    top1, top5, mpcr = _numpy_classification(logits, labels)

    images = emb.reshape(n, -1, 1, 1) if queries else emb[:, 0].reshape(n, e, 1, 1)
    # Batches of 16 with padding rows (valid False, garbage label) at the end.
    batches = []
    for s in range(0, n, 16):
        x, y = images[s:s + 16], labels[s:s + 16]
        pad = 16 - len(x)
        batches.append(dict(image=np.concatenate([x, np.ones((pad,) + x.shape[1:], x.dtype)]),
                            label=np.concatenate([y, np.zeros(pad, y.dtype)]),
                            valid=np.arange(16) < len(x)))
    model = _Fixed(queries)
    mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
    got = zero_shot_evaluate(model, {}, classifier, batches, mesh=mesh if devices > 1 else None)
    assert got["n"] == n
    assert got["top1"] == pytest.approx(top1)
    assert got["top5"] == pytest.approx(top5)
    assert got["mean_per_class_recall"] == pytest.approx(mpcr)
    assert 0.2 < top1 < 0.9


def test_classification_metrics_hand_case():
    topk = np.array([[0, 1, 2, 3, 4], [1, 0, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 1, 3, 4]])
    labels = np.array([0, 0, 0, 2])
    got = classification_metrics(topk, labels, num_classes=6)
    # class 0: 1 of 3 right at top-1; class 2: 1 of 1.
    assert got == dict(top1=0.5, top5=1.0, mean_per_class_recall=pytest.approx((1 / 3 + 1) / 2),
                       n=4)
    with pytest.raises(ValueError, match="classnames"):
        classification_metrics(topk, np.array([0, 0, 0, 9]), num_classes=6)


# ----------------------------------------------------------------- captioning


PREDICTIONS = {
    1: "A man riding a wave on top of a surfboard.",
    2: "a dog sitting on a couch",
    3: "Two giraffes standing in a grassy field!",
    4: "a plate of food",
}
REFERENCES = {
    1: ["a man riding a wave on a surfboard", "A surfer rides a large wave.",
        "man on a surfboard in the ocean"],
    2: ["a brown dog lying on a sofa", "A dog sits on the couch."],
    3: ["two giraffes in a field", "Giraffes standing on the grass near trees."],
    4: ["a plate with meat and vegetables", "food on a white plate", "a dinner plate"],
}


def test_caption_scores_equal_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    got = caption_scores(PREDICTIONS, REFERENCES)
    res = {k: [tokenize_caption(v)] for k, v in PREDICTIONS.items()}
    gts = {k: [tokenize_caption(r) for r in v] for k, v in REFERENCES.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    assert got["bleu4"] == pytest.approx(bleu[3])
    assert got["cider"] == pytest.approx(cider)
    assert 0 < got["bleu4"] < 1 and got["cider"] > 0
    assert got["n"] == 4


def test_identical_captions_score_bleu4_one():
    refs = {k: [v] for k, v in PREDICTIONS.items()}
    got = caption_scores(PREDICTIONS, refs)
    assert got["bleu4"] == pytest.approx(1.0, abs=1e-6)
    # Case and punctuation do not matter after tokenization.
    shouted = {k: v.upper() + " ..." for k, v in PREDICTIONS.items()}
    assert caption_scores(shouted, refs)["bleu4"] == pytest.approx(1.0, abs=1e-6)


def test_tokenize_caption_and_errors():
    assert tokenize_caption("A man's Bike-ride, at dusk.") == "a mans bike ride at dusk"
    with pytest.raises(ValueError, match="same ids"):
        caption_scores({1: "a"}, {2: ["a"]})
    with pytest.raises(ValueError, match="non-empty list"):
        caption_scores({1: "a"}, {1: []})


# ----------------------------------------------------------------- templates


def test_imagenet80_templates():
    assert len(IMAGENET80) == 80 and len(set(IMAGENET80)) == 80
    assert IMAGENET80[0] == "a bad photo of a {}." and IMAGENET80[-1] == "a tattoo of the {}."
    assert all(t.count("{}") == 1 for t in IMAGENET80)
    assert resolve_templates("imagenet80") == list(IMAGENET80)
    assert resolve_templates("simple") == ["a photo of a {}."]


def test_resolve_templates_forms(tmp_path):
    assert resolve_templates("itap of a {}.") == ["itap of a {}."]
    assert resolve_templates(["a {}", "the {}"]) == ["a {}", "the {}"]
    f = tmp_path / "t.txt"
    f.write_text("a {}.\n\n  a big {}. \n")
    assert resolve_templates(str(f)) == ["a {}.", "a big {}."]
    for bad in ["imagenet81", ["no slot"], [], 3, ["{} and {}"]]:
        with pytest.raises(ValueError, match="evals.zeroshot.templates"):
            resolve_templates(bad)


def test_resolve_classnames(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("tench\ngoldfish\n\ngreat white shark\n")
    assert resolve_classnames(str(f)) == ["tench", "goldfish", "great white shark"]
    assert resolve_classnames(["cat", "dog"]) == ["cat", "dog"]
    for bad in [str(tmp_path / "missing.txt"), [], ["cat", ""], 5]:
        with pytest.raises(ValueError, match="evals.zeroshot.classnames"):
            resolve_classnames(bad)
