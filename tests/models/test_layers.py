"""Attention, MLP, norms and sin-cos position embeddings against float64 NumPy.

Every reference here is written from the formulas (softmax(q k^T / sqrt(K)) v,
LayerNorm, RMSNorm, GELU variants, the 2-D sin-cos table), not from mmjax code.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import layers
from mmjax.models.ops.activations import get_activation
from mmjax.models.ops.attention import dot_product_attention, make_attention_mask
from mmjax.models.ops.norm import layer_norm

F32_TOL = 1e-5


# ----------------------------------------------------------------------------
# NumPy references
# ----------------------------------------------------------------------------

def np_attention(q, k, v, mask=None):
    """q `[B, T, H, K]`, k/v `[B, S, H, K]`, mask bool broadcastable to `[B, H, T, S]`."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bthk,bshk->bhts", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(np.asarray(mask), logits, -np.inf)
    logits = logits - logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshk->bthk", p, v)


_erf = np.vectorize(math.erf)


def np_act(name, x):
    x = np.asarray(x, np.float64)
    if name == "gelu":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if name == "quick_gelu":
        return x / (1.0 + np.exp(-1.702 * x))
    raise AssertionError(name)


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def f64(tree):
    """Unboxed params as float64 NumPy arrays."""
    return jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(tree))


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def close(got, want, tol=F32_TOL):
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.abs(got - want).max()
    assert err <= tol, f"max abs error {err} > {tol}"


# ----------------------------------------------------------------------------
# dot_product_attention
# ----------------------------------------------------------------------------

B, T, H, K = 2, 5, 3, 8


def _qkv(rng, s=T, dtype=np.float32):
    return (rand(rng, B, T, H, K).astype(dtype), rand(rng, B, s, H, K).astype(dtype),
            rand(rng, B, s, H, K).astype(dtype))


def _padding():
    valid = np.ones((B, T), bool)
    valid[0, 3:] = False  # row 0 has 3 real keys, row 1 all 5
    return valid


def test_attention_no_mask():
    q, k, v = _qkv(np.random.default_rng(0))
    got = dot_product_attention(q, k, v, None, implementation="xla")
    close(got, np_attention(q, k, v))


def test_attention_causal_mask():
    q, k, v = _qkv(np.random.default_rng(1))
    mask = make_attention_mask(None, None, causal=True, q_len=T, k_len=T)
    assert mask.shape == (1, 1, T, T)
    want_mask = np.tril(np.ones((T, T), bool))[None, None]
    np.testing.assert_array_equal(np.asarray(mask), want_mask)
    got = dot_product_attention(q, k, v, mask, implementation="xla")
    close(got, np_attention(q, k, v, want_mask))
    # The first query sees only the first key: its output is exactly v[:, 0].
    close(got[:, 0], np.asarray(v[:, 0], np.float64))


def test_attention_key_padding_mask():
    q, k, v = _qkv(np.random.default_rng(2))
    valid = _padding()
    mask = make_attention_mask(None, jnp.asarray(valid))
    assert mask.shape == (B, 1, 1, T)
    got = dot_product_attention(q, k, v, mask, implementation="xla")
    want = np_attention(q, k, v, valid[:, None, None, :])
    close(got, want)
    # Changing padded keys/values leaves every output unchanged.
    k2, v2 = k.copy(), v.copy()
    k2[0, 3:] += 5.0
    v2[0, 3:] -= 7.0
    got2 = dot_product_attention(q, k2, v2, mask, implementation="xla")
    close(got2, want)


def test_attention_causal_and_padding():
    q, k, v = _qkv(np.random.default_rng(3))
    valid = _padding()
    mask = make_attention_mask(None, jnp.asarray(valid), causal=True)
    want_mask = valid[:, None, None, :] & np.tril(np.ones((T, T), bool))[None, None]
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(mask), (B, 1, T, T)), want_mask)
    got = dot_product_attention(q, k, v, mask, implementation="xla")
    close(got, np_attention(q, k, v, want_mask))


def test_cross_attention_different_lengths():
    s = 7
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, s=s)
    got = dot_product_attention(q, k, v, None, implementation="xla")
    assert got.shape == (B, T, H, K)
    close(got, np_attention(q, k, v))
    # With a key mask over the S context positions.
    valid = np.ones((B, s), bool)
    valid[1, 4:] = False
    mask = make_attention_mask(None, jnp.asarray(valid))
    got = dot_product_attention(q, k, v, mask, implementation="xla")
    close(got, np_attention(q, k, v, valid[:, None, None, :]))


@pytest.mark.parametrize("shape", [(T, 7), (1, T, 7), (H, T, 7), (B, 1, T, 7), (B, H, T, 7)])
def test_attention_mask_of_any_broadcastable_rank(shape):
    """Masks are documented as broadcastable to `[B, H, T, S]`, lower ranks included."""
    q, k, v = _qkv(np.random.default_rng(14), s=7)
    mask = np.random.default_rng(15).random(shape) < 0.6
    mask[..., 0] = True  # every query keeps at least one key
    got = dot_product_attention(q, k, v, jnp.asarray(mask), implementation="xla")
    close(got, np_attention(q, k, v, np.broadcast_to(mask, (B, H, T, 7))))


def test_attention_bfloat16():
    q, k, v = _qkv(np.random.default_rng(5))
    qb, kb, vb = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    mask = make_attention_mask(None, jnp.asarray(_padding()), causal=True)
    got = dot_product_attention(qb, kb, vb, mask, implementation="xla")
    assert got.dtype == jnp.bfloat16
    # Reference on the bf16-rounded inputs; bf16 keeps ~3 significant digits.
    want = np_attention(*(np.asarray(a, np.float64) for a in (qb, kb, vb)),
                        np.asarray(jnp.broadcast_to(mask, (B, 1, T, T))))
    close(got, want, tol=5e-2)


def test_attention_bad_implementation_names_config_key():
    q, k, v = _qkv(np.random.default_rng(6))
    with pytest.raises(ValueError, match="`attention`"):
        dot_product_attention(q, k, v, None, implementation="bogus")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("masking", ["none", "causal+padding"])
def test_cudnn_attention_equals_xla_on_gpu(masking):
    """`attention="cudnn"` (fused kernel) against the `xla` path: bf16 forward and
    gradients of q, k, v, with and without causal + key-padding masks."""
    rng = np.random.default_rng(16)
    b, t, h, d = 2, 128, 4, 64
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16) for _ in range(3))
    ct = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    mask = None
    if masking != "none":
        valid = np.ones((b, t), bool)
        valid[1, 100:] = False
        mask = make_attention_mask(None, jnp.asarray(valid), causal=True)

    def run(impl):
        def f(q, k, v):
            out = dot_product_attention(q, k, v, mask, implementation=impl)
            return jnp.sum(out.astype(jnp.float32) * ct), out
        (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return [np.asarray(a, np.float32) for a in (out,) + grads]

    for got, want in zip(run("cudnn"), run("xla")):
        assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()


# ----------------------------------------------------------------------------
# Attention module
# ----------------------------------------------------------------------------

def np_attention_module(p, x, context=None, mask=None):
    """Re-implementation from the param layout: q/k/v `[D, H, K]`, out `[H, K, D]`."""
    x = np.asarray(x, np.float64)
    ctx = x if context is None else np.asarray(context, np.float64)
    q = np.einsum("btd,dhk->bthk", x, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("bsd,dhk->bshk", ctx, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("bsd,dhk->bshk", ctx, p["value"]["kernel"]) + p["value"]["bias"]
    o = np_attention(q, k, v, mask)
    return np.einsum("bthk,hkd->btd", o, p["out"]["kernel"]) + p["out"]["bias"]


def _randomize(params, seed):
    """Replace every param (biases included, zero at init) by random values."""
    leaves, tree = jax.tree.flatten(nn.meta.unbox(params))
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [0.3 * rand(rng, *np.shape(a)) for a in leaves])


def test_attention_module_self_attention_with_mask():
    d, heads = 12, 3
    rng = np.random.default_rng(7)
    x = rand(rng, B, T, d)
    mask = make_attention_mask(None, jnp.asarray(_padding()), causal=True)
    mod = layers.Attention(heads)
    params = _randomize(mod.init(jax.random.key(0), x, mask=mask)["params"], 1)
    p = f64(params)
    assert p["query"]["kernel"].shape == (d, heads, d // heads)
    assert p["out"]["kernel"].shape == (heads, d // heads, d)
    got = mod.apply({"params": params}, x, mask=mask)
    want = np_attention_module(p, x, mask=np.asarray(jnp.broadcast_to(mask, (B, 1, T, T))))
    close(got, want, tol=1e-4)


def test_attention_module_cross_attention():
    d, dc, s, heads = 8, 6, 4, 2
    rng = np.random.default_rng(8)
    x, ctx = rand(rng, B, T, d), rand(rng, B, s, dc)
    mod = layers.Attention(heads, out_features=5)
    params = _randomize(mod.init(jax.random.key(0), x, ctx)["params"], 2)
    p = f64(params)
    assert p["key"]["kernel"].shape == (dc, heads, d // heads)
    got = mod.apply({"params": params}, x, ctx)
    assert got.shape == (B, T, 5)
    close(got, np_attention_module(p, x, ctx), tol=1e-4)


def test_attention_module_bad_heads():
    with pytest.raises(ValueError, match="`heads`"):
        layers.Attention(5).init(jax.random.key(0), np.zeros((1, 2, 12), np.float32))


# ----------------------------------------------------------------------------
# Mlp
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "quick_gelu", "swiglu"])
def test_mlp_matches_numpy(act):
    d, hidden = 6, 10
    x = rand(np.random.default_rng(9), B, T, d)
    mod = layers.Mlp(hidden, act=act)
    params = _randomize(mod.init(jax.random.key(0), x)["params"], 3)
    p = f64(params)
    x64 = np.asarray(x, np.float64)
    h1 = x64 @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    if act == "swiglu":
        h = np_silu(x64 @ p["gate"]["kernel"] + p["gate"]["bias"]) * h1
    else:
        assert "gate" not in p
        h = np_act(act, h1)
    want = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    close(mod.apply({"params": params}, x), want, tol=1e-4)


def test_activations_differ():
    # The three GELU flavours are distinct functions: a swapped table entry would show.
    x = np.linspace(-3, 3, 61)
    for name in ("gelu", "gelu_tanh", "quick_gelu"):
        close(get_activation(name)(jnp.asarray(x, jnp.float32)), np_act(name, x))
    assert np.abs(np_act("gelu", x) - np_act("quick_gelu", x)).max() > 1e-2


def test_unknown_activation_names_config_key():
    with pytest.raises(ValueError, match="`act`"):
        layers.Mlp(4, act="gleu").init(jax.random.key(0), np.zeros((1, 2, 3), np.float32))


# ----------------------------------------------------------------------------
# Norm
# ----------------------------------------------------------------------------

def test_layernorm_matches_numpy():
    x = 3.0 + 2.0 * rand(np.random.default_rng(10), B, T, 16)
    mod = layers.Norm("layernorm", eps=1e-6)
    params = _randomize(mod.init(jax.random.key(0), x)["params"], 4)
    p = f64(params)
    x64 = np.asarray(x, np.float64)
    mu = x64.mean(-1, keepdims=True)
    var = ((x64 - mu) ** 2).mean(-1, keepdims=True)
    want = (x64 - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]
    close(mod.apply({"params": params}, x), want, tol=1e-4)


def test_rmsnorm_matches_numpy():
    x = 3.0 + 2.0 * rand(np.random.default_rng(11), B, T, 16)
    mod = layers.Norm("rmsnorm", eps=1e-6)
    params = _randomize(mod.init(jax.random.key(0), x)["params"], 5)
    assert set(params) == {"scale"}  # RMSNorm has no bias
    p = f64(params)
    x64 = np.asarray(x, np.float64)
    want = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * p["scale"]
    close(mod.apply({"params": params}, x), want, tol=1e-4)


def test_norm_bfloat16_output_and_unknown_kind():
    x = rand(np.random.default_rng(12), 2, 8)
    y = layers.Norm(dtype=jnp.bfloat16).init_with_output(jax.random.key(0), x)[0]
    assert y.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="`norm`"):
        layers.Norm("batchnorm").init(jax.random.key(0), x)


# ----------------------------------------------------------------------------
# sin-cos position embedding
# ----------------------------------------------------------------------------

def test_sincos_2d_values():
    h, w, dim, temp = 3, 4, 16, 10000.0
    pe = layers.sincos_2d(h, w, dim, temperature=temp)
    assert pe.shape == (h * w, dim) and pe.dtype == np.float32
    q = dim // 4
    for row in range(h):
        for col in range(w):
            m = row * w + col  # row-major token order, as patches are flattened
            for i in range(q):
                freq = temp ** (-i / (q - 1))
                want = [math.sin(col * freq), math.cos(col * freq),
                        math.sin(row * freq), math.cos(row * freq)]
                got = [pe[m, i], pe[m, q + i], pe[m, 2 * q + i], pe[m, 3 * q + i]]
                np.testing.assert_allclose(got, want, atol=1e-6)


def test_sincos_2d_properties():
    pe = layers.sincos_2d(4, 4, 32)
    # Origin: sin(0) = 0, cos(0) = 1 in each quarter.
    np.testing.assert_array_equal(pe[0], np.repeat([0.0, 1.0, 0.0, 1.0], 8))
    # Every position is distinct; each (sin, cos) pair lies on the unit circle.
    assert len({tuple(r) for r in pe.round(5)}) == 16
    np.testing.assert_allclose(pe[:, :8] ** 2 + pe[:, 8:16] ** 2, 1.0, atol=1e-6)
    # Lowest frequency is 1/temperature: the last column of each quarter.
    np.testing.assert_allclose(pe[3, 7], math.sin(3 / 10000.0), atol=1e-7)
    with pytest.raises(ValueError):
        layers.sincos_2d(2, 2, 6)


def test_position_embedding_sincos_added():
    x = rand(np.random.default_rng(13), 2, 6, 8)
    mod = layers.PositionEmbedding("sincos2d", hw=(2, 3))
    variables = mod.init(jax.random.key(0), x)
    assert not variables.get("params")  # fixed table, nothing to learn
    close(mod.apply(variables, x), np.asarray(x, np.float64) + layers.sincos_2d(2, 3, 8)[None])
    with pytest.raises(ValueError, match="`posemb`"):
        layers.PositionEmbedding("rope").init(jax.random.key(0), x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_closed_form_backward_equals_autodiff(dtype):
    """`layer_norm`'s custom backward against autodiff of the same forward."""
    rng = np.random.default_rng(17)
    x = jnp.asarray(3 * rng.standard_normal((4, 6, 16)) + 1, dtype)
    scale = jnp.asarray(rng.random(16) + 0.5, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(16), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((4, 6, 16)), dtype)

    def plain(x, scale, bias):
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        return ((xf - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias).astype(dtype)

    y, vjp = jax.vjp(lambda *a: layer_norm(*a, 1e-5, dtype), x, scale, bias)
    y_ref, vjp_ref = jax.vjp(plain, x, scale, bias)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for got, want in zip(vjp(ct), vjp_ref(ct)):
        assert got.dtype == want.dtype
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.abs(got - want).max() <= tol * np.abs(want).max()
    # Frozen parameters stored in bfloat16 keep their dtype in the backward pass.
    g_scale = jax.grad(lambda s: jnp.sum(layer_norm(x, s, bias, 1e-5, dtype)
                                         .astype(jnp.float32)))(scale.astype(jnp.bfloat16))
    assert g_scale.dtype == jnp.bfloat16
