"""mmjax.models: scan/remat equivalence, masks, pooling, heads, gradients, axis names, build.

Small random models on CPU. References are independent computations: the
unrolled float32 model for scan/remat, separate passes for the Q-Former masks,
manual indexing for pooling.
"""
import functools
import math

import flax.linen as nn
import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import (Blip2Stage1, CaptionDecoder, CoCa, QFormer, TextEncoder, TwoTower,
                          ViT, build)
from mmjax.models.layers import stack_layer_params
from mmjax.models.qformer import group_qformer_params

KEY = jax.random.key(0)
TOL = 1e-5

# Tiny sizes shared by the tests.
VIT = dict(image_size=8, patch_size=4, width=16, depth=2, heads=2, mlp_dim=32)
TXT = dict(vocab_size=20, max_len=10, width=16, depth=2, heads=2, mlp_dim=32, eos_id=2, pad_id=0)
QF = dict(num_queries=3, width=16, depth=4, heads=2, mlp_dim=32, cross_attention_freq=2,
          vocab_size=20, max_len=10)
# Token ids: 1 = BOS/[CLS], 2 = EOS, 0 = pad. Row 0 padded after position 4.
IDS = np.array([[1, 5, 6, 2, 0, 0, 0],
                [1, 7, 8, 9, 3, 4, 2]], np.int32)


def images(n=2, size=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def unbox(tree):
    return nn.meta.unbox(tree)


def weighted_sum(out, seed=1):
    """Scalar from every float leaf of `out`, with fixed random weights (so no
    direction of the output is invisible to the gradient)."""
    total = 0.0
    for i, leaf in enumerate(jax.tree.leaves(out)):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            continue
        w = np.random.default_rng(seed + i).standard_normal(leaf.shape).astype(np.float32)
        total = total + jnp.sum(leaf.astype(jnp.float32) * w)
    return total


def _supported(options):
    try:
        jax.jit(lambda x: x + 1, compiler_options=options)(1.0)
        return options
    except Exception:  # option names differ across XLA versions
        return None


# The test programs are tiny and each runs a few times: compiling them without
# LLVM optimization and fusion emitters cuts compile time several-fold; the
# arithmetic is the same.
FAST_COMPILE = _supported({"xla_backend_optimization_level": 0,
                           "xla_cpu_use_fusion_emitters": False})


def fast_jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def run(fn, *args):
    """`jax.jit(fn)(*args)` with FAST_COMPILE."""
    return fast_jit(fn)(*args)


def init_params(model, *args, **kwargs):
    """`model.init(KEY, ...)["params"]`, unboxed."""
    return unbox(run(lambda k: model.init(k, *args, **kwargs), KEY)["params"])


def value_and_grad(model, params, args, kwargs=None, method=None):
    """`(output, d weighted_sum(output) / d params)` of `model.apply`."""
    kwargs = kwargs or {}

    def loss(p):
        out = model.apply({"params": p}, *args, method=method, **kwargs)
        return weighted_sum(out), out
    (_, out), grads = run(jax.value_and_grad(loss, has_aux=True), params)
    return out, grads


def param_shapes(model, args, kwargs=None):
    init = functools.partial(model.init, **(kwargs or {}))
    return unbox(jax.eval_shape(init, KEY, *args)["params"])


def random_params(model, args, kwargs=None, seed=0):
    """Params with `model.init`'s layout and random values: norm scales
    1 + N(0, 0.1^2), other vectors N(0, 0.1^2), matrices N(0, 0.3^2). Unlike
    init (zero biases, unit scales) every parameter matters for the output."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        noise = rng.standard_normal(s.shape).astype(np.float32)
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return 1.0 + 0.1 * noise
        return (0.1 if s.ndim <= 1 else 0.3) * noise
    return jax.tree.map_with_path(fill, param_shapes(model, args, kwargs))


def assert_trees_close(got, want, tol=TOL):
    gl, gt = jax.tree.flatten_with_path(got)
    wl, wt = jax.tree.flatten_with_path(want)
    assert gt == wt, "tree structures differ"
    for (path, g), (_, w) in zip(gl, wl):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, (jax.tree_util.keystr(path), g.shape, w.shape)
        scale = max(1.0, np.abs(w).max())
        err = np.abs(g - w).max()
        assert err <= tol * scale, f"{jax.tree_util.keystr(path)}: max error {err}"


_REFERENCES = {}


def check_scan_matches_unrolled(case, make, args, convert, remat, kwargs=None):
    """`make(scan, remat)` builds the module; `convert(params)` maps the unrolled
    param layout to the scanned one. Forward and param-gradients of the scanned
    (rematerialized) model must equal the unrolled, non-remat model's.
    `case` names the layout, so its reference is computed once."""
    kwargs = kwargs or {}
    if case not in _REFERENCES:
        ref = make(scan=False, remat="none")
        params = random_params(ref, args, kwargs)
        _REFERENCES[case] = (params,) + value_and_grad(ref, params, args, kwargs)
    params, out_ref, g_ref = _REFERENCES[case]
    scanned = make(scan=True, remat=remat)
    params_scan = convert(params)
    # The converted tree has exactly the layout the scanned model creates.
    want = jax.tree.map(lambda a: a.shape, param_shapes(scanned, args, kwargs))
    assert jax.tree.map(lambda a: a.shape, params_scan) == want
    out, g = value_and_grad(scanned, params_scan, args, kwargs)
    assert_trees_close(out, out_ref)
    assert_trees_close(g, convert(g_ref))
    # The gradient is not trivially zero.
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g)) > 1e-3


# ----------------------------------------------------------------------------
# scan + remat == unrolled
# ----------------------------------------------------------------------------

REMATS = ["none", "full", "dots"]

# Pooling and position embedding only touch the ends of the network: every
# remat policy on one layout, the other layouts with one policy each.
VIT_CASES = ([("cls", "learned", r) for r in REMATS]
             + [("cls", "sincos2d", "dots"), ("gap", "sincos2d", "full"),
                ("gap", "learned", "none"), ("map", "learned", "full"),
                ("map", "sincos2d", "dots")])


@pytest.mark.parametrize("pool,posemb,remat", VIT_CASES)
def test_vit_scan_remat_equals_unrolled(pool, posemb, remat):
    make = functools.partial(ViT, **VIT, pool=pool, posemb=posemb, ln_pre=True, embed_dim=6)
    check_scan_matches_unrolled(("vit", pool, posemb), make, (images(),),
                                lambda p: stack_layer_params(p, 2), remat)


@pytest.mark.parametrize("causal,pool,remat", [(True, "eos", r) for r in REMATS]
                         + [(False, "cls", "full")])
def test_text_scan_remat_equals_unrolled(causal, pool, remat):
    make = functools.partial(TextEncoder, **TXT, causal=causal, pool=pool, embed_dim=6)
    check_scan_matches_unrolled(("text", causal, pool), make, (IDS,),
                                lambda p: stack_layer_params(p, 2), remat)


@pytest.mark.parametrize("remat", REMATS)
def test_caption_decoder_scan_remat_equals_unrolled(remat):
    rng = np.random.default_rng(2)
    text = rng.standard_normal((2, 7, 16)).astype(np.float32)
    img = rng.standard_normal((2, 5, 12)).astype(np.float32)
    make = functools.partial(CaptionDecoder, vocab_size=20, width=16, depth=2, heads=2,
                             mlp_dim=32)
    check_scan_matches_unrolled("decoder", make, (text, img, IDS != 0),
                                lambda p: stack_layer_params(p, 2), remat)


@pytest.mark.parametrize("remat", REMATS)
def test_qformer_scan_remat_equals_unrolled(remat):
    feats = np.random.default_rng(3).standard_normal((2, 5, 12)).astype(np.float32)
    make = functools.partial(QFormer, **QF)
    check_scan_matches_unrolled("qformer", make, (feats, IDS),
                                lambda p: group_qformer_params(p, 4, 2), remat,
                                kwargs=dict(mask_mode="causal", lm_logits=True))


def test_remat_without_scan_equals_plain():
    """remat on the unrolled stack (the prevent_cse path) changes nothing numerically."""
    plain = TextEncoder(**TXT, remat="none")
    params = random_params(plain, (IDS,))
    out_ref, g_ref = value_and_grad(plain, params, (IDS,))
    out, g = value_and_grad(TextEncoder(**TXT, remat="dots"), params, (IDS,))
    assert_trees_close(out, out_ref)
    assert_trees_close(g, g_ref)


# ----------------------------------------------------------------------------
# Q-Former attention-mask modes
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qformer():
    model = QFormer(**{**QF, "depth": 2})
    feats = np.random.default_rng(4).standard_normal((2, 5, 12)).astype(np.float32)
    params = random_params(model, (feats, IDS), dict(mask_mode="causal", lm_logits=True))
    jitted = fast_jit(lambda p, f, t, valid, mode: model.apply({"params": p}, f, t, mode,
                                                               text_valid=valid),
                      static_argnames="mode")

    def apply(feats, ids, mode, valid=None):
        return np.asarray(jitted(params, feats, ids, valid, mode=mode), np.float64)
    return feats, apply


def _changed(a, b):
    return np.abs(a - b).max() > 1e-2


def test_qformer_unimodal_equals_separate_passes(qformer):
    feats, apply = qformer
    q = QF["num_queries"]
    joint = apply(feats, IDS, "unimodal")
    queries_only = apply(feats, None, "unimodal")
    text_only = apply(None, IDS, "unimodal")
    assert joint.shape == (2, q + IDS.shape[1], 16)
    assert queries_only.shape == (2, q, 16) and text_only.shape == (2, IDS.shape[1], 16)
    np.testing.assert_allclose(joint[:, :q], queries_only, atol=1e-5)
    np.testing.assert_allclose(joint[:, q:], text_only, atol=1e-5)
    # Not trivially equal: the text does reach the text positions.
    assert _changed(text_only[:, 1:], text_only[:, :-1])


def test_qformer_causal_mask(qformer):
    feats, apply = qformer
    q = QF["num_queries"]
    base = apply(feats, IDS, "causal")
    # Queries never see the text.
    other = IDS.copy()
    other[:, 1:3] = [[11, 12], [13, 14]]
    changed = apply(feats, other, "causal")
    np.testing.assert_array_equal(changed[:, :q], base[:, :q])
    assert _changed(changed[:, q + 1:], base[:, q + 1:])
    # Text position i sees text positions <= i only: change position j (row 1, no pads).
    for j in (2, 4):
        ids = IDS.copy()
        ids[1, j] = 17
        out = apply(feats, ids, "causal")
        np.testing.assert_allclose(out[1, :q + j], base[1, :q + j], atol=1e-6)
        assert _changed(out[1, q + j], base[1, q + j])
        assert _changed(out[1, q + j + 1:], base[1, q + j + 1:])
    # Text does see the queries: another image changes the text outputs.
    other_feats = np.random.default_rng(5).standard_normal(feats.shape).astype(np.float32)
    moved = apply(other_feats, IDS, "causal")
    assert _changed(moved[:, q:], base[:, q:])


def test_qformer_bidirectional_queries_see_text(qformer):
    feats, apply = qformer
    q = QF["num_queries"]
    base = apply(feats, IDS, "bidirectional")
    ids = IDS.copy()
    ids[:, 2] = 15
    changed = apply(feats, ids, "bidirectional")
    assert _changed(changed[:, :q], base[:, :q])
    # ... and an earlier text position sees later text too.
    assert _changed(changed[:, q + 1], base[:, q + 1])


@pytest.mark.parametrize("mode", ["unimodal", "bidirectional", "causal"])
def test_qformer_padding_positions_are_ignored(qformer, mode):
    feats, apply = qformer
    q = QF["num_queries"]
    valid = IDS != 0
    base = apply(feats, IDS, mode, valid)
    ids = IDS.copy()
    ids[0, 4:] = [9, 10, 11]  # new ids at the padded positions, still marked invalid
    out = apply(feats, ids, mode, valid)
    np.testing.assert_allclose(out[0, :q + 4], base[0, :q + 4], atol=1e-6)
    np.testing.assert_allclose(out[1], base[1], atol=1e-6)
    assert _changed(out[0, q + 4:], base[0, q + 4:])  # the padded positions themselves moved
    # Default validity is `ids != pad_id`: the same as passing it explicitly.
    np.testing.assert_allclose(apply(feats, IDS, mode), base, atol=1e-6)


def test_qformer_bad_mask_mode(qformer):
    feats, apply = qformer
    with pytest.raises(ValueError, match="mask mode"):
        apply(feats, IDS, "sideways")


# ----------------------------------------------------------------------------
# TextEncoder pooling
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def causal_text():
    model = TextEncoder(**TXT, causal=True, pool="eos")
    params = random_params(model, (IDS,))
    return model, params


def test_eos_pooling_picks_first_eos(causal_text):
    model, params = causal_text
    # Row 0: two EOS (positions 2 and 4); row 1: EOS at 5; row 2: no EOS -> last real token.
    ids = np.array([[1, 5, 2, 6, 2, 0, 0],
                    [1, 5, 6, 7, 8, 2, 0],
                    [1, 5, 6, 7, 0, 0, 0]], np.int32)
    pooled, tokens = run(lambda p: model.apply({"params": p}, ids), params)
    np.testing.assert_array_equal(np.asarray(pooled), np.asarray(tokens)[[0, 1, 2], [2, 5, 3]])
    # The candidate positions give different vectors, so the check can fail.
    assert _changed(np.asarray(tokens)[0, 2], np.asarray(tokens)[0, 4])
    # Legacy mode (eos_id=None): the largest id marks the end.
    legacy = TextEncoder(**{**TXT, "eos_id": None}, causal=True, pool="eos")
    pooled, tokens = run(lambda p: legacy.apply({"params": p}, ids), params)
    np.testing.assert_array_equal(np.asarray(pooled), np.asarray(tokens)[[0, 1, 2], [3, 4, 3]])


def test_causal_eos_pooling_padding_invariant(causal_text):
    model, params = causal_text
    apply = fast_jit(lambda p, ids: model.apply({"params": p}, ids))
    long = np.concatenate([IDS, np.zeros((2, 3), np.int32)], axis=1)
    p_short, t_short = apply(params, IDS)
    p_long, t_long = apply(params, long)
    np.testing.assert_allclose(np.asarray(p_long), np.asarray(p_short), atol=1e-5)
    np.testing.assert_allclose(np.asarray(t_long)[:, :7], np.asarray(t_short), atol=1e-5)


def test_text_too_long_names_config_key(causal_text):
    model, params = causal_text
    with pytest.raises(ValueError, match="`max_len`"):
        jax.eval_shape(lambda p: model.apply({"params": p}, np.ones((1, 11), np.int32)), params)


# ----------------------------------------------------------------------------
# TwoTower heads
# ----------------------------------------------------------------------------

def _two_tower(head, **kw):
    return TwoTower(image=dict(**VIT, embed_dim=6), text=dict(**TXT, embed_dim=6), contrastive=head, **kw)


def test_two_tower_softmax_head():
    model = _two_tower("softmax")
    params = init_params(model, images(), IDS)
    assert np.isclose(float(params["log_scale"]), math.log(1 / 0.07))
    apply = fast_jit(lambda p: model.apply({"params": p}, images(), IDS))
    out = apply(params)
    assert out["zimg"].shape == (2, 6) and out["ztxt"].shape == (2, 6)
    assert out["zimg"].dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(out["zimg"], axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out["ztxt"], axis=-1), 1.0, atol=1e-6)
    assert "bias" not in out
    np.testing.assert_allclose(float(out["scale"]), 1 / 0.07, rtol=1e-6)
    # The normalized embeddings are the encoder outputs divided by their norms.
    zimg = np.asarray(run(lambda p: model.apply({"params": p}, images(), method="encode_image"),
                          params))
    np.testing.assert_allclose(out["zimg"], zimg / np.linalg.norm(zimg, axis=-1, keepdims=True),
                               atol=1e-6)
    # The forward pass uses exp(t) as it is; the bound [0, log 100] is applied to the
    # parameter after each update (tests/train/test_optimizer.py).
    for t in (6.0, 2.0):
        got = apply({**params, "log_scale": jnp.asarray(t)})["scale"]
        np.testing.assert_allclose(float(got), math.exp(t), rtol=1e-6)
    assert model.param_bounds() == {"log_scale": (0.0, math.log(100.0))}
    assert _two_tower("sigmoid").param_bounds() == {}


def test_two_tower_sigmoid_head():
    model = _two_tower("sigmoid")
    params = init_params(model, images(), IDS)
    apply = fast_jit(lambda p: model.apply({"params": p}, images(), IDS))
    out = apply(params)
    np.testing.assert_allclose(float(out["scale"]), 10.0, rtol=1e-6)
    np.testing.assert_allclose(float(out["bias"]), -10.0)
    # The sigmoid head is not clamped.
    got = apply({**params, "log_scale": jnp.asarray(6.0)})["scale"]
    np.testing.assert_allclose(float(got), math.exp(6.0), rtol=1e-6)


def test_two_tower_unknown_head():
    with pytest.raises(ValueError, match="`model.contrastive`"):
        jax.eval_shape(_two_tower("cosine").init, KEY, images(), IDS)


# ----------------------------------------------------------------------------
# CoCa and BLIP-2 stage 1: shapes and gradients through every parameter
# ----------------------------------------------------------------------------

def _leaf_norms(tree):
    return {jax.tree_util.keystr(p): float(jnp.abs(x).max())
            for p, x in jax.tree.flatten_with_path(tree)[0]}


def test_coca_shapes_and_gradients():
    model = CoCa(image=dict(**VIT), text=dict(**TXT), embed_dim=6, caption_queries=4,
                 pooler_heads=2, decoder=dict(vocab_size=20, width=16, depth=1, heads=2,
                                              mlp_dim=32))
    params = random_params(model, (images(), IDS))
    assert set(params) == {"image_tower", "pooler", "pool_norm", "image_proj", "text_tower",
                           "text_decoder", "log_scale"}
    out, grads = value_and_grad(model, params, (images(), IDS))
    assert out["zimg"].shape == (2, 6) and out["ztxt"].shape == (2, 6)
    assert out["logits"].shape == (2, IDS.shape[1], 20)
    np.testing.assert_allclose(np.linalg.norm(out["ztxt"], axis=-1), 1.0, atol=1e-6)
    tokens = jax.eval_shape(lambda p: model.apply({"params": p}, images(),
                                                  method="image_tokens"), params)
    assert tokens.shape == (2, 4, 16)
    zero = [k for k, v in _leaf_norms(grads).items() if v == 0.0]
    assert not zero, f"parameters without gradient: {zero}"


def _blip2(freeze_image):
    return Blip2Stage1(image={**VIT, "depth": 1}, qformer={**QF, "depth": 2}, embed_dim=6,
                       freeze_image=freeze_image)


@pytest.fixture(scope="module")
def blip2_params():
    # freeze_image does not change the parameters, only where gradients stop.
    return init_params(_blip2(True), images(), IDS)


@pytest.mark.parametrize("freeze_image", [True, False])
def test_blip2_shapes_and_gradients(blip2_params, freeze_image):
    model, params = _blip2(freeze_image), blip2_params
    assert set(params) == {"image_tower", "qformer_module", "vision_proj", "text_proj",
                           "itm_head", "temp"}
    out, grads = value_and_grad(model, params, (images(), IDS))
    q, l = QF["num_queries"], IDS.shape[1]
    assert out["image_feats"].shape == (2, q, 6) and out["text_feat"].shape == (2, 6)
    np.testing.assert_allclose(np.linalg.norm(out["image_feats"], axis=-1), 1.0, atol=1e-6)
    assert out["itm_logits"].shape == (2, 2) and out["itg_logits"].shape == (2, l, 20)
    np.testing.assert_allclose(float(out["temp"]), 0.07, rtol=1e-6)
    norms = _leaf_norms(grads)
    image = {k: v for k, v in norms.items() if k.startswith("['image_tower']")}
    rest = {k: v for k, v in norms.items() if k not in image}
    assert image and rest
    if freeze_image:
        assert all(v == 0.0 for v in image.values()), "frozen ViT received gradient"
    else:
        assert all(v > 0.0 for v in image.values())
    zero = [k for k, v in rest.items() if v == 0.0]
    assert not zero, f"parameters without gradient: {zero}"


def test_blip2_itg_is_causal_and_starts_with_dec(blip2_params):
    model = _blip2(True)
    feats = np.random.default_rng(6).standard_normal((2, 5, 16)).astype(np.float32)
    itg = fast_jit(lambda p, ids: model.apply({"params": p}, feats, ids, method="itg_logits"))
    base = np.asarray(itg(blip2_params, IDS))
    assert base.shape == (2, IDS.shape[1], QF["vocab_size"])
    # The first token is replaced by [DEC]: whatever it was does not matter.
    ids = IDS.copy()
    ids[:, 0] = 7
    np.testing.assert_array_equal(np.asarray(itg(blip2_params, ids)), base)
    # Logits at position i (predicting token i + 1) do not see tokens > i.
    ids = IDS.copy()
    ids[1, 3] = 11
    out = np.asarray(itg(blip2_params, ids))
    np.testing.assert_allclose(out[:, :3], base[:, :3], atol=1e-6)
    assert np.abs(out[1, 3:] - base[1, 3:]).max() > 1e-4


def test_blip2_temperature_bounds(blip2_params):
    """The forward pass uses the temperature parameter as it is (so it always has a
    gradient); the trainer clamps it to [0.001, 0.5] after each update."""
    model = _blip2(True)
    itc = fast_jit(lambda p: model.apply({"params": p}, images(), IDS,
                                         method="itc_features")["temp"])
    for t in (2.0, 1e-5, 0.2):
        got = itc({**blip2_params, "temp": jnp.asarray(t)})
        np.testing.assert_allclose(float(got), t, rtol=1e-6)
    assert model.param_bounds() == {"temp": (0.001, 0.5)}


# ----------------------------------------------------------------------------
# Logical axis names on every parameter
# ----------------------------------------------------------------------------

KNOWN_NAMES = {"embed", "mlp", "heads", "kv", "vocab", "layers", "proj", "embed_out", None}


def _boxed_leaves(variables):
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    return jax.tree.flatten_with_path(variables["params"], is_leaf=is_box)[0]


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("name", ["two_tower", "coca", "blip2_stage1"])
def test_every_param_has_logical_names(name, scan):
    image = dict(**VIT, scan=scan)
    text = dict(**TXT, scan=scan)
    models = {
        "two_tower": lambda: TwoTower(image={**image, "embed_dim": 6, "pool": "map"},
                                      text={**text, "embed_dim": 6}),
        "coca": lambda: CoCa(image=image, text=text, embed_dim=6, caption_queries=2,
                             pooler_heads=2, decoder=dict(vocab_size=20, width=16, depth=2,
                                                          heads=2, mlp_dim=32, scan=scan)),
        "blip2_stage1": lambda: Blip2Stage1(image=image, qformer=dict(QF, scan=scan),
                                            embed_dim=6),
    }
    model = models[name]()
    variables = jax.eval_shape(model.init, KEY, images(), IDS)
    leaves = _boxed_leaves(variables)
    assert len(leaves) > 10
    scanned = 0
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), f"{where} has no logical axis names"
        assert len(leaf.names) == leaf.value.ndim, (where, leaf.names, leaf.value.shape)
        assert set(leaf.names) <= KNOWN_NAMES, (where, leaf.names)
        in_stack = "['layers']" in where or "['groups']" in where
        if in_stack:
            scanned += 1
            assert leaf.names[0] == "layers", (where, leaf.names)
        else:
            assert "layers" not in leaf.names, (where, leaf.names)
    assert (scanned > 0) == scan
    # The partition spec tree is derivable for the whole model.
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    specs = nn.get_partition_spec(variables)
    assert len(jax.tree.leaves(specs, is_leaf=is_spec)) == len(leaves)


# ----------------------------------------------------------------------------
# build(config.model)
# ----------------------------------------------------------------------------

def _config(**kw):
    return {"name": "two_tower", "image": dict(**VIT, embed_dim=6),
            "text": dict(**TXT, embed_dim=6), "contrastive": "sigmoid", **kw}


def test_build_makes_the_named_model():
    model = build(_config(dtype="bfloat16"))
    assert isinstance(model, TwoTower) and model.dtype == jnp.bfloat16 and model.contrastive == "sigmoid"
    out, variables = jax.eval_shape(model.init_with_output, KEY, images(), IDS)
    assert out["zimg"].dtype == jnp.float32  # embeddings come back in float32
    # Params stay float32 under a bfloat16 compute dtype.
    assert {x.dtype for x in jax.tree.leaves(unbox(variables))} == {jnp.dtype(jnp.float32)}


def test_build_accepts_config_dict():
    model = build(ml_collections.ConfigDict(_config()))
    assert isinstance(model, TwoTower) and isinstance(model.image, dict)


def test_build_accepts_dtype_object():
    assert build(_config(dtype=jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("cfg,key", [
    (_config(name="clipp"), "model.name"),
    ({k: v for k, v in _config().items() if k != "name"}, "model.name"),
    (_config(heads="softmax"), "model.heads"),
    (_config(dtype="float8"), "model.dtype"),
    ({**_config(), "image": {**_config()["image"], "widht": 8}}, "model.image.widht"),
])
def test_build_errors_name_the_key(cfg, key):
    """Unknown top-level and nested keys, bad names and dtypes are named in the error."""
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build(cfg)


@pytest.mark.parametrize("kind,fields", [
    ("vit", dict(pool="cls")), ("vit", dict(pool="gap")), ("ast", dict(pool="cls_dist")),
    ("video_vit", dict(pool="gap", num_frames=3)), ("video_vit", dict(pool="cls", num_frames=3)),
    ("video_vit", dict(pool="none", num_frames=2)),
])
def test_llava_connector_keeps_the_media_content_tokens_of_every_tower(kind, fields):
    """VisionLM's MLP connector drops exactly the tower's leading class / distillation
    tokens (`prefix_tokens`): ViT's class token, AST's two, none of VideoViT's frame
    tokens; the Q-Former connector reads all of them."""
    import ml_collections
    from mmjax.models import VisionLM, towers
    cls = towers.tower_class(kind)
    cfg = {**fields, **cls.tiny(fields)}
    data = ml_collections.ConfigDict(dict(image_size=cfg.get("image_size", 32), output="float32",
                                          num_frames=cfg.get("num_frames", 1),
                                          sample_rate=cfg.get("sample_rate", 16000),
                                          clip_seconds=cfg.get("clip_seconds", 1.0)))
    shape, _ = cls.example_input(cfg, data)
    media = jax.ShapeDtypeStruct((2,) + tuple(shape), jnp.float32)
    lm = dict(vocab_size=64, width=32, depth=1, num_heads=2, mlp_dim=64, max_len=64)
    model = VisionLM(image=dict(kind=kind, **cfg), lm=lm, connector="mlp")
    embeds, _ = jax.eval_shape(lambda x: model.init_with_output(
        jax.random.key(0), x, method="image_embeds"), media)
    content = cls.num_tokens(cfg) - cls.prefix_tokens(cfg)
    assert embeds.shape == (2, content, 32)
    if kind == "video_vit":
        frames = cfg["num_frames"]
        assert content == (frames if cfg["pool"] != "none" else frames * (32 // 8) ** 2)
