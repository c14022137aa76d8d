"""`ops.tpu_attention`: the Pallas splash kernel against `xla_attention` (forward and
gradients, in the Pallas interpreter on CPU), the masks it takes and the ones it
leaves to XLA, and the kernel in a TPU-compiled model (deviceless, libtpu)."""
import functools
import os
import re

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: compile only
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may compile too

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mmjax.models.ops import tpu_attention  # noqa: E402
from mmjax.models.ops.attention import (dot_product_attention, make_attention_mask,  # noqa: E402
                                        xla_attention)
from mmjax.models.ops.policy import KernelPolicy, kernel_policy  # noqa: E402

# Worst error measured over the cases below, relative to the largest reference
# value (outputs and each of dq, dk, dv): 1.0e-6. Float32 throughout.
REL_TOL = 2e-5


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(got).all()
    return np.abs(got - want).max() / np.abs(want).max()


def _inputs(seed, b, t, s, h, kv, d):
    rng = np.random.default_rng(seed)
    q, ct = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, s, kv, d)), jnp.float32) for _ in range(2))
    return q, k, v, ct


def _value_and_grads(attend, q, k, v, ct):
    def f(q, k, v):
        out = attend(q, k, v)
        return jnp.sum(out * ct), out
    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return (out,) + grads


@pytest.fixture
def interpreted_on_tpu_policy(monkeypatch):
    """`dot_product_attention` as traced for a TPU (kernel policy platform "tpu"),
    with the splash kernel run by the Pallas interpreter on this CPU."""
    monkeypatch.setattr(tpu_attention, "splash_attention",
                        functools.partial(tpu_attention.splash_attention, interpret=True))
    with kernel_policy(KernelPolicy(platform="tpu")):
        yield


def _padding(b, s, valid_lengths):
    valid = np.zeros((b, s), bool)
    for row, n in enumerate(valid_lengths):
        valid[row, :n] = True
    return jnp.asarray(valid)


# (b, t, s, h, kv, d, causal, valid lengths per row or None)
CASES = {
    # 197 tokens (ViT-B/16): padded to 256; GQA; the second row has no valid key.
    "padding_gqa_197": (2, 197, 197, 4, 2, 64, False, (150, 0)),
    # Causal text with right padding; GQA; 197 -> 256.
    "causal_padding_gqa_197": (2, 197, 197, 4, 2, 64, True, (120, 197)),
    # Causal without a mask, one key/value head (MQA), head width 128, no padding.
    "causal_mqa_256": (1, 256, 256, 2, 1, 128, True, None),
    # Cross-attention: 130 queries (-> 256) over 300 keys (-> 384), key padding.
    "cross_130x300": (2, 130, 300, 4, 1, 64, False, (300, 211)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_splash_matches_xla_attention(case, interpreted_on_tpu_policy):
    """Through `dot_product_attention(..., "splash")` with `make_attention_mask`'s
    masks: outputs and gradients of q, k, v against `xla_attention` on the same mask."""
    b, t, s, h, kv, d, causal, lengths = CASES[case]
    q, k, v, ct = _inputs(sum(map(ord, case)), b, t, s, h, kv, d)
    valid = None if lengths is None else _padding(b, s, lengths)
    mask = make_attention_mask(None, valid, causal=causal, q_len=t, k_len=s)
    assert tpu_attention.splash_applies(q, k, mask)
    got = _value_and_grads(lambda *a: dot_product_attention(*a, mask, "splash"), q, k, v, ct)
    want = _value_and_grads(lambda *a: xla_attention(*a, jnp.asarray(mask)), q, k, v, ct)
    errs = [_rel_err(g, w) for g, w in zip(got, want)]
    assert max(errs) <= REL_TOL, dict(zip(("out", "dq", "dk", "dv"), errs))


def test_left_padded_causal_rows_are_finite_and_the_rest_exact():
    """Left padding with a causal mask: a padding query before the first real token
    sees no valid key. `xla_attention` averages every value there; the kernel attends
    the padding keys up to the query. Those rows are finite (and ignored downstream:
    zero cotangent); every other output and all gradients match."""
    b, t, h, kv, d = 2, 256, 2, 2, 64
    q, k, v, ct = _inputs(7, b, t, t, h, kv, d)
    valid = np.ones((b, t), bool)
    valid[0, :40] = False                       # 40 left-padding tokens in row 0
    seen = jnp.asarray(valid)[:, :, None, None]  # query t sees a valid key at or before t
    ct = jnp.where(seen, ct, 0.0)
    mask = make_attention_mask(None, jnp.asarray(valid), causal=True)
    got = _value_and_grads(functools.partial(tpu_attention.splash_attention,
                                             key_valid=jnp.asarray(valid), causal=True,
                                             interpret=True), q, k, v, ct)
    want = _value_and_grads(lambda *a: xla_attention(*a, jnp.asarray(mask)), q, k, v, ct)
    assert np.isfinite(np.asarray(got[0])).all()
    errs = [_rel_err(jnp.where(seen, got[0], 0.0), jnp.where(seen, want[0], 0.0))]
    errs += [_rel_err(g, w) for g, w in zip(got[1:], want[1:])]
    assert max(errs) <= REL_TOL, errs


def test_masks_the_kernel_takes_and_the_ones_left_to_xla():
    q = jnp.zeros((2, 256, 4, 64))
    k = jnp.zeros((2, 256, 2, 64))
    valid = jnp.ones((2, 256), bool)
    causal = make_attention_mask(None, valid, causal=True)
    key_valid, is_causal = tpu_attention.expressible_mask(causal)
    assert is_causal and key_valid is valid
    assert np.asarray(causal).shape == (2, 1, 256, 256)  # still the array where one is expected
    padding = jnp.asarray(make_attention_mask(None, valid))  # a plain [B, 1, 1, S] array
    assert tpu_attention.expressible_mask(padding)[1] is False
    assert tpu_attention.expressible_mask(None) == (None, False)
    for mask in (None, causal, padding):
        assert tpu_attention.splash_applies(q, k, mask)
    # Arbitrary [T, S] or per-head masks, and sequences under one block: XLA.
    assert not tpu_attention.splash_applies(q, k, jnp.tril(jnp.ones((256, 256), bool)))
    assert not tpu_attention.splash_applies(q, k, jnp.ones((2, 4, 1, 256), bool))
    assert not tpu_attention.splash_applies(q[:, :77], k[:, :77], None)
    assert not tpu_attention.splash_applies(q[:, :1], k, None)


def test_the_kernel_policy_platform_chooses(monkeypatch):
    """"splash" and None reach the kernel when traced for a TPU; "xla" never does, and
    neither does anything traced for CPU or GPU ("splash" is then `xla_attention`)."""
    calls = []
    monkeypatch.setattr(tpu_attention, "splash_attention",
                        lambda q, *a, **kw: calls.append(kw) or jnp.zeros_like(q))
    q, k, v, _ = _inputs(3, 1, 128, 128, 2, 2, 64)
    mask = make_attention_mask(None, None, causal=True, q_len=128, k_len=128)
    for platform, impl, expected in [("tpu", "splash", 1), ("tpu", None, 1), ("tpu", "xla", 0),
                                     ("cpu", "splash", 0), ("gpu", "splash", 0)]:
        calls.clear()
        with kernel_policy(KernelPolicy(platform=platform)):
            jax.eval_shape(lambda q, k, v: dot_product_attention(q, k, v, mask, impl), q, k, v)
        assert len(calls) == expected, (platform, impl)
    with kernel_policy(KernelPolicy(platform="cpu")):
        got = dot_product_attention(q, k, v, mask, "splash")
    np.testing.assert_array_equal(got, xla_attention(q, k, v, jnp.asarray(mask)))


def test_tpu_compiled_lm_runs_the_splash_kernel():
    """A tiny decoder LM (GQA, causal + key padding, scanned, remat) traced with the
    kernel policy's platform "tpu" on a data 2 x tensor 2 mesh, compiled by the TPU
    compiler (deviceless): the step holds the splash kernels (forward, dq, dkv) as
    Mosaic custom calls, inside `shard_map` over the batch and head axes."""
    pytest.importorskip("libtpu", reason="needs the `tpu` extra (libtpu) for deviceless compiles")
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mmjax.models.lm import DecoderLM
    from mmjax.train import sharding as shd

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
    mesh = shd.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, devices)
    model = DecoderLM(vocab_size=64, width=256, depth=1, num_heads=4, num_kv_heads=2,
                      mlp_dim=256, scan=True, remat="full", attention="splash",
                      dtype=jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((2, 256), jnp.int32,
                                sharding=NamedSharding(mesh, P(shd.BATCH_AXES)))
    with jax.set_mesh(mesh), shd.logical_rules_context(), \
            kernel_policy(KernelPolicy(platform=devices[0].platform)):
        params = jax.eval_shape(lambda: nn.meta.unbox(
            model.init(jax.random.key(0), jnp.zeros((2, 256), jnp.int32))["params"]))

        def loss(p, ids, valid):
            return model.apply({"params": p}, ids, attention_mask=valid).sum()
        hlo = jax.jit(jax.grad(loss)).lower(params, rows, rows).compile().as_text()
    assert 'custom_call_target="tpu_custom_call"' in hlo
    kernels = set(re.findall(r"splash_mha_\w+", hlo))
    assert {"splash_mha_fwd_segmented_residuals", "splash_mha_dq_segmented_no_residuals",
            "splash_mha_dkv_segmented_no_residuals"} <= kernels, kernels
