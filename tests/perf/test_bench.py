"""`mmjax bench`, the AOT memory report, and the FLOP formula against XLA's count."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _helpers import ROOT
from mmjax import cli
from mmjax.models import build
from mmjax.config.loading import load_config
from mmjax.families import get_family, model_train_flops

pytestmark = pytest.mark.usefixtures("mmjax_cache")


def _value(text, label):
    """The number in the table row `| label | 12.3 unit |` (or `label: 12.3` line)."""
    m = re.search(rf"^\|? ?{re.escape(label)}[ :|]+([-+0-9.,e]+)", text, re.M)
    assert m, f"no {label!r} in output:\n{text}"
    return float(m.group(1).replace(",", ""))


def test_bench_command_reports_time_throughput_and_flops(capsys):
    spec = "configs/clip_tiny.py:tiny"
    args = ["bench", "--config", os.path.join(ROOT, spec), "--steps", "3", "--warmup", "1"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    config = load_config(os.path.join(ROOT, spec))
    expected = model_train_flops(config)
    flops = _value(out, "model FLOPs per step")
    assert flops == pytest.approx(expected, rel=1e-6)
    assert "model FLOPs: matmuls x 6 for training (2 fwd + 4 bwd)" in out

    step_ms = _value(out, "step time (random data, median of 3)")
    samples = _value(out, "samples/s")
    tflops = _value(out, "model TFLOP/s per device")
    assert step_ms > 0 and _value(out, "compile time") > 0
    # The printed rates follow from the step time (to printing precision).
    assert samples == pytest.approx(config.batch_size / (step_ms / 1e3), rel=0.01)
    assert tflops == pytest.approx(flops / (step_ms / 1e3) / jax.device_count() / 1e12, rel=0.01)
    assert re.search(r"^\| MFU \| n/a", out, re.M)  # CPU has no known peak
    assert _value(out, "memory per device: temp") > 0
    assert _value(out, "samples/s (input pipeline)") > 0


def test_bench_mfu_uses_peak_override_and_bad_key_exits_2(capsys):
    spec = os.path.join(ROOT, "configs/clip_tiny.py:tiny")
    assert cli.main(["bench", "--config", spec, "--steps", "2", "--warmup", "1",
                     "--no-pipeline", "--peak-flops", "1e9"]) == 0
    out = capsys.readouterr().out
    tflops = _value(out, "model TFLOP/s per device")
    mfu = re.search(r"^\| MFU \| ([0-9.]+)%", out, re.M)
    assert mfu and float(mfu.group(1)) == pytest.approx(100 * tflops * 1e12 / 1e9, rel=0.02)
    assert "input pipeline" not in out

    assert cli.main(["bench", "--config", spec, "--config.optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "config.optim.lrr" in err and len(err.strip().splitlines()) == 1
    # --aot: a mesh that does not match the devices, and an unknown mesh axis.
    assert cli.main(["bench", "--aot", "--config", spec, "--devices", "8",
                     "--mesh", "data=3"]) == 2
    assert "needs 3 devices but 8 are available" in capsys.readouterr().err
    assert cli.main(["bench", "--aot", "--config", spec, "--mesh", "pipe=2"]) == 2
    assert "--mesh 'pipe=2'" in capsys.readouterr().err


def test_aot_memory_report_shrinks_per_device_state_with_fsdp(tmp_path):
    out_json = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    pytest.importorskip("libtpu", reason="needs the `tpu` extra (libtpu)")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "aot_memory.py"),
         "--config", os.path.join(ROOT, "configs/clip_b16.py:tiny"), "--target", "v5p-16",
         "--mesh", "data=8,fsdp=1", "--mesh", "data=1,fsdp=8", "--json", str(out_json)],
        env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| data=8 x fsdp=1 x tensor=1 |" in proc.stdout
    dp, fsdp = json.loads(out_json.read_text())
    assert dp["devices"] == fsdp["devices"] == 8
    assert dp["temp"] > 0 and fsdp["temp"] > 0
    assert fsdp["argument"] < 0.5 * dp["argument"]
    # Independent count of the replicated state: params + 2 Adam moments (float32)
    # + step, Adam count and RNG; the argument adds this device's batch rows.
    config = load_config(os.path.join(ROOT, "configs/clip_b16.py:tiny"))
    model = build(config.model)
    s, length = config.data.train.image_size, config.data.train.max_len
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, s, s, 3)),
                                               jnp.zeros((1, length), jnp.int32)))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert dp["params"] == n_params
    state = 3 * 4 * n_params
    assert state <= dp["state"] <= state + 64
    rows = config.batch_size // 8  # uint8 images, int32 text
    # The TPU pads arrays to its (8, 128) tiles: at least state + this device's rows.
    assert dp["argument"] >= dp["state"] + rows * (s * s * 3 + 4 * length)
    assert dp["fits"] and fsdp["fits"]


def test_model_train_flops_matches_xla_count_for_two_tower():
    model_cfg = dict(
        name="two_tower", contrastive="softmax",
        image=dict(image_size=32, patch_size=4, width=256, depth=2, heads=4, mlp_dim=1024,
                   embed_dim=128, pool="cls"),
        text=dict(vocab_size=300, max_len=16, width=256, depth=2, heads=4, mlp_dim=1024,
                  embed_dim=128, causal=True, pool="eos"))
    batch, length = 8, 16
    model = build(model_cfg)
    images = jnp.zeros((batch, 32, 32, 3), jnp.float32)
    text = jnp.ones((batch, length), jnp.int32)
    params = model.init(jax.random.key(0), images[:1], text[:1])["params"]

    def forward(p, im, tx):
        out = model.apply({"params": p}, im, tx)
        return jnp.sum(out["zimg"] @ out["ztxt"].T)  # the [B, B] logits of the loss

    xla_fwd = jax.jit(forward).lower(params, images, text).compile().cost_analysis()["flops"]
    formula = get_family("two_tower").train_flops(model_cfg, batch, length)
    assert formula == pytest.approx(3 * xla_fwd, rel=0.1)
    # The x3 for training: XLA's count of forward + backward w.r.t. the params.
    xla_train = jax.jit(jax.grad(forward)).lower(params, images, text).compile() \
        .cost_analysis()["flops"]
    assert formula == pytest.approx(xla_train, rel=0.1)


@pytest.mark.parametrize("depth,freq", [(14, 4), (12, 2), (3, 2), (6, 6)])
def test_qformer_cross_attention_count_and_flops_match_the_model(depth, freq):
    """The FLOP formulas count the Q-Former's cross-attention layers as the model
    builds them (layers 0, f, 2f, ...: 4 of 14 with f=4), and the query pass's
    formula matches XLA's own count of the compiled forward."""
    from mmjax.models import QFormer
    from mmjax.models.flops import cross_attention_flops, cross_attention_layers, layer_flops
    nq, w, mlp, n, dv = 32, 256, 1024, 256, 512  # large context: one cross layer is ~10%
    q = QFormer(num_queries=nq, width=w, depth=depth, heads=4, mlp_dim=mlp,
                cross_attention_freq=freq, vocab_size=64, max_len=8)
    feats = jnp.zeros((2, n, dv), jnp.float32)
    params = jax.eval_shape(lambda: q.init(jax.random.key(0), feats))["params"]
    built = sum("cross_attn" in params[f"layers_{i}"] for i in range(depth))
    assert built == cross_attention_layers(depth, freq)
    if depth != 14:
        return
    params = q.init(jax.random.key(0), feats)["params"]
    xla = jax.jit(lambda p, f: q.apply({"params": p}, f).sum()).lower(params, feats).compile() \
        .cost_analysis()["flops"]
    formula = 2 * (depth * layer_flops(nq, w, mlp) + built * cross_attention_flops(nq, w, n, dv))
    assert formula == pytest.approx(xla, rel=0.03)
