"""Incremental decoding: the key/value cache and greedy / beam search.

The cache. A decode-mode model keeps fixed-size buffers in the Flax `cache`
collection, written by the same few functions for every decoder (the CoCa
text tower and caption decoder, the Q-Former's ITG path and the Llama-style
`DecoderLM`):

- `CacheIndex`: each row's next free slot `[B]` (`cache_index/index`); rows of
  a batch may sit at different lengths.
- `append_kv`: a self-attention writes its new keys/values `[B, T, H, K]` at
  each row's index into `[B, S, H, K]` buffers (`cached_key`, `cached_value`)
  and attends to the whole buffer, masked by `slot_mask` (a token sees the
  slots up to its own) or `decode_slots` (also hides pad keys written earlier).
- `context_kv`: a cross-attention stores the keys/values of its fixed context
  (image tokens) on the first call and reuses them afterwards.
- `gather_cache`: selects, reorders or repeats cache rows (beam search).

The search. A *step function* `step(cache, tokens [n]) -> (logits [n, V],
cache)` appends one token per row and returns the next-token logits; any
state serves as the cache (a token buffer re-run in full, for a reference
decode). `greedy_search` and `beam_search` run one `lax.while_loop` from the
logits after the prompt, stop when every row has produced EOS or the token
budget is spent, and fill the rest with pad; beam search ranks finished
hypotheses by `sum log p / length ** length_penalty`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
StepFn = Callable[[Any, Array], tuple[Array, Any]]


# ----------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------

def write_rows(buf: Array, new: Array, index: Array) -> Array:
    """`buf [B, S, ...]` with `new [B, T, ...]` written at slots `index[b]..index[b]+T-1`
    of each row b (per-row cache offsets: rows of a batch sit at different lengths)."""
    def one(row, upd, i):
        return jax.lax.dynamic_update_slice(row, upd, (i,) + (0,) * (row.ndim - 1))
    return jax.vmap(one)(buf, new.astype(buf.dtype), index)


# Names of scanned stacks: their cache leaves carry a leading depth axis.
SCANNED_STACKS = ("layers", "groups")


def gather_cache(cache: Any, rows: Array) -> Any:
    """Cache for rows `rows [B']` (select, reorder or repeat; beam search) of a
    `cache` collection. Leaves under a scanned stack (`layers`, the Q-Former's
    `groups`) have the depth axis first and the batch axis second."""
    def take(path, x):
        scanned = any(getattr(k, "key", None) in SCANNED_STACKS for k in path)
        return jnp.take(x, rows, axis=1 if scanned else 0)
    return jax.tree_util.tree_map_with_path(take, cache)


def zero_cache(module: nn.Module, *args, method: Any = None, **kwargs) -> dict:
    """The zero `cache` collection of a decode-mode `module` for a call with `args`
    (the batch size and buffer lengths follow from them and the module's fields);
    `init` runs for shapes only."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, method=method,
                                                **kwargs))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


class CacheIndex(nn.Module):
    """Per-row write position `[B]` of the KV cache; returns it and advances it."""

    @nn.compact
    def __call__(self, batch: int, advance: Array) -> Array:
        initializing = not self.has_variable("cache", "index")
        index = self.variable("cache", "index", jnp.zeros, (batch,), jnp.int32)
        start = index.value
        if not initializing:
            index.value = start + advance
        return start


def slot_mask(start: Array, length: int, cache_len: int) -> tuple[Array, Array]:
    """`(mask [B, 1, T, S], slots [B, T])` of a call appending `length` tokens at
    each row's slot `start [B]`: token t goes to slot start + t and sees every
    slot up to its own (S = cache_len)."""
    slots = start[:, None] + jnp.arange(length, dtype=jnp.int32)
    return (jnp.arange(cache_len)[None, None, :] <= slots[:, :, None])[:, None], slots


def decode_slots(module: nn.Module, key_valid: Optional[Array], batch: int, length: int,
                 cache_len: int) -> tuple[Array, Array, Array]:
    """Cache bookkeeping of one decode-mode call of `module` (inside its compact method).

    Advances the module's per-row cache index (`cache/cache_index/index [B]`)
    by `length`, records which of the new keys may be attended
    (`cache/key_valid [B, S]`, from `key_valid [B, T]`, None = all) and
    returns `(mask [B, 1, T, S], start [B], slots [B, T])`: the causal mask
    over the cache slots (a token sees the valid slots up to its own), each
    row's first slot and the slot of every new token.
    """
    start = CacheIndex(name="cache_index")(batch, jnp.full((batch,), length, jnp.int32))
    causal, slots = slot_mask(start, length, cache_len)
    valid = module.variable("cache", "key_valid", jnp.zeros, (batch, cache_len), bool)
    new = jnp.ones((batch, length), bool) if key_valid is None else key_valid.astype(bool)
    valid.value = write_rows(valid.value, new, start)
    return causal & valid.value[:, None, None], start, slots


def append_kv(module: nn.Module, k: Array, v: Array, write_index: Optional[Array],
              cache_len: int, dtype: Any) -> tuple[Array, Array]:
    """Self-attention cache of `module`: writes the new keys/values `k, v [B, T, H, K]`
    into its `cached_key` / `cached_value` buffers `[B, cache_len, H, K]` (dtype
    `dtype`) at each row's `write_index [B]` and returns the whole buffers."""
    if write_index is None:
        raise ValueError("self-attention with a key/value cache needs `write_index` [B] "
                         "(each row's first cache slot for this call).")
    out = []
    for name, new in (("cached_key", k), ("cached_value", v)):
        b, _, h, d = new.shape
        buf = module.variable("cache", name, jnp.zeros, (b, cache_len, h, d), dtype)
        buf.value = write_rows(buf.value, new, write_index)
        out.append(buf.value)
    return out[0], out[1]


def context_kv(module: nn.Module, kv: Optional[tuple[Array, Array]],
               dtype: Any) -> tuple[Array, Array]:
    """Cross-attention cache of `module`: with `kv` (the context's keys and values
    `[B, S, H, K]`, the prefill call) stores them as `cached_key` / `cached_value`
    in `dtype` and returns them; with None returns the stored ones."""
    if kv is not None:
        for name, new in zip(("cached_key", "cached_value"), kv):
            var = module.variable("cache", name, jnp.zeros, new.shape, dtype)
            var.value = new.astype(dtype)
        return kv
    if not module.has_variable("cache", "cached_key"):
        raise ValueError("cross-attention with a context cache got context=None before any "
                         "call stored the context's keys/values: pass the context (e.g. "
                         "image tokens) on the first (prefill) call.")
    return module.get_variable("cache", "cached_key"), module.get_variable("cache", "cached_value")


# ----------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------

def _banned(vocab: int, pad_id: int, eos_id: Any, ban_pad: bool) -> Optional[Array]:
    """`[V]` True for the pad token when it may not be generated (unless it is EOS)."""
    if not ban_pad:
        return None
    never = jnp.arange(vocab) == pad_id
    return never if eos_id is None else never & (pad_id != eos_id)


def token_log_probs(logits: Array, pad_id: int, eos_id: Any = None,
                    ban_pad: bool = False) -> Array:
    """float32 log-probabilities `[n, V]` of next-token `logits [n, V]`; with `ban_pad`
    the pad token gets probability 0 (unless it equals `eos_id`, which may be traced)."""
    logits = logits.astype(jnp.float32)
    never = _banned(logits.shape[-1], pad_id, eos_id, ban_pad)
    if never is not None:
        logits = jnp.where(never, -jnp.inf, logits)
    return jax.nn.log_softmax(logits, axis=-1)


def _is_eos(tokens: Array, eos_id: Any) -> Array:
    return jnp.zeros(tokens.shape, bool) if eos_id is None else tokens == eos_id


def greedy_search(step: StepFn, logits: Array, cache: Any, max_new_tokens: int, *,
                  eos_id: Any = None, pad_id: int = 0, ban_pad: bool = False,
                  select: Optional[Callable[[Array, Array], Array]] = None) -> Array:
    """Greedy (or sampled) decoding of `n` rows: int32 `[n, max_new_tokens]`.

    Args:
      step: `(cache, tokens [n]) -> (logits [n, V], cache)`, appending one token.
      logits, cache: float32 next-token logits `[n, V]` after the prompt and the
        state `step` continues from.
      eos_id: a row stops after emitting it (None: never); its later tokens are
        `pad_id`. May be traced.
      ban_pad: never pick the pad token (unless it is EOS).
      select: `(logits [n, V], i) -> tokens [n]` for step i (e.g. sampling);
        default the argmax (pad excluded with `ban_pad`).
    Traceable (one `lax.while_loop`; call it under `jax.jit`).
    """
    n = logits.shape[0]

    def argmax(lg, i):
        never = _banned(lg.shape[-1], pad_id, eos_id, ban_pad)
        return jnp.argmax(lg if never is None else jnp.where(never, -jnp.inf, lg), axis=-1)

    select = argmax if select is None else select

    def cond(state):
        i, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tokens, done, logits, cache = state
        tok = jnp.where(done, pad_id, select(logits, i)).astype(jnp.int32)
        done = done | _is_eos(tok, eos_id)
        logits, cache = step(cache, tok)
        return i + 1, tokens.at[:, i].set(tok), done, logits, cache

    tokens = jnp.full((n, max_new_tokens), pad_id, jnp.int32)
    state = (jnp.int32(0), tokens, jnp.zeros((n,), bool), logits, cache)
    return jax.lax.while_loop(cond, body, state)[1]


def beam_search(step: StepFn, logits: Array, cache: Any, max_new_tokens: int, *,
                beam_size: int, eos_id: Any = None, pad_id: int = 0,
                length_penalty: float = 1.0, ban_pad: bool = False,
                reorder: Callable[[Any, Array], Any] = gather_cache) -> tuple[Array, Array]:
    """Beam search: best tokens int32 `[B, max_new_tokens]` and their scores float32 `[B]`.

    Rows `b * beam_size .. b * beam_size + beam_size - 1` of `logits
    [B * beam_size, V]` and `cache` are the beams of batch element b, all
    starting from the same prompt (only beam 0 is live at first, so the first
    step does not pick copies). Each step extends every live beam by every
    token and keeps the `beam_size` best by summed log-probability; a beam that
    produced EOS stays in the beam, extended by pad at no cost, until better
    live beams push it out. The result is the final beam with the best
    `sum log p / generated_length ** length_penalty` (the length counts EOS; 0
    ranks by the raw sum), and that score.

    Args: `step`, `eos_id`, `pad_id`, `ban_pad` as in `greedy_search`;
      `reorder(cache, rows [B * beam_size])` gives each new beam its parent's
      cache row (default `gather_cache`).
    Traceable (one `lax.while_loop`; call it under `jax.jit`).
    """
    n, vocab = logits.shape
    k = beam_size
    b = n // k
    scores = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)[None].repeat(b, axis=0)
    # A finished beam has one continuation, pad, at no cost: it keeps its score
    # and competes with the live beams.
    finished = jnp.where(jnp.arange(vocab) == pad_id, 0.0, -jnp.inf)

    def cond(state):
        i, _, _, done, _, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, seqs, scores, done, lengths, logits, cache = state
        logp = token_log_probs(logits, pad_id, eos_id, ban_pad).reshape(b, k, vocab)
        logp = jnp.where(done[..., None], finished, logp)
        total = (scores[..., None] + logp).reshape(b, k * vocab)
        scores, flat = jax.lax.top_k(total, k)                           # [b, k]
        parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        seqs = jnp.take_along_axis(seqs, parent[..., None], axis=1).at[:, :, i].set(token)
        was_done = jnp.take_along_axis(done, parent, axis=1)
        lengths = jnp.take_along_axis(lengths, parent, axis=1) + (~was_done).astype(jnp.int32)
        # Each new beam continues its parent's cache row.
        rows = (jnp.arange(b)[:, None] * k + parent).reshape(-1)
        logits, cache = step(reorder(cache, rows), token.reshape(-1))
        return (i + 1, seqs, scores, was_done | _is_eos(token, eos_id), lengths, logits,
                cache)

    seqs = jnp.full((b, k, max_new_tokens), pad_id, jnp.int32)
    state = (jnp.int32(0), seqs, scores, jnp.zeros((b, k), bool), jnp.zeros((b, k), jnp.int32),
             logits, cache)
    _, seqs, scores, _, lengths, _, _ = jax.lax.while_loop(cond, body, state)
    normalized = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** length_penalty
    best = jnp.argmax(normalized, axis=1)
    return seqs[jnp.arange(b), best], normalized[jnp.arange(b), best]


def nucleus_sample(logits: Array, key: Array, temperature: Array, top_p: Array) -> Array:
    """Sample ids `[B]` from `logits [B, V]` after temperature and top-p filtering."""
    logits = logits / jnp.maximum(temperature, 1e-6)
    sorted_logits = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the top token always).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    keep = keep.at[:, 0].set(True)
    cutoff = jnp.take_along_axis(sorted_logits, keep.sum(-1, keepdims=True) - 1, axis=-1)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
