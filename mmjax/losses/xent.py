"""Cross-entropy with label smoothing, the one formula every loss uses."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array,
                           label_smoothing: float = 0.0) -> jax.Array:
    """Per-position CE against targets `(1 - eps)·onehot(label) + eps/C`.

    Args:
      logits: `[..., C]` float32.
      labels: int `[...]`.
    Returns: `[...]` float32, `logsumexp(x) - (1 - eps)·x_label - eps·mean(x)`.
    """
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    loss = lse - (1.0 - label_smoothing) * picked
    if label_smoothing:
        loss = loss - label_smoothing * jnp.mean(logits, axis=-1)
    return loss
