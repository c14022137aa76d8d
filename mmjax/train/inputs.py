"""Dummy model inputs of a config's shapes, for `model.init` and shape inference."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def sample_inputs(config: Any, batch: int = 1) -> tuple[jax.Array, jax.Array]:
    """Dummy `(images [b, S, S, 3], text [b, L])` used to initialize the model."""
    s, l = int(config.data.train.image_size), int(config.data.train.max_len)
    return jnp.zeros((batch, s, s, 3), jnp.float32), jnp.zeros((batch, l), jnp.int32)
