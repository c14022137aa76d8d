"""FLOP counts (`Family.train_flops`, the towers' token counts) against the programs.

The reference is the matmuls of the real train step: each `:tiny` recipe's
`Trainer` (one CPU device) is lowered with abstract inputs, and its StableHLO,
before XLA optimizes it, lists every matmul as a `stablehlo.dot_general`
(JAX has already dropped results nothing uses; XLA would still merge repeated
work, e.g. BLIP-2's ITG pass recomputing the image keys/values of ITC's, which
the model does compute). A dot costs 2 x prod(output shape) x prod(contracted
dims); functions count once per call. The recipes' `scan` and `remat` (of
`model` and of each of its sections) are switched off first, which changes no
model FLOP: scanned layers sit in `while` bodies (the counter refuses matmuls
inside any region, called from one included, rather than guess trip counts) and
rematerialization recomputes forward matmuls, which MFU leaves out.

The formula and the program are compared like with like:
- causal attention: the formula counts half (`flops.CAUSAL_ATTENTION`, the
  MaxText / PaLM convention: the masked half is no model work); XLA computes
  the whole score matrix. The expected count is the formula with
  `CAUSAL_ATTENTION = 1`, every other term unchanged.
- a trained media tower: the formula counts 3 x `forward_flops`; the program
  computes no gradient with respect to the raw media (patch embedding: dW
  only; AST's mel filterbank, which has no parameters: neither). That
  difference is measured on the tower alone (3 x its forward minus its loss
  and parameter gradients, as the step computes them) and taken off.
- a loss's own matmuls (VQA's soft targets: one-hot answers x scores) are no
  model work: the formula leaves them out, the expected count adds them.
The counts then agree exactly; a formula that counts a block too many or too
few times (a Q-Former layer, an ITM pass, a frozen part's gradients) misses
them by more than the 2% allowed.
"""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax.config.loading import load_config
from mmjax.families import get_family, model_train_flops
from mmjax.models import flops
from mmjax.models.ast import AST
from mmjax.models.video import VideoViT
from mmjax.models.vit import ViT
from mmjax.train.step import build_trainer, unmasked_config

RECIPES = ["blip2_stage1:tiny", "blip2_stage2:tiny", "llava:tiny", "coca_b16:tiny", "clip_tiny:tiny",
           "lit_b16:tiny", "siglip_b16:tiny", "clap_tiny:tiny", "video_clip_tiny:tiny",
           "one_tower_tiny:tiny", "one_tower_tiny:shared,tiny", "one_tower_tiny:vqa,tiny",
           "vilt_b32:tiny", "vilt_b32:vqa,tiny", "vlmo_base:tiny"]

_FUNC = re.compile(r"^\s*func\.func (?:public |private )?@([\w.$-]+)")
_CALL = re.compile(r"(?<![\w.])(?:func\.)?call @([\w.$-]+)")
_DOT_TYPES = re.compile(r":\s*\((tensor<[^>]*>),\s*tensor<[^>]*>\)\s*->\s*(tensor<[^>]*>)")


def _dims(tensor_type: str) -> list[int]:
    """`tensor<8x4x16xbf16>` -> [8, 4, 16]."""
    return [int(d) for d in tensor_type[len("tensor<"):-1].split("x")[:-1]]


def matmul_flops(stablehlo: str) -> int:
    """Matmul FLOPs of a lowered module's `main`: 2 x prod(output) x prod(contracted
    dims) per `stablehlo.dot_general`, each function counted once per call."""
    funcs, body, depth = {}, None, 0
    for line in stablehlo.splitlines():
        m = _FUNC.match(line)
        if m:
            body = funcs.setdefault(m.group(1), {"flops": 0, "calls": [], "region_calls": []})
            depth = 0
        if body is None:
            continue
        if "stablehlo.dot_general" in line:
            assert depth == 1, f"a matmul inside a region (loop? cond?): {line.strip()[:160]}"
            lhs, out = map(_dims, _DOT_TYPES.search(line).groups())
            dims = re.search(r"contracting_dims = \[([0-9, ]*)\] x", line).group(1)
            contracted = [lhs[int(i)] for i in dims.split(",") if i.strip()]
            body["flops"] += 2 * int(np.prod(out)) * int(np.prod(contracted))
        assert not re.search(r"stablehlo\.(dot|convolution)\b(?!_)", line), line.strip()[:160]
        body["calls" if depth == 1 else "region_calls"] += _CALL.findall(line)
        depth += line.count("{") - line.count("}")

    def total(name):
        for c in funcs[name]["region_calls"]:  # e.g. a scanned body, outlined
            assert total(c) == 0, f"a call with matmuls inside a region (loop? cond?): @{c}"
        return funcs[name]["flops"] + sum(total(c) for c in funcs[name]["calls"])
    return total("main")


def _unrolled_config(spec: str, overrides=()) -> ml_collections.ConfigDict:
    """The recipe with every `scan` off and `remat` "none" (see the module docstring)."""
    config = load_config(spec, overrides)
    for section in (config.model, *config.model.values()):  # the model's own, e.g. OneTower's
        if isinstance(section, ml_collections.ConfigDict):
            if "scan" in section:
                section.scan = False
            if "remat" in section:
                section.remat = "none"
    return config


def _tower_raw_input_flops(trainer) -> float:
    """Per example: 3 x the forward matmul FLOPs of the step's media tower minus those of
    its loss and parameter gradients (`value_and_grad`, as in the step): the gradients
    no program computes, of its matmuls on the raw media."""
    model = trainer.model.apply({"params": trainer.abstract_state["params"]},
                                method=lambda m: m.image_tower.clone(parent=None))
    shape, _ = trainer.family.media_example(trainer.config)
    x = jax.ShapeDtypeStruct((1,) + tuple(shape), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]

    def loss(p, media):
        return sum(jnp.sum(y.astype(jnp.float32)) for y in model.apply({"params": p}, media)
                   if y is not None)
    forward = matmul_flops(jax.jit(loss).lower(params, x).as_text())
    train = matmul_flops(jax.jit(jax.value_and_grad(loss)).lower(params, x).as_text())
    return 3 * forward - train


def _loss_matmuls(config, shapes) -> int:
    """Matmuls of the losses, not of the model (no formula counts them): VQA's soft
    targets (`losses.vqa_targets`), an einsum of the one-hot answer ids `[B, Q, K, A]`
    with their scores, 2 x B x Q x K x A."""
    if "vqa" not in config.objectives:
        return 0
    return 2 * int(np.prod(shapes["answer_ids"].shape)) * len(config.model.answers)


def _check_train_flops(config, monkeypatch, unmasked=False):
    """`model_train_flops` of `config` (of the unmasked tail's model with `unmasked`)
    against the matmuls of its lowered train step, like with like (module docstring)."""
    trainer = build_trainer(config, jax.devices()[:1])
    batch = int(config.batch_size)
    family = get_family(config)
    shapes = {k: jax.ShapeDtypeStruct(s, d, sharding=trainer.batch_sharding)
              for k, (s, d) in family.batch_spec(config, batch).items()}
    program = matmul_flops(trainer.lower(shapes, unmasked=unmasked).as_text())

    frozen = tuple(config.optim.get("freeze") or ())
    monkeypatch.setattr(flops, "CAUSAL_ATTENTION", 1.0)
    # `Family.step_flops`: objectives, questions
    expected = model_train_flops(unmasked_config(config) if unmasked else config)
    if "image_tower" not in frozen:
        expected -= batch * _tower_raw_input_flops(trainer)
    expected += _loss_matmuls(config, shapes)
    assert expected == pytest.approx(program, rel=0.02)
    return program


@pytest.mark.parametrize("spec", RECIPES)
def test_train_flops_match_the_matmuls_of_the_train_step(spec, monkeypatch):
    """`model_train_flops` of the recipe (its family's `step_flops`, which passes what
    else the formula reads: one-tower objectives and VQA questions) = the matmul FLOPs
    of its jitted train step, like with like (module docstring)."""
    _check_train_flops(_unrolled_config(spec), monkeypatch)


def test_train_flops_follow_the_patches_patch_dropout_keeps(monkeypatch):
    """With `model.image.patch_dropout=0.75` the formula counts the kept patches as the
    lowered step computes them, and the unmasked tail's step every patch: each within 2%
    of its program. (The families' formulas take the kept count from the towers'
    `num_tokens`, which the tower cases below check against a training call.)"""
    config = _unrolled_config("clip_tiny:tiny", ["model.image.patch_dropout=0.75",
                                                 "unmasked_tuning_steps=1"])
    masked = _check_train_flops(config, monkeypatch)
    full = _check_train_flops(config, monkeypatch, unmasked=True)
    assert masked < 0.8 * full


def _data(cfg: dict) -> ml_collections.ConfigDict:
    """`data.train` keys the towers' `example_input` reads, matching `cfg`."""
    return ml_collections.ConfigDict(dict(
        image_size=cfg.get("image_size", 0), output="float32", num_frames=cfg.get("num_frames", 0),
        sample_rate=cfg.get("sample_rate", 16000), clip_seconds=cfg.get("clip_seconds", 10.0)))


def _case(cls, marks=(), **fields):
    pd = "-patch_dropout" if fields.get("patch_dropout") else ""
    return pytest.param(cls, fields, marks=marks, id=f"{cls.__name__}-{fields['pool']}{pd}")


TOWER_CASES = [
    _case(ViT, pool="cls"), _case(ViT, pool="gap", embed_dim=16), _case(ViT, pool="map"),
    _case(ViT, pool="none", act="swiglu"),
    _case(AST, pool="cls_dist", embed_dim=16), _case(AST, pool="none"),
    _case(VideoViT, pool="gap", temporal="transformer", num_frames=3),
    _case(VideoViT, pool="cls", embed_dim=16, temporal="mean", num_frames=3),
    _case(VideoViT, pool="none", temporal="transformer", num_frames=3),
    _case(VideoViT, pool="gap", temporal="transformer", num_frames=3, act="swiglu"),
    # a training call (with an "augment" rng) keeps 1 - patch_dropout of the patches
    _case(ViT, pool="cls", patch_dropout=0.5), _case(AST, pool="cls_dist", patch_dropout=0.5),
    _case(VideoViT, pool="none", temporal="mean", num_frames=3, patch_dropout=0.5),
]


@pytest.mark.parametrize("cls,fields", TOWER_CASES)
def test_tower_tokens_and_forward_flops_match_the_module(cls, fields):
    """`num_tokens` / `token_width` are the shape of `tokens [B, N, D]` that a training
    call of `__call__` (with an "augment" rng) returns, and `forward_flops` the matmuls
    of its forward (pooled output included)."""
    cfg = {**fields, **cls.tiny(fields)}
    model = cls(**cfg)
    shape, _ = cls.example_input(cfg, _data(cfg))
    x = jax.ShapeDtypeStruct((2,) + tuple(shape), jnp.float32)
    rngs = {"params": jax.random.key(0), "augment": jax.random.key(1)}
    (pooled, tokens), variables = jax.eval_shape(lambda x: model.init_with_output(rngs, x), x)
    assert tokens.shape == (2, cls.num_tokens(cfg), cls.token_width(cfg))
    assert (pooled is None) == (cfg["pool"] == "none")

    def forward(v, media):
        return [y for y in model.apply(v, media, rngs={"augment": jax.random.key(1)})
                if y is not None]
    one = jax.ShapeDtypeStruct((1,) + tuple(shape), jnp.float32)
    program = matmul_flops(jax.jit(forward).lower(variables, one).as_text())
    assert cls.forward_flops(cfg) == pytest.approx(program, rel=1e-6)
