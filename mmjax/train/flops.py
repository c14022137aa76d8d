"""Model FLOPs per training step, written down, and MFU.

Counting rules (MaxText / PaLM convention):
- a matmul `[T, a] @ [a, b]` costs 2·T·a·b FLOPs;
- self-attention scores and the weighted sum cost 4·T·S·D per layer
  (T queries, S keys, D width), halved for causal attention;
- embedding gathers, norms, activations and softmaxes are not counted;
- training = 3 × forward (forward + backward for activations and weights),
  except towers whose gradient is stopped (BLIP-2's frozen ViT): 1 × forward.
MFU = training FLOPs per step / (step time × peak FLOP/s of all devices).
"""
from __future__ import annotations

from typing import Optional

import jax

# Dense bf16 peak FLOP/s per device (datasheets); override with config.peak_flops.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
    "L4": 121e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "TPU7x": 2307e12,
}


def peak_flops_per_device(override: Optional[float] = None,
                          device: Optional[jax.Device] = None) -> Optional[float]:
    """Peak FLOP/s of `device` (the run's mesh devices; default `jax.devices()[0]`)
    from the table (longest matching name), or the override."""
    if override:
        return float(override)
    kind = (device if device is not None else jax.devices()[0]).device_kind
    matches = [k for k in PEAK_FLOPS if k.lower() in kind.lower()]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


def _layer(t: int, d: int, mlp: int, s: Optional[int] = None, causal: bool = False,
           gated: bool = False, ctx: Optional[tuple[int, int]] = None) -> float:
    """Forward FLOPs of one Transformer layer over `t` tokens (per example)."""
    s = t if s is None else s
    f = 2 * t * 4 * d * d                         # q, k, v, out projections
    f += 2 * t * d * mlp * (3 if gated else 2)    # MLP
    f += 4 * t * s * d * (0.5 if causal else 1.0)  # attention
    if ctx is not None:                           # cross-attention to (n, dc) context
        n, dc = ctx
        f += 2 * t * 2 * d * d + 2 * n * 2 * dc * d + 4 * t * n * d
    return f


def vit_flops(c: dict) -> float:
    """Forward FLOPs of a ViT per image."""
    p, w = c["patch_size"], c["width"]
    n = (c["image_size"] // p) ** 2
    t = n + (1 if c.get("pool", "cls") == "cls" else 0)
    mlp = c.get("mlp_dim") or 4 * w
    f = 2 * n * p * p * 3 * w
    f += c["depth"] * _layer(t, w, mlp, gated=c.get("act") == "swiglu")
    if c.get("pool") == "map":
        f += _layer(1, w, mlp, s=t) - 2 * 1 * 2 * w * w + 2 * t * 2 * w * w
    if c.get("embed_dim"):
        f += 2 * w * c["embed_dim"]
    return f


def text_flops(c: dict, length: int) -> float:
    w = c["width"]
    mlp = c.get("mlp_dim") or 4 * w
    f = c["depth"] * _layer(length, w, mlp, causal=c.get("causal", True),
                            gated=c.get("act") == "swiglu")
    if c.get("embed_dim"):
        f += 2 * w * c["embed_dim"]
    return f


def model_train_flops(model_cfg: dict, batch: int, text_len: int,
                      frozen: tuple = ("image_tower", "lm_module")) -> float:
    """Training FLOPs of one step over a global batch (see module docstring).
    `frozen`: the `optim.freeze` prefixes (used by VisionLM)."""
    name = model_cfg["name"]
    img = dict(model_cfg.get("image", {}))
    if name == "two_tower":
        fwd = vit_flops(img) + text_flops(dict(model_cfg["text"]), text_len)
        e = img.get("embed_dim") or img["width"]
        return 3 * batch * fwd + 3 * 2 * batch * batch * e
    if name == "coca":
        txt, dec = dict(model_cfg["text"]), dict(model_cfg["decoder"])
        q = model_cfg.get("caption_queries", 256)
        n = (img["image_size"] // img["patch_size"]) ** 2
        w = img["width"]
        fwd = vit_flops({**img, "pool": "none", "embed_dim": None})
        fwd += 2 * (q + 1) * 2 * w * w + 2 * n * 2 * w * w + 4 * (q + 1) * n * w  # pooler
        fwd += text_flops({**txt, "embed_dim": model_cfg.get("embed_dim")}, text_len)
        dw = dec["width"]
        fwd += dec["depth"] * _layer(text_len, dw, dec.get("mlp_dim") or 4 * dw, causal=True,
                                     ctx=(q, w))
        fwd += 2 * text_len * dw * dec["vocab_size"]
        return 3 * batch * fwd
    if name == "blip2_stage1":
        qc = dict(model_cfg["qformer"])
        w, nq, depth = qc.get("width", 768), qc.get("num_queries", 32), qc.get("depth", 12)
        mlp, freq = qc.get("mlp_dim", 3072), qc.get("cross_attention_freq", 2)
        n = (img["image_size"] // img["patch_size"]) ** 2 + 1
        dv = img["width"]
        cross = (2 * nq * 2 * w * w + 2 * n * 2 * dv * w + 4 * nq * n * w) * (depth // freq + depth % freq)

        def qformer(tokens):
            return depth * _layer(tokens, w, mlp) + cross
        # ITC: queries pass + text pass; ITM: 3B joint passes; ITG: joint pass + LM head.
        vocab = qc.get("vocab_size", 30523)
        per = qformer(nq) + depth * _layer(text_len, w, mlp) + qformer(nq + text_len) \
            + 2 * text_len * w * vocab
        return batch * vit_flops({**img, "embed_dim": None}) + 3 * batch * per \
            + 3 * 2 * batch * qformer(nq + text_len)
    if name == "vision_lm":
        return vision_lm_train_flops(model_cfg, batch, text_len, frozen)
    raise ValueError(f"no FLOP formula for model.name={name!r}")


def vision_lm_train_flops(model_cfg: dict, batch: int, text_len: int,
                          frozen: tuple = ("image_tower", "lm_module")) -> float:
    """VisionLM: frozen ViT 1x forward; connector 3x; LM 2x forward when frozen
    (activation gradients only) else 3x; T = text_len + image tokens."""
    img, lm = dict(model_cfg["image"]), dict(model_cfg["lm"])
    n = (img["image_size"] // img["patch_size"]) ** 2
    d, dv = lm["width"], img["width"]
    heads = lm["num_heads"]
    kv = (lm.get("num_kv_heads") or heads) * (lm.get("head_dim") or d // heads)
    if model_cfg.get("connector", "mlp") == "qformer":
        qc = dict(model_cfg["qformer"])
        w, p = qc.get("width", 768), qc.get("num_queries", 32)
        depth, freq = qc.get("depth", 12), qc.get("cross_attention_freq", 2)
        n_ctx = n + (1 if img.get("pool", "cls") == "cls" else 0)
        conn = depth * _layer(p, w, qc.get("mlp_dim", 3072)) + (depth // freq) * (
            2 * p * 2 * w * w + 2 * n_ctx * 2 * dv * w + 4 * p * n_ctx * w) + 2 * p * w * d
    else:
        p = n
        conn = 2 * p * dv * d + 2 * p * d * d
    t = text_len + p
    layer = 2 * t * (2 * d * d + 2 * d * kv) + 2 * t * d * lm["mlp_dim"] * 3 + 2 * t * t * d
    lm_fwd = lm["depth"] * layer + 2 * t * d * lm["vocab_size"]
    lm_factor = 2 if "lm_module" in frozen else 3
    return batch * (vit_flops({**img, "embed_dim": None}) + 3 * conn + lm_factor * lm_fwd)
