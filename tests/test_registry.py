"""A tower registered from outside mmjax (`mmjax.registry`): a 1-D signal encoder
with its own media decoder and built-in data, defined in this file only, trained
`:tiny`-sized through the entry point of `mmjax train` (`mmjax.train.loop.train`),
evaluated (zero-shot on its held-out built-in split) and read back by `mmjax eval`;
and a family registered from outside (`register_family`) that shares its model class
with a built-in family, trained one step with its own loss.
"""
import io
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import registry
from mmjax.config import base_config, make_tiny
from mmjax.data import builtin as builtin_lib
from mmjax.data import media as media_lib
from mmjax.data.bad import BadSample
from mmjax.errors import ConfigError
from mmjax.families import get_family
from mmjax.models import towers

KIND = "signal_conv"
CLASSES = ["a slow sine wave", "a fast sine wave", "a slow square wave", "a fast square wave"]
LENGTH = 256


# ------------------------------------------------------------------ the user's code

class SignalEncoder(nn.Module):
    """1-D signals `[B, length]` float32 -> (pooled `[B, embed_dim]`, tokens `[B, N, width]`):
    non-overlapping windows of `patch` samples, a Dense embedding, `depth`
    self-attention blocks, mean pooling."""
    length: int = 1024
    patch: int = 16
    width: int = 128
    depth: int = 2
    heads: int = 4
    embed_dim: int = 64
    dtype: object = jnp.float32

    modality = "signal"

    @staticmethod
    def example_input(cfg, data):
        return (int(cfg.get("length", 1024)),), np.float32

    @staticmethod
    def num_tokens(cfg):
        return int(cfg.get("length", 1024)) // int(cfg.get("patch", 16))

    @staticmethod
    def token_width(cfg):
        return int(cfg.get("width", 128))

    @staticmethod
    def forward_flops(cfg):
        n, w, p = SignalEncoder.num_tokens(cfg), int(cfg.get("width", 128)), int(cfg.get("patch", 16))
        layer = 2 * n * 4 * w * w + 4 * n * n * w + 2 * n * w * 4 * w * 2
        return 2 * n * p * w + int(cfg.get("depth", 2)) * layer + 2 * w * int(cfg.get("embed_dim", 64))

    @staticmethod
    def tiny(cfg):
        return dict(length=LENGTH, patch=16, width=32, depth=1, heads=2, embed_dim=32)

    @nn.compact
    def __call__(self, x):
        b = x.shape[0]
        x = x.reshape(b, self.length // self.patch, self.patch).astype(self.dtype)
        x = nn.Dense(self.width, dtype=self.dtype)(x)
        x = x + self.param("posemb", nn.initializers.normal(0.02), x.shape[1:])
        for _ in range(self.depth):
            y = nn.LayerNorm(dtype=self.dtype)(x)
            x = x + nn.SelfAttention(self.heads, dtype=self.dtype)(y)
            y = nn.LayerNorm(dtype=self.dtype)(x)
            x = x + nn.Dense(self.width, dtype=self.dtype)(nn.gelu(nn.Dense(4 * self.width,
                                                                           dtype=self.dtype)(y)))
        return nn.Dense(self.embed_dim, dtype=self.dtype)(x.mean(1)), x


def make_signal(label: int, rng: np.random.Generator) -> np.ndarray:
    """Class `label` of CLASSES: slow (3 cycles) or fast (12), sine or square, random phase."""
    t = np.arange(LENGTH) / LENGTH
    cycles = 3 if label % 2 == 0 else 12
    wave = np.sin(2 * np.pi * (cycles * t + rng.random()))
    if label >= 2:
        wave = np.sign(wave)
    return (wave + 0.1 * rng.standard_normal(LENGTH)).astype(np.float32)


def decode_signal(data: bytes, ext: str, rng, options) -> np.ndarray:
    """`.npy` member -> float32 `[LENGTH]` (a file of another length is a bad sample)."""
    try:
        x = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise BadSample("corrupt_signal", f"{type(e).__name__}: {e}") from None
    if x.shape != (LENGTH,):
        raise BadSample("corrupt_signal", f"shape {x.shape}, want ({LENGTH},)")
    return x.astype(np.float32)


def signal_shards(cache_dir, split, syn, seed=0):
    """Built-in signals: `syn.{split}_samples` of them, captions from CLASSES."""
    from mmjax.data.cache import cached_shards
    from mmjax.data.writer import ShardWriter
    num = int(syn[f"{split}_samples"])
    params = dict(split=split, num_samples=num, per_shard=int(syn.samples_per_shard), seed=seed)

    def write(folder, progress):
        rng = np.random.default_rng([seed, split == "train"])
        with ShardWriter(folder, max_count=params["per_shard"], max_bytes=1 << 40,
                         prefix=split) as w:
            for i in range(num):
                label = i % len(CLASSES)
                buf = io.BytesIO()
                np.save(buf, make_signal(label, rng))
                w.write({"__key__": f"{i:06d}", "npy": buf.getvalue(),
                         "txt": CLASSES[label], "cls": label})
                progress(i + 1)
    return cached_shards(cache_dir, f"signals-{split}", params, write, what=f"{split} signals")


# ------------------------------------------------------------------ the tests

@pytest.fixture
def signal_tower(monkeypatch, tmp_path):
    """Registers the tower for one test and removes it afterwards."""
    monkeypatch.setenv("MMJAX_CACHE", str(tmp_path / "cache"))
    tables = (towers.TOWERS, media_lib.MEDIA, builtin_lib.BUILTIN)
    saved = [dict(t) for t in tables]
    registry.register_tower(
        KIND, SignalEncoder,
        media=media_lib.MediaSpec("signal", ("npy",), f"{__name__}:decode_signal"),
        builtin=registry.Builtin(shards=signal_shards, classnames=CLASSES))
    yield
    for table, old in zip(tables, saved):
        table.clear()
        table.update(old)


def signal_config(workers: int = 0):
    c = base_config()
    c.model = dict(name="two_tower", contrastive="softmax", image=dict(kind=KIND),
                   text=dict(vocab_size=259, max_len=32, width=64, depth=2, heads=4,
                             mlp_dim=128, embed_dim=16))
    c.objectives = {"softmax_contrastive": 1.0}
    c.data.train.shards = "synthetic"
    make_tiny(c)
    c.total_steps = c.checkpoint_every = 40
    c.log_every = 10
    c.optim.lr = 3e-3
    c.synthetic.train_samples = 256
    c.synthetic.test_samples = 64
    c.synthetic.samples_per_shard = 64
    c.data.train.workers = workers
    return c


def test_a_tower_registered_from_outside_trains_and_evaluates(signal_tower, tmp_path):
    """The registered tower reads its own media through spawned loader workers, trains
    (loss falls), checkpoints, and is evaluated zero-shot on its built-in test split,
    at the end of training and again by `mmjax eval` from the checkpoint."""
    from mmjax.commands.eval import evaluate_run
    from mmjax.train.loop import train

    config = signal_config(workers=1)
    assert get_family(config).media(config.model) == "signal"
    result = train(config, str(tmp_path / "run"))

    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    assert result["zeroshot/num_classes"] == len(CLASSES)
    assert result["zeroshot/n"] == 64
    saved = json.load(open(tmp_path / "run" / "eval" / "step_40.json"))
    assert saved["zeroshot/top1"] == result["zeroshot/top1"]
    # The signal tower's parameters are in the checkpoint, with its shapes.
    params = _checkpoint_params(tmp_path / "run", config)
    assert params["image_tower"]["Dense_0"]["kernel"].shape == (16, 32)
    assert params["image_tower"]["posemb"].shape == (LENGTH // 16, 32)
    # Re-evaluating the checkpoint from the workdir gives the same numbers.
    again = evaluate_run(None, str(tmp_path / "run"), None, None, [])
    assert again["step"] == 40 and again["zeroshot/top1"] == result["zeroshot/top1"]


def _checkpoint_params(workdir, config):
    from mmjax.train.checkpoint import Checkpointer
    from mmjax.train.step import build_trainer
    trainer = build_trainer(config)
    ckpt = Checkpointer(str(workdir), async_save=False)
    try:
        state, _, _ = trainer.restore(ckpt)
    finally:
        ckpt.close()
    return jax.device_get(state["params"])


def test_register_tower_refuses_a_taken_name_and_mismatched_media(signal_tower):
    with pytest.raises(ConfigError, match="registered already"):
        registry.register_tower("vit", SignalEncoder)
    with pytest.raises(ConfigError, match="not what SignalEncoder reads"):
        registry.register_tower("other", SignalEncoder,
                                media=media_lib.MediaSpec("audio", ("wav",), "x:y"))


def test_an_unregistered_media_is_a_config_error(tmp_path):
    """A tower whose modality has no decoder fails before training with one line."""
    from mmjax.train.loop import train
    towers.TOWERS[KIND] = SignalEncoder  # the class alone, without register_tower's media
    try:
        config = signal_config()
        config.data.train.shards = str(tmp_path / "x-{0..1}.tar")
        with pytest.raises(ConfigError, match="no media decoder is registered for modality "
                                              "'signal'"):
            train(config, str(tmp_path / "run"))
    finally:
        del towers.TOWERS[KIND]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_a_family_registered_from_outside_trains():
    """`register_family`: a family of the user's own (here a two-tower variant whose
    loss is the symmetric contrastive loss plus an embedding-norm penalty) on an mmjax
    model class, chosen by `model.name`; its loss is the one the step differentiates."""
    from mmjax import families, models
    from mmjax.config import load_config
    from mmjax.config.schema import check_config, check_model
    from mmjax.families.two_tower import TwoTowerFamily, contrastive_terms
    from mmjax.models.text import TextEncoder
    from mmjax.models.two_tower import TwoTower
    from mmjax.perf.bench import random_batch
    from mmjax.train.step import build_trainer

    class NormPenaltyFamily(TwoTowerFamily):
        name = "two_tower_norm"
        objectives = ("softmax_contrastive", "norm")

        def losses(self, model, params, batch, objectives, rng):
            out = self.apply(model, params, *self.model_inputs(model, batch), rng=rng)
            terms, extra = contrastive_terms(out, objectives)
            if "norm" in objectives:
                zimg = model.apply({"params": params}, batch["image"], method="encode_image")
                terms["norm"] = jnp.mean(jnp.sum(zimg ** 2, -1))
            return terms, extra

    saved = [dict(t) for t in (families.FAMILIES, models.MODELS, models.SUBMODULES)]
    try:
        registry.register_family(NormPenaltyFamily(), TwoTower,
                                 {"image": "tower", "text": TextEncoder})
        with pytest.raises(ConfigError, match="registered already"):
            registry.register_family(NormPenaltyFamily(), TwoTower, {})
        config = load_config("clip_tiny:tiny").copy_and_resolve_references()
        config.unlock()
        config.model.name = "two_tower_norm"
        config.objectives = {"softmax_contrastive": 1.0, "norm": 0.5}
        check_config(config)
        check_model(config)
        trainer = build_trainer(config, jax.devices()[:1])
        assert trainer.family.name == "two_tower_norm"
        state = trainer.init_state(0)
        batch = random_batch(config, trainer.batch_sharding)
        _, metrics = trainer.step(state, batch)
        m = jax.device_get(metrics)
        assert set(m) >= {"loss/softmax_contrastive", "loss/norm"}
        np.testing.assert_allclose(m["loss"], m["loss/softmax_contrastive"] + 0.5 * m["loss/norm"],
                                   rtol=1e-5)
    finally:
        for table, old in zip((families.FAMILIES, models.MODELS, models.SUBMODULES), saved):
            table.clear()
            table.update(old)
