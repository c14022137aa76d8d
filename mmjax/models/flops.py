"""FLOP formulas of the building blocks, for MFU.

Counting rules (MaxText / PaLM convention):
- a matmul `[T, a] @ [a, b]` costs 2·T·a·b FLOPs;
- self-attention scores and the weighted sum cost 4·T·S·D per layer
  (T queries, S keys, D width), times `CAUSAL_ATTENTION` (1/2) for causal
  attention: the masked half is not model work, although XLA computes it;
- embedding gathers, norms, activations and softmaxes are not counted.

A training step runs each block in one of three ways (`Pass`), and a forward
matmul costs 1 + one more per operand whose gradient the step computes:
- `TRAIN`: trained weights, gradients flowing: 3× (dX and dW);
- `FROZEN`: frozen weights between trained parts (a frozen LM after a trained
  connector): 2× for matmuls with a weight (dX only), 3× for attention
  (both operands are activations);
- `FORWARD`: frozen and with nothing trained before it (a frozen media
  tower): 1×.
A matmul whose activation operand gets no gradient costs one less (the keys
and values of a frozen tower's tokens in a trained Q-Former: dW only).
Media towers give their forward FLOPs (`forward_flops`); `tower_flops` counts
a trained tower 3× that. The program computes less on the raw media: no
input gradient for the patch embedding, no gradient at all for AST's
parameter-free mel filterbank (at real sizes, 0.1-0.2% of the tower).

Patch dropout (`model.image.patch_dropout`, FLIP) counts in training: the
towers' `forward_flops` and `num_tokens` take the kept patches, so MFU and every
family's formula follow them; evaluation runs every patch.

Block functions return FLOPs per example; `similarity_flops` per step.
Families combine them into a training step's count (`mmjax.families`).
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

from mmjax.models.layers import kept_patches

# Share of a causal attention's score and weighted-sum FLOPs that counts.
CAUSAL_ATTENTION = 0.5


class Pass(NamedTuple):
    """How a training step runs a block (module docstring)."""
    weights: bool = False  # its parameters are trained: weight gradients
    grads: bool = False    # gradients flow through its activations

    def dense(self, grad_in: bool = True) -> int:
        """Cost of a weight × activation matmul relative to its forward; `grad_in`:
        the activation's gradient is computed (when the block's are)."""
        return 1 + self.weights + (self.grads and grad_in)

    def attention(self) -> int:
        """Cost of an activation × activation matmul relative to its forward."""
        return 1 + 2 * self.grads


FORWARD = Pass()
TRAIN = Pass(weights=True, grads=True)
FROZEN = Pass(weights=False, grads=True)


def dense_flops(t: int, a: int, b: int, mode: Pass = FORWARD, grad_in: bool = True) -> float:
    """`[t, a] @ [a, b]` against a weight: 2·t·a·b, times `mode.dense(grad_in)`."""
    return mode.dense(grad_in) * 2 * t * a * b


def attention_flops(t: int, s: int, d: int, causal: bool = False,
                    mode: Pass = FORWARD) -> float:
    """Scores and weighted sum of `t` queries over `s` keys of width `d`: 4·t·s·d
    (times `CAUSAL_ATTENTION` when causal), times `mode.attention()`."""
    return mode.attention() * 4 * t * s * d * (CAUSAL_ATTENTION if causal else 1.0)


def layer_flops(t: int, d: int, mlp: int, s: Optional[int] = None, causal: bool = False,
                gated: bool = False, ctx: Optional[tuple[int, int]] = None,
                qkv: Optional[tuple[int, int]] = None, mode: Pass = FORWARD) -> float:
    """One Transformer layer over `t` tokens of width `d` (per example).

    Args:
      mlp: MLP hidden width (`gated`: SwiGLU, three matmuls).
      s: keys of the self-attention (default `t`).
      ctx: `(n, dc)`: cross-attention to `n` context tokens of width `dc`.
      qkv: `(query, key/value)` projection widths (grouped-query attention;
        default `(d, d)`).
    """
    s = t if s is None else s
    q, kv = qkv or (d, d)
    f = dense_flops(t, d, 2 * q + 2 * kv, mode)            # q, k, v, out projections
    f += dense_flops(t, d, mlp * (3 if gated else 2), mode)  # MLP
    f += attention_flops(t, s, q, causal, mode)
    if ctx is not None:
        f += cross_attention_flops(t, d, *ctx, mode=mode)
    return f


def cross_attention_flops(t: int, d: int, n: int, dc: int, mode: Pass = FORWARD,
                          context_grad: bool = True) -> float:
    """One cross-attention block: `t` queries of width `d` attend to `n` context tokens
    of width `dc` (q and out projections, k and v projections of the context, scores
    and weighted sum). `context_grad`: the context gets gradients (not a frozen tower's
    tokens: its k/v projections then cost no input gradient)."""
    return (dense_flops(t, d, 2 * d, mode) + dense_flops(n, dc, 2 * d, mode, context_grad)
            + attention_flops(t, n, d, mode=mode))


def cross_attention_layers(depth: int, freq: int) -> int:
    """How many of a Q-Former's `depth` layers cross-attend to the image: layers
    0, freq, 2*freq, ... (`mmjax.models.qformer`), i.e. ceil(depth / freq)."""
    return -(-int(depth) // int(freq))


def pooler_flops(n: int, d: int, queries: int = 1, mlp: int = 0, gated: bool = False,
                 mode: Pass = FORWARD) -> float:
    """Attention pooling (`layers.MAPHead`): `queries` learned queries attend to `n`
    tokens of width `d`, then an MLP of hidden width `mlp` on them (0: none, CoCa's
    attentional pooler)."""
    f = cross_attention_flops(queries, d, n, d, mode)
    return f + (dense_flops(queries, d, mlp * (3 if gated else 2), mode) if mlp else 0.0)


def vit_flops(c: Mapping) -> float:
    """Forward FLOPs of a ViT (`ViT` fields) per image in a training step: the patch
    embedding of every patch, the blocks (and pooling) over the patches that
    `patch_dropout` keeps (`layers.kept_patches`) and the class token."""
    p, w = c["patch_size"], c["width"]
    n = (c["image_size"] // p) ** 2
    pool = c.get("pool", "cls")
    t = kept_patches(n, c.get("patch_dropout") or 0.0) + (1 if pool == "cls" else 0)
    mlp, gated = c.get("mlp_dim") or 4 * w, c.get("act") == "swiglu"
    f = dense_flops(n, p * p * 3, w) + c["depth"] * layer_flops(t, w, mlp, gated=gated)
    if pool == "map":
        f += pooler_flops(t, w, mlp=mlp, gated=gated)
    if c.get("embed_dim") and pool != "none":
        f += dense_flops(1, w, c["embed_dim"])
    return f


def tower_flops(tower: type, cfg: dict, trained: bool) -> float:
    """A media tower per example in a training step: its `forward_flops(cfg)`, 3× when
    `trained` (module docstring), 1× when frozen (it reads the raw media, so no
    gradient reaches a frozen tower)."""
    return (3 if trained else 1) * tower.forward_flops(cfg)


def tower_config(model_cfg: Mapping, **overrides) -> dict:
    """`model.image` as a tower's static methods take it: a plain dict without
    `kind`, updated with `overrides` (e.g. CoCa's `pool="none"`)."""
    cfg = {**dict(model_cfg.get("image") or {}), **overrides}
    cfg.pop("kind", None)
    return cfg


def text_flops(c: Mapping, length: int, mode: Pass = FORWARD) -> float:
    """A text Transformer (`TextEncoder` fields) over `length` tokens, with the
    projection of its pooled token."""
    w = c["width"]
    f = c["depth"] * layer_flops(length, w, c.get("mlp_dim") or 4 * w,
                                 causal=c.get("causal", True), gated=c.get("act") == "swiglu",
                                 mode=mode)
    if c.get("embed_dim") and c.get("pool", "eos") != "none":
        f += dense_flops(1, w, c["embed_dim"], mode)
    return f


def caption_decoder_flops(c: Mapping, length: int, ctx: tuple[int, int],
                          mode: Pass = FORWARD) -> float:
    """CoCa's multimodal decoder (`CaptionDecoder` fields) over `length` tokens:
    causal layers cross-attending to `ctx = (n, dc)` image tokens, then the
    vocabulary projection."""
    w = c["width"]
    f = c["depth"] * layer_flops(length, w, c.get("mlp_dim") or 4 * w, causal=True,
                                 gated=c.get("act") == "swiglu", ctx=ctx, mode=mode)
    return f + dense_flops(length, w, c["vocab_size"], mode)


def qformer_flops(c: Mapping, text_len: int = 0, ctx: Optional[tuple[int, int]] = None,
                  mode: Pass = FORWARD, context_grad: bool = True,
                  lm_head: bool = False) -> float:
    """One Q-Former pass (`QFormer` fields) per example: the queries when `ctx = (n, dc)`
    (image tokens) is given, then `text_len` text tokens. Every layer attends over all
    of them (its masks are not causal attention: counted whole); the queries
    cross-attend to the image in `cross_attention_layers` of them (`context_grad`: see
    `cross_attention_flops`). `lm_head`: the ITG head's transform and tied-embedding
    logits on every position."""
    w, depth = c.get("width", 768), c.get("depth", 12)
    nq = c.get("num_queries", 32) if ctx is not None else 0
    t = nq + text_len
    f = depth * layer_flops(t, w, c.get("mlp_dim", 3072), mode=mode)
    if nq:
        f += (cross_attention_layers(depth, c.get("cross_attention_freq", 2))
              * cross_attention_flops(nq, w, *ctx, mode=mode, context_grad=context_grad))
    if lm_head:
        f += dense_flops(t, w, w + c.get("vocab_size", 30523), mode)
    return f


def lm_flops(c: Mapping, length: int, mode: Pass = FORWARD) -> float:
    """A Llama-style decoder LM (`DecoderLM` fields) over `length` tokens: causal
    grouped-query attention, SwiGLU MLP, the vocabulary projection."""
    d, heads = c["width"], c["num_heads"]
    head_dim = c.get("head_dim") or d // heads
    qkv = (heads * head_dim, (c.get("num_kv_heads") or heads) * head_dim)
    layer = layer_flops(length, d, c["mlp_dim"], causal=True, gated=True, qkv=qkv, mode=mode)
    return c["depth"] * layer + dense_flops(length, d, c["vocab_size"], mode)


def similarity_flops(batch: int, e: int, queries: int = 1, mode: Pass = FORWARD) -> float:
    """Per step: the contrastive similarities of `batch` media embeddings (`queries`
    each, BLIP-2's ITC) against `batch` text embeddings of width `e`."""
    return mode.attention() * 2 * batch * batch * queries * e

