"""Hugging Face checkpoint reading and the (HF key, mmjax path, transform) tables.

Shared by the converters in `mmjax.convert.hf` (CLIP, SigLIP, BLIP-2) and
`mmjax.convert.llama`: a table of `Rule`s is applied to a state dict to get
mmjax params, or read backwards to export them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConvertError


# ----------------------------------------------------------------------------
# Reading checkpoints
# ----------------------------------------------------------------------------

def read_hf_checkpoint(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """`(config, state_dict)` from a `save_pretrained` directory (safetensors only)."""
    from safetensors.numpy import load_file

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory; expected a Hugging Face "
                                "`save_pretrained` folder with config.json and *.safetensors.")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{cfg_file}: missing; expected a `save_pretrained` folder.")
    with open(cfg_file, encoding="utf-8") as f:
        config = json.load(f)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        pickled = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
        hint = (f" Found {pickled}: mmjax does not load pickled weights; re-save with "
                "`model.save_pretrained(path, safe_serialization=True)`.") if pickled else ""
        raise FileNotFoundError(f"{path}: no *.safetensors weights.{hint}")
    state: dict[str, np.ndarray] = {}
    for fname in files:
        for k, v in load_file(os.path.join(path, fname)).items():
            state[k] = np.asarray(v, dtype=np.float32) if v.dtype != np.float32 else v
    return config, state


# ----------------------------------------------------------------------------
# The mapping table
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """One tensor: HF key <-> mmjax path, with forward/backward transforms."""
    hf: str
    path: tuple[str, ...]
    to_jax: Callable[[np.ndarray], np.ndarray] = lambda x: x
    to_hf: Callable[[np.ndarray], np.ndarray] = lambda x: x


def _linear(hf: str, path: tuple, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{hf}.weight", path + ("kernel",), lambda w: w.T, lambda k: k.T)]
    if bias:
        rules.append(Rule(f"{hf}.bias", path + ("bias",)))
    return rules


def _norm(hf: str, path: tuple, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{hf}.weight", path + ("scale",))]
    if bias:
        rules.append(Rule(f"{hf}.bias", path + ("bias",)))
    return rules


def _heads_in(hf: str, path: tuple, heads: int, bias: bool = True) -> list[Rule]:
    """torch Linear [H*K, Din] -> DenseGeneral kernel [Din, H, K]."""
    def fwd(w):
        return w.T.reshape(w.shape[1], heads, w.shape[0] // heads)

    def bwd(k):
        return k.reshape(k.shape[0], -1).T
    rules = [Rule(f"{hf}.weight", path + ("kernel",), fwd, bwd)]
    if bias:
        rules.append(Rule(f"{hf}.bias", path + ("bias",), lambda b: b.reshape(heads, -1),
                          lambda b: b.reshape(-1)))
    return rules


def _heads_out(hf: str, path: tuple, heads: int) -> list[Rule]:
    """torch Linear [Dout, H*K] -> DenseGeneral kernel [H, K, Dout]."""
    return [Rule(f"{hf}.weight", path + ("kernel",),
                 lambda w: w.T.reshape(heads, w.shape[1] // heads, w.shape[0]),
                 lambda k: k.reshape(-1, k.shape[-1]).T),
            Rule(f"{hf}.bias", path + ("bias",))]


def _qkv(hf: str, path: tuple, heads: int, names=("q_proj", "k_proj", "v_proj")) -> list[Rule]:
    return [r for hf_name, ours in zip(names, ("query", "key", "value"))
            for r in _heads_in(f"{hf}.{hf_name}", path + (ours,), heads)]


def _attention(hf: str, path: tuple, heads: int) -> list[Rule]:
    """CLIP/SigLIP attention (q/k/v/out_proj) -> `mmjax.models.layers.Attention`."""
    return _qkv(hf, path, heads) + _heads_out(f"{hf}.out_proj", path + ("out",), heads)


def _pre_norm_layer(hf: str, path: tuple, heads: int) -> list[Rule]:
    """CLIP / SigLIP encoder layer -> `mmjax.models.layers.Block`."""
    return (_attention(f"{hf}.self_attn", path + ("attn",), heads)
            + _norm(f"{hf}.layer_norm1", path + ("norm1",))
            + _norm(f"{hf}.layer_norm2", path + ("norm2",))
            + _linear(f"{hf}.mlp.fc1", path + ("mlp", "fc1"))
            + _linear(f"{hf}.mlp.fc2", path + ("mlp", "fc2")))


def _two_tower_layers(config: dict) -> list[Rule]:
    """Encoder layers of both towers of a CLIP-layout checkpoint (CLIP, SigLIP)."""
    rules = []
    for hf_tower, ours, cfg in (("vision_model", "image_tower", config["vision_config"]),
                                ("text_model", "text_tower", config["text_config"])):
        for i in range(cfg["num_hidden_layers"]):
            rules += _pre_norm_layer(f"{hf_tower}.encoder.layers.{i}", (ours, f"layers_{i}"),
                                     cfg["num_attention_heads"])
    return rules


def _patch(hf: str, path: tuple) -> Rule:
    """torch Conv2d [D, 3, p, p] -> mmjax patch kernel [p, p, 3, D]."""
    return Rule(hf, path, lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))


def apply_rules(rules: list[Rule], state: dict[str, np.ndarray], source: str) -> dict:
    """HF state dict -> nested mmjax params via `rules` (errors name missing keys)."""
    missing = [r.hf for r in rules if r.hf not in state]
    if missing:
        raise ConvertError(f"{source}: checkpoint lacks {len(missing)} expected tensors, e.g. "
                           f"{missing[:5]}; is this the right architecture?")
    flat = {r.path: np.asarray(r.to_jax(state[r.hf]), np.float32) for r in rules}
    return flax.traverse_util.unflatten_dict(flat)


def export_rules(rules: list[Rule], params: dict) -> dict[str, np.ndarray]:
    """Nested mmjax params -> HF state dict via `rules`."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    return {r.hf: np.array(r.to_hf(np.asarray(flat[r.path])), np.float32, order="C")
            for r in rules}


# ----------------------------------------------------------------------------
# Shape checking against the model built from config
# ----------------------------------------------------------------------------

def check_params(model: Any, params: dict, *init_args, source: str = "checkpoint") -> dict:
    """Verify `params` has exactly the structure and shapes `model.init` would create.

    Raises ValueError naming every mismatching parameter path with both shapes
    (checkpoint vs. config), and the missing / unexpected paths.
    """
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), *init_args))["params"]
    expected = flax.traverse_util.flatten_dict(flax.linen.meta.unbox(expected))
    got = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    problems = []
    for k in sorted(set(expected) | set(got)):
        name = "/".join(k)
        if k not in got:
            problems.append(f"{name}: missing from {source} (config expects {tuple(expected[k].shape)})")
        elif k not in expected:
            problems.append(f"{name}: in {source} but not in the model built from config")
        elif tuple(got[k].shape) != tuple(expected[k].shape):
            problems.append(f"{name}: {source} has shape {tuple(got[k].shape)}, "
                            f"config expects {tuple(expected[k].shape)}")
    if problems:
        raise ConvertError(f"{source} does not match the model config ({len(problems)} "
                           "problems):\n  " + "\n  ".join(problems[:20]))
    return jax.tree.map(jnp.asarray, params)
