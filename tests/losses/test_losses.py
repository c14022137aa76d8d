"""Single-device values and gradients of mmjax.losses vs float64 NumPy.

References are written here from the definitions (independent of the
implementation); reference gradients come from central finite differences
in float64.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.losses import (blip2_itc_loss, blip2_itm_triples, caption_loss,
                          itm_loss, next_token_loss, sigmoid_contrastive_loss,
                          softmax_contrastive_loss)

RTOL = 1e-5


# ----------------------------------------------------------------- helpers


def _normalized(rng, *shape):
    x = rng.standard_normal(shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _ce_smoothed(logits, labels, eps):
    """Per-row CE of float64 logits `[n, C]` vs (1-eps)·onehot + eps/C."""
    n, c = logits.shape
    target = np.full((n, c), eps / c)
    target[np.arange(n), labels] += 1.0 - eps
    return -(target * _log_softmax(logits)).sum(axis=-1)


def _num_grads(f, args, h=1e-6):
    """Central differences of scalar f(*args) wrt every arg, in float64."""
    args = [np.array(a, np.float64) for a in args]
    grads = []
    for k, a in enumerate(args):
        g = np.zeros_like(a)
        flat, gflat = a.reshape(-1), g.reshape(-1)
        for idx in range(flat.size):
            orig = flat[idx]
            flat[idx] = orig + h
            up = f(*args)
            flat[idx] = orig - h
            down = f(*args)
            flat[idx] = orig
            gflat[idx] = (up - down) / (2 * h)
        grads.append(g)
    return grads


def _close(actual, expected, rtol=RTOL):
    """Relative closeness; entries are compared at the scale of the array."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-12)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def _check(jax_fn, ref_fn, args, argnums, rtol=RTOL):
    """Value and grads of jax_fn(*args) (float32) vs float64 reference."""
    value, grads = jax.value_and_grad(jax_fn, argnums=argnums)(
        *[jnp.asarray(a) for a in args])
    assert value.dtype == jnp.float32 and value.shape == ()
    _close(value, ref_fn(*[np.float64(a) for a in args]), rtol)
    ref_grads = _num_grads(ref_fn, args)
    for i, g in zip(argnums, grads):
        _close(g, ref_grads[i], rtol)


# ------------------------------------------------------------ references


def ref_softmax(zimg, ztxt, scale, eps=0.0):
    logits = scale * zimg @ ztxt.T
    labels = np.arange(len(zimg))
    return 0.5 * (_ce_smoothed(logits, labels, eps).mean()
                  + _ce_smoothed(logits.T, labels, eps).mean())


def ref_sigmoid(zimg, ztxt, scale, bias):
    logits = scale * zimg @ ztxt.T + bias
    labels = 2 * np.eye(len(zimg)) - 1
    # -log σ(z) = log(1 + exp(-z)), stable form.
    return np.logaddexp(0.0, -labels * logits).sum() / len(zimg)


def ref_sigmoid_identity(zimg, ztxt, scale, bias):
    """Σ softplus(logits) - Σ positive logits, divided by B."""
    logits = scale * zimg @ ztxt.T + bias
    return (np.logaddexp(0.0, logits).sum() - np.trace(logits)) / len(zimg)


def ref_caption(logits, targets, mask, eps=0.0):
    b, l, v = logits.shape
    per_tok = _ce_smoothed(logits.reshape(b * l, v), targets.reshape(-1), eps)
    m = mask.reshape(-1).astype(np.float64)
    return (per_tok * m).sum() / m.sum()


def ref_itc(qf, tf, temp, eps=0.1):
    b, q, _ = qf.shape
    sim = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            sim[i, j] = max(qf[i, k] @ tf[j] for k in range(q))
    labels = np.arange(b)
    return 0.5 * (_ce_smoothed(sim / temp, labels, eps).mean()
                  + _ce_smoothed(sim.T / temp, labels, eps).mean())


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_softmax_contrastive(eps):
    rng = np.random.default_rng(0)
    zimg, ztxt = _normalized(rng, 6, 5), _normalized(rng, 6, 5)
    scale = np.float32(7.5)
    _check(lambda a, b, s: softmax_contrastive_loss(a, b, s, label_smoothing=eps),
           lambda a, b, s: ref_softmax(a, b, s, eps),
           (zimg, ztxt, scale), (0, 1, 2))


def test_sigmoid_contrastive():
    rng = np.random.default_rng(1)
    zimg, ztxt = _normalized(rng, 6, 5), _normalized(rng, 6, 5)
    scale, bias = np.float32(10.0), np.float32(-2.0)
    args = (zimg, ztxt, scale, bias)
    _check(sigmoid_contrastive_loss, ref_sigmoid, args, (0, 1, 2, 3))
    # The identity is a second, independent form of the same loss.
    _check(sigmoid_contrastive_loss, ref_sigmoid_identity, args, (0, 1, 2, 3))
    np.testing.assert_allclose(ref_sigmoid(*map(np.float64, args)),
                               ref_sigmoid_identity(*map(np.float64, args)),
                               rtol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_caption_loss_with_padding(eps):
    rng = np.random.default_rng(2)
    b, l, v = 2, 4, 6
    logits = rng.standard_normal((b, l, v)).astype(np.float32)
    targets = rng.integers(0, v, (b, l))
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    _check(lambda x: caption_loss(x, jnp.asarray(targets), jnp.asarray(mask), eps),
           lambda x: ref_caption(x, targets, mask, eps), (logits,), (0,))
    # Padding really is excluded: changing padded logits changes nothing.
    poked = logits.copy()
    poked[~mask] += 50.0
    np.testing.assert_allclose(caption_loss(poked, targets, mask, eps),
                               caption_loss(logits, targets, mask, eps), rtol=1e-6)


def test_caption_loss_bf16_logits_computed_in_f32():
    rng = np.random.default_rng(3)
    b, l, v = 2, 5, 300
    logits = jnp.asarray(4 * rng.standard_normal((b, l, v)), jnp.bfloat16)
    targets = rng.integers(0, v, (b, l))
    mask = rng.random((b, l)) < 0.7
    mask[0, 0] = True
    value, grad = jax.value_and_grad(caption_loss)(logits, targets, mask, 0.1)
    assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    # The reference sees exactly the bf16-rounded inputs, so the f32 compute
    # must match to float32 precision (bf16 internal math would be ~1e-2 off).
    x64 = np.asarray(logits.astype(jnp.float32), np.float64)
    _close(value, ref_caption(x64, targets, mask, 0.1))
    (ref_grad,) = _num_grads(lambda x: ref_caption(x, targets, mask, 0.1), (x64,))
    _close(np.asarray(grad.astype(jnp.float32)), ref_grad, rtol=1e-2)


def test_next_token_loss():
    rng = np.random.default_rng(4)
    b, l, v, pad = 3, 6, 7, 0
    logits = rng.standard_normal((b, l, v)).astype(np.float32)
    tokens = rng.integers(1, v, (b, l))
    tokens[0, 4:] = pad
    tokens[2, 2:] = pad

    def ref(x):
        tgt = tokens[:, 1:]
        return ref_caption(x[:, :-1], tgt, tgt != pad, 0.1)

    _check(lambda x: next_token_loss(x, jnp.asarray(tokens), pad, 0.1), ref,
           (logits,), (0,))


def test_blip2_itc_loss():
    rng = np.random.default_rng(5)
    b, q, d = 5, 3, 4
    qf, tf = _normalized(rng, b, q, d), _normalized(rng, b, d)
    temp = np.float32(0.2)
    _check(lambda a, t, s: blip2_itc_loss(a, t, s)[0], ref_itc,
           (qf, tf, temp), (0, 1, 2))
    _, sim = blip2_itc_loss(qf, tf, temp)
    ref_sim = np.einsum("iqd,jd->iqj", np.float64(qf), np.float64(tf)).max(1)
    _close(sim, ref_sim)


def test_itm_loss():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((9, 2)).astype(np.float32)
    labels = rng.integers(0, 2, 9)
    _check(lambda x: itm_loss(x, jnp.asarray(labels)),
           lambda x: _ce_smoothed(x, labels, 0.0).mean(), (logits,), (0,))


# ------------------------------------------------------------ ITM triples


def _masked_softmax(rows):
    rows = np.array(rows, np.float64)
    np.fill_diagonal(rows, -np.inf)
    e = np.exp(rows - rows.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_itm_triples_layout_and_determinism():
    rng = np.random.default_rng(7)
    b = 6
    sim = jnp.asarray(rng.standard_normal((b, b)), jnp.float32)
    key = jax.random.PRNGKey(3)
    out = blip2_itm_triples(sim, key, temp=0.5)
    again = blip2_itm_triples(sim, key, temp=0.5)
    for name in ("image_index", "text_index", "labels"):
        assert out[name].dtype == jnp.int32 and out[name].shape == (3 * b,)
        np.testing.assert_array_equal(out[name], again[name])
    img, txt = np.asarray(out["image_index"]), np.asarray(out["text_index"])
    ar = np.arange(b)
    np.testing.assert_array_equal(out["labels"], [1] * b + [0] * (2 * b))
    np.testing.assert_array_equal(img[:b], ar)
    np.testing.assert_array_equal(txt[:b], ar)
    np.testing.assert_array_equal(txt[b:2 * b], ar)   # text j, negative image
    np.testing.assert_array_equal(img[2 * b:], ar)    # image i, negative text
    other = blip2_itm_triples(sim, jax.random.PRNGKey(4), temp=0.5)
    assert not np.array_equal(other["image_index"], out["image_index"]) or \
        not np.array_equal(other["text_index"], out["text_index"])


def test_itm_negatives_follow_masked_softmax():
    rng = np.random.default_rng(8)
    b, draws, temp = 4, 20000, 0.5
    # A peaked diagonal: the positive would dominate if it were not removed.
    sim = rng.standard_normal((b, b)) * 0.3 + 3.0 * np.eye(b)
    sim32 = jnp.asarray(sim, jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), draws)
    out = jax.jit(jax.vmap(lambda k: blip2_itm_triples(sim32, k, temp=temp)))(keys)
    neg_img = np.asarray(out["image_index"][:, b:2 * b])  # [draws, B] per text
    neg_txt = np.asarray(out["text_index"][:, 2 * b:])    # [draws, B] per image
    assert not (neg_img == np.arange(b)).any()
    assert not (neg_txt == np.arange(b)).any()
    sim_scaled = np.float64(np.asarray(sim32)) / temp
    p_img = _masked_softmax(sim_scaled.T)  # row j: image probs for text j
    p_txt = _masked_softmax(sim_scaled)    # row i: text probs for image i
    freq_img = np.stack([np.bincount(neg_img[:, j], minlength=b) for j in range(b)]) / draws
    freq_txt = np.stack([np.bincount(neg_txt[:, i], minlength=b) for i in range(b)]) / draws
    # Std of a frequency is <= 0.5/sqrt(20000) ~ 0.0035; allow ~4 sigma.
    np.testing.assert_allclose(freq_img, p_img, atol=0.015)
    np.testing.assert_allclose(freq_txt, p_txt, atol=0.015)


def test_itm_negatives_skip_excluded_pairs_with_a_fallback():
    """`exclude` (e.g. two samples of one class) removes pairs from the negatives'
    softmax; a row with nothing left draws from every other sample as before."""
    rng = np.random.default_rng(9)
    b, draws, temp = 5, 8000, 0.5
    label = np.array([0, 0, 1, 1, 2])  # sample 4 shares no class: nothing excluded
    exclude = (label[:, None] == label[None, :])
    exclude_all = exclude.copy()
    exclude_all[0] = True  # image 0 / text 0: every pair excluded -> fallback
    sim = rng.standard_normal((b, b)) + 2.0 * exclude  # excluded pairs the most similar
    sim32 = jnp.asarray(sim, jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(1), draws)
    for ex in (exclude, exclude_all):
        out = jax.jit(jax.vmap(lambda k: blip2_itm_triples(sim32, k, temp=temp,
                                                           exclude=jnp.asarray(ex))))(keys)
        neg_img = np.asarray(out["image_index"][:, b:2 * b])  # per text
        neg_txt = np.asarray(out["text_index"][:, 2 * b:])    # per image
        logits = np.float64(np.asarray(sim32)) / temp
        for rows, negs, lg in ((np.arange(b), neg_txt, logits), (np.arange(b), neg_img,
                                                                 logits.T)):
            for i in rows:
                allowed = ~ex[i] if lg is logits else ~ex[:, i]
                allowed[i] = False
                if not allowed.any():  # the fallback: every other sample
                    allowed = np.arange(b) != i
                p = np.where(allowed, np.exp(lg[i] - lg[i].max()), 0.0)
                freq = np.bincount(negs[:, i], minlength=b) / draws
                np.testing.assert_allclose(freq, p / p.sum(), atol=0.02)
                assert not freq[~allowed].any()


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        softmax_contrastive_loss(jnp.zeros((4, 3)), jnp.zeros((5, 3)), 1.0)
    with pytest.raises(ValueError, match="mask shape"):
        caption_loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), int), jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="B >= 2"):
        blip2_itm_triples(jnp.zeros((1, 1)), jax.random.PRNGKey(0))
