"""KV-cache caption decoding (CoCa text path, BLIP-2 Q-Former ITG head) against
full-sequence recomputation: per-step logits, greedy and beam tokens, batching,
EOS handling, and the scanned layer layout (same weights, stacked)."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from mmjax.families.captioning import (CaptionStepFn, beam_search, blip2_itg_logits_fn,
                                       coca_logits_fn, greedy_decode)
from mmjax.models.jitted import model_method
from mmjax.models import Blip2Stage1, CoCa
from mmjax.models.layers import stack_layer_params
from mmjax.models.qformer import group_qformer_params

PAD, BOS = 0, 1
NO_EOS = 10_000                 # an id the models never produce: decode to max_len
IMAGE, MAX_LEN, VOCAB, DEPTH = 16, 8, 40, 2
VIT = dict(image_size=IMAGE, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64)


def _coca(scan):
    tower = dict(width=32, depth=DEPTH, heads=2, mlp_dim=64, scan=scan)
    return CoCa(image=VIT, text=dict(vocab_size=VOCAB, max_len=MAX_LEN, **tower),
                decoder=dict(vocab_size=VOCAB, **tower), embed_dim=16, caption_queries=4,
                pooler_heads=2)


def _blip2(scan):
    # cross_attention_freq=1: scanned, the Q-Former is two groups of one layer.
    return Blip2Stage1(image=VIT, qformer=dict(num_queries=4, width=32, depth=DEPTH, heads=2,
                                               mlp_dim=64, vocab_size=VOCAB, max_len=MAX_LEN,
                                               cross_attention_freq=1, scan=scan),
                       embed_dim=16, dec_id=3)


def _to_scanned(params):
    """Unrolled params -> the scanned layout of the same weights."""
    params = dict(params)
    for name in ("text_tower", "text_decoder"):
        if name in params:
            params[name] = stack_layer_params(params[name], DEPTH, "layers")
    if "qformer_module" in params:
        params["qformer_module"] = group_qformer_params(params["qformer_module"], DEPTH, 1)
    return params


@pytest.fixture(scope="module", params=["coca", "blip2"])
def case(request):
    """(model, scanned model, variables, scanned variables, images, step-fn maker, eos id)."""
    build = _coca if request.param == "coca" else _blip2
    model, scanned = build(False), build(True)
    images = np.random.default_rng(0).standard_normal((3, IMAGE, IMAGE, 3)).astype(np.float32)
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), images[:2],
                                             np.ones((2, MAX_LEN), np.int32)))
    # Larger random weights make the image matter for the captions (the
    # Q-Former's 0.02-std init leaves its text nearly blind to the image).
    if request.param == "coca":
        variables = jax.tree.map(lambda x: x * 3, variables)
    else:
        variables = jax.tree_util.tree_map_with_path(
            lambda path, x: x * 10 if "kernel" in jax.tree_util.keystr(path) else x, variables)
    make = coca_logits_fn if request.param == "coca" else blip2_itg_logits_fn
    # EOS := the 2nd token image 0's free-running caption generates, so that
    # caption stops early and the others may or may not.
    free = greedy_decode(make(model, variables, images), np.full((3, 1), BOS), MAX_LEN,
                         NO_EOS, PAD)
    return (model, scanned, variables, {"params": _to_scanned(variables["params"])}, images,
            make, int(free[0, 2]), free)


def _full_logits(model, variables, images, text):
    """Independent reference: the model's own full-sequence pass `[B, L, V]`."""
    tokens = model.apply(variables, images, method="image_tokens")
    if isinstance(model, CoCa):
        return model_method(model, "decode")(variables, text, tokens)
    return model_method(model, "itg_logits")(variables, tokens, text)


def test_cached_step_logits_equal_full_sequence_logits(case):
    model, _, variables, _, images, make, _, _ = case
    fn = make(model, variables, images)
    assert isinstance(fn, CaptionStepFn)
    text = np.random.default_rng(1).integers(3, VOCAB, (3, MAX_LEN)).astype(np.int32)
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
    # 1e-5 absolute; float32 rounding grows with the logits' size (CoCa's reach
    # ~10 here), so 1e-5 of the largest logit when that is above 1.
    scale = np.abs(full).max()
    assert scale > 0.1                        # the comparison is not between near-zeros
    np.testing.assert_allclose(np.stack(cached, 1), full[:, p - 1:], rtol=0,
                               atol=1e-5 * max(1.0, scale))


def test_cached_decoding_equals_recompute(case):
    model, _, variables, _, images, make, eos, free = case
    fn = make(model, variables, images)
    prefix = np.full((3, 1), BOS)

    greedy = greedy_decode(fn, prefix, MAX_LEN, eos, PAD)
    np.testing.assert_array_equal(greedy_decode(fn, prefix, MAX_LEN, eos, PAD, use_cache=False),
                                  greedy)
    # Each caption is the free-running one up to its first EOS, then pad.
    for row, ref in zip(greedy.tolist(), free.tolist()):
        end = ref.index(eos, 1) + 1 if eos in ref[1:] else MAX_LEN
        assert row == ref[:end] + [PAD] * (MAX_LEN - end)
    assert greedy[0, -1] == PAD and len({tuple(r) for r in free.tolist()}) > 1

    beams, scores = beam_search(fn, prefix, 3, MAX_LEN, eos, PAD, return_scores=True)
    ref, ref_scores = beam_search(fn, prefix, 3, MAX_LEN, eos, PAD, return_scores=True,
                                  use_cache=False)
    np.testing.assert_array_equal(beams, ref)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    for row in beams.tolist():
        if eos in row[1:]:
            end = row.index(eos, 1) + 1
            assert row[end:] == [PAD] * (MAX_LEN - end)
    np.testing.assert_array_equal(beam_search(fn, prefix, 1, MAX_LEN, eos, PAD), greedy)

    # Rows are independent (no mixing of cache rows across images or beams):
    # the batch in another order gives the same captions in that order.
    order = [2, 0, 1]
    shuffled = make(model, variables, images[order])
    np.testing.assert_array_equal(greedy_decode(shuffled, prefix, MAX_LEN, eos, PAD),
                                  greedy[order])
    np.testing.assert_array_equal(beam_search(shuffled, prefix, 3, MAX_LEN, eos, PAD),
                                  beams[order])
    with pytest.raises(ValueError, match="multiple of the images"):
        greedy_decode(fn, prefix[:2], MAX_LEN, eos, PAD)


def test_scanned_layout_decodes_like_unrolled(case):
    """Same weights, scanned layers: same captions; beams reorder the scanned
    cache (a leading depth axis before the batch axis) correctly."""
    model, scanned, variables, scanned_vars, images, make, eos, _ = case
    prefix = np.full((3, 1), BOS)
    fn, fn_scan = make(model, variables, images), make(scanned, scanned_vars, images)
    np.testing.assert_array_equal(greedy_decode(fn_scan, prefix, MAX_LEN, eos, PAD),
                                  greedy_decode(fn, prefix, MAX_LEN, eos, PAD))
    np.testing.assert_array_equal(beam_search(fn_scan, prefix, 3, MAX_LEN, eos, PAD),
                                  beam_search(fn, prefix, 3, MAX_LEN, eos, PAD))
