"""Llama-family decoder-only language model, with KV-cache decoding and generation.

`DecoderLM(...)(ids [B, L]) -> logits [B, L, V]` (float32)
  token embedding, `depth` pre-RMSNorm blocks (grouped-query self-attention
  with rotary position embeddings in Hugging Face Llama's rotate-half layout,
  SwiGLU MLP without biases), final RMSNorm, LM head tied to the embedding or
  separate. `inputs_embeds [B, L, D]` may replace `ids` (a connector
  prepends image features to `model.apply(..., ids, method="embed")`).

Incremental decoding: `model.clone(decode=True, cache_len=S)` keeps, per
layer, fixed-size key/value buffers `[B, S, kv_heads, head_dim]` in the
`cache` collection and one write index per row (`mmjax.models.decoding`).
Each call appends its tokens at each row's index and attends to everything
written before.

Padding convention: prompts are RIGHT-padded. Each row keeps positions
0..len-1; a prefill call with `attention_mask` advances each row's index by
its own number of valid tokens, so the next token of a short row overwrites
its padding slots. A decode-mode `attention_mask` must therefore be a prefix
of ones per row.

`generate(model, variables, prompt_ids, prompt_lengths, max_new_tokens, ...)`
runs prefill, then `decoding.greedy_search` / `beam_search` over one-token
steps: greedy, sampling (temperature, nucleus top-p) and beam search.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError
from mmjax.models import decoding
from mmjax.models.decoding import CacheIndex, append_kv, gather_cache, slot_mask
from mmjax.models.layers import (Dense, Mlp, Norm, _HeadsIn, _HeadsOut, boundary, constrain,
                                 logical, normal_init, remat_policy)
from mmjax.models.ops.attention import dot_product_attention, make_attention_mask

Array = jax.Array


# ----------------------------------------------------------------------------
# Rotary position embedding (Hugging Face Llama layout)
# ----------------------------------------------------------------------------

def rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos, sin tables `[B, T, 1, K]` (float32) for integer `positions [B, T]`.

    Frequencies theta^(-2i/K) for i < K/2, repeated over both halves of the
    head (the rotate-half layout of Hugging Face Llama checkpoints).
    """
    if head_dim % 2:
        raise ConfigError(f"rotary embeddings need an even head_dim, got {head_dim} "
                          "(config keys `width`/`num_heads` or `head_dim`).")
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, K/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate `x [B, T, H, K]` by the tables from `rope_tables` (computed in float32)."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------

class GQAttention(nn.Module):
    """Causal grouped-query self-attention with RoPE and an optional KV cache.

    `__call__(x [B, T, D], mask [B, 1, T, S], positions [B, T], write_index [B] | None)`
    returns `[B, T, D]`. In decode mode the new keys/values are written into
    the cache at `write_index` per row and attention runs over the whole
    cache (S = cache_len); otherwise S = T.
    """
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    decode: bool = False
    cache_len: int = 0
    implementation: Optional[str] = "xla"
    dtype: Any = jnp.float32
    kernel_init: Any = normal_init(0.02)

    @nn.compact
    def __call__(self, x, mask, positions, write_index):
        def proj(heads, name):
            return _HeadsIn(x.shape[-1], heads, self.head_dim, False, self.dtype,
                            self.kernel_init, name=name)(x)

        names = ("act_batch", "act_length", "act_heads", "act_kv")
        q = constrain(proj(self.num_heads, "query"), names)
        k = constrain(proj(self.num_kv_heads, "key"), names)
        v = constrain(proj(self.num_kv_heads, "value"), names)
        cos, sin = rope_tables(positions, self.head_dim, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.decode:
            k, v = append_kv(self, k, v, write_index, self.cache_len, self.dtype)
        out = dot_product_attention(q, k, v, mask, self.implementation)
        out = _HeadsOut(x.shape[-1], False, self.dtype, self.kernel_init, name="out")(out)
        return constrain(out, ("act_batch", "act_length", "act_embed"))


class DecoderBlock(nn.Module):
    """Pre-RMSNorm block: x + attn(norm(x)); x + swiglu(norm(x)).

    Scan-friendly: `(x [B, T, D], (mask, positions, write_index)) -> (x, None)`.
    """
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    norm_eps: float
    rope_theta: float
    decode: bool = False
    cache_len: int = 0
    implementation: Optional[str] = "xla"
    dtype: Any = jnp.float32
    kernel_init: Any = normal_init(0.02)

    @nn.compact
    def __call__(self, x, extras):
        mask, positions, write_index = extras
        norm = functools.partial(Norm, kind="rmsnorm", eps=self.norm_eps, dtype=self.dtype)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        h = GQAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.rope_theta,
                        self.decode, self.cache_len, self.implementation, self.dtype,
                        self.kernel_init, name="attn")(norm(name="attn_norm")(x), mask,
                                                       positions, write_index)
        x = x + h
        h = Mlp(self.mlp_dim, act="swiglu", use_bias=False, dtype=self.dtype,
                kernel_init=self.kernel_init, name="mlp")(norm(name="mlp_norm")(x))
        return x + h, None


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------

class DecoderLM(nn.Module):
    """Llama-style decoder-only LM.

    Fields:
      vocab_size: vocabulary size V (token embedding rows and logits).
      width: hidden width D.
      depth: number of decoder blocks.
      num_heads: query attention heads.
      mlp_dim: hidden width of the SwiGLU MLP.
      num_kv_heads: key/value heads for grouped-query attention; must divide
        num_heads (None = num_heads).
      head_dim: per-head width (None = width // num_heads).
      norm_eps: RMSNorm epsilon.
      rope_theta: RoPE base (frequencies theta^(-2i/head_dim)).
      max_len: context length the weights were trained for; only the default
        cache size (inputs are not checked against it).
      tie_embeddings: LM head = transposed token embedding.
      scan: `nn.scan` over layers (params `layers` with a leading depth axis;
        unrolled params are `layers_0..`).
      remat: `jax.checkpoint` policy per block: "none", "full", "dots",
        "dots_no_batch" or "save_everything".
      attention: "xla", "cudnn", "splash" or None (see `ops.attention.dot_product_attention`).
      dtype: compute dtype (params stay float32; logits are float32); in a
        VisionLM config, `model.dtype` unless this section sets it.
      init_std: standard deviation of the normal init of the token embedding and
        every kernel (attention, MLP, LM head).
      decode: KV-cache mode (incremental decoding); `generate` turns it on by
        `clone`, so a training config leaves it False.
      cache_len: the KV-cache buffer length in tokens (None = max_len). The
        caller keeps every row's tokens within cache_len: inside jit a write
        past the end cannot be detected (`generate` sizes it itself).
    """
    vocab_size: int = 32000
    width: int = 4096
    depth: int = 32
    num_heads: int = 32
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    mlp_dim: int = 11008
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_len: int = 4096
    tie_embeddings: bool = False
    scan: bool = False
    remat: str = "none"
    attention: Optional[str] = "xla"
    dtype: Any = jnp.float32
    init_std: float = 0.02
    decode: bool = False
    cache_len: Optional[int] = None

    def setup(self):
        kv_heads = self.num_kv_heads or self.num_heads
        if self.num_heads % kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                              f"{kv_heads} (config keys `num_heads`, `num_kv_heads`).")
        head_dim = self.head_dim or self.width // self.num_heads
        if self.head_dim is None and self.width % self.num_heads:
            raise ConfigError(f"width {self.width} is not divisible by num_heads {self.num_heads}; "
                              "set config key `head_dim`.")
        init = normal_init(self.init_std)
        self.token_embedding = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                                        embedding_init=logical(init, ("vocab", "embed")))
        block_kw = dict(num_heads=self.num_heads, num_kv_heads=kv_heads, head_dim=head_dim,
                        mlp_dim=self.mlp_dim, norm_eps=self.norm_eps, rope_theta=self.rope_theta,
                        decode=self.decode, cache_len=self.cache_len or self.max_len,
                        implementation=self.attention, dtype=self.dtype, kernel_init=init)
        block = DecoderBlock
        if self.remat != "none":
            block = nn.remat(block, policy=remat_policy(self.remat), prevent_cse=not self.scan)
        if self.scan:
            self.layers = nn.scan(block, variable_axes={"params": 0, "cache": 0},
                                  split_rngs={"params": True}, in_axes=nn.broadcast,
                                  length=self.depth,
                                  metadata_params={nn.PARTITION_NAME: "layers"})(**block_kw)
        else:
            # A list attribute names the blocks layers_0 .. layers_{depth-1}.
            self.layers = [block(**block_kw) for _ in range(self.depth)]
        self.final_norm = Norm(kind="rmsnorm", eps=self.norm_eps, dtype=self.dtype)
        if not self.tie_embeddings:
            self.lm_head = Dense(self.vocab_size, ("embed", "vocab"), use_bias=False,
                                 dtype=self.dtype, kernel_init=init)
        if self.decode:
            self.cache_index = CacheIndex()

    def embed(self, ids: Array) -> Array:
        """Token embeddings `[B, L, D]` (compute dtype) of `ids [B, L]`: gathered from the
        float32 table, then cast, so the table's gradient is scattered (and reduced
        across replicas) in float32."""
        return jnp.take(self.token_embedding.embedding, ids, axis=0).astype(self.dtype)

    def __call__(self, ids: Optional[Array] = None, positions: Optional[Array] = None,
                 attention_mask: Optional[Array] = None,
                 inputs_embeds: Optional[Array] = None) -> Array:
        """Logits `[B, L, V]` (float32).

        Args:
          ids: int32 `[B, L]` token ids, or None when `inputs_embeds [B, L, D]` is given.
          positions: int32 `[B, L]` RoPE positions. Default: 0..L-1, or in decode
            mode each row's cache index onwards.
          attention_mask: `[B, L]` 1 for real tokens, 0 for padding (keys that
            are 0 are never attended). In decode mode: right padding only.
        """
        if (ids is None) == (inputs_embeds is None):
            raise ValueError("DecoderLM: pass exactly one of `ids` [B, L] and "
                             "`inputs_embeds` [B, L, D].")
        x = self.embed(ids) if ids is not None else inputs_embeds.astype(self.dtype)
        b, t = x.shape[:2]
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        valid = None if attention_mask is None else attention_mask.astype(bool)
        if self.decode:
            advance = (jnp.full((b,), t, jnp.int32) if valid is None
                       else valid.sum(-1).astype(jnp.int32))
            start = self.cache_index(b, advance)  # [B]
            # A query sees every cache slot up to its own (earlier slots are filled);
            # slot [B, T]: the cache slot of each new token.
            mask, slot = slot_mask(start, t, self.cache_len or self.max_len)
            if positions is None:
                positions = slot
            write_index = start
        else:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            mask = make_attention_mask(None, valid, causal=True, q_len=t, k_len=t)
            write_index = None

        extras = (mask, positions, write_index)
        if self.scan:
            x = self.layers(x, extras)[0]
        else:
            for layer in self.layers:
                x = layer(x, extras)[0]
        x = boundary(self.final_norm(x))
        if self.tie_embeddings:
            logits = self.token_embedding.attend(x)
        else:
            logits = self.lm_head(x)
        return constrain(logits.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))


# ----------------------------------------------------------------------------
# Cache helpers
# ----------------------------------------------------------------------------

def init_cache(model: DecoderLM, batch_size: int, cache_len: int) -> dict:
    """Zero KV cache for `model.clone(decode=True, cache_len=cache_len)` and `batch_size` rows."""
    return decoding.zero_cache(model.clone(decode=True, cache_len=cache_len),
                               jnp.zeros((batch_size, 1), jnp.int32))


# ----------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------

def _prefill(dec: DecoderLM, params, prompt_ids, prompt_embeds, prompt_lengths, batch_rows,
             cache_len):
    cache = init_cache(dec, batch_rows, cache_len)
    width = (prompt_ids if prompt_embeds is None else prompt_embeds).shape[1]
    mask = jnp.arange(width)[None] < prompt_lengths[:, None]
    logits, state = dec.apply({"params": params, "cache": cache}, prompt_ids,
                              attention_mask=mask, inputs_embeds=prompt_embeds,
                              mutable=["cache"])
    last = logits[jnp.arange(batch_rows), prompt_lengths - 1]  # [B, V]
    return last, state["cache"]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "method", "beam_size",
                                             "eos_id", "pad_id"))
def _generate(model, params, prompt_ids, prompt_embeds, prompt_lengths, rng, temperature, top_p,
              *, max_new_tokens, method, beam_size, eos_id, pad_id):
    b, p = (prompt_ids if prompt_embeds is None else prompt_embeds).shape[:2]
    dec = model.clone(decode=True, cache_len=p + max_new_tokens)
    last, cache = _prefill(dec, params, prompt_ids, prompt_embeds, prompt_lengths, b,
                           p + max_new_tokens)

    def step(cache, tokens):  # one token per row: logits [n, V]
        logits, state = dec.apply({"params": params, "cache": cache}, tokens[:, None],
                                  mutable=["cache"])
        return logits[:, 0], state["cache"]

    if method in ("greedy", "sample"):
        select = None if method == "greedy" else (
            lambda logits, i: decoding.nucleus_sample(logits, jax.random.fold_in(rng, i),
                                                      temperature, top_p))
        return decoding.greedy_search(step, last, cache, max_new_tokens, eos_id=eos_id,
                                      pad_id=pad_id, select=select)
    # Beam search: rows b*W .. b*W+W-1 are the beams of prompt b, best summed
    # log-probability returned (no length normalization).
    rows = jnp.repeat(jnp.arange(b), beam_size)
    tokens, _ = decoding.beam_search(step, last[rows], gather_cache(cache, rows), max_new_tokens,
                                     beam_size=beam_size, eos_id=eos_id, pad_id=pad_id,
                                     length_penalty=0.0)
    return tokens


def generate(model: DecoderLM, variables: dict, prompt_ids, prompt_lengths,
             max_new_tokens: int, *, method: str = "greedy", temperature: float = 1.0,
             top_p: float = 1.0, beam_size: int = 4, eos_id: Optional[int] = None,
             pad_id: int = 0, rng: Optional[Array] = None,
             prompt_embeds: Optional[Array] = None) -> Array:
    """Generate `max_new_tokens` tokens after each prompt -> int32 `[B, max_new_tokens]`.

    Args:
      prompt_ids: int32 `[B, P]`, RIGHT-padded (any pad value); or None with
        `prompt_embeds [B, P, D]` (e.g. image tokens + question embeddings
        from `VisionLM.inputs`, valid positions a prefix of each row).
      prompt_lengths: int32 `[B]`, 1 <= length <= P.
      method: "greedy", "sample" (temperature, nucleus `top_p`) or "beam"
        (`beam_size` beams, best summed log-probability returned).
      eos_id: once a row emits it, the row's later tokens are `pad_id`.
      rng: PRNG key for "sample" (a fixed key gives the same tokens).
    The whole loop is one jitted call (prefill, then a `lax.while_loop` of
    one-token steps against a KV cache of length P + max_new_tokens, ended
    early once every row has emitted `eos_id`).
    """
    if method not in ("greedy", "sample", "beam"):
        raise ValueError(f"generate: method {method!r}; choose 'greedy', 'sample' or 'beam'.")
    if (prompt_ids is None) == (prompt_embeds is None):
        raise ValueError("generate: pass exactly one of prompt_ids [B, P] and "
                         "prompt_embeds [B, P, D].")
    if prompt_ids is not None:
        prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
        if prompt_ids.ndim != 2:
            raise ValueError(f"generate: prompt_ids must be [B, P], got shape {prompt_ids.shape}.")
        shape = prompt_ids.shape
    else:
        prompt_embeds = jnp.asarray(prompt_embeds)
        if prompt_embeds.ndim != 3:
            raise ValueError("generate: prompt_embeds must be [B, P, D], got shape "
                             f"{prompt_embeds.shape}.")
        shape = prompt_embeds.shape
    lengths = np.asarray(prompt_lengths)
    width = shape[1]
    if lengths.shape != shape[:1] or lengths.min() < 1 or lengths.max() > width:
        raise ValueError(f"generate: prompt_lengths {lengths.tolist()} must be [B] with values in "
                         f"1..{width} (the padded prompt width).")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}.")
    if method == "beam" and not 1 <= beam_size <= model.vocab_size:
        raise ValueError(f"generate: beam_size {beam_size} must be in 1..vocab_size.")
    if method == "sample" and rng is None:
        raise ValueError("generate: method='sample' needs `rng` (a jax.random key).")
    rng = jax.random.key(0) if rng is None else rng
    return _generate(model, variables["params"], prompt_ids, prompt_embeds,
                     jnp.asarray(lengths, jnp.int32),
                     rng, jnp.float32(temperature), jnp.float32(top_p),
                     max_new_tokens=int(max_new_tokens), method=method,
                     beam_size=int(beam_size) if method == "beam" else 1,
                     eos_id=eos_id, pad_id=int(pad_id))
