"""FLOP formulas of the building blocks (per example, forward), for MFU.

Counting rules (MaxText / PaLM convention):
- a matmul `[T, a] @ [a, b]` costs 2·T·a·b FLOPs;
- self-attention scores and the weighted sum cost 4·T·S·D per layer
  (T queries, S keys, D width), halved for causal attention;
- embedding gathers, norms, activations and softmaxes are not counted.
Towers expose `forward_flops(cfg)`; families combine them into a training
step's count (`mmjax.families`).
"""
from __future__ import annotations

from typing import Optional


def layer_flops(t: int, d: int, mlp: int, s: Optional[int] = None, causal: bool = False,
           gated: bool = False, ctx: Optional[tuple[int, int]] = None) -> float:
    """Forward FLOPs of one Transformer layer over `t` tokens (per example)."""
    s = t if s is None else s
    f = 2 * t * 4 * d * d                         # q, k, v, out projections
    f += 2 * t * d * mlp * (3 if gated else 2)    # MLP
    f += 4 * t * s * d * (0.5 if causal else 1.0)  # attention
    if ctx is not None:                           # cross-attention to (n, dc) context
        f += cross_attention_flops(t, d, *ctx)
    return f


def cross_attention_flops(t: int, d: int, n: int, dc: int) -> float:
    """Forward FLOPs of one cross-attention block: `t` queries of width `d`
    attend to `n` context tokens of width `dc` (q and out projections, k and v
    projections of the context, scores and weighted sum)."""
    return 2 * t * 2 * d * d + 2 * n * 2 * dc * d + 4 * t * n * d


def cross_attention_layers(depth: int, freq: int) -> int:
    """How many of a Q-Former's `depth` layers cross-attend to the image: layers
    0, freq, 2*freq, ... (`mmjax.models.qformer`), i.e. ceil(depth / freq)."""
    return -(-int(depth) // int(freq))


def vit_flops(c: dict) -> float:
    """Forward FLOPs of a ViT per image."""
    p, w = c["patch_size"], c["width"]
    n = (c["image_size"] // p) ** 2
    t = n + (1 if c.get("pool", "cls") == "cls" else 0)
    mlp = c.get("mlp_dim") or 4 * w
    f = 2 * n * p * p * 3 * w
    f += c["depth"] * layer_flops(t, w, mlp, gated=c.get("act") == "swiglu")
    if c.get("pool") == "map":
        f += layer_flops(1, w, mlp, s=t) - 2 * 1 * 2 * w * w + 2 * t * 2 * w * w
    if c.get("embed_dim"):
        f += 2 * w * c["embed_dim"]
    return f


def text_flops(c: dict, length: int) -> float:
    """Forward FLOPs of a text Transformer (`TextEncoder` fields) over `length` tokens."""
    w = c["width"]
    mlp = c.get("mlp_dim") or 4 * w
    f = c["depth"] * layer_flops(length, w, mlp, causal=c.get("causal", True),
                            gated=c.get("act") == "swiglu")
    if c.get("embed_dim"):
        f += 2 * w * c["embed_dim"]
    return f
