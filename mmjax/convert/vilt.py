"""Import Hugging Face ViLT checkpoints (`ViltModel`, `ViltForMaskedLM`,
`ViltForQuestionAnswering`) as an `mmjax.models.OneTower` (shared experts).

    model, variables = load_vilt("/ckpt/vilt-b32-mlm")
    tokens = model.apply(variables, images, method="image_tokens")     # NHWC float32
    seq = model.apply(variables, tokens, ids, method="fuse")           # [B, L + N, D]
    pooled = model.apply(variables, seq, method="pooled")              # [B, D]
    logits = model.apply(variables, tokens, masked_ids, method="mlm_logits")  # [B, L, V]
    answers = model.apply(variables, images, ids, method="vqa_logits")  # [B, A]

`images` are `[B, S, S, 3]` float32 with S = `config.image_size` (normalized as
`ViltImageProcessor` does), `ids` int `[B, L]` (L <= max_position_embeddings,
BERT ids, padded with `pad_token_id`; pad keys are masked). `seq` is
`ViltModel`'s `last_hidden_state` (text first) and `pooled` its
`pooler_output`, except that `ViltModel` shuffles the patch tokens (with their
position embeddings) at random: text tokens, the class token and every head
are invariant, the patch tokens equal up to that permutation.

What the folder holds decides the heads (`architectures` in config.json, and
the tensors): the masked-LM head (`mlm_dense`, `mlm_norm`, `mlm_bias`; the
decoder weight is tied to the word embeddings) from `ViltForMaskedLM`, the VQA
classifier (`vqa_fc1`, `vqa_norm`, `vqa_fc2`; `model.answers` = `id2label` in id
order) from `ViltForQuestionAnswering`. Parameters the folder lacks (always the
ITM head `itm_head`: `transformers` has no ViLT ITM model; the MLM head of a
non-MLM folder; the pooler of `ViltModel(add_pooling_layer=False)`) keep their
random `model.init` values; `load_vilt` logs their paths.

BERT's token-type embedding of the text (type 0; mmjax has no token types)
is folded into the text position embeddings before their LayerNorm, so import
is exact but there is no export. As everywhere in `mmjax.convert`, only
safetensors are read (no pickle).

`load_vilt_source` is the `config.init` source kind `hf_vilt:PATH`
(`mmjax.train.init_sources`): the checkpoint's parameters only, no random
heads, so the target model keeps its own init for what the folder lacks:

    c.init.all = "hf_vilt:/ckpt/vilt-b32-mlm"
    # or per subtree: c.init.encoder = "hf_vilt:/ckpt/vilt-b32-mlm#encoder", ...

(the `one_tower` model config must match the folder: `vilt_model(config)`'s
fields). Each entry reads the folder again.
"""
from __future__ import annotations

import logging

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.convert.hf import _act
from mmjax.convert.rules import (Rule, _heads_out, _linear, _norm, _patch, _qkv, apply_rules,
                                 check_params, read_hf_checkpoint)
from mmjax.errors import ConvertError
from mmjax.models import OneTower
from mmjax.models.layers import stack_layer_params

log = logging.getLogger("mmjax")

_PREFIX = "vilt."  # the backbone's prefix in the task models (ViltForMaskedLM, ...)
CLS_ID, SEP_ID, MASK_ID = 101, 102, 103  # BERT's (bert-base-uncased) special ids


def _square(config: dict, key: str, path: str) -> int:
    v = config[key]
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ConvertError(f"{path}/config.json: non-square {key} {v}; mmjax's ViT takes "
                               "square images and patches.")
        v = v[0]
    return int(v)


def _strip_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Backbone keys without the task models' `vilt.` prefix (heads keep their names)."""
    if not any(k.startswith(_PREFIX) for k in state):
        return state
    return {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v for k, v in state.items()}


def _has_vqa(config: dict, state: dict) -> bool:
    """A `ViltForQuestionAnswering` folder (other classifiers, e.g. NLVR2's
    `ViltForImagesAndTextClassification`, also name their head `classifier.*`)."""
    archs = config.get("architectures") or []
    if "ViltForQuestionAnswering" in archs:
        return True
    d = config["hidden_size"]
    return (not archs and "classifier.3.weight" in state
            and tuple(state.get("classifier.0.weight", np.zeros(0)).shape) == (2 * d, d))


def _answers(config: dict, state: dict, path: str) -> tuple:
    n = int(state["classifier.3.weight"].shape[0]) if "classifier.3.weight" in state \
        else int(config.get("num_labels", len(config.get("id2label") or {})))
    id2label = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    lacking = [i for i in range(n) if i not in id2label]
    if lacking:
        raise ConvertError(f"{path}/config.json: id2label lacks the answers of ids {lacking[:5]} "
                           f"(the classifier has {n} outputs).")
    return tuple(id2label[i] for i in range(n))


def vilt_model(config: dict, *, scan: bool = False, dtype=jnp.float32,
               answers: tuple = (), path: str = "config", **overrides) -> OneTower:
    """The `OneTower` of a Hugging Face `ViltConfig` dict (shared experts, BERT
    special ids: pad `pad_token_id` or 0, [CLS] 101, [SEP] 102, [MASK] 103).
    `overrides` replace model fields (e.g. `mask_id`, `special_ids`)."""
    d, heads = config["hidden_size"], config["num_attention_heads"]
    eps = config.get("layer_norm_eps", 1e-12)
    pad = config.get("pad_token_id") or 0
    image = dict(image_size=_square(config, "image_size", path),
                 patch_size=_square(config, "patch_size", path), width=d, depth=0, pool="cls",
                 posemb="learned", ln_pre=False, ln_post=False, patch_bias=True, embed_dim=None,
                 scan=False)
    text = dict(vocab_size=config["vocab_size"], max_len=config["max_position_embeddings"],
                width=d, depth=0, pool="none", norm_eps=eps, heads=heads, pad_id=pad)
    fields = dict(image=image, text=text, depth=config["num_hidden_layers"], heads=heads,
                  mlp_dim=config["intermediate_size"], act=_act(config.get("hidden_act", "gelu")),
                  norm_eps=eps, experts="shared", answers=tuple(answers), pad_id=pad,
                  mask_id=MASK_ID, special_ids=(pad, CLS_ID, SEP_ID), scan=scan, dtype=dtype)
    return OneTower(**{**fields, **overrides})


def _vilt_rules(config: dict, state: dict, path: str, vqa: bool) -> list[Rule]:
    """(HF key, mmjax path) of the tensors `state` (prefix stripped) holds."""
    d, heads = config["hidden_size"], config["num_attention_heads"]
    emb, txt, img = "embeddings.", ("text_tower",), ("image_tower",)
    tt_key = emb + "text_embeddings.token_type_embeddings.weight"
    if tt_key not in state:
        raise ConvertError(f"{path}: checkpoint lacks {tt_key!r} (the text token-type "
                           "embedding); is this a ViLT folder?")
    text_type0 = state[tt_key][0]
    rules = [Rule(emb + "text_embeddings.word_embeddings.weight",
                  txt + ("token_embedding", "embedding")),
             # The text's token type is always 0: fold its row into the positions.
             Rule(emb + "text_embeddings.position_embeddings.weight", txt + ("posemb",),
                  lambda x: x + text_type0),
             *_norm(emb + "text_embeddings.LayerNorm", txt + ("ln_final",)),
             _patch(emb + "patch_embeddings.projection.weight", img + ("patch_kernel",)),
             Rule(emb + "patch_embeddings.projection.bias", img + ("patch_bias",)),
             Rule(emb + "cls_token", img + ("cls",), lambda x: x.reshape(d)),
             Rule(emb + "position_embeddings", img + ("posemb", "embedding"),
                  lambda x: x.reshape(x.shape[-2:])),
             # Modality types: text 0, image 1 (NLVR2 checkpoints have a third row
             # for their second image, unused here).
             Rule(emb + "token_type_embeddings.weight", ("type_embedding",), lambda x: x[:2]),
             *_norm("layernorm", ("encoder", "final_norm"))]
    for i in range(config["num_hidden_layers"]):
        hf, p = f"encoder.layer.{i}", ("encoder", f"layers_{i}")
        rules += (_qkv(f"{hf}.attention.attention", p + ("attn",), heads,
                       ("query", "key", "value"))
                  + _heads_out(f"{hf}.attention.output.dense", p + ("attn", "out"), heads)
                  + _norm(f"{hf}.layernorm_before", p + ("norm1",))
                  + _norm(f"{hf}.layernorm_after", p + ("norm2",))
                  + _linear(f"{hf}.intermediate.dense", p + ("mlp", "fc1"))
                  + _linear(f"{hf}.output.dense", p + ("mlp", "fc2")))
    if "pooler.dense.weight" in state:
        rules += _linear("pooler.dense", ("pooler",))
    if "mlm_score.transform.dense.weight" in state:
        bias = next((k for k in ("mlm_score.decoder.bias", "mlm_score.bias") if k in state),
                    "mlm_score.decoder.bias")
        rules += (_linear("mlm_score.transform.dense", ("mlm_dense",))
                  + _norm("mlm_score.transform.LayerNorm", ("mlm_norm",))
                  + [Rule(bias, ("mlm_bias",))])
    if vqa:
        rules += (_linear("classifier.0", ("vqa_fc1",)) + _norm("classifier.1", ("vqa_norm",))
                  + _linear("classifier.3", ("vqa_fc2",)))
    return rules


def _sample_inputs(model: OneTower):
    s = model.image["image_size"]
    return (jnp.zeros((1, s, s, 3), jnp.float32),
            jnp.zeros((1, min(8, int(model.text["max_len"]))), jnp.int32))


def _convert(path: str, scan: bool, dtype, overrides: dict) -> tuple[OneTower, dict]:
    """`(model, checkpoint params)`: the nested params the folder holds, shapes unchecked."""
    config, state = read_hf_checkpoint(path)
    if config.get("model_type", "vilt") != "vilt":
        raise ConvertError(f"{path}/config.json: model_type is {config['model_type']!r}, "
                           "expected 'vilt'.")
    state = _strip_prefix(state)
    vqa = _has_vqa(config, state)
    model = vilt_model(config, scan=scan, dtype=dtype, path=path,
                       answers=_answers(config, state, path) if vqa else (), **overrides)
    if not config.get("qkv_bias", True):  # mmjax attention always has q/k/v biases
        for i in range(config["num_hidden_layers"]):
            for name in ("query", "key", "value"):
                state.setdefault(f"encoder.layer.{i}.attention.attention.{name}.bias",
                                 np.zeros(config["hidden_size"], np.float32))
    tied = state.get("mlm_score.decoder.weight")
    words = state.get("embeddings.text_embeddings.word_embeddings.weight")
    if tied is not None and words is not None and not np.array_equal(tied, words):
        raise ConvertError(f"{path}: mlm_score.decoder.weight differs from the word embeddings; "
                           "mmjax ties the masked-LM decoder to them (untied heads are not "
                           "supported).")
    n_img = model.image["image_size"] // model.image["patch_size"]
    max_image = config.get("max_image_length", -1)
    if isinstance(max_image, int) and 0 < max_image < n_img ** 2:
        log.warning("%s: max_image_length=%d < %d patches: transformers keeps a random subset "
                    "of the patches; mmjax uses all of them.", path, max_image, n_img ** 2)
    params = apply_rules(_vilt_rules(config, state, path, vqa), state, path)
    if scan:
        params["encoder"] = stack_layer_params(params["encoder"], config["num_hidden_layers"])
    return model, params


def _complete(model: OneTower, params: dict, init: dict, path: str) -> tuple[dict, list[str]]:
    """Checked full tree: `params` plus `init`'s leaves (initial values of at least
    the paths the checkpoint lacks) where `params` has none; and those paths
    ('/'-joined)."""
    flat = flax.traverse_util.flatten_dict(params)
    full = flax.traverse_util.flatten_dict(init)
    kept = sorted(k for k in full if k not in flat)
    tree = flax.traverse_util.unflatten_dict({**{k: full[k] for k in kept}, **flat})
    return (check_params(model, tree, *_sample_inputs(model), source=path),
            ["/".join(k) for k in kept])


def _init_heads(model: OneTower, x):
    """Touch the heads only (a cheap `init` method: compiling the whole model's
    init takes seconds)."""
    pooled = model.pooler(x)
    out = [model.itm_head(pooled), model.mlm_norm(model.mlm_dense(x))]
    if model.answers:
        out.append(model.vqa_head(pooled))
    return out


def _head_init(model: OneTower, params: dict, seed: int) -> dict:
    """`model.init(jax.random.key(seed))`'s values of the parameters `params` lacks
    (flax derives each module's initializer key from its path, so the heads alone
    get the full init's values); the full init when more than heads are lacking."""
    key = jax.random.key(seed)
    heads = jax.jit(lambda k: model.init(k, jnp.zeros((1, model.width), jnp.float32),
                                         method=_init_heads))(key)["params"]
    heads = flax.linen.meta.unbox(heads)
    have = set(flax.traverse_util.flatten_dict(params)) | set(
        flax.traverse_util.flatten_dict(heads))
    shapes = jax.eval_shape(lambda: model.init(key, *_sample_inputs(model)))["params"]
    if set(flax.traverse_util.flatten_dict(flax.linen.meta.unbox(shapes))) <= have:
        return heads
    return flax.linen.meta.unbox(jax.jit(model.init)(key, *_sample_inputs(model))["params"])


def load_vilt(path: str, *, scan: bool = False, dtype=jnp.float32, seed: int = 0,
              **overrides) -> tuple[OneTower, dict]:
    """Load a Hugging Face ViLT folder (config.json + *.safetensors) -> `(OneTower,
    variables)`.

    Parameters (mmjax path <- HF key, `vilt.` prefix of the task models dropped;
    D width, H heads, K = D / H, p patch, M intermediate size):
      text_tower/token_embedding/embedding [V, D] <- embeddings.text_embeddings.word_embeddings
      text_tower/posemb [max_len, D] <- ...text_embeddings.position_embeddings
                                        + ...text_embeddings.token_type_embeddings[0]
      text_tower/ln_final <- ...text_embeddings.LayerNorm
      image_tower/patch_kernel [p, p, 3, D], patch_bias [D] <- embeddings.patch_embeddings.projection
      image_tower/cls [D] <- embeddings.cls_token
      image_tower/posemb/embedding [N + 1, D] <- embeddings.position_embeddings
      type_embedding [2, D] <- embeddings.token_type_embeddings (text 0, image 1)
      encoder/layers_i/{norm1, norm2} <- encoder.layer.i.{layernorm_before, layernorm_after}
      encoder/layers_i/attn/{query,key,value} kernel [D, H, K], bias [H, K]
                                        <- ...attention.attention.{query,key,value}
      encoder/layers_i/attn/out kernel [H, K, D] <- ...attention.output.dense
      encoder/layers_i/mlp/fc1 [D, M], fc2 [M, D] <- ...intermediate.dense, ...output.dense
      encoder/final_norm <- layernorm;  pooler <- pooler.dense
      mlm_dense, mlm_norm, mlm_bias [V] <- mlm_score.transform.{dense, LayerNorm},
                                           mlm_score.decoder.bias (or mlm_score.bias)
      vqa_fc1 [D, 2D], vqa_norm, vqa_fc2 [2D, A] <- classifier.{0, 1, 3}

    `scan=True` returns the scanned layout (`encoder/layers` with a leading
    depth axis; same numbers). `dtype` is the compute dtype; parameters stay
    float32. Parameters the folder lacks (`itm_head` always, a head of another
    task, the pooler) keep `model.init(jax.random.key(seed))`'s values and are
    logged. `overrides` replace model fields (`vilt_model`). A checkpoint whose
    shapes do not match its config raises `ConvertError` naming each parameter.
    """
    model, params = _convert(path, scan, dtype, overrides)
    params, kept = _complete(model, params, _head_init(model, params, seed), path)
    if kept:
        log.info("%s: %d parameters keep their initial values (not in the checkpoint): %s",
                 path, len(kept), kept)
    return model, {"params": params}


def load_vilt_source(path: str, *, scan: bool = False, dtype=jnp.float32,
                     **overrides) -> tuple[OneTower, dict]:
    """`(OneTower, {"params": ...})` with only the parameters the folder holds
    (shape-checked against the model of its config): the `config.init` source
    kind `hf_vilt:PATH`, whose target keeps its own initial values for the rest
    (`mmjax.train.init_sources.IMPORTERS["hf_vilt"].keep_init`)."""
    model, params = _convert(path, scan, dtype, overrides)
    flat = flax.traverse_util.flatten_dict(params)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *_sample_inputs(model)))
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                         flax.linen.meta.unbox(shapes["params"]))
    checked, _ = _complete(model, params, zeros, path)
    checked = flax.traverse_util.flatten_dict(checked)
    return model, {"params": flax.traverse_util.unflatten_dict({k: checked[k] for k in flat})}

