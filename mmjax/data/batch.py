"""Global batch assembly: per-process numpy rows -> sharded ``jax.Array``s; host-side
chunking of a stream (``batched``)."""
from __future__ import annotations

from typing import Iterable, Iterator

import jax
import numpy as np

from mmjax.errors import ConfigError


def make_global_batch(local: dict[str, np.ndarray],
                      sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """Builds global arrays from this process's rows of the global batch.

    Args:
      local: ``{name: [b_local, ...]}``, the rows this process loaded
        (every process passes the same keys, shapes and dtypes).
      sharding: sharding of the global batch, e.g.
        ``NamedSharding(mesh, P("data"))``; axis 0 is split over processes.

    Returns:
      ``{name: jax.Array [b_local * process_count, ...]}`` laid out with
      ``sharding`` (rows of process p at ``p * b_local ...`` when the mesh
      orders devices by process, as ``jax.make_mesh`` does).
    """
    out = {}
    for name, value in local.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        try:
            out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
        except ValueError as e:
            raise ConfigError(f"global batch field {name!r} with local shape {value.shape}: {e} "
                              "(the local batch size must split evenly over this process's "
                              "devices on the data axes)") from e
    return out


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Lists of up to ``size`` consecutive items of ``items`` (the last may be shorter)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
