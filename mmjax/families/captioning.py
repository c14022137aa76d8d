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
are re-ranked the cache rows follow their parents. Either way the search is
`mmjax.models.decoding`'s (`greedy_search`, `beam_search`) over a step
function, one jitted `lax.while_loop`, compiled once per shape and source.

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

from mmjax.models.jitted import ModelKey, model_method
from mmjax.models import decoding


@jax.tree_util.register_pytree_node_class
class CaptionStepFn:
    """Cached next-token logits of a captioning model for a batch of images.

    A pytree: `variables` and `image_tokens [B, N, D]` are its leaves (traced
    jit arguments); the model, its decode method (`method(text, image_tokens)`
    or, with `image_first`, `method(image_tokens, text)`, returning `[n, L, V]`)
    are static, the model compared by value (`mmjax.models.jitted.ModelKey`: decoding
    compiles once per shape for equal models). The model must accept
    `clone(cached_decode=True, cache_len=S)` (see `CoCa` and `Blip2Stage1`).

    - `fn(tokens [n, L])` -> float32 logits `[n, L, V]`: a plain logits function
      (no cache; re-runs the model on the whole buffer).
    - `fn.prefill(prefix [n, P], cache_len)` -> (float32 logits `[n, V]` of the
      token after the prefix, cache for n rows of `cache_len` positions).
    - `fn.step(cache, tokens [n], cache_len)` -> (logits `[n, V]` of the token
      after `tokens`, cache with `tokens` appended).
    """

    def __init__(self, model: Any, method: str, image_first: bool, variables: Any,
                 image_tokens: Any):
        # The model goes into the static part as a `ModelKey`: equal models give
        # equal tree structures (one compilation), unequal ones never share one.
        self._key = model if isinstance(model, ModelKey) else ModelKey(model)
        self.model = self._key.model
        self.method, self.image_first = method, image_first
        self.variables, self.image_tokens = variables, image_tokens

    def tree_flatten(self):
        return ((self.variables, self.image_tokens), (self._key, self.method, self.image_first))

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
        cache = decoding.zero_cache(dec, *args, method=self.method)
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


def _source(fn, prefix, max_len: int, pad_id: int, cached: bool):
    """The step function the search runs, for rows starting from `prefix [n, P]`.

    Returns `(logits [n, V] of the token after the prefix, state, step,
    reorder)` for `decoding.greedy_search` / `beam_search`. Cached: the step
    function's prefill and one-token steps against a `max_len`-slot cache.
    Uncached: the state is the token buffer `[n, max_len]` (prefix, then pad)
    and the position of its last token; each step writes the new tokens and
    re-runs `fn` on the whole buffer, reading the next position (exact, as the
    decoders are causal: position t never sees the pad after it).
    """
    if cached:
        logits, cache = fn.prefill(prefix, max_len)
        return (logits, cache, lambda cache, tokens: fn.step(cache, tokens, max_len),
                decoding.gather_cache)
    n, p = prefix.shape

    def logits_at(buf, t):
        return jax.lax.dynamic_index_in_dim(fn(buf), t, axis=1,
                                            keepdims=False).astype(jnp.float32)

    def step(state, tokens):
        buf, t = state
        buf = buf.at[:, t + 1].set(tokens)
        return logits_at(buf, t + 1), (buf, t + 1)

    def reorder(state, rows):
        return jnp.take(state[0], rows, axis=0), state[1]

    buf = jnp.full((n, max_len), pad_id, jnp.int32).at[:, :p].set(prefix)
    t = jnp.int32(p - 1)
    return logits_at(buf, t), (buf, t), step, reorder


# eos_id is traced: one program serves every EOS id.
@functools.partial(jax.jit, static_argnames=("max_len", "pad_id", "cached"))
def _greedy(logits_fn, prefix, *, max_len: int, eos_id, pad_id: int, cached: bool):
    logits, state, step, _ = _source(logits_fn, prefix, max_len, pad_id, cached)
    new = decoding.greedy_search(step, logits, state, max_len - prefix.shape[1],
                                 eos_id=eos_id, pad_id=pad_id, ban_pad=True)
    return jnp.concatenate([prefix, new], axis=1)


def _use_cache(logits_fn, use_cache: bool) -> bool:
    return bool(use_cache) and isinstance(logits_fn, CaptionStepFn)


def greedy_decode(logits_fn: Callable, prefix_ids, max_len: int, eos_id: int,
                  pad_id: int, use_cache: bool = True) -> np.ndarray:
    """Greedy decoding in one compiled `while_loop` (`decoding.greedy_search`).

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
    # Every beam starts as the prefix (the cache is prefilled for all b * k rows).
    logits, state, step, reorder = _source(logits_fn, jnp.repeat(prefix, beam_size, axis=0),
                                           max_len, pad_id, cached)
    new, scores = decoding.beam_search(step, logits, state, max_len - p, beam_size=beam_size,
                                       eos_id=eos_id, pad_id=pad_id,
                                       length_penalty=length_penalty, ban_pad=True,
                                       reorder=reorder)
    return jnp.concatenate([prefix, new], axis=1), scores


def beam_search(logits_fn: Callable, prefix_ids, beam_size: int, max_len: int, eos_id: int,
                pad_id: int, length_penalty: float = 1.0, return_scores: bool = False,
                use_cache: bool = True):
    """Beam search in one compiled `while_loop` (`decoding.beam_search`).

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
