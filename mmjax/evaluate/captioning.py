"""Caption decoding (greedy and beam search) for CoCa and BLIP-2 stage 1.

Decoding reads next-token logits from one of two kinds of source:

- A *logits function* maps a token buffer `[n, L]` int32 to logits
  `[n, L, V]`, where logits at position t predict token t + 1. Decoding keeps
  a fixed-size buffer `[n, max_len]` (prefix, then pad) and re-runs the
  function on the whole buffer at every step, reading position t: O(L^2)
  token positions for a caption of L tokens, exact because the decoders are
  causal (position t never sees the pad after it). Any plain Python function
  (or `jax.tree_util.Partial`) serves; tests use hand-made ones.
- A *caption step function* (`CaptionStepFn`, built by `coca_logits_fn` and
  `blip2_itg_logits_fn`) decodes with a key/value cache: one prefill call
  runs the prefix (and the image side of the decoder: CoCa's cross-attention
  keys/values, the Q-Former's query keys/values) into fixed-size caches of
  `max_len` slots, then each step runs only the new token: O(L). A step
  function is also a logits function (calling it re-runs the model on a
  buffer), so wrappers and `use_cache=False` take the buffer path.

`n` is a multiple of the batch size B: with beam search the rows are the
beams, grouped by image (row r belongs to image r // (n // B)); when beams
are re-ranked the cache rows follow their parents. Either way the whole
decode is one jitted `lax.while_loop`, compiled once per shape and source.

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
from mmjax.models.layers import gather_cache


class _ModelRef:
    """Hashable handle of a model for a pytree's static part (flax modules with
    dict fields are unhashable): equal only to a handle of the same object, so
    jit compiles once per model and shape."""
    __slots__ = ("model",)

    def __init__(self, model: Any):
        self.model = model

    def __hash__(self):
        return id(self.model)

    def __eq__(self, other):
        return isinstance(other, _ModelRef) and other.model is self.model


@jax.tree_util.register_pytree_node_class
class CaptionStepFn:
    """Cached next-token logits of a captioning model for a batch of images.

    A pytree: `variables` and `image_tokens [B, N, D]` are its leaves (traced
    jit arguments); the model, its decode method (`method(text, image_tokens)`
    or, with `image_first`, `method(image_tokens, text)`, returning `[n, L, V]`)
    are static. The model must accept `clone(cached_decode=True, cache_len=S)`
    (see `CoCa` and `Blip2Stage1`).

    - `fn(tokens [n, L])` -> float32 logits `[n, L, V]`: a plain logits function
      (no cache; re-runs the model on the whole buffer).
    - `fn.prefill(prefix [n, P], cache_len)` -> (float32 logits `[n, V]` of the
      token after the prefix, cache for n rows of `cache_len` positions).
    - `fn.step(cache, tokens [n], cache_len)` -> (logits `[n, V]` of the token
      after `tokens`, cache with `tokens` appended).
    """

    def __init__(self, model: Any, method: str, image_first: bool, variables: Any,
                 image_tokens: Any):
        self.model = model.model if isinstance(model, _ModelRef) else model
        self.method, self.image_first = method, image_first
        self.variables, self.image_tokens = variables, image_tokens

    def tree_flatten(self):
        return ((self.variables, self.image_tokens),
                (_ModelRef(self.model), self.method, self.image_first))

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*aux, *children)

    def _images(self, n: int):
        """Image tokens repeated for `n` rows (row r belongs to image r // (n // B))."""
        b = self.image_tokens.shape[0]
        if n % b:
            raise ValueError(f"{n} token rows for {b} images: rows must be a multiple of the "
                             "images (prefix_ids one row per image).")
        return jnp.repeat(self.image_tokens, n // b, axis=0)

    def _args(self, text, image_tokens) -> tuple:
        return (image_tokens, text) if self.image_first else (text, image_tokens)

    def __call__(self, tokens):
        images = self._images(tokens.shape[0])
        out = self.model.apply(self.variables, *self._args(tokens, images), method=self.method)
        return out.astype(jnp.float32)

    def prefill(self, prefix, cache_len: int):
        dec = self.model.clone(cached_decode=True, cache_len=cache_len)
        args = self._args(prefix, self._images(prefix.shape[0]))
        # A zero cache of the right structure, as `lm.init_cache` (init for shapes only).
        shapes = jax.eval_shape(
            lambda: dec.init(jax.random.key(0), *args, method=self.method))["cache"]
        cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        logits, state = dec.apply({**self.variables, "cache": cache}, *args, method=self.method,
                                  mutable=["cache"])
        return logits[:, -1].astype(jnp.float32), state["cache"]

    def step(self, cache, tokens, cache_len: int):
        dec = self.model.clone(cached_decode=True, cache_len=cache_len)
        logits, state = dec.apply({**self.variables, "cache": cache},
                                  *self._args(tokens[:, None], None), method=self.method,
                                  mutable=["cache"])
        return logits[:, -1].astype(jnp.float32), state["cache"]


def _as_partial(logits_fn: Callable) -> Any:
    # A `Partial` is a pytree: its bound arrays (variables, image tokens) are
    # traced jit arguments and its function is part of the static structure, so
    # the decode compiles once per shape and function, not once per batch.
    if isinstance(logits_fn, (Partial, CaptionStepFn)):
        return logits_fn
    return Partial(logits_fn)


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


def _log_probs(logits, pad_id: int, eos_id):
    """float32 log-probabilities `[n, V]` of next-token `logits [n, V]` (pad
    excluded unless it is EOS; `eos_id` may be traced)."""
    logits = logits.astype(jnp.float32)
    never = (jnp.arange(logits.shape[-1]) == pad_id) & (pad_id != eos_id)
    return jax.nn.log_softmax(jnp.where(never, -jnp.inf, logits), axis=-1)


def _source(fn, seqs, p: int, max_len: int, cached: bool):
    """Next-token logits for the decode loops, with or without a cache.

    Returns `(state, logits(state, seqs [n, max_len], t) -> [n, V],
    advance(state, rows [n] | None, tokens [n]) -> state)`: `advance` is
    called once the tokens at position t + 1 are chosen, `rows` being the
    parent row of each row when beams were re-ranked.
    """
    if not cached:
        def logits_at(state, seqs, t):
            return jax.lax.dynamic_index_in_dim(fn(seqs), t, axis=1, keepdims=False)
        return (), logits_at, lambda state, rows, tokens: state

    def advance(state, rows, tokens):
        cache = state[0] if rows is None else gather_cache(state[0], rows)
        logits, cache = fn.step(cache, tokens, max_len)
        return cache, logits

    logits, cache = fn.prefill(seqs[:, :p], max_len)
    return (cache, logits), lambda state, seqs, t: state[1], advance


# eos_id is traced: one program serves every EOS id.
@functools.partial(jax.jit, static_argnames=("max_len", "pad_id", "cached"))
def _greedy(logits_fn, prefix, *, max_len: int, eos_id, pad_id: int, cached: bool):
    b, p = prefix.shape
    buf = jnp.full((b, max_len), pad_id, jnp.int32).at[:, :p].set(prefix)
    src, logits_at, advance = _source(logits_fn, buf, p, max_len, cached)

    def cond(state):
        t, _, done, _ = state
        return (t < max_len - 1) & ~jnp.all(done)

    def body(state):
        t, buf, done, src = state
        logp = _log_probs(logits_at(src, buf, t), pad_id, eos_id)
        nxt = jnp.where(done, pad_id, jnp.argmax(logp, axis=-1)).astype(jnp.int32)
        buf = buf.at[:, t + 1].set(nxt)
        return t + 1, buf, done | (nxt == eos_id), advance(src, None, nxt)

    state = (jnp.int32(p - 1), buf, jnp.zeros((b,), bool), src)
    return jax.lax.while_loop(cond, body, state)[1]


def _use_cache(logits_fn, use_cache: bool) -> bool:
    return bool(use_cache) and isinstance(logits_fn, CaptionStepFn)


def greedy_decode(logits_fn: Callable, prefix_ids, max_len: int, eos_id: int,
                  pad_id: int, use_cache: bool = True) -> np.ndarray:
    """Greedy decoding in one compiled `while_loop`.

    Args:
      logits_fn: a `CaptionStepFn`, or tokens `[B, max_len]` -> logits
        `[B, max_len, V]` (see the module docstring); a
        `jax.tree_util.Partial` for arrays it closes over.
      prefix_ids: int `[B, P]` (or `[B]`) tokens to start from, e.g. BOS.
      max_len: buffer length, prefix included (and the cache length).
      eos_id, pad_id: a row ends after EOS; the rest is `pad_id`.
      use_cache: decode a `CaptionStepFn` with its key/value cache; False
        re-runs it on the whole buffer at every step (the reference). Plain
        logits functions always take the buffer path.

    Returns:
      int32 NumPy `[B, max_len]`: prefix, generated tokens, EOS, pad.
    """
    prefix = _check(prefix_ids, max_len)
    return np.asarray(_greedy(_as_partial(logits_fn), jnp.asarray(prefix), max_len=max_len,
                              eos_id=np.int32(eos_id), pad_id=pad_id,
                              cached=_use_cache(logits_fn, use_cache)))


@functools.partial(jax.jit, static_argnames=("beam_size", "max_len", "pad_id",
                                             "length_penalty", "cached"))
def _beam(logits_fn, prefix, *, beam_size: int, max_len: int, eos_id, pad_id: int,
          length_penalty: float, cached: bool):
    b, p = prefix.shape
    k = beam_size
    seqs = jnp.full((b, k, max_len), pad_id, jnp.int32).at[:, :, :p].set(prefix[:, None])
    # Every beam starts as the prefix (the cache is prefilled for all b * k rows).
    src, logits_at, advance = _source(logits_fn, seqs.reshape(b * k, max_len), p, max_len,
                                      cached)
    # Only beam 0 is live at the start, so the first step does not pick K copies.
    scores = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)[None].repeat(b, axis=0)
    state = (jnp.int32(p - 1), seqs, scores, jnp.zeros((b, k), bool), jnp.zeros((b, k), jnp.int32),
             src)

    def cond(state):
        t, _, _, done, _, _ = state
        return (t < max_len - 1) & ~jnp.all(done)

    def body(state):
        t, seqs, scores, done, lengths, src = state
        logp = _log_probs(logits_at(src, seqs.reshape(b * k, max_len), t), pad_id, eos_id)
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
        # Each new beam continues its parent's cache row.
        rows = (jnp.arange(b)[:, None] * k + parent).reshape(-1)
        src = advance(src, rows, token.reshape(-1))
        return t + 1, seqs, scores, was_done | (token == eos_id), lengths, src

    _, seqs, scores, _, lengths, _ = jax.lax.while_loop(cond, body, state)
    normalized = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** length_penalty
    best = jnp.argmax(normalized, axis=1)
    return seqs[jnp.arange(b), best], normalized[jnp.arange(b), best]


def beam_search(logits_fn: Callable, prefix_ids, beam_size: int, max_len: int, eos_id: int,
                pad_id: int, length_penalty: float = 1.0, return_scores: bool = False,
                use_cache: bool = True):
    """Beam search in one compiled `while_loop`.

    Each step extends every live beam by every token and keeps the
    `beam_size` best by summed log-probability; a beam that produced EOS stays
    in the beam (extended by pad at no cost) until better live beams push it
    out. The search ends when all beams are finished or the buffer is full;
    the returned caption is the final beam with the best
    `sum log p / generated_length ** length_penalty` (generated length counts
    EOS; 0 ranks by the raw sum). With `beam_size=1` this is greedy decoding.

    Args:
      logits_fn: a `CaptionStepFn`, or tokens `[B * beam_size, max_len]` ->
        logits `[B * beam_size, max_len, V]`, rows grouped by batch element.
      prefix_ids: int `[B, P]` (or `[B]`) start tokens.
      beam_size, max_len, eos_id, pad_id, use_cache: as in `greedy_decode`
        (the cache holds `B * beam_size` rows, reordered as beams are re-ranked).
      length_penalty: exponent of the length normalization of the final pick.
      return_scores: also return the normalized scores `[B]`.

    Returns:
      int32 NumPy `[B, max_len]` (and float32 `[B]` with `return_scores`).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}.")
    prefix = _check(prefix_ids, max_len)
    seqs, scores = _beam(_as_partial(logits_fn), jnp.asarray(prefix), beam_size=beam_size,
                         max_len=max_len, eos_id=np.int32(eos_id), pad_id=pad_id,
                         length_penalty=float(length_penalty),
                         cached=_use_cache(logits_fn, use_cache))
    return (np.asarray(seqs), np.asarray(scores)) if return_scores else np.asarray(seqs)


# ---------------------------------------------------------------- model helpers

def coca_logits_fn(model: Any, variables: Any, images) -> CaptionStepFn:
    """Caption step function of a CoCa model for `images [B, H, W, 3]` (float32).

    The image side runs once here. Cached decoding runs the text tower and
    the multimodal decoder (`model.decode`) once on the prefix (computing the
    image tokens' cross-attention keys/values), then one token per step;
    called as a logits function it re-runs `model.decode` on the buffer.
    """
    tokens = jax.jit(model_method(model, "image_tokens"))(variables, jnp.asarray(images))
    return CaptionStepFn(model, "decode", False, variables, tokens)


def blip2_itg_logits_fn(model: Any, variables: Any, images) -> CaptionStepFn:
    """Caption step function of a BLIP-2 stage-1 model's ITG head for `images`.

    The frozen ViT runs once here. Cached decoding runs the Q-Former in its
    causal mode (`model.itg_logits`, which puts [DEC] at position 0, so any
    first token such as BOS serves as the prefix) once on the queries and the
    prefix, then only the new text token per step.
    """
    tokens = jax.jit(model_method(model, "image_tokens"))(variables, jnp.asarray(images))
    return CaptionStepFn(model, "itg_logits", True, variables, tokens)


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
