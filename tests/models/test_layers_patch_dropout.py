"""Patch dropout (`layers.drop_patches`, FLIP) in the towers that use it: ViT, AST and the
frame ViT of VideoViT.

The reference is the tower's own unmasked output with the same parameters: with no
blocks (`depth=0`) every output token is a function of its own embedding alone (position
embedding, per-token LayerNorm), so each token a training call keeps must be, bit for
bit, one row of the evaluation call's tokens. Matching the rows recovers which patches
each example kept, without reading the mask from mmjax."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError
from mmjax.models.ast import AST
from mmjax.models.layers import kept_patches
from mmjax.models.video import VideoViT
from mmjax.models.vit import ViT

B = 6
SMALL = dict(width=16, heads=2, mlp_dim=32)


def _kept_rows(train, full, prefix):
    """`train [B, P + K, D]` tokens of a training call, `full [B, P + N, D]` of an
    evaluation call: checks that the first `prefix` rows are equal and that every
    other training row is exactly one patch row of `full`; returns the patch indices
    `[B, K]` each example kept."""
    train, full = np.asarray(train), np.asarray(full)
    np.testing.assert_array_equal(train[:, :prefix], full[:, :prefix])
    kept = []
    for t, f in zip(train[:, prefix:], full[:, prefix:]):
        same = (t[:, None, :] == f[None, :, :]).all(-1)       # [K, N]
        assert (same.sum(1) == 1).all(), "a kept token is not one patch's embedding"
        kept.append(same.argmax(1))
    return np.stack(kept)


def _apply(model):
    """`fn(variables, x, key=None)`: `model.apply` jitted (one compile per call kind
    instead of one per operation), with an "augment" rng when `key` is given."""
    evaluate = jax.jit(model.apply)
    train = jax.jit(lambda v, x, k: model.apply(v, x, rngs={"augment": k}))
    return lambda v, x, key=None: evaluate(v, x) if key is None else train(v, x, key)


def _run(model, x, key):
    variables = jax.jit(model.init)(jax.random.key(0), x)
    apply = _apply(model)
    return variables, apply, apply(variables, x, key)[1], apply(variables, x)[1]


@pytest.mark.parametrize("fields", [dict(pool="cls", posemb="learned", ln_pre=True),
                                    dict(pool="gap", posemb="sincos2d")],
                         ids=["cls-learned", "gap-sincos2d"])
def test_vit_keeps_a_random_subset_of_each_images_patch_embeddings(fields):
    """16 patches at 0.5: 8 kept per image, in order, the class token always; different
    images and different keys keep different patches; the same key the same ones."""
    model = ViT(image_size=32, patch_size=8, depth=0, patch_dropout=0.5, **SMALL, **fields)
    x = jax.random.normal(jax.random.key(1), (B, 32, 32, 3))
    prefix = 1 if fields["pool"] == "cls" else 0
    variables, apply, train, full = _run(model, x, jax.random.key(2))
    assert full.shape == (B, prefix + 16, 16) and train.shape == (B, prefix + 8, 16)
    kept = _kept_rows(train, full, prefix)
    assert (np.diff(kept, axis=1) > 0).all()                 # distinct, original order
    assert len({tuple(k) for k in kept}) > 1                 # a mask per image
    np.testing.assert_array_equal(apply(variables, x, jax.random.key(2))[1], train)
    other = apply(variables, x, jax.random.key(3))[1]
    assert (_kept_rows(other, full, prefix) != kept).any()
    # Over many draws every patch is kept about half the time (no position favoured).
    draws = np.concatenate([_kept_rows(apply(variables, x, k)[1], full, prefix)
                            for k in jax.random.split(jax.random.key(4), 16)])
    counts = np.bincount(draws.ravel(), minlength=16) / len(draws)
    assert counts.min() > 0.25 and counts.max() < 0.75, counts


def test_ast_keeps_class_and_distillation_tokens_and_video_frames_draw_their_own():
    """AST (2 leading tokens) keeps both and round(12 x 0.25) = 3 of its 12 spectrogram
    patches; VideoViT's frame ViT draws a mask per frame (tokens of `pool="none"`)."""
    ast = AST(n_mels=32, max_length=64, patch_size=16, frequency_stride=16, time_stride=16,
              depth=0, patch_dropout=0.75, **SMALL)
    spec = jax.random.normal(jax.random.key(1), (B, 64, 32))
    _, _, train, full = _run(ast, spec, jax.random.key(2))
    assert full.shape[1] == 2 + 8 and train.shape[1] == 2 + kept_patches(8, 0.75) == 4
    _kept_rows(train, full, 2)

    video = VideoViT(image_size=16, patch_size=8, depth=0, pool="none", num_frames=3,
                     patch_dropout=0.5, **SMALL)
    clips = jax.random.normal(jax.random.key(1), (2, 3, 16, 16, 3))
    _, _, train, full = _run(video, clips, jax.random.key(2))
    assert full.shape[1] == 3 * 4 and train.shape[1] == 3 * 2
    kept = _kept_rows(train.reshape(6, 2, 16), full.reshape(6, 4, 16), 0)
    assert len({tuple(k) for k in kept}) > 1


def test_evaluation_sees_every_patch():
    """Without an "augment" rng (evaluation) a tower with patch dropout computes exactly
    what the same tower without it does, on the same parameters; the training call's
    pooled output differs."""
    x = jax.random.normal(jax.random.key(1), (B, 32, 32, 3))
    fields = dict(image_size=32, patch_size=8, pool="gap", depth=1, **SMALL)
    dropping = ViT(patch_dropout=0.5, **fields)
    variables = jax.jit(dropping.init)(jax.random.key(0), x)
    plain = _apply(ViT(**fields))(variables, x)
    apply = _apply(dropping)
    for a, b in zip(apply(variables, x), plain):
        np.testing.assert_array_equal(a, b)
    pooled = apply(variables, x, jax.random.key(2))[0]
    assert np.abs(np.asarray(pooled) - np.asarray(plain[0])).max() > 1e-3


def test_kept_count_and_range():
    assert [kept_patches(196, r) for r in (0.0, 0.5, 0.75, 0.9)] == [196, 98, 49, 20]
    assert kept_patches(100, 0.7) == 30 and kept_patches(4, 0.99) == 1
    model = ViT(image_size=16, patch_size=8, depth=0, patch_dropout=1.0, **SMALL)
    with pytest.raises(ConfigError, match=r"config\.model\.image\.patch_dropout=1\.0: must be"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
