"""`ops.matmul.linear` / `layers.Dense`: the float32-accumulating low-precision matmul
(forward, custom backward, both dW orientations), equality with `flax.linen.Dense`,
the GEMMs XLA:CPU compiles for it, and remat/scan of a bfloat16 ViT."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from mmjax.models import layers
from mmjax.models.layers import stack_layer_params
from mmjax.models.ops.activations import gelu, get_activation
from mmjax.models.ops.attention import dot_product_attention
from mmjax.models.ops.matmul import linear
from mmjax.models.vit import ViT

BF16 = jnp.bfloat16


def _bf16(a):
    """Round to bfloat16, returned as float64 (the exact values the matmul sees)."""
    return np.asarray(jnp.asarray(a, BF16), np.float64)


def _gelu64(z):
    return z * 0.5 * (1 + erf(z / np.sqrt(2)))


def _dgelu64(z):
    return 0.5 * (1 + erf(z / np.sqrt(2))) + z * np.exp(-z * z / 2) / np.sqrt(2 * np.pi)


@pytest.mark.parametrize("n_in,n_out", [(24, 80), (80, 24)])  # both dW orientations
@pytest.mark.parametrize("act", [None, "gelu"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_low_precision_linear_value_and_grads_match_float64(n_in, n_out, act, use_bias):
    rng = np.random.default_rng(0)
    n = 96
    x, w = _bf16(rng.standard_normal((n, n_in))), _bf16(rng.standard_normal((n_in, n_out)) / 5)
    b = rng.standard_normal(n_out) if use_bias else None
    ct = _bf16(rng.standard_normal((n, n_out)))  # the output is bf16, so is its cotangent
    fn = get_activation(act) if act else None

    def f(x, w, b):
        return linear(x, w, b, BF16, fn)

    y, vjp = jax.vjp(f, jnp.asarray(x, BF16), jnp.asarray(w, BF16),
                     None if b is None else jnp.asarray(b, jnp.float32))
    dx, dw, db = vjp(jnp.asarray(ct, BF16))
    assert y.dtype == BF16 and dx.dtype == BF16 and dw.dtype == BF16

    pre = x @ w + (0 if b is None else b)
    want = _gelu64(pre) if act else pre
    d_pre = ct * (_dgelu64(pre) if act else 1.0)
    # Output: one bfloat16 rounding of a float32 sum (<= 1 ulp = 2^-8 relative).
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=2 ** -7,
                               atol=2 ** -7 * np.abs(want).max() / 64)
    # Gradients: the custom backward rounds d_pre to bf16 before its two GEMMs.
    for got, ref in ((dx, d_pre @ w.T), (dw, x.T @ d_pre)):
        got = np.asarray(got, np.float64)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 2e-2 * np.abs(ref).max()
    if use_bias:
        np.testing.assert_allclose(np.asarray(db), d_pre.sum(0), rtol=1e-2,
                                   atol=1e-2 * np.abs(d_pre.sum(0)).max())
    else:
        assert db is None


def test_float32_linear_is_exact_matmul():
    rng = np.random.default_rng(1)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((5, 7), (7, 3), (3,)))
    got = linear(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), jnp.float32)
    np.testing.assert_allclose(got, x @ w + b, rtol=1e-5, atol=1e-5)


def test_dense_is_flax_dense():
    x = np.random.default_rng(2).standard_normal((2, 3, 8)).astype(np.float32)
    ours = layers.Dense(5, ("embed", "mlp"))
    ref = nn.Dense(5, kernel_init=layers.default_kernel_init)
    p_ours = ours.init(jax.random.key(3), x)
    p_ref = ref.init(jax.random.key(3), x)
    # Same names, shapes and initial values (checkpoints and converters unchanged).
    assert jax.tree.map(np.shape, nn.unbox(p_ours)) == jax.tree.map(np.shape, p_ref)
    for a, b in zip(jax.tree.leaves(nn.unbox(p_ours)), jax.tree.leaves(p_ref)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(ours.apply(p_ours, x), ref.apply(p_ref, x), rtol=1e-6, atol=1e-6)
    names = jax.tree.map(lambda p: p.names, p_ours["params"],
                         is_leaf=lambda p: isinstance(p, nn.LogicallyPartitioned))
    assert names == {"kernel": ("embed", "mlp"), "bias": ("mlp",)}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU lowering property")
def test_cpu_backward_gemms_stay_bfloat16():
    """Every GEMM of forward + backward takes bf16 operands and yields float32: the
    only bf16 GEMM XLA:CPU runs fast. A plain `.T` operand or autodiff's float32
    cotangent would turn some of them into float32 GEMMs (upcast operands)."""
    x = jnp.ones((256, 64), BF16)
    w = jnp.ones((64, 128), jnp.float32)
    b = jnp.ones((128,), jnp.float32)

    def loss(x, w, b):
        return linear(x, w, b, BF16, gelu).astype(jnp.float32).sum()

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, w, b).compile().as_text()
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    dots = re.findall(r"= (\w+)\[[\d,]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)
    assert len(dots) == 3, dots  # y, dx, dW
    for out, a, b_ in dots:
        assert (types[a], types[b_], out) == ("bf16", "bf16", "f32"), (out, a, b_)


VIT = dict(image_size=16, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64,
           pool="cls", ln_pre=True, embed_dim=8, dtype=BF16)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_bfloat16_vit_scan_and_remat_equal_unrolled(remat):
    """The custom-backward matmul under nn.scan and jax.checkpoint policies (the
    configs train bfloat16 ViTs with `dots_no_batch`) gives the plain model's
    gradients."""
    img = np.random.default_rng(4).standard_normal((2, 16, 16, 3)).astype(np.float32)
    ref = ViT(**VIT, scan=False, remat="none")
    params = nn.unbox(ref.init(jax.random.key(5), img))["params"]
    scanned = ViT(**VIT, scan=True, remat=remat)

    def value_and_grad(model, p):
        return jax.jit(jax.value_and_grad(
            lambda p: sum(jnp.sum(o.astype(jnp.float32) ** 2)
                          for o in model.apply({"params": p}, img))))(p)

    v_ref, g_ref = value_and_grad(ref, params)
    v, g = value_and_grad(scanned, stack_layer_params(params, 2))
    g_ref = stack_layer_params(g_ref, 2)
    np.testing.assert_allclose(v, v_ref, rtol=1e-2)
    scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g_ref))
    assert scale > 1e-3
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert a.shape == b.shape
        assert float(jnp.abs(a - b).max()) <= 2e-2 * scale
    # A remat policy that saves dots keeps the same numbers as recomputing them.
    if remat == "dots":
        _, g_full = value_and_grad(ViT(**VIT, scan=True, remat="full"),
                                   stack_layer_params(params, 2))
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_full)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kv_heads", [4, 2])  # multi-head and grouped-query
def test_bfloat16_attention_grads_match_float32(kv_heads):
    """bf16 attention (bf16 x bf16 -> f32 batched GEMMs with the custom backward on
    CPU) against the float32 path on the same bf16-rounded inputs."""
    rng = np.random.default_rng(6)
    b, t, s, h, d = 2, 5, 7, 4, 8
    q = _bf16(rng.standard_normal((b, t, h, d)))
    k, v = (_bf16(rng.standard_normal((b, s, kv_heads, d))) for _ in range(2))
    mask = jnp.asarray(rng.random((b, 1, t, s)) < 0.7).at[..., 0].set(True)
    ct = rng.standard_normal((b, t, h, d))

    def run(dtype):
        def f(q, k, v):
            out = dot_product_attention(q, k, v, mask, implementation="xla")
            return jnp.sum(out.astype(jnp.float32) * ct)
        args = [jnp.asarray(a, dtype) for a in (q, k, v)]
        return [np.asarray(g, np.float64) for g in jax.grad(f, argnums=(0, 1, 2))(*args)]

    for got, want in zip(run(BF16), run(jnp.float32)):
        assert np.abs(got - want).max() <= 3e-2 * np.abs(want).max()
        assert np.abs(want).max() > 1e-2


@pytest.mark.parametrize("remat", ["full", "none"])
def test_weights_gathered_once_give_the_gradients_of_one_device(remat):
    """`config.mesh.fsdp_weights="gather_once"` (`KernelPolicy.gather_weights`): the
    accelerator matmul path (forced here by the policy's platform) gathers each
    FSDP-sharded float32 kernel once, cast to bfloat16, and keeps it for the
    backward pass. On a (data 1, fsdp 8, tensor 1) CPU mesh with every layer
    kernel sharded, loss and gradients (float32, reduced in float32) equal one
    device's (to bfloat16 rounding), and the in-matmul path's on the same mesh
    exactly; the compiled step all-gathers each layer
    kernel in the forward pass only (the backward gathers nothing again, remat
    included)."""
    from mmjax.models.ops.policy import KernelPolicy, kernel_policy
    from mmjax.train import sharding as shd
    model = ViT(**dict(VIT, width=64, mlp_dim=128), scan=True, remat=remat)
    img = np.random.default_rng(6).standard_normal((8, 16, 16, 3)).astype(np.float32)
    boxed = model.init(jax.random.key(7), img)["params"]
    params = nn.unbox(boxed)
    mesh = shd.make_mesh(dict(data=1, fsdp=8, tensor=1), jax.devices()[:8])
    p_sh = shd.state_shardings(boxed, mesh)
    sharded_kernels = [s.spec for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(p_sh))
                       if p.ndim >= 3 and "fsdp" in s.spec]
    assert len(sharded_kernels) >= 6  # q, k, v, out, fc1, fc2 of the scanned stack (+ patches)

    def loss(p, x):
        return sum(jnp.sum(o.astype(jnp.float32) ** 2) for o in model.apply({"params": p}, x))

    def run(gather, on_mesh):
        policy = KernelPolicy(platform="gpu", gather_weights=gather)
        one = shd.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
        with kernel_policy(policy), shd.logical_rules_context(), \
                jax.set_mesh(mesh if on_mesh else one):
            if on_mesh:
                f = jax.jit(jax.value_and_grad(loss), in_shardings=(p_sh, shd.batch_sharding(mesh)))
                args = (jax.device_put(params, p_sh), jax.device_put(img, shd.batch_sharding(mesh)))
            else:
                f = jax.jit(jax.value_and_grad(loss))
                args = (jax.device_put(params, jax.devices()[0]), img)
            text = f.lower(*args).compile().as_text()
            return f(*args), text

    (v1, g1), _ = run(True, on_mesh=False)
    (v8, g8), text = run(True, on_mesh=True)
    (vm, gm), _ = run(False, on_mesh=True)
    scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g1))
    assert scale > 1e-3
    for v in (v8, vm):
        np.testing.assert_allclose(v, v1, rtol=1e-3)
    # bfloat16 activations round differently on 8 devices (both paths alike: 4e-3)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
        assert a.dtype == jnp.float32
        assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) <= 1e-2 * scale
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(gm)):  # the same numbers
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # every gather of a layer kernel is a forward one (`jvp(...)`), none in the backward
    gathers = [l for l in text.splitlines() if re.search(r"= \S+ all-gather(-start)?\(", l)
               and "/layers/" in l]
    assert gathers and not [l for l in gathers if "transpose(" in l], gathers[:2]
