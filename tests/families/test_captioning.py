"""Caption decoding: hand-made logits functions with known answers, and a tiny
random CoCa (beam 1 = greedy, a batch = its rows one by one, EOS stops a row).
Model captions against full-recompute Python searches: tests/models/test_decoding.py."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.families.captioning import beam_search, coca_logits_fn, greedy_decode
from mmjax.models import CoCa

PAD, BOS, EOS = 0, 1, 2


def _markov(table):
    """Logits function whose output at position t depends only on token t:
    logits[b, t] = table[tokens[b, t]] (a `[V, V]` matrix of log-probabilities)."""
    table = jnp.asarray(table, jnp.float32)
    return lambda tokens: table[tokens]


# ----------------------------------------------------------------- hand-made


def test_greedy_follows_known_chain_and_pads_after_eos():
    v = 6
    nxt = {BOS: 3, 3: 4, 4: EOS, 5: 5, EOS: 3, PAD: 3}   # 5 repeats forever
    table = np.full((v, v), -5.0)
    for a, b in nxt.items():
        table[a, b] = 5.0
    table[:, PAD] = 10.0   # pad has the highest logit everywhere: it must never be generated
    out = greedy_decode(_markov(table), [[BOS], [4], [5], [3]], max_len=7, eos_id=EOS,
                        pad_id=PAD)
    np.testing.assert_array_equal(out, [[BOS, 3, 4, EOS, PAD, PAD, PAD],
                                        [4, EOS, PAD, PAD, PAD, PAD, PAD],
                                        [5, 5, 5, 5, 5, 5, 5],
                                        [3, 4, EOS, PAD, PAD, PAD, PAD]])
    # Same answers from beam search (beam 1 and 3): the chain is near-deterministic.
    for k in (1, 3):
        np.testing.assert_array_equal(
            beam_search(_markov(table), [[BOS], [4], [5], [3]], k, 7, EOS, PAD), out)


def test_beam_search_beats_greedy_on_known_case():
    # From BOS: a (0.6) or b (0.4). After a: a, b, EOS each 1/3. After b: EOS 0.9.
    a, b = 3, 4
    p = np.full((5, 5), 1e-9)
    p[BOS, [a, b]] = [0.6, 0.4]
    p[a, [a, b, EOS]] = 1 / 3
    p[b, EOS], p[b, a] = 0.9, 0.1
    p[EOS, EOS] = p[PAD, EOS] = 1.0
    logits = np.log(p / p.sum(axis=1, keepdims=True))
    greedy = greedy_decode(_markov(logits), [[BOS]], 4, EOS, PAD)
    assert greedy[0, :2].tolist() == [BOS, a]
    beam = beam_search(_markov(logits), [[BOS]], 2, 4, EOS, PAD, length_penalty=0.0)
    np.testing.assert_array_equal(beam, [[BOS, b, EOS, PAD]])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_equals_exhaustive_search(length_penalty):
    """With more beams than sequences nothing is pruned: the result is the exact
    best of all sequences under the normalized score."""
    rng = np.random.default_rng(0)
    v, max_len = 5, 5
    logits = rng.standard_normal((v, v)) * 2
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    prefixes = [[BOS], [3], [4]]
    seqs, scores = beam_search(_markov(logits), prefixes, 128, max_len, EOS, PAD,
                               length_penalty=length_penalty, return_scores=True)
    alphabet = [t for t in range(v) if t != PAD]    # pad is never generated
    for row, prefix in enumerate(prefixes):
        best, best_seq = -np.inf, None
        for g in range(1, max_len):
            for body in itertools.product(alphabet, repeat=g):
                if EOS in body[:-1] or (g < max_len - 1 and body[-1] != EOS):
                    continue   # an EOS ends a caption; shorter ones must end with it
                # Pad is excluded from the softmax of the step, as in decoding.
                tokens, total = prefix + list(body), 0.0
                for prev, cur in zip(tokens[len(prefix) - 1:-1], body):
                    lp = np.log(np.exp(logp[prev, alphabet]).sum())
                    total += logp[prev, cur] - lp
                score = total / g ** length_penalty
                if score > best:
                    best, best_seq = score, tokens
        expected = best_seq + [PAD] * (max_len - len(best_seq))
        np.testing.assert_array_equal(seqs[row], expected)
        assert scores[row] == pytest.approx(best, rel=1e-4)


def test_decode_argument_errors():
    f = _markov(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="max_len"):
        greedy_decode(f, [[BOS, 3, 3]], 3, EOS, PAD)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(f, [[BOS]], 0, 5, EOS, PAD)


# ----------------------------------------------------------------- tiny models

IMAGE, MAX_LEN, VOCAB = 16, 8, 40
VIT = dict(image_size=IMAGE, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64)


@pytest.fixture(scope="module")
def coca():
    model = CoCa(image=VIT, text=dict(vocab_size=VOCAB, max_len=MAX_LEN, width=32, depth=1,
                                      heads=2, mlp_dim=64),
                 decoder=dict(vocab_size=VOCAB, width=32, depth=1, heads=2, mlp_dim=64),
                 embed_dim=16, caption_queries=4, pooler_heads=2)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((3, IMAGE, IMAGE, 3)).astype(np.float32) * 2
    ids = np.ones((2, MAX_LEN), np.int32)
    variables = jax.jit(model.init)(jax.random.key(0), images[:2], ids)
    # Larger random weights make the image matter more for the captions.
    variables = jax.tree.map(lambda x: x * 3, variables)
    return model, variables, images


def test_coca_beam1_equals_greedy_and_batch_equals_single(coca):
    model, variables, images = coca
    prefix = np.full((3, 1), BOS)
    fn = coca_logits_fn(model, variables, images)
    greedy = greedy_decode(fn, prefix, MAX_LEN, EOS, PAD)
    np.testing.assert_array_equal(beam_search(fn, prefix, 1, MAX_LEN, EOS, PAD), greedy)
    beams = beam_search(fn, prefix, 3, MAX_LEN, EOS, PAD)
    for i in range(3):
        single = coca_logits_fn(model, variables, images[i:i + 1])
        np.testing.assert_array_equal(greedy_decode(single, prefix[:1], MAX_LEN, EOS, PAD)[0],
                                      greedy[i])
        np.testing.assert_array_equal(beam_search(single, prefix[:1], 3, MAX_LEN, EOS, PAD)[0],
                                      beams[i])


def test_decoding_stops_at_eos_with_tiny_coca(coca):
    model, variables, images = coca
    fn = coca_logits_fn(model, variables, images)
    # Make EOS the likely 3rd token by boosting its logit from position 2 on.
    boosted = jax.tree_util.Partial(
        lambda inner, t: inner(t).at[:, 2:, EOS].add(100.0), fn)
    out = greedy_decode(boosted, np.full((3, 1), BOS), MAX_LEN, EOS, PAD)
    assert (out[:, 3] == EOS).all() and (out[:, 4:] == PAD).all()
    assert (out[:, 1:3] != EOS).all()
