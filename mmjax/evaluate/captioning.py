"""Caption decoding (greedy and beam search) for CoCa and BLIP-2 stage 1.

A *logits function* maps a token buffer `[n, L]` int32 to logits
`[n, L, V]`, where logits at position t predict token t + 1. `n` is a multiple
of the batch size B: with beam search the rows are the beams, grouped by
image (row r belongs to image r // (n // B)). `coca_logits_fn` and
`blip2_itg_logits_fn` build one for a batch of images.

Decoding keeps a fixed-size buffer `[B, max_len]` (prefix, then pad) and
compiles once: every step re-runs the model on the whole buffer and reads
the logits at position t. There is no key/value cache, so a caption of L
tokens costs O(L^2) token positions of compute instead of O(L); that is the
price of one simple, shape-static program. This is exact because the
decoders are causal: position t never sees the pad tokens after it.

A row stops at EOS; the positions after it hold `pad_id`. The pad token is
never generated (unless it equals EOS, as with Hugging Face CLIP tokenizers).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from mmjax.evaluate.retrieval import model_method


def _as_partial(logits_fn: Callable) -> Partial:
    # A `Partial` is a pytree: its bound arrays (variables, image tokens) are
    # traced jit arguments and its function is part of the static structure, so
    # the decode compiles once per shape and function, not once per batch.
    return logits_fn if isinstance(logits_fn, Partial) else Partial(logits_fn)


def _check(prefix_ids, max_len: int) -> np.ndarray:
    prefix = np.asarray(prefix_ids, np.int32)
    if prefix.ndim == 1:
        prefix = prefix[:, None]
    if prefix.ndim != 2 or prefix.shape[1] < 1:
        raise ValueError(f"prefix_ids must be int [B, P] with P >= 1 (e.g. a BOS column), got "
                         f"shape {prefix.shape}.")
    if prefix.shape[1] >= max_len:
        raise ValueError(f"max_len ({max_len}) must exceed the prefix length "
                         f"({prefix.shape[1]}) to leave room for generated tokens.")
    return prefix


def _step_log_probs(logits_fn, buf, t, pad_id: int, eos_id: int):
    """float32 log-probabilities `[n, V]` of the token after position t."""
    logits = logits_fn(buf)
    step = jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False).astype(jnp.float32)
    if pad_id != eos_id:
        step = step.at[:, pad_id].set(-jnp.inf)
    return jax.nn.log_softmax(step, axis=-1)


@functools.partial(jax.jit, static_argnames=("max_len", "eos_id", "pad_id"))
def _greedy(logits_fn, prefix, *, max_len: int, eos_id: int, pad_id: int):
    b, p = prefix.shape
    buf = jnp.full((b, max_len), pad_id, jnp.int32).at[:, :p].set(prefix)

    def cond(state):
        t, _, done = state
        return (t < max_len - 1) & ~jnp.all(done)

    def body(state):
        t, buf, done = state
        nxt = jnp.argmax(_step_log_probs(logits_fn, buf, t, pad_id, eos_id), axis=-1)
        nxt = jnp.where(done, pad_id, nxt).astype(jnp.int32)
        buf = buf.at[:, t + 1].set(nxt)
        return t + 1, buf, done | (nxt == eos_id)

    _, buf, _ = jax.lax.while_loop(cond, body, (jnp.int32(p - 1), buf, jnp.zeros((b,), bool)))
    return buf


def greedy_decode(logits_fn: Callable, prefix_ids, max_len: int, eos_id: int,
                  pad_id: int) -> np.ndarray:
    """Greedy decoding in one compiled `while_loop`.

    Args:
      logits_fn: tokens `[B, max_len]` -> logits `[B, max_len, V]` (see the
        module docstring); a `jax.tree_util.Partial` for arrays it closes over.
      prefix_ids: int `[B, P]` (or `[B]`) tokens to start from, e.g. BOS.
      max_len: buffer length, prefix included.
      eos_id, pad_id: a row ends after EOS; the rest is `pad_id`.

    Returns:
      int32 NumPy `[B, max_len]`: prefix, generated tokens, EOS, pad.
    """
    prefix = _check(prefix_ids, max_len)
    return np.asarray(_greedy(_as_partial(logits_fn), jnp.asarray(prefix), max_len=max_len,
                              eos_id=eos_id, pad_id=pad_id))


@functools.partial(jax.jit, static_argnames=("beam_size", "max_len", "eos_id", "pad_id",
                                             "length_penalty"))
def _beam(logits_fn, prefix, *, beam_size: int, max_len: int, eos_id: int, pad_id: int,
          length_penalty: float):
    b, p = prefix.shape
    k = beam_size
    seqs = jnp.full((b, k, max_len), pad_id, jnp.int32).at[:, :, :p].set(prefix[:, None])
    # Only beam 0 is live at the start, so the first step does not pick K copies.
    scores = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)[None].repeat(b, axis=0)
    state = (jnp.int32(p - 1), seqs, scores, jnp.zeros((b, k), bool), jnp.zeros((b, k), jnp.int32))

    def cond(state):
        t, _, _, done, _ = state
        return (t < max_len - 1) & ~jnp.all(done)

    def body(state):
        t, seqs, scores, done, lengths = state
        logp = _step_log_probs(logits_fn, seqs.reshape(b * k, max_len), t, pad_id, eos_id)
        vocab = logp.shape[-1]
        logp = logp.reshape(b, k, vocab)
        # A finished beam has one continuation, pad, at no cost: it keeps its
        # score and competes with the live beams.
        finished = jnp.where(jnp.arange(vocab) == pad_id, 0.0, -jnp.inf)
        logp = jnp.where(done[..., None], finished, logp)
        total = (scores[..., None] + logp).reshape(b, k * vocab)
        scores, flat = jax.lax.top_k(total, k)                           # [b, k]
        parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        seqs = jnp.take_along_axis(seqs, parent[..., None], axis=1).at[:, :, t + 1].set(token)
        was_done = jnp.take_along_axis(done, parent, axis=1)
        lengths = jnp.take_along_axis(lengths, parent, axis=1) + (~was_done).astype(jnp.int32)
        return t + 1, seqs, scores, was_done | (token == eos_id), lengths

    _, seqs, scores, _, lengths = jax.lax.while_loop(cond, body, state)
    normalized = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** length_penalty
    best = jnp.argmax(normalized, axis=1)
    return seqs[jnp.arange(b), best], normalized[jnp.arange(b), best]


def beam_search(logits_fn: Callable, prefix_ids, beam_size: int, max_len: int, eos_id: int,
                pad_id: int, length_penalty: float = 1.0, return_scores: bool = False):
    """Beam search in one compiled `while_loop`.

    Each step extends every live beam by every token and keeps the
    `beam_size` best by summed log-probability; a beam that produced EOS stays
    in the beam (extended by pad at no cost) until better live beams push it
    out. The search ends when all beams are finished or the buffer is full;
    the returned caption is the final beam with the best
    `sum log p / generated_length ** length_penalty` (generated length counts
    EOS; 0 ranks by the raw sum). With `beam_size=1` this is greedy decoding.

    Args:
      logits_fn: tokens `[B * beam_size, max_len]` -> logits
        `[B * beam_size, max_len, V]`, rows grouped by batch element.
      prefix_ids: int `[B, P]` (or `[B]`) start tokens.
      beam_size, max_len, eos_id, pad_id: as in `greedy_decode`.
      length_penalty: exponent of the length normalization of the final pick.
      return_scores: also return the normalized scores `[B]`.

    Returns:
      int32 NumPy `[B, max_len]` (and float32 `[B]` with `return_scores`).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}.")
    prefix = _check(prefix_ids, max_len)
    seqs, scores = _beam(_as_partial(logits_fn), jnp.asarray(prefix), beam_size=beam_size,
                         max_len=max_len, eos_id=eos_id, pad_id=pad_id,
                         length_penalty=float(length_penalty))
    return (np.asarray(seqs), np.asarray(scores)) if return_scores else np.asarray(seqs)


# ---------------------------------------------------------------- model helpers

_DECODE_FNS: dict = {}


def _decoder(model: Any, method: str, tokens_first: bool) -> Callable:
    """Stable `f(variables, image_tokens [B, S, D], text [n, L]) -> [n, L, V]`."""
    key = (id(model), method)
    if key not in _DECODE_FNS:
        apply = model_method(model, method)

        def logits(variables, image_tokens, text):
            # Beams of image i are rows i*K .. i*K+K-1 of `text`.
            img = jnp.repeat(image_tokens, text.shape[0] // image_tokens.shape[0], axis=0)
            out = apply(variables, text, img) if tokens_first else apply(variables, img, text)
            return out.astype(jnp.float32)
        _DECODE_FNS[key] = (model, logits)
    return _DECODE_FNS[key][1]


def coca_logits_fn(model: Any, variables: Any, images) -> Partial:
    """Logits function of a CoCa model for `images [B, H, W, 3]` (float32).

    The image side runs once here; each decode step runs the text tower and
    the multimodal decoder (`model.decode`) on the token buffer.
    """
    tokens = jax.jit(model_method(model, "image_tokens"))(variables, jnp.asarray(images))
    return Partial(_decoder(model, "decode", tokens_first=True), variables, tokens)


def blip2_itg_logits_fn(model: Any, variables: Any, images) -> Partial:
    """Logits function of a BLIP-2 stage-1 model's ITG head for `images`.

    The frozen ViT runs once here; each step runs the Q-Former in its causal
    mode (`model.itg_logits`, which puts [DEC] at position 0, so any first
    token such as BOS serves as the prefix).
    """
    tokens = jax.jit(model_method(model, "image_tokens"))(variables, jnp.asarray(images))
    return Partial(_decoder(model, "itg_logits", tokens_first=False), variables, tokens)


def generate_captions(logits_fn: Callable, batch_size: int, tokenizer: Any, max_len: int,
                      beam_size: int = 1, length_penalty: float = 1.0) -> list[str]:
    """Decodes `batch_size` captions starting from the tokenizer's BOS (or EOS
    when it has none) and returns them as text via `tokenizer.decode`."""
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    prefix = np.full((batch_size, 1), start, np.int32)
    if beam_size == 1:
        ids = greedy_decode(logits_fn, prefix, max_len, tokenizer.eos_id, tokenizer.pad_id)
    else:
        ids = beam_search(logits_fn, prefix, beam_size, max_len, tokenizer.eos_id,
                          tokenizer.pad_id, length_penalty)
    return [tokenizer.decode(row[1:]) for row in ids]
