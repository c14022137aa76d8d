"""Decoder LM: parity with `transformers.LlamaForCausalLM`, KV-cache decoding, generation.

Random-weight Llama configs (GQA: 4 heads, 2 kv heads) are saved with
`save_pretrained` and loaded through `mmjax.convert.llama.load_llama`.
Decoding is checked against full-sequence recomputation (and against
transformers' own greedy generation); beam search against a plain Python
beam search over full forwards.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmjax.convert.llama import load_llama  # noqa: E402
from mmjax.models.lm import generate, init_cache  # noqa: E402

TOL = 1e-4
VOCAB = 101


def _hf_llama(tied: bool, seed: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=tied, initializer_range=0.1,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at 1; randomize them so a swapped mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return model


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    out = {}
    for tied in (False, True):
        ref = _hf_llama(tied, seed=int(tied))
        path = str(tmp_path_factory.mktemp(f"llama_tied{int(tied)}"))
        ref.save_pretrained(path)
        out[tied] = (path, ref)
    return out


@pytest.fixture(scope="module")
def lm(llama_dirs):
    """The untied model loaded unrolled, with a jitted full forward."""
    path, ref = llama_dirs[False]
    model, variables = load_llama(path)
    forward = jax.jit(lambda ids, mask: model.apply(variables, ids, attention_mask=mask))
    return model, variables, forward, ref


# Rows: full, right-padded, left-padded (with explicit positions), right-padded.
IDS = np.random.RandomState(0).randint(3, VOCAB, (4, 10)).astype(np.int64)
MASK = np.array([[1] * 10, [1] * 6 + [0] * 4, [0] * 3 + [1] * 7, [1] * 2 + [0] * 8])


@pytest.mark.parametrize("tied,scan,remat", [(False, False, "none"), (True, False, "none"),
                                              (False, True, "none"), (True, True, "full")])
def test_llama_parity(llama_dirs, tied, scan, remat):
    path, ref = llama_dirs[tied]
    model, variables = load_llama(path, scan=scan)
    model = model.clone(remat=remat)
    assert model.tie_embeddings == tied and model.num_kv_heads == 2 and model.rope_theta == 500.0
    assert ("lm_head" in variables["params"]) != tied

    with torch.no_grad():
        want = ref(torch.from_numpy(IDS)).logits.numpy()
    apply = jax.jit(lambda ids, **kw: model.apply(variables, ids, **kw))
    got = np.asarray(apply(jnp.asarray(IDS, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)

    # Padded batch: pass the same mask and positions to both; compare real tokens.
    positions = np.maximum(np.cumsum(MASK, axis=1) - 1, 0)
    with torch.no_grad():
        want = ref(torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK),
                   position_ids=torch.from_numpy(positions)).logits.numpy()
    got = np.asarray(apply(jnp.asarray(IDS, jnp.int32), positions=jnp.asarray(positions, jnp.int32),
                           attention_mask=jnp.asarray(MASK)))
    real = MASK.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0)


def test_inputs_embeds_match_ids(lm):
    model, variables, forward, _ = lm
    ids = jnp.asarray(IDS[:2], jnp.int32)
    emb = jax.jit(lambda i: model.apply(variables, i, method="embed"))(ids)
    assert emb.shape == (2, 10, 64)
    from_embeds = jax.jit(lambda e: model.apply(variables, inputs_embeds=e))(emb)
    np.testing.assert_allclose(from_embeds, forward(ids, jnp.ones_like(ids)), atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        model.apply(variables)


def test_unsupported_rope_scaling_is_refused(llama_dirs, tmp_path):
    path, _ = llama_dirs[False]
    bad = str(tmp_path / "scaled")
    shutil.copytree(path, bad)
    cfg_file = os.path.join(bad, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="rope_scaling.*llama3"):
        load_llama(bad)


# ----------------------------------------------------------------------------
# KV-cache decoding
# ----------------------------------------------------------------------------

PROMPTS = [[5, 17, 42, 8, 99, 23], [61, 7], [33, 12, 90, 4]]
NEW = 6


def _padded(rows, width, pad=0):
    out = np.full((len(rows), width), pad, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _full_last_logits(forward, seqs, width):
    """Last-position logits of each sequence, by a full (uncached) forward `[N, V]`."""
    ids = _padded(seqs, width)
    mask = _padded([[1] * len(s) for s in seqs], width)
    logits = np.asarray(forward(jnp.asarray(ids), jnp.asarray(mask)))
    return logits[np.arange(len(seqs)), [len(s) - 1 for s in seqs]]


def test_cached_logits_equal_full_forward(lm):
    """Prefill a right-padded batch, then feed one token at a time."""
    model, variables, forward, _ = lm
    lengths = np.array([len(p) for p in PROMPTS])
    width = lengths.max()
    dec = model.clone(decode=True, cache_len=width + NEW)
    step = jax.jit(lambda cache, ids, mask: dec.apply(
        {"params": variables["params"], "cache": cache}, ids, attention_mask=mask,
        mutable=["cache"]))
    cache = init_cache(model, len(PROMPTS), width + NEW)
    prompts = _padded(PROMPTS, width)
    logits, state = step(cache, jnp.asarray(prompts), jnp.asarray(_padded(
        [[1] * n for n in lengths], width)))
    np.testing.assert_array_equal(state["cache"]["cache_index"]["index"], lengths)
    cached = np.asarray(logits)[np.arange(len(PROMPTS)), lengths - 1]
    seqs = [list(p) for p in PROMPTS]
    rng = np.random.RandomState(1)
    for _ in range(NEW):
        np.testing.assert_allclose(cached, _full_last_logits(forward, seqs, width + NEW),
                                   atol=TOL, rtol=0)
        nxt = rng.randint(3, VOCAB, len(seqs))  # any tokens: the cache must follow them
        for s, t in zip(seqs, nxt):
            s.append(int(t))
        logits, state = step(state["cache"], jnp.asarray(nxt[:, None], jnp.int32),
                             jnp.ones((len(seqs), 1), jnp.int32))
        cached = np.asarray(logits)[:, 0]


def test_greedy_matches_recompute_hf_and_single_rows(lm):
    model, variables, forward, ref = lm
    lengths = [len(p) for p in PROMPTS]
    width = max(lengths)
    got = np.asarray(generate(model, variables, _padded(PROMPTS, width, pad=77), lengths, NEW))
    assert got.shape == (len(PROMPTS), NEW) and got.dtype == np.int32

    # Full recomputation, token by token.
    seqs = [list(p) for p in PROMPTS]
    for _ in range(NEW):
        nxt = _full_last_logits(forward, seqs, width + NEW).argmax(-1)
        for s, t in zip(seqs, nxt):
            s.append(int(t))
    np.testing.assert_array_equal(got, [s[len(p):] for s, p in zip(seqs, PROMPTS)])

    for i, p in enumerate(PROMPTS):
        one = generate(model, variables, np.array([p], np.int32), [len(p)], NEW)
        np.testing.assert_array_equal(np.asarray(one)[0], got[i])
        with torch.no_grad():
            hf = ref.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
        np.testing.assert_array_equal(hf[0, len(p):].numpy(), got[i])


def test_greedy_with_scan_and_eos(llama_dirs, lm):
    model, variables, _, _ = lm
    lengths = [len(p) for p in PROMPTS]
    prompts = _padded(PROMPTS, max(lengths))
    want = np.asarray(generate(model, variables, prompts, lengths, NEW))
    scanned, svars = load_llama(llama_dirs[False][0], scan=True)
    np.testing.assert_array_equal(generate(scanned, svars, prompts, lengths, NEW), want)

    # Row 0 stops at its third token: later tokens become pad_id.
    eos = int(want[0, 2])
    got = np.asarray(generate(model, variables, prompts, lengths, NEW, eos_id=eos, pad_id=-1))
    for row_got, row_want in zip(got, want):
        hits = np.flatnonzero(row_want == eos)
        stop = hits[0] + 1 if hits.size else NEW
        np.testing.assert_array_equal(row_got[:stop], row_want[:stop])
        assert (row_got[stop:] == -1).all()


def test_sampling(lm):
    model, variables, _, _ = lm
    lengths = [len(p) for p in PROMPTS]
    prompts = _padded(PROMPTS, max(lengths))
    greedy = np.asarray(generate(model, variables, prompts, lengths, NEW))

    def sample(seed, **kw):
        return np.asarray(generate(model, variables, prompts, lengths, NEW, method="sample",
                                   rng=jax.random.key(seed), **kw))

    a, b = sample(0, temperature=2.0), sample(0, temperature=2.0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sample(1, temperature=2.0))
    np.testing.assert_array_equal(sample(3, temperature=2.0, top_p=1e-6), greedy)
    with pytest.raises(ValueError, match="rng"):
        generate(model, variables, prompts, lengths, NEW, method="sample")


def _reference_beam(forward, prompt, beams, steps, width):
    """Beam search over full forwards: sum of log-probs, best hypothesis at the end."""
    hyps = [(0.0, list(prompt))]
    for _ in range(steps):
        logits = _full_last_logits(forward, [h for _, h in hyps], width).astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        cands = [(s + logp[j, t], h + [t]) for j, (s, h) in enumerate(hyps)
                 for t in range(logp.shape[1])]
        hyps = sorted(cands, key=lambda c: -c[0])[:beams]
    return hyps[0][1][len(prompt):]


def test_beam_search(lm):
    model, variables, forward, _ = lm
    lengths = [len(p) for p in PROMPTS]
    prompts = _padded(PROMPTS, max(lengths))
    greedy = np.asarray(generate(model, variables, prompts, lengths, NEW))
    beam1 = generate(model, variables, prompts, lengths, NEW, method="beam", beam_size=1)
    np.testing.assert_array_equal(beam1, greedy)

    got = np.asarray(generate(model, variables, prompts, lengths, NEW, method="beam",
                              beam_size=3))
    for i, p in enumerate(PROMPTS):
        np.testing.assert_array_equal(got[i], _reference_beam(forward, p, 3, NEW,
                                                              max(lengths) + NEW))
