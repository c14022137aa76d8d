"""Tokenizers that pad with their EOS token (Hugging Face's CLIP): the first EOS of a
row is text, only what follows it is padding, in the text encoder's key mask and
in the captioning loss's targets."""
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.losses import next_token_loss
from mmjax.models.text import TextEncoder, real_tokens

EOS = 9


def _rows():
    # BOS=1, words, EOS, then EOS as padding; one row truncated without EOS.
    return np.array([[1, 4, 5, EOS, EOS, EOS, EOS, EOS],
                     [1, 6, EOS, EOS, EOS, EOS, EOS, EOS],
                     [1, 4, 5, 6, 7, 8, 4, 5]], np.int32)


def test_real_tokens_keeps_the_first_eos():
    ids = _rows()
    lengths = [4, 3, 8]
    want = np.arange(8)[None, :] < np.array(lengths)[:, None]
    assert (np.asarray(real_tokens(jnp.asarray(ids), EOS, EOS)) == want).all()
    # pad != eos: plain `ids != pad`
    assert (np.asarray(real_tokens(jnp.asarray(ids), 0, EOS)) == (ids != 0)).all()


def test_encoder_with_pad_equal_eos_matches_the_unpadded_row():
    """Bidirectional attention with padding masked: a padded row pools (at its EOS)
    what the same text without any padding pools."""
    enc = TextEncoder(vocab_size=12, max_len=8, width=16, depth=1, heads=2, causal=False,
                      mask_padding=True, pool="eos", eos_id=EOS, pad_id=EOS)
    ids = _rows()
    params = enc.init(jax.random.key(0), jnp.asarray(ids))
    apply = jax.jit(lambda x: enc.apply(params, x)[0])
    pooled = apply(jnp.asarray(ids))
    for row, n in zip(ids, [4, 3, 8]):
        alone = apply(jnp.asarray(row[None, :n]))
        got = pooled[[i for i, r in enumerate(ids) if (r == row).all()][0]]
        np.testing.assert_allclose(np.asarray(got), np.asarray(alone[0]), atol=1e-5)


def test_caption_loss_targets_the_first_eos():
    """The model must learn to stop: with pad == EOS the first EOS is a target, the
    EOS padding after it is not (NumPy cross-entropy over the same targets)."""
    ids = _rows()
    logits = np.asarray(jax.random.normal(jax.random.key(1), (3, 8, 12)), np.float32)
    got = float(next_token_loss(jnp.asarray(logits), jnp.asarray(ids), EOS, eos_id=EOS))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    terms = []
    for b, n in enumerate([4, 3, 8]):
        for t in range(1, n):  # targets ids[b, 1:n]: words and the first EOS
            terms.append(-logp[b, t - 1, ids[b, t]])
    np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)
    # without eos_id the EOS targets are dropped as padding: a different number
    assert abs(float(next_token_loss(jnp.asarray(logits), jnp.asarray(ids), EOS)) - got) > 1e-4
