"""The one-tower objectives (`mmjax.losses.one_tower`): BERT's MLM masking, the
masked-LM loss and VQA's soft-score binary cross-entropy, against float64 NumPy
written from the definitions (and PyTorch's BCE where torch is installed)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.losses import mask_tokens, masked_lm_loss, vqa_loss, vqa_targets

SPECIALS = (0, 1, 2)  # pad, BOS, EOS
V, MASK = 1000, 999


def _text(rng, b, l):
    """Rows `[BOS] tokens [EOS] pad...` of ids in [3, MASK) (never the mask id)."""
    text = rng.integers(3, MASK, (b, l)).astype(np.int32)
    text[:, 0] = 1
    for row, n in zip(text, rng.integers(2, l, b)):
        row[n] = 2
        row[n + 1:] = 0
    return text


# ----------------------------------------------------------------- mask_tokens


def test_mask_tokens_follows_bert_rates_and_never_touches_specials():
    """On ~60k maskable tokens: 15% chosen (bound 0.01 = ~7 sigma), of those 80%
    [MASK], 10% random, 10% unchanged (bounds 0.03, > 7 sigma); specials and pad
    never chosen nor changed; random ids uniform over the whole vocabulary."""
    rng = np.random.default_rng(0)
    text = _text(rng, 768, 160)
    masked, chosen = jax.jit(lambda t, k: mask_tokens(
        t, k, mask_id=MASK, vocab_size=V, special_ids=SPECIALS))(jnp.asarray(text),
                                                                  jax.random.key(3))
    masked, chosen = np.asarray(masked), np.asarray(chosen)
    assert masked.shape == text.shape and masked.dtype == np.int32 and chosen.dtype == bool
    special = np.isin(text, SPECIALS)
    assert special.sum() > 10_000  # the rows really hold pad, BOS and EOS
    assert not chosen[special].any()
    np.testing.assert_array_equal(masked[~chosen], text[~chosen])  # only chosen ones change
    n = (~special).sum()
    assert n > 45_000
    assert abs(chosen.sum() / n - 0.15) < 0.01, chosen.sum() / n
    picked, original = masked[chosen], text[chosen]
    k = len(picked)
    # A random id equals [MASK] or the original with probability 1/V each.
    to_mask = (picked == MASK).mean()
    same = (picked == original).mean()
    other = ((picked != MASK) & (picked != original)).mean()
    assert abs(to_mask - (0.8 + 0.1 / V)) < 0.03, to_mask
    assert abs(same - (0.1 + 0.1 / V)) < 0.03, same
    assert abs(other - 0.1 * (1 - 2 / V)) < 0.03, other
    random_ids = picked[(picked != MASK) & (picked != original)]
    assert len(random_ids) > 0.05 * k
    assert random_ids.min() >= 0 and random_ids.max() < V
    # Uniform over [0, V): mean (V - 1) / 2, sd of the mean ~ 289 / sqrt(~1000) ~ 9.
    assert abs(random_ids.mean() - (V - 1) / 2) < 60, random_ids.mean()
    assert (random_ids < 3).sum() <= len(random_ids) * 0.02  # not skewed to the specials
    # Positions are chosen independently of where they are in the row.
    first_half = chosen[:, 1:40][~special[:, 1:40]].mean()
    assert abs(first_half - 0.15) < 0.02


def test_mask_tokens_is_deterministic_per_key_and_reads_the_given_specials():
    rng = np.random.default_rng(1)
    text = jnp.asarray(_text(rng, 16, 40))
    kw = dict(mask_id=MASK, vocab_size=V, special_ids=SPECIALS)
    a = mask_tokens(text, jax.random.key(7), **kw)
    b = mask_tokens(text, jax.random.key(7), **kw)
    c = mask_tokens(text, jax.random.key(8), **kw)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a[1]), np.asarray(c[1]))
    # prob=1 chooses every non-special token, and only those; an id listed as
    # special is never chosen.
    t = np.asarray(text)
    extra = int(t[0, 1])
    _, every = mask_tokens(text, jax.random.key(0), mask_id=MASK, vocab_size=V,
                           special_ids=SPECIALS + (extra,), prob=1.0)
    np.testing.assert_array_equal(np.asarray(every), ~np.isin(t, SPECIALS + (extra,)))
    _, none = mask_tokens(text, jax.random.key(0), prob=0.0, **kw)
    assert not np.asarray(none).any()


# ----------------------------------------------------------------- masked LM loss


def _np_ce(logits, targets):
    x = np.float64(logits)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
    return lse - np.take_along_axis(x, targets[..., None], -1)[..., 0]


def test_masked_lm_loss_is_the_cross_entropy_over_chosen_positions():
    rng = np.random.default_rng(2)
    b, l, v = 3, 9, 17
    logits = (3 * rng.standard_normal((b, l, v))).astype(np.float32)
    targets = rng.integers(0, v, (b, l)).astype(np.int32)
    chosen = rng.random((b, l)) < 0.3
    chosen[0, 0] = True
    got = float(masked_lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(chosen)))
    ce = _np_ce(logits, targets)
    want = ce[chosen].mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # The unchosen positions do not count: changing their logits changes nothing.
    other = logits.copy()
    other[~chosen] += 5 * rng.standard_normal(other[~chosen].shape).astype(np.float32)
    np.testing.assert_allclose(float(masked_lm_loss(jnp.asarray(other), jnp.asarray(targets),
                                                    jnp.asarray(chosen))), want, rtol=1e-5)
    # Nothing chosen: 0, not NaN.
    assert float(masked_lm_loss(jnp.asarray(logits), jnp.asarray(targets),
                                jnp.zeros((b, l), bool))) == 0.0


def test_masked_lm_loss_equals_torch_cross_entropy_with_ignored_labels():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    b, l, v = 4, 7, 23
    logits = (2 * rng.standard_normal((b, l, v))).astype(np.float32)
    targets = rng.integers(0, v, (b, l)).astype(np.int32)
    chosen = rng.random((b, l)) < 0.25
    chosen[1, 3] = True
    got = float(masked_lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(chosen)))
    labels = np.where(chosen, targets, -100).astype(np.int64)
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(np.float64(logits)).reshape(-1, v),
                                            torch.from_numpy(labels).reshape(-1),
                                            ignore_index=-100)
    np.testing.assert_allclose(got, float(ref), rtol=1e-5)


def test_masked_lm_loss_rejects_mismatched_shapes():
    logits = jnp.zeros((2, 5, 7))
    ids = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match="masked_lm_loss"):
        masked_lm_loss(logits[:, 0], ids, ids > 0)  # [B, V] logits
    with pytest.raises(ValueError, match="masked_lm_loss"):
        masked_lm_loss(logits, ids[:, :4], ids > 0)
    with pytest.raises(ValueError, match="masked_lm_loss"):
        masked_lm_loss(logits, ids, (ids > 0)[:1])


# ----------------------------------------------------------------- VQA


def _np_targets(ids, scores, a):
    out = np.zeros(ids.shape[:-1] + (a,))
    for idx in np.ndindex(ids.shape[:-1]):
        for k in range(ids.shape[-1]):
            if ids[idx + (k,)] >= 0:
                out[idx + (ids[idx + (k,)],)] += scores[idx + (k,)]
    return out


def _np_bce(x, z):
    """-(z log sigmoid(x) + (1 - z) log(1 - sigmoid(x))), float64, with
    -log sigmoid(x) = log(1 + e^-x) and -log(1 - sigmoid(x)) = log(1 + e^x)."""
    x, z = np.float64(x), np.float64(z)
    return z * np.logaddexp(0.0, -x) + (1 - z) * np.logaddexp(0.0, x)


def _vqa_case(seed, n=6, a=11, k=4):
    rng = np.random.default_rng(seed)
    ids = np.full((n, k), -1, np.int32)
    scores = np.zeros((n, k), np.float32)
    for i in range(n):
        m = rng.integers(1, k + 1)
        ids[i, :m] = rng.choice(a, m, replace=False)
        scores[i, :m] = rng.choice([1 / 3, 2 / 3, 1.0], m)
    logits = (2 * rng.standard_normal((n, a))).astype(np.float32)
    return ids, scores, logits


def test_vqa_targets_and_loss_equal_numpy_bce_over_weighted_rows():
    ids, scores, logits = _vqa_case(3)
    n, a = logits.shape
    targets = np.asarray(vqa_targets(jnp.asarray(ids), jnp.asarray(scores), a))
    want_t = _np_targets(ids, scores, a)
    assert targets.shape == (n, a) and targets.dtype == np.float32
    np.testing.assert_allclose(targets, want_t, rtol=1e-6)
    # Leading batch dims are kept: [B, Q, K] -> [B, Q, A].
    t3 = vqa_targets(jnp.asarray(ids.reshape(2, 3, -1)), jnp.asarray(scores.reshape(2, 3, -1)),
                     a)
    np.testing.assert_allclose(np.asarray(t3).reshape(n, a), want_t, rtol=1e-6)
    weights = np.array([1, 0, 1, 1, 0, 1], np.float32)
    got = float(vqa_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights)))
    per_row = _np_bce(logits, want_t).sum(-1)
    np.testing.assert_allclose(got, (per_row * weights).sum() / weights.sum(), rtol=1e-5)
    # Rows with weight 0 do not count, whatever their logits.
    other = logits.copy()
    other[weights == 0] = 50.0
    np.testing.assert_allclose(float(vqa_loss(jnp.asarray(other), jnp.asarray(targets),
                                              jnp.asarray(weights))), got, rtol=1e-6)
    # Large logits stay finite (log-sum-exp form).
    big = float(vqa_loss(jnp.asarray(logits * 100), jnp.asarray(targets), jnp.ones(n)))
    assert np.isfinite(big)
    np.testing.assert_allclose(big, _np_bce(logits * 100.0, want_t).sum(-1).mean(), rtol=1e-4)
    # No weighted row: 0.
    assert float(vqa_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.zeros(n))) == 0.0


def test_vqa_loss_equals_torch_bce_times_answers():
    torch = pytest.importorskip("torch")
    ids, scores, logits = _vqa_case(4, n=8, a=13)
    a = logits.shape[1]
    targets = vqa_targets(jnp.asarray(ids), jnp.asarray(scores), a)
    got = float(vqa_loss(jnp.asarray(logits), targets, jnp.ones(len(logits))))
    ref = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(np.float64(logits)), torch.from_numpy(np.float64(targets))) * a
    np.testing.assert_allclose(got, float(ref), rtol=1e-5)


def test_vqa_loss_rejects_mismatched_shapes():
    logits = jnp.zeros((4, 5))
    with pytest.raises(ValueError, match="vqa_loss"):
        vqa_loss(logits, jnp.zeros((4, 6)), jnp.ones(4))
    with pytest.raises(ValueError, match="vqa_loss"):
        vqa_loss(logits, jnp.zeros((4, 5)), jnp.ones(3))
    with pytest.raises(ValueError, match="vqa_loss"):
        vqa_loss(logits, jnp.zeros((4, 5)), jnp.ones((4, 1)))
