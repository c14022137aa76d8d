"""Import Hugging Face Audio Spectrogram Transformer checkpoints (`ASTModel`,
`ASTForAudioClassification`) as an `mmjax.models.ast.AST` tower.

    model, variables = load_ast("/ckpt/ast-finetuned-audioset-10-10-0.4593")
    pooled, tokens = model.apply(variables, spectrogram)  # [B, max_length, num_mel_bins]
    pooled, tokens = model.apply(variables, waveform)     # [B, model.num_samples], 16 kHz

`pooled` is `ASTModel`'s `pooler_output` (mean of the class and distillation
tokens) and `tokens` its `last_hidden_state`. Both key layouts are read: the
one `transformers` 5 writes (`layers.{i}.attention.q_proj`, ...) and the
older one of the published checkpoints (`encoder.layer.{i}.attention.attention.query`,
...), with or without the `audio_spectrogram_transformer.` prefix of the
classification model (whose classifier head is not imported). As everywhere
in `mmjax.convert`, only safetensors are read (no pickle).

The waveform front end of the returned tower approximates the Kaldi fbank of
`ASTFeatureExtractor` (see `mmjax.models.ast`); for exact features of a
checkpoint, compute them with its feature extractor and pass the spectrogram.
"""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from mmjax.convert.hf import _act
from mmjax.convert.rules import (Rule, _heads_out, _linear, _norm, _qkv, apply_rules,
                                 check_params, read_hf_checkpoint)
from mmjax.errors import ConvertError
from mmjax.models.ast import AST
from mmjax.models.layers import stack_layer_params

_PREFIX = "audio_spectrogram_transformer."
# Older layout (the published checkpoints) -> the layout transformers 5 writes.
_LEGACY = [
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.query\.", r"layers.\1.attention.q_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.key\.", r"layers.\1.attention.k_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.value\.", r"layers.\1.attention.v_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.o_proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.mlp.fc2."),
    (r"^encoder\.layer\.(\d+)\.", r"layers.\1."),
]


def _normalize_keys(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strip the classification model's prefix (dropping its head) and rename the
    older key layout to the current one."""
    if any(k.startswith(_PREFIX) for k in state):
        state = {k[len(_PREFIX):]: v for k, v in state.items() if k.startswith(_PREFIX)}
    out = {}
    for k, v in state.items():
        for pattern, repl in _LEGACY:
            k, n = re.subn(pattern, repl, k)
            if n:
                break
        out[k] = v
    return out


def _int_patch(config: dict, path: str) -> int:
    p = config.get("patch_size", 16)
    if isinstance(p, (list, tuple)):
        if len(set(p)) != 1:
            raise ConvertError(f"{path}: non-square patch_size {p} in config.json; mmjax's AST "
                               "takes square patches.")
        p = p[0]
    return int(p)


def ast_model(config: dict, *, scan: bool = False, dtype=jnp.float32, path: str = "config",
              **overrides) -> AST:
    """The `AST` tower of a Hugging Face `ASTConfig` dict (Transformer sizes,
    patching, `max_length` frames; front end at 16 kHz with a 10 ms hop and
    `clip_seconds` such that a clip gives exactly `max_length` frames).
    `overrides` replace fields (e.g. `embed_dim`, `pool`, `clip_seconds`)."""
    if config.get("head_dim") not in (None, config["hidden_size"] // config["num_attention_heads"]):
        raise ConvertError(f"{path}: head_dim {config['head_dim']} != hidden_size / "
                           "num_attention_heads is not supported.")
    max_length = int(config.get("max_length", 1024))
    hop, sr = 160, 16000
    fields = dict(sample_rate=sr, clip_seconds=(max_length - 1) * hop / sr, hop_length=hop,
                  n_mels=int(config.get("num_mel_bins", 128)), max_length=max_length,
                  patch_size=_int_patch(config, path),
                  frequency_stride=int(config.get("frequency_stride", 10)),
                  time_stride=int(config.get("time_stride", 10)),
                  width=config["hidden_size"], depth=config["num_hidden_layers"],
                  heads=config["num_attention_heads"],
                  mlp_dim=config.get("intermediate_size", 4 * config["hidden_size"]),
                  act=_act(config.get("hidden_act", "gelu")),
                  norm_eps=config.get("layer_norm_eps", 1e-12), pool="cls_dist",
                  embed_dim=None, scan=scan, dtype=dtype)
    return AST(**{**fields, **overrides})


def _ast_rules(config: dict) -> list[Rule]:
    d, heads = config["hidden_size"], config["num_attention_heads"]
    emb = "embeddings."
    rules = [Rule(emb + "cls_token", ("cls",), lambda x: x.reshape(d)),
             Rule(emb + "distillation_token", ("dist",), lambda x: x.reshape(d)),
             Rule(emb + "position_embeddings", ("posemb", "embedding"),
                  lambda x: x.reshape(x.shape[-2:])),
             # torch Conv2d [D, 1, p (freq), p (time)] -> [p (freq), p (time), D]
             Rule(emb + "patch_embeddings.projection.weight", ("patch_kernel",),
                  lambda w: w[:, 0].transpose(1, 2, 0)),
             Rule(emb + "patch_embeddings.projection.bias", ("patch_bias",)),
             *_norm("layernorm", ("ln_post",))]
    for i in range(config["num_hidden_layers"]):
        hf, p = f"layers.{i}", (f"layers_{i}",)
        rules += (_qkv(f"{hf}.attention", p + ("attn",), heads, ("q_proj", "k_proj", "v_proj"))
                  + _heads_out(f"{hf}.attention.o_proj", p + ("attn", "out"), heads)
                  + _norm(f"{hf}.layernorm_before", p + ("norm1",))
                  + _norm(f"{hf}.layernorm_after", p + ("norm2",))
                  + _linear(f"{hf}.mlp.fc1", p + ("mlp", "fc1"))
                  + _linear(f"{hf}.mlp.fc2", p + ("mlp", "fc2")))
    return rules


def load_ast(path: str, *, scan: bool = False, dtype=jnp.float32, **overrides
             ) -> tuple[AST, dict]:
    """Load a Hugging Face AST folder (config.json + *.safetensors) -> `(AST, variables)`.

    `scan=True` returns the scanned layout (same numbers); `dtype` is the
    compute dtype (parameters stay float32); `overrides` replace tower fields
    (see `ast_model`). A checkpoint whose shapes do not match its config
    raises `ConvertError` naming each parameter and both shapes.
    """
    config, state = read_hf_checkpoint(path)
    model = ast_model(config, scan=scan, dtype=dtype, path=path, **overrides)
    state = _normalize_keys(state)
    if not config.get("qkv_bias", True):  # mmjax attention always has q/k/v biases
        d = config["hidden_size"]
        for i in range(config["num_hidden_layers"]):
            for name in ("q_proj", "k_proj", "v_proj"):
                state.setdefault(f"layers.{i}.attention.{name}.bias", np.zeros(d, np.float32))
    params = apply_rules(_ast_rules(config), state, path)
    if scan:
        params = stack_layer_params(params, config["num_hidden_layers"])
    sample = jnp.zeros((1, model.frames, model.n_mels), jnp.float32)
    return model, {"params": check_params(model, params, sample, source=path)}
