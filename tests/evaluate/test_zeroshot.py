"""Zero-shot classification on real (synthetic) images with a freshly trained tiny CLIP.

A TwoTower is fitted for 800 small Adam steps on CPU with the softmax
contrastive loss on the built-in coloured-shapes data; its zero-shot
accuracy on held-out images must be far above chance (1/24), and the
prompt-ensembled classifier must match a float64 NumPy re-computation.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.data.synthetic import CLASSNAMES, make_batch
from mmjax.data.tokenizers import build_tokenizer
from mmjax.evaluate.zeroshot import zero_shot_classifier, zero_shot_evaluate
from mmjax.losses import softmax_contrastive_loss
from mmjax.models import TwoTower

IMAGE = 16
MAX_LEN = 32
TEMPLATES = ["a photo of a {}.", "a {}", "a picture of a {}"]


def _model():
    image = dict(image_size=IMAGE, patch_size=4, width=32, depth=1, heads=2, mlp_dim=64,
                 embed_dim=32)
    text = dict(vocab_size=259, max_len=MAX_LEN, width=32, depth=1, heads=2, mlp_dim=64,
                embed_dim=32)
    return TwoTower(image=image, text=text)


def _prep(images):
    return images.astype(np.float32) / 127.5 - 1.0


@pytest.fixture(scope="module")
def trained():
    tok = build_tokenizer("bytes", MAX_LEN)
    images, _, captions = make_batch(range(3072), "train", IMAGE)
    images, ids = _prep(images), tok(captions)
    model = _model()
    variables = jax.jit(model.init)(jax.random.key(0), images[:2], ids[:2])
    tx = optax.adam(3e-3)
    opt = tx.init(variables)

    @jax.jit
    def step(variables, opt, x, t):
        def loss_fn(v):
            out = model.apply(v, x, t)
            return softmax_contrastive_loss(out["zimg"], out["ztxt"], out["scale"])
        loss, grads = jax.value_and_grad(loss_fn)(variables)
        updates, opt = tx.update(grads, opt, variables)
        return optax.apply_updates(variables, updates), opt, loss

    rng = np.random.default_rng(0)
    losses = []
    for _ in range(800):
        idx = rng.choice(len(images), 64, replace=False)
        variables, opt, loss = step(variables, opt, images[idx], ids[idx])
        losses.append(float(loss))
    return model, variables, tok, losses


def test_zero_shot_accuracy_far_above_chance(trained):
    model, variables, tok, losses = trained
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:5])  # it did learn
    classifier = zero_shot_classifier(model, variables, CLASSNAMES, TEMPLATES, tok,
                                      batch_size=32)
    images, labels, _ = make_batch(range(300), "test", IMAGE)
    batches = [dict(image=_prep(images[s:s + 64]), label=labels[s:s + 64])
               for s in range(0, 300, 64)]
    metrics = zero_shot_evaluate(model, variables, classifier, batches)
    chance = 1 / len(CLASSNAMES)
    assert metrics["n"] == 300
    assert metrics["top1"] > 6 * chance, metrics
    assert metrics["top5"] > metrics["top1"]
    assert metrics["mean_per_class_recall"] > 5 * chance, metrics


def test_classifier_matches_numpy_prompt_ensemble(trained):
    model, variables, tok, _ = trained
    names = CLASSNAMES[:5]
    # batch_size 4 does not divide the 15 prompts: exercises the padded last call.
    classifier = zero_shot_classifier(model, variables, names, TEMPLATES, tok, batch_size=4)
    expected = []
    for name in names:
        ids = tok([t.format(name) for t in TEMPLATES])
        emb = np.asarray(model.apply(variables, jnp.asarray(ids), method="encode_text"),
                         np.float64)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        mean = emb.mean(axis=0)
        expected.append(mean / np.linalg.norm(mean))
    assert classifier.shape == (5, 32)
    np.testing.assert_allclose(classifier, np.stack(expected), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(classifier, axis=1), 1.0, rtol=1e-6)
