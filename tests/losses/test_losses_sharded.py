"""mmjax.losses under a (data, fsdp, tensor) mesh of 8 simulated devices.

Values and gradients of the jitted, sharded losses must equal the
single-device results, and the manual collectives (ring / gathers) must
really be in the compiled program.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mmjax.losses import (blip2_itc_loss, blip2_itm_triples, caption_loss,
                          next_token_loss, sigmoid_contrastive_loss,
                          softmax_contrastive_loss)

pytestmark = pytest.mark.numerics

MESHES = [(8, 1, 1), (4, 2, 1), (2, 2, 2)]
BATCH = 16
TOL = 1e-5


def _mesh(shape):
    return jax.make_mesh(shape, ("data", "fsdp", "tensor"),
                         axis_types=(AxisType.Auto,) * 3)


def _normalized(key, *shape):
    x = jax.random.normal(key, shape)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _batch_sharded(mesh, x):
    spec = P(("data", "fsdp"), *([None] * (x.ndim - 1)))
    return jax.device_put(x, NamedSharding(mesh, spec))


def _assert_trees_close(actual, expected, tol=TOL):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        scale = max(np.abs(e).max(), 1e-12)
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol * scale)


def _run_sharded(mesh, fn, batch_args, rep_args, argnums):
    """jit(value_and_grad(fn)) with batch args sharded on `mesh`."""
    with jax.set_mesh(mesh):
        args = [_batch_sharded(mesh, a) for a in batch_args] + list(rep_args)
        step = jax.jit(jax.value_and_grad(fn, argnums=argnums))
        out = step(*args)
        hlo = step.lower(*args).compile().as_text()
    return out, hlo


@pytest.fixture(scope="module")
def pair():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return _normalized(k1, BATCH, 8), _normalized(k2, BATCH, 8)


@pytest.mark.parametrize("shape", MESHES)
def test_softmax_sharded_matches_single_device(shape, pair):
    fn = lambda a, b, s: softmax_contrastive_loss(a, b, s, label_smoothing=0.1)
    scale = jnp.float32(12.0)
    ref = jax.value_and_grad(fn, argnums=(0, 1, 2))(*pair, scale)
    out, hlo = _run_sharded(_mesh(shape), fn, pair, [scale], (0, 1, 2))
    _assert_trees_close(out, ref)
    assert "all-gather" in hlo


@pytest.mark.parametrize("shape", MESHES)
def test_sigmoid_ring_matches_single_device(shape, pair):
    scale, bias = jnp.float32(10.0), jnp.float32(-3.0)
    # A weighted objective, so the custom backward sees a cotangent != 1.
    fn = lambda *args: 2.5 * sigmoid_contrastive_loss(*args)
    ref = jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(*pair, scale, bias)
    out, hlo = _run_sharded(_mesh(shape), fn, pair, [scale, bias], (0, 1, 2, 3))
    _assert_trees_close(out, ref)
    # The ring, not a gather of the text features, is what ran.
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo


@pytest.mark.parametrize("shape", MESHES)
def test_caption_sharded_matches_single_device(shape):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((BATCH, 5, 11)), jnp.float32)
    tokens = jnp.asarray(rng.integers(1, 11, (BATCH, 5)), jnp.int32)
    # Uneven padding across shards: a per-shard mean would differ.
    tokens = tokens.at[:4, 2:].set(0).at[9, 1:].set(0)
    mask = tokens != 0
    cap = lambda x, t, m: caption_loss(x, t, m, label_smoothing=0.1)
    nxt = lambda x, t: next_token_loss(x, t, 0, label_smoothing=0.1)
    mesh = _mesh(shape)
    for fn, args in ((cap, (logits, tokens, mask)), (nxt, (logits, tokens))):
        ref = jax.value_and_grad(fn)(*args)
        out, _ = _run_sharded(mesh, fn, args, [], 0)
        _assert_trees_close(out, ref)


@pytest.mark.parametrize("shape", MESHES)
def test_blip2_itc_and_itm_sharded_match_single_device(shape):
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    qf, tf = _normalized(k1, BATCH, 4, 8), _normalized(k2, BATCH, 8)
    temp = jnp.float32(0.1)
    fn = lambda q, t, s: blip2_itc_loss(q, t, s)
    ref = jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True)(qf, tf, temp)
    mesh = _mesh(shape)
    rng = jax.random.PRNGKey(7)
    ref_triples = blip2_itm_triples(ref[0][1], rng, temp=temp)
    with jax.set_mesh(mesh):
        args = (_batch_sharded(mesh, qf), _batch_sharded(mesh, tf), temp)
        step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))
        out = step(*args)
        hlo = step.lower(*args).compile().as_text()
        triples = jax.jit(blip2_itm_triples)(out[0][1], rng, temp)
    _assert_trees_close(out, ref)
    assert "all-gather" in hlo and "all-to-all" in hlo
    for name in ("image_index", "text_index", "labels"):
        np.testing.assert_array_equal(triples[name], ref_triples[name])


def _temp_bytes(fn, n, local_batch=256, dim=64):
    """Per-device temp bytes of compiled value_and_grad on n devices."""
    mesh = jax.make_mesh((n, 1, 1), ("data", "fsdp", "tensor"),
                         axis_types=(AxisType.Auto,) * 3,
                         devices=jax.devices()[:n])
    feats = jax.ShapeDtypeStruct((n * local_batch, dim), jnp.float32,
                                 sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3))).lower(
            feats, feats, scalar, scalar).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_sigmoid_ring_memory_does_not_grow_with_devices():
    ring = sigmoid_contrastive_loss
    gathered = lambda *a: sigmoid_contrastive_loss(*a, axis_names=())
    ring2, ring8 = _temp_bytes(ring, 2), _temp_bytes(ring, 8)
    gath2, gath8 = _temp_bytes(gathered, 2), _temp_bytes(gathered, 8)
    assert ring8 <= 1.25 * ring2, (ring2, ring8)
    # The gathered [b, B] baseline grows about linearly with B.
    assert gath8 >= 3 * gath2, (gath2, gath8)


def test_indivisible_batch_names_the_mesh_axes():
    mesh = _mesh((8, 1, 1))
    z = jnp.ones((12, 4)) / 2.0
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="not divisible"):
        jax.jit(sigmoid_contrastive_loss)(z, z, 1.0, 0.0)
