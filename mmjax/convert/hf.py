"""Import (and export) Hugging Face `transformers` checkpoints.

Reads directories written by `save_pretrained` (config.json + *.safetensors);
no pickle anywhere on the load path (`pytorch_model.bin` is refused).

    model, variables = load_clip("/ckpt/clip-vit-b32")
    zimg = model.apply(variables, images, method="encode_image")   # NHWC float32
    ztxt = model.apply(variables, token_ids, method="encode_text")  # int32 [B, L]

Each converter is a table of (HF key, mmjax parameter path, transform), used
in both directions, so export is the same table read backwards.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import Blip2Stage1, TwoTower
from mmjax.models.layers import stack_layer_params
from mmjax.models.qformer import group_qformer_params
from mmjax.convert.rules import (
    Rule, _heads_out, _linear, _norm, _patch, _qkv, _two_tower_layers, apply_rules, check_params,
    export_rules, read_hf_checkpoint)
from mmjax.errors import ConvertError


# ----------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------

def _vit_fields(v: dict, *, act: str, eps: float, scan: bool, **layout) -> dict:
    """ViT fields from a Hugging Face `vision_config` (sizes, activation, eps) plus the
    family's layout (`pool`, `ln_pre`, `patch_bias`, `embed_dim`, ...)."""
    return dict(image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
                depth=v["num_hidden_layers"], heads=v["num_attention_heads"],
                mlp_dim=v["intermediate_size"], act=_act(v.get("hidden_act", act)),
                norm_eps=v.get("layer_norm_eps", eps), posemb="learned", ln_post=True,
                scan=scan, **layout)


def _text_fields(t: dict, *, act: str, eps: float, scan: bool, **layout) -> dict:
    """TextEncoder fields from a Hugging Face `text_config` plus the family's layout."""
    return dict(vocab_size=t["vocab_size"], max_len=t["max_position_embeddings"],
                width=t["hidden_size"], depth=t["num_hidden_layers"],
                heads=t["num_attention_heads"], mlp_dim=t["intermediate_size"],
                act=_act(t.get("hidden_act", act)), norm_eps=t.get("layer_norm_eps", eps),
                scan=scan, **layout)


def _clip_model(config: dict, scan: bool, dtype) -> TwoTower:
    v, t = config["vision_config"], config["text_config"]
    eos = t.get("eos_token_id", 2)
    proj = config.get("projection_dim", 512)
    image = _vit_fields(v, act="quick_gelu", eps=1e-5, scan=scan, pool="cls", ln_pre=True,
                        patch_bias=False, embed_dim=proj)
    # Causal attention already hides padding from every position up to EOS, and
    # CLIP tokenizers often pad with the EOS id itself.
    text = _text_fields(t, act="quick_gelu", eps=1e-5, scan=scan, causal=True,
                        mask_padding=False, pool="eos", eos_id=None if eos == 2 else eos,
                        pad_id=t.get("pad_token_id", 1) or 0, embed_dim=proj)
    return TwoTower(image=image, text=text, contrastive="softmax", dtype=dtype)


def _act(name: str) -> str:
    table = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
             "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu"}
    if name not in table:
        raise ConvertError(f"Unsupported hidden_act {name!r} in config.json.")
    return table[name]


def _clip_rules(config: dict) -> list[Rule]:
    img, txt = ("image_tower",), ("text_tower",)
    rules = [Rule("vision_model.embeddings.class_embedding", img + ("cls",)),
             _patch("vision_model.embeddings.patch_embedding.weight", img + ("patch_kernel",)),
             Rule("vision_model.embeddings.position_embedding.weight", img + ("posemb", "embedding")),
             *_norm("vision_model.pre_layrnorm", img + ("ln_pre",)),
             *_norm("vision_model.post_layernorm", img + ("ln_post",)),
             *_linear("visual_projection", img + ("proj",), bias=False),
             Rule("text_model.embeddings.token_embedding.weight", txt + ("token_embedding", "embedding")),
             Rule("text_model.embeddings.position_embedding.weight", txt + ("posemb",)),
             *_norm("text_model.final_layer_norm", txt + ("ln_final",)),
             *_linear("text_projection", txt + ("proj",), bias=False),
             Rule("logit_scale", ("log_scale",), lambda x: x.reshape(()), lambda x: x.reshape(()))]
    return rules + _two_tower_layers(config)


def _maybe_scan(params: dict, config_pairs: list[tuple[str, int]], scan: bool) -> dict:
    if not scan:
        return params
    params = dict(params)
    for tower, depth in config_pairs:
        params[tower] = stack_layer_params(params[tower], depth)
    return params


def _sample_inputs(model: TwoTower):
    img, txt = model.image, model.text
    return (jnp.zeros((1, img["image_size"], img["image_size"], 3), jnp.float32),
            jnp.zeros((1, txt["max_len"]), jnp.int32))


def load_clip(path: str, *, scan: bool = False, dtype=jnp.float32) -> tuple[TwoTower, dict]:
    """Load a Hugging Face `CLIPModel` folder -> `(TwoTower, variables)`.

    `scan=True` returns the scanned layout (same numbers). `dtype` is the
    compute dtype; parameters stay float32.
    """
    config, state = read_hf_checkpoint(path)
    model = _clip_model(config, scan, dtype)
    params = apply_rules(_clip_rules(config), state, path)
    params = _maybe_scan(params, [("image_tower", config["vision_config"]["num_hidden_layers"]),
                                  ("text_tower", config["text_config"]["num_hidden_layers"])], scan)
    return model, {"params": check_params(model, params, *_sample_inputs(model), source=path)}


def export_clip(model: TwoTower, variables: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """mmjax CLIP -> `(config_dict, state_dict)` for `transformers.CLIPModel`.

    Build the torch model with `CLIPModel(CLIPConfig(**config_dict))` and
    `load_state_dict({k: torch.from_numpy(v) ...})`, or call `save_clip`.
    """
    img, txt = dict(model.image), dict(model.text)
    inv_act = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
    config = {
        "projection_dim": img["embed_dim"],
        "logit_scale_init_value": math.log(1 / 0.07),
        "vision_config": dict(image_size=img["image_size"], patch_size=img["patch_size"],
                              hidden_size=img["width"], num_hidden_layers=img["depth"],
                              num_attention_heads=img["heads"],
                              intermediate_size=img.get("mlp_dim") or 4 * img["width"],
                              hidden_act=inv_act[img.get("act", "quick_gelu")],
                              layer_norm_eps=img.get("norm_eps", 1e-5),
                              projection_dim=img["embed_dim"]),
        "text_config": dict(vocab_size=txt["vocab_size"], max_position_embeddings=txt["max_len"],
                            hidden_size=txt["width"], num_hidden_layers=txt["depth"],
                            num_attention_heads=txt["heads"],
                            intermediate_size=txt.get("mlp_dim") or 4 * txt["width"],
                            hidden_act=inv_act[txt.get("act", "quick_gelu")],
                            layer_norm_eps=txt.get("norm_eps", 1e-5),
                            eos_token_id=txt["eos_id"] if txt.get("eos_id") is not None else 2,
                            pad_token_id=txt.get("pad_id", 1),
                            projection_dim=txt["embed_dim"]),
    }
    params = flax.core.unfreeze(flax.linen.meta.unbox(variables["params"]))
    from mmjax.models.layers import unstack_layer_params
    if img.get("scan"):
        params["image_tower"] = unstack_layer_params(params["image_tower"], img["depth"])
    if txt.get("scan"):
        params["text_tower"] = unstack_layer_params(params["text_tower"], txt["depth"])
    return config, export_rules(_clip_rules(config), params)


def save_clip(path: str, model: TwoTower, variables: dict) -> None:
    """Write an mmjax CLIP as a `transformers`-loadable folder (config.json + safetensors)."""
    from safetensors.numpy import save_file

    config, state = export_clip(model, variables)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_type": "clip", "architectures": ["CLIPModel"], **config}, f, indent=2)
    save_file(state, os.path.join(path, "model.safetensors"))


# ----------------------------------------------------------------------------
# SigLIP
# ----------------------------------------------------------------------------

def _siglip_rules(config: dict) -> list[Rule]:
    v = config["vision_config"]
    img, txt, head = ("image_tower",), ("text_tower",), ("image_tower", "map_head")
    d = v["hidden_size"]

    def in_proj(idx, what):
        sl = slice(idx * d, (idx + 1) * d)
        if what == "weight":
            return lambda w: w[sl].T.reshape(d, v["num_attention_heads"], -1)
        return lambda b: b[sl].reshape(v["num_attention_heads"], -1)

    rules = [_patch("vision_model.embeddings.patch_embedding.weight", img + ("patch_kernel",)),
             Rule("vision_model.embeddings.patch_embedding.bias", img + ("patch_bias",)),
             Rule("vision_model.embeddings.position_embedding.weight", img + ("posemb", "embedding")),
             *_norm("vision_model.post_layernorm", img + ("ln_post",)),
             Rule("vision_model.head.probe", head + ("probe",), lambda x: x.reshape(1, d)),
             *_heads_out("vision_model.head.attention.out_proj", head + ("attn", "out"),
                         v["num_attention_heads"]),
             *_norm("vision_model.head.layernorm", head + ("norm",)),
             *_linear("vision_model.head.mlp.fc1", head + ("mlp", "fc1")),
             *_linear("vision_model.head.mlp.fc2", head + ("mlp", "fc2")),
             Rule("text_model.embeddings.token_embedding.weight", txt + ("token_embedding", "embedding")),
             Rule("text_model.embeddings.position_embedding.weight", txt + ("posemb",)),
             *_norm("text_model.final_layer_norm", txt + ("ln_final",)),
             *_linear("text_model.head", txt + ("proj",)),
             Rule("logit_scale", ("log_scale",), lambda x: x.reshape(())),
             Rule("logit_bias", ("logit_bias",), lambda x: x.reshape(()))]
    # torch.nn.MultiheadAttention packs q, k, v into one in_proj tensor.
    for idx, name in enumerate(("query", "key", "value")):
        rules.append(Rule("vision_model.head.attention.in_proj_weight",
                          head + ("attn", name, "kernel"), in_proj(idx, "weight")))
        rules.append(Rule("vision_model.head.attention.in_proj_bias",
                          head + ("attn", name, "bias"), in_proj(idx, "bias")))
    return rules + _two_tower_layers(config)


def load_siglip(path: str, *, scan: bool = False, dtype=jnp.float32) -> tuple[TwoTower, dict]:
    """Load a Hugging Face `SiglipModel` folder -> `(TwoTower, variables)` (sigmoid head).

    The text tower attends to padding and pools the last position, as SigLIP
    does: feed ids padded to the full length with the tokenizer's pad id.
    """
    config, state = read_hf_checkpoint(path)
    v, t = config["vision_config"], config["text_config"]
    image = _vit_fields(v, act="gelu_pytorch_tanh", eps=1e-6, scan=scan, pool="map",
                        ln_pre=False, patch_bias=True, embed_dim=None)
    text = _text_fields(t, act="gelu_pytorch_tanh", eps=1e-6, scan=scan, causal=False,
                        mask_padding=False, pool="last", eos_id=t.get("eos_token_id"),
                        pad_id=t.get("pad_token_id", 1), proj_bias=True,
                        embed_dim=t.get("projection_size", t["hidden_size"]))
    model = TwoTower(image=image, text=text, contrastive="sigmoid", dtype=dtype)
    params = apply_rules(_siglip_rules(config), state, path)
    params = _maybe_scan(params, [("image_tower", v["num_hidden_layers"]),
                                  ("text_tower", t["num_hidden_layers"])], scan)
    return model, {"params": check_params(model, params, *_sample_inputs(model), source=path)}


# ----------------------------------------------------------------------------
# BLIP-2 (stage-1 image-text retrieval model: ViT + Q-Former + heads)
# ----------------------------------------------------------------------------

def _blip2_rules(config: dict) -> list[Rule]:
    v, q = config["vision_config"], config["qformer_config"]
    img, qf = ("image_tower",), ("qformer_module",)
    d = v["hidden_size"]
    rules = [Rule("vision_model.embeddings.class_embedding", img + ("cls",), lambda x: x.reshape(d)),
             _patch("vision_model.embeddings.patch_embedding.weight", img + ("patch_kernel",)),
             Rule("vision_model.embeddings.patch_embedding.bias", img + ("patch_bias",)),
             Rule("vision_model.embeddings.position_embedding", img + ("posemb", "embedding"),
                  lambda x: x.reshape(x.shape[-2:])),
             *_norm("vision_model.post_layernorm", img + ("ln_post",)),
             Rule("query_tokens", qf + ("query_tokens",), lambda x: x.reshape(x.shape[-2:])),
             Rule("embeddings.word_embeddings.weight", qf + ("word_embeddings", "embedding")),
             Rule("embeddings.position_embeddings.weight", qf + ("position_embeddings",)),
             *_norm("qformer.layernorm", qf + ("embed_norm",)),
             *_linear("vision_projection", ("vision_proj",)),
             *_linear("text_projection", ("text_proj",)),
             *_linear("itm_head", ("itm_head",))]
    hv = v["num_attention_heads"]
    for i in range(v["num_hidden_layers"]):
        hf, p = f"vision_model.encoder.layers.{i}", img + (f"layers_{i}", )
        rules += [Rule(f"{hf}.self_attn.qkv.weight", p + ("attn", name, "kernel"),
                       (lambda j: lambda w: w[j * d:(j + 1) * d].T.reshape(d, hv, -1))(j))
                  for j, name in enumerate(("query", "key", "value"))]
        rules += [Rule(f"{hf}.self_attn.qkv.bias", p + ("attn", name, "bias"),
                       (lambda j: lambda b: b[j * d:(j + 1) * d].reshape(hv, -1))(j))
                  for j, name in enumerate(("query", "key", "value"))]
        rules += (_heads_out(f"{hf}.self_attn.projection", p + ("attn", "out"), hv)
                  + _norm(f"{hf}.layer_norm1", p + ("norm1",))
                  + _norm(f"{hf}.layer_norm2", p + ("norm2",))
                  + _linear(f"{hf}.mlp.fc1", p + ("mlp", "fc1"))
                  + _linear(f"{hf}.mlp.fc2", p + ("mlp", "fc2")))
    hq = q["num_attention_heads"]
    for i in range(q["num_hidden_layers"]):
        hf, p = f"qformer.encoder.layer.{i}", qf + (f"layers_{i}",)
        bert = ("query", "key", "value")
        rules += (_qkv(f"{hf}.attention.attention", p + ("self_attn", "attn"), hq, bert)
                  + _heads_out(f"{hf}.attention.output.dense", p + ("self_attn", "attn", "out"), hq)
                  + _norm(f"{hf}.attention.output.LayerNorm", p + ("self_attn", "norm"))
                  + _linear(f"{hf}.intermediate_query.dense", p + ("ffn_query", "fc1"))
                  + _linear(f"{hf}.output_query.dense", p + ("ffn_query", "fc2"))
                  + _norm(f"{hf}.output_query.LayerNorm", p + ("ffn_query", "norm")))
        if q.get("use_qformer_text_input", False):
            rules += (_linear(f"{hf}.intermediate.dense", p + ("ffn_text", "fc1"))
                      + _linear(f"{hf}.output.dense", p + ("ffn_text", "fc2"))
                      + _norm(f"{hf}.output.LayerNorm", p + ("ffn_text", "norm")))
        if i % q.get("cross_attention_frequency", 2) == 0:
            rules += (_qkv(f"{hf}.crossattention.attention", p + ("cross_attn", "attn"), hq, bert)
                      + _heads_out(f"{hf}.crossattention.output.dense",
                                   p + ("cross_attn", "attn", "out"), hq)
                      + _norm(f"{hf}.crossattention.output.LayerNorm", p + ("cross_attn", "norm")))
    return rules


def load_blip2_qformer(path: str, *, scan: bool = False, dtype=jnp.float32,
                       dec_id: Optional[int] = None) -> tuple[Blip2Stage1, dict]:
    """Load a Hugging Face BLIP-2 stage-1 folder (`Blip2ForImageTextRetrieval`:
    ViT + Q-Former + projections + ITM head) -> `(Blip2Stage1, variables)`.

    The tied ITG LM head (BERT prediction head) is not part of the
    `transformers` model; its parameters start from the word embeddings
    (decoder) with a fresh dense/LayerNorm transform.
    The Q-Former alone: `QFormer(**model.qformer).apply(
    {"params": variables["params"]["qformer_module"]}, image_feats, text_ids)`.
    """
    config, state = read_hf_checkpoint(path)
    v, q = config["vision_config"], config["qformer_config"]
    image = _vit_fields(v, act="gelu", eps=1e-6, scan=scan, pool="cls", ln_pre=False,
                        patch_bias=True, embed_dim=None)
    qformer = dict(num_queries=config.get("num_query_tokens", 32), width=q["hidden_size"],
                   depth=q["num_hidden_layers"], heads=q["num_attention_heads"],
                   mlp_dim=q["intermediate_size"],
                   cross_attention_freq=q.get("cross_attention_frequency", 2),
                   vocab_size=q["vocab_size"], max_len=q["max_position_embeddings"],
                   act=_act(q.get("hidden_act", "gelu")), norm_eps=q.get("layer_norm_eps", 1e-12),
                   scan=scan)
    pad = q.get("pad_token_id", 0) or 0
    model = Blip2Stage1(image=image, qformer=qformer,
                        embed_dim=config.get("image_text_hidden_size", 256),
                        dec_id=q.get("bos_token_id", 1) if dec_id is None else dec_id,
                        pad_id=pad, dtype=dtype)
    params = apply_rules(_blip2_rules(config), state, path)
    # The ITG head (BERT prediction head, decoder tied to the word embeddings)
    # is not part of transformers' retrieval model: start it fresh (BERT init).
    width, rng = q["hidden_size"], np.random.default_rng(0)
    params["qformer_module"].update(
        lm_transform={"kernel": rng.normal(0, 0.02, (width, width)).astype(np.float32),
                      "bias": np.zeros(width, np.float32)},
        lm_norm={"scale": np.ones(width, np.float32), "bias": np.zeros(width, np.float32)},
        lm_bias=np.zeros(q["vocab_size"], np.float32))
    if not q.get("use_qformer_text_input", False):
        # Checkpoints without a text FFN (e.g. the Q-Former inside a stage-2
        # model): start it from the query FFN, as BLIP-2 initializes one from
        # the other.
        for i in range(q["num_hidden_layers"]):
            layer = params["qformer_module"][f"layers_{i}"]
            layer["ffn_text"] = jax.tree.map(np.copy, layer["ffn_query"])
    params["temp"] = state["temp"].reshape(()) if "temp" in state else np.float32(0.07)
    if scan:
        params["image_tower"] = stack_layer_params(params["image_tower"], v["num_hidden_layers"])
        params["qformer_module"] = group_qformer_params(
            params["qformer_module"], q["num_hidden_layers"], qformer["cross_attention_freq"])
    return model, {"params": check_params(model, params, *_blip2_inputs(model), source=path)}


def _blip2_inputs(model: Blip2Stage1):
    s = model.image["image_size"]
    return jnp.zeros((1, s, s, 3), jnp.float32), jnp.ones((1, 4), jnp.int32)


def load_llama(path: str, **kwargs):
    """Hugging Face `LlamaForCausalLM` folder -> `(DecoderLM, variables)`; see `mmjax.convert.llama`."""
    from mmjax.convert.llama import load_llama as _load
    return _load(path, **kwargs)
