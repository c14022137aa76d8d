"""Mesh and sharding rules: one table maps logical axis names to mesh axes.

Mesh axes are `("data", "fsdp", "tensor")` with sizes from `config.mesh`
(-1 fills the remaining devices). The batch is split over `data` x `fsdp`.

Parameters: the tensor-parallel rules below place `heads`, `mlp` and
`vocab` dims on `tensor`; then FSDP shards the largest remaining dimension
that divides evenly by the `fsdp` size (small tensors stay replicated).
Activations use the `act_*` names (see `mmjax.models.layers`).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mmjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis (or None = replicated). The single table of rules.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # weights (tensor parallelism; FSDP is added per parameter, see below)
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed", None),
    ("embed_out", None),
    ("kv", None),
    ("proj", None),
    ("layers", None),
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

# Parameters smaller than this many elements are not FSDP-sharded.
FSDP_MIN_SIZE = 2 ** 12

log = logging.getLogger("mmjax")


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over `devices` (default all) with axes data/fsdp/tensor.

    `mesh_config` has integer fields `data`, `fsdp`, `tensor`; one may be -1
    to take the remaining devices.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = [int(mesh_config[a]) if a in mesh_config else 1 for a in MESH_AXES]
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ConfigError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n % known:
            raise ConfigError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: {n} devices are not "
                              f"divisible by {known}.")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ConfigError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                          f"devices but {n} are available; set one axis to -1.")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


FSDP_RINGS = ("one_way", "two_way")
FSDP_WEIGHTS = ("in_matmul", "gather_once")


def mesh_choice(config_mesh: Any, key: str, choices: Sequence[str]) -> str:
    """`config.mesh.<key>`, one of `choices` (the first when a saved config lacks it)."""
    value = str(config_mesh.get(key, choices[0]))
    if value not in choices:
        raise ConfigError(f"config.mesh.{key}={value!r}: choose one of {list(choices)}.")
    return value


def compiler_options(mesh: Mesh, fsdp_ring: str = FSDP_RINGS[0]) -> dict[str, Any]:
    """XLA options of a step compiled for `mesh`'s devices (`jax.jit(compiler_options=)`).

    On TPU, XLA's SPMD partitioner turns the gather of an FSDP-sharded weight into
    its matmul (and the gradient's reduce-scatter out of its matmul) as a windowed
    loop around the ring of the `fsdp` axis. Its default runs the ring both ways:
    half the ring steps, but each weight moves 9/8 of its size over n = 8 chips
    where (n - 1)/n is the minimum (`config.mesh.fsdp_ring="two_way"`).
    "one_way" passes each block on once: exactly the minimum (BENCHMARKS.md,
    "Where the FSDP rows' collectives come from"). Other platforms: no options.
    """
    mesh_choice({"fsdp_ring": fsdp_ring}, "fsdp_ring", FSDP_RINGS)
    if mesh.devices.flat[0].platform != "tpu":
        return {}
    return {"xla_tpu_spmd_bidirectional_windowed_einsum": fsdp_ring == "two_way"}


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over data x fsdp, everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec of one parameter from its logical names and shape."""
    rules = dict(LOGICAL_RULES)
    spec: list[Any] = []
    for name, dim in zip(names, shape):
        axis = rules.get(name) if name is not None else None
        if axis is not None and dim % mesh.shape[axis]:
            axis = None  # not divisible: keep this dim replicated
        spec.append(axis)
    fsdp = mesh.shape["fsdp"]
    if fsdp > 1 and math.prod(shape) >= FSDP_MIN_SIZE:
        candidates = [i for i, d in enumerate(shape)
                      if spec[i] is None and d % fsdp == 0 and names[i] != "layers"]
        if candidates:
            spec[max(candidates, key=lambda i: shape[i])] = "fsdp"
    return P(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """NamedShardings for a (boxed) abstract state pytree.

    Leaves wrapped in `nn.LogicallyPartitioned` get rules-based specs; other
    leaves (step counter, optimizer counts, RNG) are replicated.
    """
    def one(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return NamedSharding(mesh, param_spec(x.names, x.value.shape, mesh))
        return NamedSharding(mesh, P())
    return jax.tree.map(one, abstract_state,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def follow_params(abstract_tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree that embeds params-shaped subtrees (optimizer state).

    A leaf whose key path ends with a parameter's path, and whose shape equals
    that parameter's, gets the parameter's sharding (Adam moments); every
    other leaf (counts, masked-out placeholders) is replicated.
    """
    def names(path):
        return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    shapes = {names(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
    by_path = {names(p): sh for p, sh in jax.tree_util.tree_leaves_with_path(
        param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))}
    repl = NamedSharding(mesh, P())

    def one(path, leaf):
        full = names(path)
        for start in range(len(full)):
            key = full[start:]
            if key in by_path and shapes[key] == getattr(leaf, "shape", None):
                return by_path[key]
        return repl
    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def logical_rules_context():
    """Context under which `nn.with_logical_constraint` uses LOGICAL_RULES."""
    return nn.logical_axis_rules(LOGICAL_RULES)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES) + f" ({mesh.devices.size} devices)"


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """Rows this process loads: global / process_count (checked divisible)."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % shards:
        raise ConfigError(f"config.batch_size={global_batch} must be divisible by data x fsdp = "
                          f"{shards}.")
    if global_batch % jax.process_count():
        raise ConfigError(f"config.batch_size={global_batch} must be divisible by the process "
                          f"count {jax.process_count()}.")
    return global_batch // jax.process_count()
