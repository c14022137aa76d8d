"""`mmjax.models.decoding`: greedy and beam search over step functions and the
shared KV cache, against plain-Python searches that recompute every hypothesis
from scratch (full forward of the whole sequence, no cache, float64 scores).

Models: a hand-made Markov step function, the CoCa caption decoder alone
(`text.CaptionDecoder`, unrolled and scanned), CoCa and the BLIP-2 Q-Former's
ITG head through `families.captioning`, and the Llama-style `DecoderLM` through
`lm.generate`, all with random weights."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.families.captioning import (beam_search, blip2_itg_logits_fn, coca_logits_fn,
                                       greedy_decode)
from mmjax.models.jitted import model_method
from mmjax.models import Blip2Stage1, CoCa, decoding
from mmjax.models.layers import stack_layer_params
from mmjax.models.lm import DecoderLM, generate
from mmjax.models.text import CaptionDecoder

PAD, BOS = 0, 1


# ----------------------------------------------------------------------------
# References: every hypothesis re-run in full
# ----------------------------------------------------------------------------

def _mask_pad(logits, pad, eos, ban_pad):
    logits = np.array(logits, np.float64)
    if ban_pad and pad != eos:
        logits[..., pad] = -np.inf
    return logits


def ref_greedy(last_logits, prefixes, steps, eos, pad, ban_pad):
    """Row by row: argmax of the full forward's last logits, stop after EOS, pad after."""
    out = []
    for prefix in prefixes:
        seq, new = list(prefix), []
        while len(new) < steps and (not new or new[-1] != eos):
            t = int(_mask_pad(last_logits([seq])[0], pad, eos, ban_pad).argmax())
            seq.append(t)
            new.append(t)
        out.append(new + [pad] * (steps - len(new)))
    return np.asarray(out)


def ref_beam(last_logits, prefix, k, steps, eos, pad, length_penalty, ban_pad):
    """Hypotheses as Python lists: live ones extended by every allowed token, finished
    ones (after EOS) by pad at no cost; keep the k best sums of float64 log-probs;
    pick the best `sum / length ** length_penalty` (length counts EOS, not pads
    after it). Returns (tokens, score)."""
    hyps = [(0.0, [], False)]
    for _ in range(steps):
        if all(done for _, _, done in hyps):
            break
        live = [toks for _, toks, done in hyps if not done]
        logits = _mask_pad(last_logits([list(prefix) + t for t in live]), pad, eos, ban_pad)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        cands, j = [], 0
        for score, toks, done in hyps:
            if done:
                cands.append((score, toks + [pad], True))
                continue
            cands += [(score + logp[j, t], toks + [t], t == eos)
                      for t in range(logp.shape[1]) if np.isfinite(logp[j, t])]
            j += 1
        hyps = sorted(cands, key=lambda c: -c[0])[:k]

    def length(toks):
        return toks.index(eos) + 1 if eos in toks else len(toks)

    best = max(hyps, key=lambda h: h[0] / max(length(h[1]), 1) ** length_penalty)
    toks = best[1] + [pad] * (steps - len(best[1]))
    return toks, best[0] / max(length(best[1]), 1) ** length_penalty


def _eos_from(free, row=0, pos=1):
    """An EOS id the free-running decode `[n, steps]` (new tokens) of `row` produces
    at `pos`: that row stops early, the others may or may not."""
    return int(free[row, pos])


def _stopped_early(tokens, eos, pad, pos=1):
    """Row `tokens` (new tokens) holds EOS by `pos` and only pad after its first EOS."""
    tokens = list(np.asarray(tokens))
    end = tokens.index(eos) + 1
    return end <= pos + 1 and all(t == pad for t in tokens[end:])


# ----------------------------------------------------------------------------
# The search on a hand-made step function
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("ban_pad,length_penalty", [(True, 1.0), (False, 0.0), (True, 0.5)])
def test_search_on_markov_step_function(ban_pad, length_penalty):
    """Second-order chain: logits = table[previous token, token]; the state is each
    row's previous token, so beams must carry their parent's state (`reorder`)."""
    v, steps, eos = 7, 6, 2
    table = np.random.default_rng(0).standard_normal((v, v, v)).astype(np.float32) * 2

    def step(prev, tokens):
        return jnp.asarray(table)[prev, tokens], tokens

    def last_logits(seqs):
        return table[[s[-2] for s in seqs], [s[-1] for s in seqs]]

    prefixes = [[BOS, 3], [4, 5], [5, 5], [3, 4]]
    prev, cur = (jnp.asarray([p[j] for p in prefixes], jnp.int32) for j in (0, 1))
    first = jnp.asarray(table)[prev, cur]
    greedy = jax.jit(lambda lg, c: decoding.greedy_search(
        step, lg, c, steps, eos_id=eos, pad_id=PAD, ban_pad=ban_pad))(first, cur)
    np.testing.assert_array_equal(greedy, ref_greedy(last_logits, prefixes, steps, eos, PAD,
                                                     ban_pad))
    # No EOS: every row runs the whole budget.
    no_eos = decoding.greedy_search(step, first, cur, steps, pad_id=PAD)
    np.testing.assert_array_equal(no_eos, ref_greedy(last_logits, prefixes, steps, -1, PAD,
                                                     False))
    k = 3
    toks, scores = jax.jit(lambda lg, c: decoding.beam_search(
        step, lg, c, steps, beam_size=k, eos_id=eos, pad_id=PAD,
        length_penalty=length_penalty, ban_pad=ban_pad,
        reorder=lambda state, rows: jnp.take(state, rows)))(jnp.repeat(first, k, 0),
                                                            jnp.repeat(cur, k))
    for i, p in enumerate(prefixes):
        want, score = ref_beam(last_logits, p, k, steps, eos, PAD, length_penalty, ban_pad)
        np.testing.assert_array_equal(toks[i], want)
        assert float(scores[i]) == pytest.approx(score, rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------
# The CoCa caption decoder alone (self- and cross-attention caches)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("scan", [False, True])
def test_caption_decoder_cached_search_equals_recompute(scan):
    vocab, width, max_len, depth = 40, 32, 8, 2
    rng = np.random.default_rng(1)
    table = jnp.asarray(rng.standard_normal((vocab, width)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((3, 4, width)), jnp.float32)
    kw = dict(vocab_size=vocab, width=width, depth=depth, heads=2, mlp_dim=64)
    full = CaptionDecoder(**kw)
    params = nn.unbox(full.init(jax.random.key(2), table[jnp.ones((1, 2), jnp.int32)],
                                context[:1]))["params"]
    params = jax.tree.map(lambda x: x * 2, params)   # peaked, but beams still re-rank
    dec = CaptionDecoder(**kw, scan=scan, decode=True, cache_len=max_len)
    dec_params = stack_layer_params(params, depth) if scan else params
    forward = jax.jit(lambda ids, ctx: full.apply({"params": params}, table[ids], ctx))

    def prefill(prefix, ctx):
        cache = decoding.zero_cache(dec, table[prefix], ctx)
        logits, state = dec.apply({"params": dec_params, "cache": cache}, table[prefix], ctx,
                                  mutable=["cache"])
        return logits[:, -1], state["cache"]

    def step(cache, tokens):  # the context's keys/values come from the cache
        logits, state = dec.apply({"params": dec_params, "cache": cache},
                                  table[tokens][:, None], None, mutable=["cache"])
        return logits[:, -1], state["cache"]

    @jax.jit
    def search(prefix, ctx, eos):
        greedy = decoding.greedy_search(step, *prefill(prefix, ctx), max_len - 1, eos_id=eos,
                                        pad_id=PAD, ban_pad=True)
        rows = jnp.repeat(jnp.arange(prefix.shape[0]), 3)
        beams = decoding.beam_search(step, *prefill(prefix[rows], ctx[rows]), max_len - 1,
                                     beam_size=3, eos_id=eos, pad_id=PAD, ban_pad=True)
        return greedy, beams

    prefix = jnp.full((3, 1), BOS, jnp.int32)
    free, _ = search(prefix, context, jnp.int32(10_000))
    eos = _eos_from(np.asarray(free))
    greedy, (beams, scores) = search(prefix, context, jnp.int32(eos))
    for i in range(3):
        def last(seqs, i=i):
            ids = jnp.asarray(seqs, jnp.int32)
            return np.asarray(forward(ids, jnp.repeat(context[i:i + 1], len(seqs), 0))[:, -1])
        np.testing.assert_array_equal(greedy[i], ref_greedy(last, [[BOS]], max_len - 1, eos,
                                                            PAD, True)[0])
        want, score = ref_beam(last, [BOS], 3, max_len - 1, eos, PAD, 1.0, True)
        np.testing.assert_array_equal(beams[i], want)
        assert float(scores[i]) == pytest.approx(score, rel=1e-4, abs=1e-5)
    assert _stopped_early(greedy[0], eos, PAD)


# ----------------------------------------------------------------------------
# CoCa and BLIP-2 ITG captioning
# ----------------------------------------------------------------------------

VIT = dict(image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64)


@pytest.mark.parametrize("kind", ["coca", "blip2"])
def test_captioning_equals_recompute(kind):
    vocab, max_len = 40, 7
    if kind == "coca":
        tower = dict(width=32, depth=2, heads=2, mlp_dim=64)
        model = CoCa(image=VIT, text=dict(vocab_size=vocab, max_len=max_len, **tower),
                     decoder=dict(vocab_size=vocab, **tower), embed_dim=16, caption_queries=4,
                     pooler_heads=2)
    else:
        model = Blip2Stage1(image=VIT, qformer=dict(num_queries=4, width=32, depth=2, heads=2,
                                                    mlp_dim=64, vocab_size=vocab,
                                                    max_len=max_len), embed_dim=16, dec_id=3)
    images = np.random.default_rng(3).standard_normal((2, 16, 16, 3)).astype(np.float32)
    variables = jax.jit(model.init)(jax.random.key(4), images, np.ones((2, max_len), np.int32))
    # Larger random weights: peaked logits, captions that depend on the image.
    variables = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 3 if kind == "coca" else
        (x * 10 if "kernel" in jax.tree_util.keystr(p) else x), variables)
    make = coca_logits_fn if kind == "coca" else blip2_itg_logits_fn
    fn = make(model, variables, images)
    prefix = np.full((2, 1), BOS)
    eos = _eos_from(greedy_decode(fn, prefix, max_len, 10_000, PAD)[:, 1:])
    tokens = model.apply(variables, images, method="image_tokens")
    full = jax.jit(model_method(model, "decode" if kind == "coca" else "itg_logits"))
    greedy = greedy_decode(fn, prefix, max_len, eos, PAD)
    for lp in (1.0, 0.0):
        beams, scores = beam_search(fn, prefix, 3, max_len, eos, PAD, lp, return_scores=True)
        for i in range(2):
            def last(seqs, i=i):
                ids = jnp.asarray(seqs, jnp.int32)
                img = jnp.repeat(tokens[i:i + 1], len(seqs), 0)
                args = (ids, img) if kind == "coca" else (img, ids)
                return np.asarray(full(variables, *args)[:, -1])
            if lp == 1.0:
                np.testing.assert_array_equal(
                    greedy[i, 1:], ref_greedy(last, [[BOS]], max_len - 1, eos, PAD, True)[0])
            want, score = ref_beam(last, [BOS], 3, max_len - 1, eos, PAD, lp, True)
            np.testing.assert_array_equal(beams[i, 1:], want)
            assert float(scores[i]) == pytest.approx(score, rel=1e-4, abs=1e-5)
    assert _stopped_early(greedy[0, 1:], eos, PAD)


# ----------------------------------------------------------------------------
# The decoder LM
# ----------------------------------------------------------------------------

def test_lm_generate_equals_recompute():
    vocab, new = 50, 6
    model = DecoderLM(vocab_size=vocab, width=32, depth=2, num_heads=4, num_kv_heads=2,
                      mlp_dim=48, max_len=32)
    variables = model.init(jax.random.key(5), jnp.ones((1, 4), jnp.int32))
    variables = jax.tree.map(lambda x: x * 4, variables)
    forward = jax.jit(lambda ids: model.apply(variables, ids))

    def last(seqs):
        return np.asarray(forward(jnp.asarray(seqs, jnp.int32))[:, -1])

    prompts = [[5, 17, 42, 8, 9], [31, 7], [33, 12, 40]]
    lengths = [len(p) for p in prompts]
    ids = np.full((3, 5), 49, np.int32)              # right padding, any id
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p

    def one_by_one(eos, pad):
        return np.concatenate([ref_greedy(last, [p], new, eos, pad, False) for p in prompts])

    free = np.asarray(generate(model, variables, ids, lengths, new))
    np.testing.assert_array_equal(free, one_by_one(-1, PAD))
    eos = _eos_from(free)
    stopped = np.asarray(generate(model, variables, ids, lengths, new, eos_id=eos, pad_id=PAD))
    np.testing.assert_array_equal(stopped, one_by_one(eos, PAD))
    assert _stopped_early(stopped[0], eos, PAD)
    for eos_id in (None, eos):
        beams = np.asarray(generate(model, variables, ids, lengths, new, method="beam",
                                    beam_size=3, eos_id=eos_id, pad_id=PAD))
        for i, p in enumerate(prompts):
            want, _ = ref_beam(last, p, 3, new, -1 if eos_id is None else eos_id, PAD, 0.0,
                               False)
            np.testing.assert_array_equal(beams[i], want)
