"""Trainer: sharded = unsharded, every recipe runs, LiT freezes, clear config errors."""
import glob
import json
import os

import jax
import numpy as np
import pytest

from mmjax import cli
from mmjax.models import build
from mmjax.train import sharding as shd
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.config_utils import load_config
from mmjax.train.loop import train
from mmjax.train.optimizer import build_optimizer
from mmjax.train.step import Trainer

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py")))


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MMJAX_CACHE", str(tmp_path_factory.getbasetemp() / "mmjax_cache"))


def _batches(config, n, seed=0):
    rng = np.random.RandomState(seed)
    s, l, b = config.data.train.image_size, config.data.train.max_len, config.batch_size
    out = []
    for _ in range(n):
        text = rng.randint(3, 200, (b, l)).astype(np.int32)
        text[:, 0] = 1
        for row, length in zip(text, rng.randint(4, l, b)):  # EOS then padding
            row[length] = 2
            row[length + 1:] = 0
        out.append({"image": rng.randn(b, s, s, 3).astype(np.float32), "text": text})
    return out


def _run(config, mesh_shape, steps=5):
    n = int(np.prod(mesh_shape))
    mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, mesh_shape)), jax.devices()[:n])
    model = build(config.model)
    tx, schedule = build_optimizer(config.optim, int(config.total_steps))
    trainer = Trainer(config, model, tx, schedule, mesh)
    state = trainer.init_state(0)
    losses = []
    for batch in _batches(config, steps):
        state, metrics = trainer.step(state, jax.device_put(batch, trainer.batch_sharding))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state["params"]), state


@pytest.mark.parametrize("recipe,meshes", [
    ("clip_b16", [(8, 1, 1), (2, 4, 1), (2, 2, 2)]),
    ("siglip_b16", [(2, 2, 2)]),
    # Stage 2: frozen ViT (+ frozen LM for BLIP-2), connector (+ LM for LLaVA) trained.
    ("llava", [(2, 2, 2)]),
    ("blip2_stage2", [(2, 2, 2), (2, 1, 4)]),
])
def test_sharded_steps_equal_single_device(recipe, meshes):
    # eps 1e-4: with a small eps Adam turns float noise in near-zero gradients
    # into full-size updates (sign(g) * lr). Such gradients exist: the
    # Q-Former's key biases (exactly zero in exact arithmetic) and its
    # cross-attention query bias (~3e-6, a sum of terms that cancel), whose
    # value moves by ~2% with the reduction order of a (2,2,2) mesh.
    arg = "finetune,tiny" if recipe == "llava" else "tiny"
    config = load_config(f"{recipe}:{arg}", ["batch_size=16", "model.dtype=float32",
                                            "optim.eps=1e-4"])
    ref_losses, ref_params, _ = _run(config, (1, 1, 1))
    assert np.all(np.isfinite(ref_losses)) and ref_losses[-1] != ref_losses[0]
    for shape in meshes:
        losses, params, state = _run(config, shape)
        # Same math, different reduction order across devices: float32 noise only.
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
        if shape[1] > 1:  # FSDP really shards the big weights
            k = state["params"]["image_tower"]["layers"]["mlp"]["fc1"]["kernel"]
            assert "fsdp" in str(k.sharding.spec)
        if "lm_module" in params and shape[1] > 1 and shape[2] > 1:  # LM on fsdp and tensor
            lm = state["params"]["lm_module"]
            k = lm.get("layers", lm.get("layers_0"))["mlp"]["fc1"]["kernel"]
            assert "fsdp" in str(k.sharding.spec) and "tensor" in str(k.sharding.spec)


def test_sharded_bfloat16_steps_match_single_device():
    """bfloat16 compute (on CPU: bf16 x bf16 -> f32 GEMMs with a custom backward) on a
    (2, 2, 2) mesh vs one device. Equal up to bfloat16 rounding of differently
    ordered float32 partial sums: measured, losses within 2e-3 and the parameter
    updates of 5 steps within 1.4% (relative norm); a wrong gradient is O(1) off."""
    config = load_config("clip_b16:tiny", ["batch_size=16", "model.dtype=bfloat16",
                                           "optim.eps=1e-4"])
    ref_losses, ref_params, _ = _run(config, (1, 1, 1))
    losses, params, _ = _run(config, (2, 2, 2))
    assert ref_losses[-1] != ref_losses[0]
    np.testing.assert_allclose(losses, ref_losses, rtol=5e-3)
    tx, schedule = build_optimizer(config.optim, int(config.total_steps))
    init = Trainer(config, build(config.model), tx, schedule,
                   shd.make_mesh(dict(zip(shd.MESH_AXES, (1, 1, 1))), jax.devices()[:1]))
    init = jax.tree.leaves(jax.device_get(init.init_state(0)["params"]))
    ref = [np.float64(b) - c for b, c in zip(jax.tree.leaves(ref_params), init)]
    got = [np.float64(a) - c for a, c in zip(jax.tree.leaves(params), init)]
    diff = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(got, ref)))
    assert diff <= 0.1 * np.sqrt(sum(np.sum(b ** 2) for b in ref))


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(c)[:-3] for c in CONFIGS])
def test_every_recipe_runs_tiny(path, tmp_path):
    config = load_config(f"{path}:tiny")
    result = train(config, str(tmp_path))
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [l["step"] for l in lines] == [1, 2, 3]
    assert all(np.isfinite(l["loss"]) for l in lines)
    for name in config.objectives:
        assert np.isfinite(lines[-1][f"loss/{name}"])
    if config.model.name == "vision_lm":
        if config.data.train.text_format == "dialog":
            assert result["vqa/count"] == 4 * 5 and 0.0 <= result["vqa_accuracy"] <= 1.0
        else:
            assert result["captioning/n"] == 8 and result["captioning/bleu4"] >= 0.0
    else:
        assert 0.0 <= result["zeroshot/top1"] <= 1.0
        assert 0.0 <= result["retrieval/t2i_r1"] <= result["retrieval/t2i_r5"] <= 1.0
    if config.model.name in ("coca", "blip2_stage1"):
        assert result["captioning/n"] == 8 and result["captioning/bleu4"] >= 0.0
    assert os.path.exists(tmp_path / "eval" / "step_3.json")
    # Frozen groups provably do not change; the rest does.
    frozen = list(config.optim.freeze)
    if frozen:
        model = build(config.model)
        tx, schedule = build_optimizer(config.optim, 3)
        trainer = Trainer(config, model, tx, schedule, shd.make_mesh(config.mesh))
        init = jax.device_get(trainer.init_state(int(config.seed))["params"])
        ckpt = Checkpointer(str(tmp_path), async_save=False)
        final, _, step = trainer.restore(ckpt)
        ckpt.close()
        final = jax.device_get(final["params"])
        assert step == 3
        for group in init:
            same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(init[group]),
                                                             jax.tree.leaves(final[group])))
            assert same == (group in frozen), group


def _cli_error(args, capsys):
    code = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_mistyped_config_key_is_one_line(capsys, tmp_path):
    msg = _cli_error(["train", "--config", "clip_tiny:tiny", "--workdir", str(tmp_path),
                      "--config.optim.lrr=0.1"], capsys)
    assert "config.optim.lrr" in msg and "config.optim.lr" in msg


def test_missing_shard_pattern_is_one_line(capsys, tmp_path):
    msg = _cli_error(["train", "--config", "clip_tiny:tiny", "--workdir", str(tmp_path),
                      f"--config.data.train.shards={tmp_path}/nothing-{{000..009}}.tar"], capsys)
    assert "data.train.shards" in msg and "nothing-" in msg


def test_workdir_of_another_config_is_one_line(capsys, tmp_path):
    assert cli.main(["train", "--config", "clip_tiny:tiny", "--workdir", str(tmp_path)]) == 0
    capsys.readouterr()
    msg = _cli_error(["train", "--config", "clip_tiny:tiny", "--workdir", str(tmp_path),
                      "--config.model.text.width=32"], capsys)
    assert "another config" in msg and "config.model.text.width" in msg


def test_tokenizer_larger_than_vocab_is_rejected(capsys, tmp_path):
    msg = _cli_error(["train", "--config", "clip_tiny:tiny", "--workdir", str(tmp_path),
                      "--config.model.text.vocab_size=100"], capsys)
    assert "vocab_size" in msg
