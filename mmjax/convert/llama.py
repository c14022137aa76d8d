"""Import Hugging Face `LlamaForCausalLM` checkpoints into `mmjax.models.lm.DecoderLM`.

    model, variables = load_llama("/ckpt/llama")            # save_pretrained folder
    logits = model.apply(variables, ids)                       # int32 [B, L] -> [B, L, V]
    tokens = generate(model, variables, prompts, lengths, 32)  # mmjax.models.lm.generate

Safetensors only (see `mmjax.convert.rules.read_hf_checkpoint`). Plain RoPE only:
a `rope_scaling` / `rope_parameters` other than the default type is refused.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from mmjax.convert import rules as rules_lib
from mmjax.errors import ConvertError
from mmjax.models.layers import stack_layer_params
from mmjax.models.lm import DecoderLM

SUPPORTED_MODEL_TYPES = ("llama",)


def _rope_theta(config: dict, path: str) -> float:
    """RoPE base from config.json, refusing scaled variants (transformers 4 and 5 layouts)."""
    for key in ("rope_scaling", "rope_parameters"):
        spec: Optional[dict] = config.get(key)
        if not spec:
            continue
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind not in (None, "default"):
            raise ConvertError(f"{path}/config.json: `{key}` has rope type {kind!r}; mmjax's "
                               "DecoderLM implements plain RoPE only (rope_type 'default'). "
                               "Use a checkpoint without RoPE scaling.")
    params = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    return float(theta)


def llama_model_kwargs(config: dict, path: str = "checkpoint") -> dict:
    """`DecoderLM` fields from a Hugging Face Llama config.json dict."""
    model_type = config.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConvertError(f"{path}/config.json: model_type {model_type!r} is not supported by "
                           f"load_llama (supported: {SUPPORTED_MODEL_TYPES}).")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key, False):
            raise ConvertError(f"{path}/config.json: `{key}` is true; DecoderLM has no biases "
                               "in attention or MLP projections.")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConvertError(f"{path}/config.json: hidden_act {act!r}; DecoderLM's MLP is SwiGLU "
                           "(hidden_act 'silu').")
    heads = config["num_attention_heads"]
    return dict(vocab_size=config["vocab_size"], width=config["hidden_size"],
                depth=config["num_hidden_layers"], num_heads=heads,
                num_kv_heads=config.get("num_key_value_heads") or heads,
                head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                mlp_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-6),
                rope_theta=_rope_theta(config, path),
                max_len=config.get("max_position_embeddings", 2048),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)))


def _llama_rules(kw: dict) -> list:
    """HF tensor name <-> unrolled `DecoderLM` parameter path."""
    Rule, linear, norm, heads_in = rules_lib.Rule, rules_lib._linear, rules_lib._norm, \
        rules_lib._heads_in
    h, hkv, k = kw["num_heads"], kw["num_kv_heads"], kw["head_dim"]
    rules = [Rule("model.embed_tokens.weight", ("token_embedding", "embedding")),
             *norm("model.norm", ("final_norm",), bias=False)]
    if not kw["tie_embeddings"]:
        rules += linear("lm_head", ("lm_head",), bias=False)
    for i in range(kw["depth"]):
        hf, p = f"model.layers.{i}", (f"layers_{i}",)
        attn = p + ("attn",)
        rules += (heads_in(f"{hf}.self_attn.q_proj", attn + ("query",), h, bias=False)
                  + heads_in(f"{hf}.self_attn.k_proj", attn + ("key",), hkv, bias=False)
                  + heads_in(f"{hf}.self_attn.v_proj", attn + ("value",), hkv, bias=False)
                  # torch Linear [D, H*K] -> [H, K, D]
                  + [Rule(f"{hf}.self_attn.o_proj.weight", attn + ("out", "kernel"),
                          lambda w: w.T.reshape(h, k, w.shape[0]),
                          lambda x: x.reshape(-1, x.shape[-1]).T)]
                  + linear(f"{hf}.mlp.gate_proj", p + ("mlp", "gate"), bias=False)
                  + linear(f"{hf}.mlp.up_proj", p + ("mlp", "fc1"), bias=False)
                  + linear(f"{hf}.mlp.down_proj", p + ("mlp", "fc2"), bias=False)
                  + norm(f"{hf}.input_layernorm", p + ("attn_norm",), bias=False)
                  + norm(f"{hf}.post_attention_layernorm", p + ("mlp_norm",), bias=False))
    return rules


def load_llama(path: str, *, scan: bool = False, dtype=jnp.float32) -> tuple[DecoderLM, dict]:
    """Load a Hugging Face `LlamaForCausalLM` `save_pretrained` folder -> `(DecoderLM, variables)`.

    Args:
      path: folder with config.json and *.safetensors.
      scan: build the model with `nn.scan` over layers (params stacked).
      dtype: compute dtype; parameters are float32.
    Tied checkpoints (`tie_word_embeddings`) carry no `lm_head.weight`; the
    model then projects with the token embedding.
    """
    config, state = rules_lib.read_hf_checkpoint(path)
    kw = llama_model_kwargs(config, path)
    model = DecoderLM(**kw, scan=scan, dtype=dtype)
    params = rules_lib.apply_rules(_llama_rules(kw), state, path)
    if scan:
        params = stack_layer_params(params, kw["depth"])
    sample = np.zeros((1, 1), np.int32)
    return model, {"params": rules_lib.check_params(model, params, sample, source=path)}
