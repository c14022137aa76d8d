"""Start parts of a model from other weights, and keep frozen sources out of checkpoints.

`config.init` maps a parameter prefix of the model to a source:

    c.init = {"image_tower": "workdir:/runs/blip2_s1#image_tower",
              "qformer_module": "workdir:/runs/blip2_s1#qformer_module",
              "lm_module": "hf_llama:/models/llama-1b"}

The prefix `all` takes every parameter of the model from one source (`c.init.all =
"workdir:/runs/vlmo_pt"` fine-tunes a whole pretrained model); parameters the
source lacks (a new VQA head) keep their initial values.

Source forms (`#SUBTREE` picks a '/'-separated subtree of the source's params):
  workdir:DIR[@STEP]   the params of an mmjax run (latest or given step), with
                       that run's own `init` sources filled in.
  hf_llama:PATH        `mmjax.convert.hf.load_llama` (Llama-architecture LM).
  hf_clip:PATH, hf_siglip:PATH, hf_blip2:PATH
                       the other importers of `mmjax.convert.hf`.
  hf_ast:PATH          `mmjax.convert.ast.load_ast` (a Hugging Face `ASTModel` or
                       `ASTForAudioClassification` folder): an AST audio tower,
                       e.g. `{"image_tower": "hf_ast:/models/ast-audioset"}` for
                       a two-tower model with `model.image.kind="ast"`.
  hf_vilt:PATH         `mmjax.convert.vilt.load_vilt_source` (a Hugging Face
                       `ViltModel`, `ViltForMaskedLM` or `ViltForQuestionAnswering`
                       folder; only the tensors it holds) for a `one_tower` model
                       with the folder's shapes: `{"all": "hf_vilt:PATH"}`, or one
                       entry per top-level subtree the folder holds, `{k:
                       f"hf_vilt:{PATH}#{k}"}` for "text_tower", "image_tower",
                       "type_embedding", "encoder", "pooler", plus "mlm_dense",
                       "mlm_norm", "mlm_bias" (MLM folder) or "vqa_fc1",
                       "vqa_norm", "vqa_fc2" (VQA folder). The rest (`itm_head`
                       always) keeps its init.
Every parameter under the target prefix must exist in the source with the
same shape (extra source parameters, such as a classifier head, are ignored),
except those the importer never provides (`Importer.keep_init`): hf_ast's
output projection `proj` (`model.image.embed_dim`; `ASTModel` has none). Those
keep their initial values, and are checkpointed even when frozen (no source
holds them). Values are cast to the target's dtype and placed with the
target's sharding.

Checkpoints: parameters that are frozen (`optim.freeze`) AND come from an
`init` source are not written; the checkpoint's data item records the
sources instead (`frozen_sources`), and restoring reloads them. A stage-2 run
over a frozen 7B LM thus checkpoints only the connector and its optimizer
state.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np

from mmjax import workdir as wd
from mmjax.errors import ConfigError
from mmjax.train.optimizer import cast_frozen, frozen_labels
from mmjax.train.trees import SEP, flat, nested

log = logging.getLogger("mmjax")


class InitError(ConfigError):
    """A `config.init` entry that cannot be applied (message names the key)."""


def _under(path: str, prefix: str) -> bool:
    prefix = prefix.strip(SEP)
    return path == prefix or path.startswith(prefix + SEP)


def _relative(paths, prefix: str) -> dict[str, str]:
    """`{path: path relative to prefix}` for the paths under `prefix`."""
    cut = len(prefix.strip(SEP)) + 1
    return {k: k[cut:] for k in paths if _under(k, prefix)}


def _scanned(relative_paths) -> bool:
    """True when a subtree holds its layers scanned (`.../layers/...`, not `layers_0/...`)."""
    return any("layers" in r.split(SEP)[:-1] for r in relative_paths)


# `config.init.all = SOURCE`: every parameter of the model that the source holds
# (fine-tuning a whole pretrained model; new heads keep their initial values).
ALL = "all"


def _fewer_layers(rel_path: str, src_shape, dst_shape) -> bool:
    """A scanned-stack leaf whose source has more layers (leading axis) than the target."""
    return (rel_path.startswith("layers" + SEP) and len(src_shape) == len(dst_shape) >= 1
            and tuple(src_shape[1:]) == tuple(dst_shape[1:]) and src_shape[0] > dst_shape[0])


def init_entries(config: Any) -> dict[str, str]:
    init = config.get("init") if hasattr(config, "get") else None
    if not init:
        return {}
    return {str(k): str(v) for k, v in dict(init).items()}


# ----------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Importer:
    """A source kind that converts a foreign checkpoint.

    loader: "module:function", called as `function(PATH, scan=bool)` and
      returning `(model, {"params": ...})` (the `mmjax.convert` importers).
    keep_init: paths, relative to the target prefix, of parameters the source
      never has (a head the foreign model lacks): when the source lacks them
      they keep their initial values instead of failing the load.
    """
    loader: str
    keep_init: tuple[str, ...] = ()

    def load(self) -> Callable:
        module, _, name = self.loader.partition(":")
        return getattr(importlib.import_module(module), name)

    def keeps(self, rel_path: str) -> bool:
        return any(_under(rel_path, k) for k in self.keep_init)


# The one registration of each importer kind (`config.init` values "KIND:PATH").
IMPORTERS = {
    "hf_llama": Importer("mmjax.convert.hf:load_llama"),
    "hf_clip": Importer("mmjax.convert.hf:load_clip"),
    "hf_siglip": Importer("mmjax.convert.hf:load_siglip"),
    "hf_blip2": Importer("mmjax.convert.hf:load_blip2_qformer"),
    # ASTModel has no output projection: the tower's `proj` keeps its init.
    "hf_ast": Importer("mmjax.convert.ast:load_ast", keep_init=("proj",)),
    # Only the tensors of the folder (no random heads); under a prefix above the
    # heads, those a ViLT folder may lack keep their init.
    "hf_vilt": Importer("mmjax.convert.vilt:load_vilt_source",
                        keep_init=("itm_head", "pooler", "mlm_dense", "mlm_norm", "mlm_bias",
                                   "vqa_fc1", "vqa_norm", "vqa_fc2")),
}


def _kept(spec: str, rel_path: str) -> bool:
    """Whether the source kind of `spec` never provides `rel_path` (keeps its init)."""
    importer = IMPORTERS.get(spec.partition(":")[0])
    return importer is not None and importer.keeps(rel_path)


def _parse(spec: str, key: str) -> tuple[str, str, Optional[int], str]:
    kind, sep, rest = spec.partition(":")
    if not sep or (kind != "workdir" and kind not in IMPORTERS):
        raise InitError(f"config.init.{key}={spec!r}: expected 'workdir:DIR[@STEP][#SUBTREE]' "
                        f"or '{'|'.join(IMPORTERS)}:PATH[#SUBTREE]'.")
    rest, _, subtree = rest.partition("#")
    step = None
    if kind == "workdir" and "@" in rest:
        rest, _, s = rest.rpartition("@")
        try:
            step = int(s)
        except ValueError:
            raise InitError(f"config.init.{key}={spec!r}: step after '@' must be an integer.") \
                from None
    return kind, rest, step, subtree.strip(SEP)


def restore_run_params(workdir: str, step: Optional[int] = None) -> tuple[Any, dict, int]:
    """`(config, params, step)` of an mmjax run: checkpointed params on the
    host (numpy), completed with the run's own `init` sources."""
    from mmjax.train.checkpoint import Checkpointer, CheckpointError
    path = wd.join(workdir, "config.json")
    if not wd.exists(path):
        raise CheckpointError(f"{workdir}: no config.json (not an mmjax run directory)")
    config = ml_collections.ConfigDict(json.loads(wd.read_text(path))["config"])
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        host, step = ckpt.restore_params_to_host(step)
    finally:
        ckpt.close()
    params = flat(host)
    entries = init_entries(config)
    if entries:
        import flax.linen as nn
        from mmjax.models import build
        from mmjax.families import get_family
        model = build(config.model)
        inputs = get_family(config).sample_inputs(config)
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
        layout = flat(nn.meta.unbox(shapes["params"]))
    for prefix, spec in entries.items():
        src = load_source(spec, prefix, scan=_scanned(_relative(layout, prefix).values()))
        for rel, value in flat(src).items():
            full = rel if prefix == ALL else f"{prefix}{SEP}{rel}" if rel else prefix
            params.setdefault(full, value)
    # The dtypes the run trained with (a frozen LM in config.optim.frozen_dtype).
    return config, cast_frozen(nested(params), config.optim), step


def load_source(spec: str, key: str = "?", scan: Optional[bool] = None) -> dict:
    """Host params (numpy, nested) of one `config.init` source, subtree applied."""
    kind, path, step, subtree = _parse(spec, key)
    if kind == "workdir":
        params = restore_run_params(path, step)[1]
    else:
        loader = IMPORTERS[kind].load()
        try:
            params = loader(path, scan=bool(scan))[1]["params"]
        except FileNotFoundError as e:
            raise InitError(f"config.init.{key}={spec!r}: {e}") from None
        params = jax.tree.map(np.asarray, params)
    if subtree:
        flat_params = flat(params)
        sub = {r: flat_params[k] for k, r in _relative(flat_params, subtree).items()}
        if not sub:
            raise InitError(f"config.init.{key}={spec!r}: the source has no subtree {subtree!r}; "
                            f"top-level names are {sorted(params)}.")
        params = nested(sub)
    return params


def apply_init(params: Any, config: Any, only: Optional[set] = None) -> Any:
    """Overwrite the parameters under each `config.init` prefix with its source.

    `params` are the (sharded) initial parameters, or their abstract
    `ShapeDtypeStruct`s; returns the same tree with the sourced leaves
    replaced (same shapes, dtypes and shardings). With `only` (flat paths),
    sources holding none of those paths are not loaded.
    """
    entries = init_entries(config)
    if not entries:
        return params
    target = flat(params)
    for prefix, spec in entries.items():
        whole = prefix == ALL
        rel_keys = {k: k for k in target} if whole else _relative(target, prefix)
        if not rel_keys:
            raise InitError(f"config.init.{prefix}: the model has no parameters under {prefix!r}; "
                            f"top-level names are {sorted(params)}.")
        if only is not None and only.isdisjoint(rel_keys):
            continue
        src = flat(load_source(spec, prefix, scan=_scanned(rel_keys.values())))
        kept = {k: r for k, r in rel_keys.items() if r not in src and (whole or _kept(spec, r))}
        missing = [r for k, r in rel_keys.items() if r not in src and k not in kept]
        if missing:
            raise InitError(f"config.init.{prefix}={spec!r}: the source lacks {len(missing)} "
                            f"parameters, e.g. {missing[:4]}; it has e.g. {sorted(src)[:4]} "
                            "(check the #SUBTREE and the scan/unrolled layout).")
        rel_keys = {k: r for k, r in rel_keys.items() if k not in kept}
        truncated = set()
        for k, r in rel_keys.items():
            dst, value = target[k], src[r]
            if _fewer_layers(r, value.shape, dst.shape):
                # A scanned stack with fewer layers than the source takes the
                # first ones: LLaVA's penultimate-layer features
                # (vision_feature_layer=-2), BLIP-2's ViT without its last layer.
                truncated.add((value.shape[0], dst.shape[0]))
                value = value[:dst.shape[0]]
            if tuple(value.shape) != tuple(dst.shape):
                raise InitError(f"config.init.{prefix}={spec!r}: parameter {r!r} has shape "
                                f"{tuple(value.shape)} in the source but {tuple(dst.shape)} in "
                                "the model; make the model config match the source.")
            value = np.asarray(value).astype(dst.dtype)
            target[k] = jax.make_array_from_callback(dst.shape, dst.sharding,
                                                     lambda idx, v=value: v[idx])
        log.info("init: %d parameters under %r from %s (%d source parameters unused)",
                 len(rel_keys), prefix, spec, len(src) - len(rel_keys))
        if kept:
            log.info("init: %d parameters under %r keep their initial values (%s has none): "
                     "%s", len(kept), prefix, spec.partition(":")[0], sorted(kept.values()))
        for have, use in sorted(truncated):
            log.info("init: %r uses the first %d of the source's %d scanned layers",
                     prefix, use, have)
    return nested(target)


# ----------------------------------------------------------------------------
# Checkpoint contents
# ----------------------------------------------------------------------------

def referenced_keys(params: Any, config: Any) -> set[str]:
    """Flat paths that are frozen and come from an `init` source (not checkpointed);
    parameters a source kind never provides (`Importer.keep_init`) are not among them."""
    entries = init_entries(config)
    freeze = list(config.optim.get("freeze") or [])
    if not entries or not freeze:
        return set()
    labels = flat(frozen_labels(params, freeze))
    return {k for k, lab in labels.items()
            if lab == "frozen" and any(_under(k, p) and not _kept(s, _relative([k], p)[k])
                                       for p, s in entries.items())}


def strip_referenced(state: dict, refs: set[str]) -> dict:
    """The state as checkpointed: `params` without the referenced leaves."""
    if not refs:
        return state
    return dict(state, params=nested({k: v for k, v in flat(state["params"]).items()
                                      if k not in refs}))


def merge_params(full: Any, partial: Any) -> Any:
    """`full` params with every leaf present in `partial` replaced."""
    out = flat(full)
    out.update(flat(partial))
    return nested(out)
