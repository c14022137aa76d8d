"""KV-cache caption decoding (CoCa text path, BLIP-2 Q-Former ITG head) against
full-sequence recomputation: per-step logits, greedy and beam tokens, batching,
EOS handling, and the scanned layer layout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.evaluate.captioning import (CaptionStepFn, beam_search, blip2_itg_logits_fn,
                                       coca_logits_fn, greedy_decode)
from mmjax.evaluate.retrieval import model_method
from mmjax.models import Blip2Stage1, CoCa

PAD, BOS = 0, 1
NO_EOS = 10_000                 # an id the models never produce: decode to max_len
IMAGE, MAX_LEN, VOCAB = 16, 8, 40
VIT = dict(image_size=IMAGE, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64)


def _coca(scan):
    tower = dict(width=32, depth=2, heads=2, mlp_dim=64, scan=scan)
    return CoCa(image=VIT, text=dict(vocab_size=VOCAB, max_len=MAX_LEN, **tower),
                decoder=dict(vocab_size=VOCAB, **tower), embed_dim=16, caption_queries=4,
                pooler_heads=2)


def _blip2(scan):
    # cross_attention_freq=1: with scan, two scanned groups of one layer each.
    return Blip2Stage1(image=VIT, qformer=dict(num_queries=4, width=32, depth=2, heads=2,
                                               mlp_dim=64, vocab_size=VOCAB, max_len=MAX_LEN,
                                               cross_attention_freq=1 if scan else 2,
                                               scan=scan),
                       embed_dim=16, dec_id=3)


CASES = {"coca": (_coca, False), "coca_scan": (_coca, True),
         "blip2": (_blip2, False), "blip2_scan": (_blip2, True)}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    build, scan = CASES[request.param]
    model = build(scan)
    images = np.random.default_rng(0).standard_normal((3, IMAGE, IMAGE, 3)).astype(np.float32)
    variables = jax.jit(model.init)(jax.random.key(0), images[:2],
                                    np.ones((2, MAX_LEN), np.int32))
    # Larger random weights make the image matter more for the captions.
    variables = jax.tree.map(lambda x: x * 3, variables)
    make = coca_logits_fn if isinstance(model, CoCa) else blip2_itg_logits_fn
    return request.param, model, variables, images, make


def _full_logits(model, variables, images, text):
    """Independent reference: the model's own full-sequence pass `[B, L, V]`."""
    tokens = model.apply(variables, images, method="image_tokens")
    if isinstance(model, CoCa):
        return model_method(model, "decode")(variables, text, tokens)
    return model_method(model, "itg_logits")(variables, tokens, text)


def test_cached_step_logits_equal_full_sequence_logits(case):
    _, model, variables, images, make = case
    fn = make(model, variables, images)
    assert isinstance(fn, CaptionStepFn)
    rng = np.random.default_rng(1)
    text = rng.integers(3, VOCAB, (3, MAX_LEN)).astype(np.int32)
    text[:, 0] = BOS
    text[1, 3] = PAD       # a pad key is masked in the full pass; the cache must agree
    full = np.asarray(_full_logits(model, variables, images, text))

    prefill = jax.jit(lambda f, prefix: f.prefill(prefix, MAX_LEN))
    step = jax.jit(lambda f, cache, tokens: f.step(cache, tokens, MAX_LEN))
    p = 2
    logits, cache = prefill(fn, text[:, :p])
    cached = [logits]
    for t in range(p, MAX_LEN):
        logits, cache = step(fn, cache, text[:, t])
        cached.append(logits)
    # float32 rounding grows with the logits' size (here up to ~10): 1e-5 of it.
    scale = np.abs(full).max()
    assert scale > 1.0                        # the comparison is not between near-zeros
    np.testing.assert_allclose(np.stack(cached, 1), full[:, p - 1:], rtol=0, atol=1e-5 * scale)


def test_cached_greedy_and_beam_equal_recompute(case):
    name, model, variables, images, make = case
    fn = make(model, variables, images)
    prefix = np.full((3, 1), BOS)
    greedy = greedy_decode(fn, prefix, MAX_LEN, NO_EOS, PAD)
    np.testing.assert_array_equal(greedy_decode(fn, prefix, MAX_LEN, NO_EOS, PAD,
                                                use_cache=False), greedy)
    assert len({tuple(r) for r in greedy.tolist()}) > 1   # captions depend on the image
    assert (greedy[:, 1:] != PAD).all()                   # pad is never generated
    with pytest.raises(ValueError, match="multiple of the images"):
        greedy_decode(fn, prefix[:2], MAX_LEN, NO_EOS, PAD)
    if name.endswith("_scan"):
        # Beams reorder the scanned cache (leading depth axis) too.
        np.testing.assert_array_equal(
            beam_search(fn, prefix, 3, MAX_LEN, NO_EOS, PAD),
            beam_search(fn, prefix, 3, MAX_LEN, NO_EOS, PAD, use_cache=False))
        return
    beams, scores = beam_search(fn, prefix, 3, MAX_LEN, NO_EOS, PAD, return_scores=True)
    ref, ref_scores = beam_search(fn, prefix, 3, MAX_LEN, NO_EOS, PAD, return_scores=True,
                                  use_cache=False)
    np.testing.assert_array_equal(beams, ref)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)
    np.testing.assert_array_equal(beam_search(fn, prefix, 1, MAX_LEN, NO_EOS, PAD), greedy)
    # A batch decodes as its images one by one.
    for i in range(3):
        single = make(model, variables, images[i:i + 1])
        np.testing.assert_array_equal(
            greedy_decode(single, prefix[:1], MAX_LEN, NO_EOS, PAD)[0], greedy[i])
        np.testing.assert_array_equal(
            beam_search(single, prefix[:1], 3, MAX_LEN, NO_EOS, PAD)[0], beams[i])


def test_cached_decoding_stops_at_eos_with_pad_after(case):
    name, model, variables, images, make = case
    if name.endswith("_scan"):
        pytest.skip("EOS handling does not depend on the layer layout")
    fn = make(model, variables, images)
    prefix = np.full((3, 1), BOS)
    free = greedy_decode(fn, prefix, MAX_LEN, NO_EOS, PAD)
    eos = int(free[0, 2])          # the token row 0 generates 2nd becomes EOS
    out = greedy_decode(fn, prefix, MAX_LEN, eos, PAD)
    for row, ref in zip(out, free):
        end = list(ref[1:]).index(eos) + 2 if eos in ref[1:] else MAX_LEN
        np.testing.assert_array_equal(row[:end], ref[:end])
        assert (row[end:] == PAD).all()
    assert out[0, 2] == eos and (out[0, 3:] == PAD).all()
    np.testing.assert_array_equal(out, greedy_decode(fn, prefix, MAX_LEN, eos, PAD,
                                                     use_cache=False))
    beams = beam_search(fn, prefix, 3, MAX_LEN, eos, PAD)
    np.testing.assert_array_equal(beams, beam_search(fn, prefix, 3, MAX_LEN, eos, PAD,
                                                     use_cache=False))
    for row in beams.tolist():
        if eos in row[1:]:
            end = row.index(eos, 1) + 1
            assert all(t == PAD for t in row[end:])
