"""Which batch mesh axes a loss should reduce over.

The losses run inside the train step's `jax.jit` with `jax.set_mesh(mesh)`
active and the batch dim sharded over `("data", "fsdp")`. They look at the
ambient (abstract) mesh to decide between a plain computation and a
`jax.shard_map` over the batch axes.
"""
import math

import jax

from mmjax.errors import ConfigError


def active_batch_axes(axis_names):
    """Batch mesh axes to go manual over, or `()` for the plain path.

    Args:
      axis_names: candidate axis names, e.g. `("data", "fsdp")`. Names absent
        from the current mesh are ignored.

    Returns:
      The present names (in the given order) when a mesh is set and their
      size product is > 1; otherwise `()`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return ()
    if isinstance(axis_names, str):
        axis_names = (axis_names,)
    present = tuple(n for n in axis_names if n in mesh.axis_names)
    if math.prod(mesh.shape[n] for n in present) <= 1:
        return ()
    return present


def num_shards(axes):
    """Number of batch shards over `axes` in the current mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[n] for n in axes)


def check_divisible(batch, axes, what):
    """Raise a clear error when the global batch does not split evenly."""
    n = num_shards(axes)
    if batch % n:
        raise ConfigError(
            f"{what}: global batch {batch} is not divisible by the {n} batch "
            f"shards of mesh axes {axes}; choose a global batch size that is a "
            f"multiple of {n} (the product of those mesh axis sizes).")
    return n
