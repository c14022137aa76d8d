"""Peak FLOP/s per device and MFU.

Model FLOPs per step are written down per family (`Family.train_flops`, from
the block formulas in `mmjax.models.flops`) with the MaxText / PaLM rules:
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
    return peak_flops_of_kind((device if device is not None else jax.devices()[0]).device_kind)


def peak_flops_of_kind(kind: str) -> Optional[float]:
    """Peak FLOP/s of a `device_kind` ("TPU v5", "NVIDIA H100 80GB HBM3", ...):
    the table entry with the longest name that it contains, or None."""
    matches = [k for k in PEAK_FLOPS if k.lower() in kind.lower()]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None
