"""The config schema: every key's type, range and description, and the checks
that involve several keys, run when a config is loaded (`load_config`) and when
`mmjax.train.loop.train` starts, before anything is built or compiled.

- Keys and types: the base config (`mmjax.config.defaults.KEYS`, the data
  pipeline's `mmjax.data.options.DATA_KEYS`, each with a one-line description);
  `--config.KEY=VALUE` of an unknown key is an error with close matches, and a
  value of another type is an error (`mmjax.config.loading`).
- Ranges: `NUMERIC_KEYS` (and every model size is an integer >= 1).
- Cross-key checks: `check_config` (when a config loads; no files, no JAX): the
  family of `model.name` and its model's fields, the tower of `model.image.kind`
  and its media decoder and built-in data, the data keys the tower's input fixes,
  objectives x family, evaluators x family; `check_model` (when `train` starts,
  after a multi-process job joined; `mmjax bench` and `compile` too): the
  tokenizer's vocabulary x the model's, the family's own checks (both towers'
  embedding width, a pooled tower), `optim.freeze` / `init` prefixes x the
  model's parameters, traced without allocating anything.
- `help_config(config)` lists a recipe's keys with values and descriptions
  (`mmjax train --help-config`).
"""
from __future__ import annotations

import inspect
import re
from typing import Any

import jax
import ml_collections

from mmjax.errors import ConfigError

# Numeric keys and their allowed values: (kind, low, high, extra). kind "int" takes
# integers, "float" any number; low/high are inclusive bounds (None: open), except
# that a high of 1.0 marked "<1" excludes 1; extra: None allowed ("none"), -1
# allowed ("-1"). Checked once when a config is loaded, recipe values included.
_INT_GE1 = ("int", 1, None, "")
_INT_GE0 = ("int", 0, None, "")
NUMERIC_KEYS = {
    "seed": _INT_GE0, "total_steps": _INT_GE1, "batch_size": _INT_GE1, "log_every": _INT_GE1,
    "unmasked_tuning_steps": _INT_GE0, "model.image.patch_dropout": ("float", 0, "<1", ""),
    "checkpoint_every": _INT_GE1, "keep_checkpoints": _INT_GE1,
    "peak_flops": ("float", ">0", None, "none"),
    "mesh.data": ("int", 1, None, "-1"), "mesh.fsdp": ("int", 1, None, "-1"),
    "mesh.tensor": ("int", 1, None, "-1"),
    "multihost.init_timeout_s": _INT_GE1, "multihost.heartbeat_timeout_s": _INT_GE1,
    "multihost.shutdown_timeout_s": _INT_GE1, "multihost.preemption_deadline_s": _INT_GE0,
    "multihost.peer_timeout_s": _INT_GE0,
    "multihost.stop_check_every": _INT_GE1,
    "optim.lr": ("float", 0, None, ""), "optim.warmup_steps": _INT_GE0,
    "optim.end_lr_frac": ("float", 0, 1, ""), "optim.b1": ("float", 0, "<1", ""),
    "optim.b2": ("float", 0, "<1", ""), "optim.eps": ("float", 0, None, ""),
    "optim.weight_decay": ("float", 0, None, ""),
    "optim.clip_norm": ("float", 0, None, "none"), "optim.accum_steps": _INT_GE1,
    "synthetic.train_samples": _INT_GE1, "synthetic.test_samples": _INT_GE1,
    "synthetic.image_size": _INT_GE1, "synthetic.samples_per_shard": _INT_GE1,
    "data.train.max_len": _INT_GE1, "data.train.image_size": _INT_GE1,
    "data.train.workers": _INT_GE0, "data.train.shuffle_buffer": _INT_GE0,
    "data.train.prefetch": _INT_GE0, "data.train.num_captions": _INT_GE1,
    "data.train.seed": _INT_GE0, "data.train.min_bad_count": _INT_GE0,
    "data.train.max_bad_fraction": ("float", 0, 1, ""),
    "data.train.max_pixels": ("int", 1, None, "none"),
    "health.patience": _INT_GE0, "health.tolerance": ("float", 0, None, ""),
    "evals.every": _INT_GE0, "evals.batch_size": _INT_GE1,
    "evals.zeroshot.max_samples": _INT_GE0, "evals.retrieval.max_samples": _INT_GE0,
    "evals.retrieval.num_captions": _INT_GE1, "evals.captioning.max_samples": _INT_GE0,
    "evals.captioning.beam_size": _INT_GE1, "evals.captioning.max_len": _INT_GE1,
    "evals.vqa.max_samples": _INT_GE0, "evals.vqa.max_new_tokens": _INT_GE1,
}
# Model sizes, wherever they appear under config.model (None where a recipe leaves one out).
MODEL_SIZE_KEYS = {"width", "depth", "vl_depth", "heads", "num_heads", "mlp_dim", "patch_size",
                   "image_size", "max_len", "vocab_size", "embed_dim", "num_queries",
                   "caption_queries", "pooler_heads", "cross_attention_freq"}


def describe_range(rule: tuple) -> str:
    """Human text of a NUMERIC_KEYS rule, e.g. 'an integer >= 1'."""
    kind, low, high, extra = rule
    what = "an integer" if kind == "int" else "a number"
    parts = []
    if low == ">0":
        parts.append("> 0")
    elif low is not None:
        parts.append(f">= {low}")
    if high == "<1":
        parts.append("< 1")
    elif high is not None:
        parts.append(f"<= {high}")
    text = f"{what} {' and '.join(parts)}".strip()
    if extra == "-1":
        text = f"-1 (the remaining devices) or {text}"
    if extra == "none":
        text = f"None or {text}"
    return text


def _fits(value: Any, rule: tuple) -> bool:
    kind, low, high, extra = rule
    if value is None:
        return extra == "none"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if kind == "int" and not float(value).is_integer():
        return False
    if value != value or value in (float("inf"), float("-inf")):  # NaN, inf
        return False
    if extra == "-1" and value == -1:
        return True
    if low == ">0":
        ok = value > 0
    else:
        ok = low is None or value >= low
    if high == "<1":
        ok = ok and value < 1
    elif high is not None:
        ok = ok and value <= high
    return ok


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Every numeric key in range; ConfigError naming the key, its value and what is allowed."""
    def get(path):
        node = config
        for part in path.split("."):
            if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
                return None, False
            node = node[part]
        return node, True

    checks = []
    for key, rule in NUMERIC_KEYS.items():
        value, present = get(key)
        if present:
            checks.append((key, value, rule))
    if "objectives" in config:
        for name, weight in config.objectives.items():
            checks.append((f"objectives.{name}", weight, ("float", 0, None, "")))
    if "model" in config:
        def walk(node, prefix):
            for k, v in node.items():
                if isinstance(v, (ml_collections.ConfigDict, dict)):
                    walk(v, f"{prefix}{k}.")
                elif k in MODEL_SIZE_KEYS:
                    # depth 0: an embedding without blocks (the one-tower family's
                    # text and media embeddings)
                    low = 0 if k in ("depth", "vl_depth") else 1
                    checks.append((f"{prefix}{k}", v, ("int", low, None, "none")))
        walk(config.model, "model.")
    for key, value, rule in checks:
        if not _fits(value, rule):
            raise ConfigError(f"config.{key}={value!r}: must be {describe_range(rule)}.")


# ----------------------------------------------------------------- cross-key checks

# What to use when a config enables an evaluator its family does not offer.
NOT_OFFERED = {"retrieval": "a two-tower, CoCa, BLIP-2 or multiway one-tower recipe",
               "captioning": "a CoCa, BLIP-2 or VisionLM recipe",
               "vqa": "a VisionLM (llava, blip2_stage2) or one-tower (one_tower_tiny:vqa) "
                      "recipe",
               "grounding": "a two-tower, CoCa, BLIP-2, one-tower or VisionLM recipe"}
EVALUATORS = ("zeroshot", "retrieval", "captioning", "vqa", "grounding")


def enabled_evaluators(config: Any) -> list[str]:
    """The `config.evals` sections that run (their `shards` set), checked against
    the family: zero-shot (on by default) is skipped quietly where the family has no
    zero-shot classifier; any other evaluator it does not offer is a ConfigError."""
    from mmjax.families import get_family
    family = get_family(config)
    out = []
    for name in EVALUATORS:
        section = (config.get("evals") or {}).get(name)
        if not (section and section.get("shards")):
            continue
        if name not in family.evaluators:
            if name == "zeroshot":
                continue
            raise ConfigError(f"config.evals.{name}: the {family.name} family does not offer "
                              f"it; use {NOT_OFFERED[name]} or set evals.{name}.shards=''.")
        out.append(name)
    return out


def check_config(config: Any) -> None:
    """The checks of a config that need neither files nor JAX (so they run before a
    multi-process job joins); ConfigError naming the keys. Builds the model module
    (a dataclass: no parameters). `check_model` does the rest."""
    from mmjax.data import builtin as builtin_lib
    from mmjax.data import media as media_lib
    from mmjax.families import get_family
    from mmjax.models import build, towers
    validate_config(config)
    family = get_family(config)
    model = build(config.model)
    family.check_objectives(model, config.objectives)
    data = config.data.train
    media = family.media(config.model)
    media_lib.get_media_spec(media)  # a ConfigError naming what is registered if none is
    for key, value in towers.data_keys(*towers.tower_fields(config.model.get("image"))).items():
        if data.get(key) != value:
            raise ConfigError(f"config.data.train.{key}={data.get(key)!r} but the model's "
                              f"{media} tower reads {value!r} (model.image); set "
                              f"--config.data.train.{key}={value}.")
    check_patch_dropout(config, family)
    evaluators = enabled_evaluators(config)
    builtin = ["data.train.shards"] if data.get("shards") == "synthetic" else []
    builtin += [f"evals.{n}.shards" for n in evaluators if config.evals[n].shards == "synthetic"]
    if builtin and media not in builtin_lib.BUILTIN:
        raise ConfigError(f"config.{builtin[0]}='synthetic': there is no built-in data for the "
                          f"model's {media} tower (have {sorted(builtin_lib.BUILTIN)}); give "
                          "shard paths.")


def check_patch_dropout(config: Any, family: Any) -> None:
    """`model.image.patch_dropout` only where the family takes any number of media
    tokens (`Family.patch_dropout`: not where they fill fixed places of one
    sequence, VisionLM and one-tower), and `unmasked_tuning_steps` within
    `total_steps`."""
    rate = (config.model.get("image") or {}).get("patch_dropout") or 0
    if rate and not family.patch_dropout:
        raise ConfigError(f"config.model.image.patch_dropout={rate!r}: the {family.name} family "
                          "places a fixed number of media tokens in one sequence, so its tower "
                          "cannot drop patches; set it to 0.")
    tail = int(config.get("unmasked_tuning_steps") or 0)
    if tail > int(config.total_steps):
        raise ConfigError(f"config.unmasked_tuning_steps={tail} is more than config.total_steps="
                          f"{config.total_steps}; at most total_steps (every step unmasked).")


def check_model(config: Any, tokenizer: bool = True) -> None:
    """The checks that read the tokenizer or trace the model (shapes only, nothing
    allocated, but JAX starts its backend: in a multi-process job this runs after
    the processes joined): the tokenizer's vocabulary x the model's, the family's
    own checks (e.g. both towers' embedding width), `optim.freeze` and `init`
    prefixes x the model's parameters. ConfigError naming the keys.

    `tokenizer=False` (`mmjax compile`, which reads no data) skips the tokenizer
    unless the model takes its vocabulary size from it (`vocab_size=None`). AST
    towers with `spec_mean` / `spec_std` None get them measured on the training
    data (`mmjax.config.audio_stats`); without data (compile), AST's numbers stand
    in (they change no shape)."""
    from mmjax.config import audio_stats
    from mmjax.families import get_family
    from mmjax.models import build
    from mmjax.models.ast import AST_MEAN, AST_STD
    family = get_family(config)
    text = config.model.get(family.text_section)
    if tokenizer or (text is not None and text.get("vocab_size", 0) is None):
        check_vocabulary(config)
    if tokenizer:
        audio_stats.fill_spectrogram_stats(config)
    for name in audio_stats.unset_sections(config):
        config.model[name].update(dict(spec_mean=AST_MEAN, spec_std=AST_STD))
    family.check_config(config)
    prefixes = [("optim.freeze", p) for p in (config.optim.get("freeze") or [])]
    prefixes += [("init", p) for p in (config.get("init") or {}) if p != "all"]  # all: the model
    if prefixes:
        check_prefixes(config, build(config.model), prefixes)


def check_vocabulary(config: Any) -> None:
    """The model's text vocabulary and special ids x the tokenizer's
    (`data.train.tokenizer`), before anything is built or compiled: the tokenizer's
    ids must fit `model.<text section>.vocab_size` (a gather would clamp them
    silently); the model's pad id (`model.pad_id`, else `model.text.pad_id`) and,
    where the text tower pools at EOS, `model.text.eos_id` must be the tokenizer's.
    A vocab_size or pad id the config sets to None is filled in from the tokenizer
    (in `config` itself, so the run's saved config holds it); an eos_id of None keeps
    its meaning (pool at each row's highest id). ConfigError naming the keys and
    both values."""
    from mmjax.data.tokenizers import build_tokenizer
    from mmjax.families import get_family
    from mmjax.models import build
    from mmjax.models.text import TextEncoder
    d = config.data.train
    tokenizer = build_tokenizer(d.tokenizer, int(d.max_len))
    family = get_family(config)
    model, text = config.model, config.model.get("text")
    what = f"config.data.train.tokenizer={d.tokenizer!r}"
    key = f"model.{family.text_section}.vocab_size"
    if model[family.text_section].get("vocab_size") is None:
        model[family.text_section].vocab_size = tokenizer.vocab_size
    vocab = family.vocab_size(model)
    if tokenizer.vocab_size > vocab:
        raise ConfigError(f"{what} has {tokenizer.vocab_size} tokens but the model's vocab_size "
                          f"is {vocab}; raise config.{key} to {tokenizer.vocab_size} "
                          f"(--config.{key}={tokenizer.vocab_size}, or None to take it from "
                          "the tokenizer).")
    ids = []  # (section, its key prefix, field, the tokenizer's id, what the id does)
    if "pad_id" in model or text is None:
        ids.append((model, "model", "pad_id", tokenizer.pad_id, "pads with"))
    else:
        ids.append((text, "model.text", "pad_id", tokenizer.pad_id, "pads with"))
    if text is not None and text.get("pool", TextEncoder.pool) == "eos":
        ids.append((text, "model.text", "eos_id", tokenizer.eos_id, "ends every text with"))
    if getattr(family, "pad_differs_from_eos", False) and tokenizer.pad_id == tokenizer.eos_id:
        raise ConfigError(f"{what} pads with its EOS id {tokenizer.eos_id}; the "
                          f"{family.name} family finds padding by id, so every EOS of a "
                          "dialog would be hidden from attention and loss. Use a tokenizer "
                          "with a pad token of its own (e.g. a copy of the tokenizer folder "
                          "whose tokenizer_config.json sets pad_token to <unk> or a reserved "
                          "token), as Vicuna's does.")
    built = build(model)  # its fields with their defaults
    for section, prefix, field, want, does in ids:
        unset = field not in section
        if unset:
            have = getattr(TextEncoder if prefix == "model.text" else built, field, None)
        else:
            have = section[field]
            if have is None and field == "pad_id":
                section[field] = have = want
        if have is not None and have != want:
            fix = (f"add {field}={want} to config.{prefix} in the recipe" if unset else
                   f"set --config.{prefix}.{field}={want}"
                   + (" (or None to take it from the tokenizer)" if field == "pad_id" else ""))
            raise ConfigError(f"config.{prefix}.{field}={have}"
                              f"{' (unset: the default)' if unset else ''} but {what} {does} "
                              f"id {want}; {fix}.")


def param_paths(config: Any, model: Any) -> list[str]:
    """'/'-joined paths of the model's parameters (traced, nothing allocated)."""
    from mmjax.families import get_family
    media, text = get_family(config).sample_inputs(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), media, text))["params"]
    return ["/".join(str(getattr(k, "key", k)) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(
                shapes, is_leaf=lambda x: hasattr(x, "names") and hasattr(x, "value"))[0]]


def check_prefixes(config: Any, model: Any, prefixes: list[tuple[str, str]]) -> None:
    """Each `(key, prefix)` must name at least one parameter (`a/b` matches `a/b`
    and `a/b/...`)."""
    paths = param_paths(config, model)
    for key, prefix in prefixes:
        p = prefix.strip("/")
        if not any(path == p or path.startswith(p + "/") for path in paths):
            top = sorted({path.split("/")[0] for path in paths})
            raise ConfigError(f"config.{key}: {prefix!r} matches no parameter of the model; "
                              f"top-level names are {top}.")


# ----------------------------------------------------------------- descriptions

def describe(key: str) -> str:
    """The one-line description of a dotted key of the base config ('' if none)."""
    from mmjax.config.defaults import KEYS, SECTIONS
    from mmjax.data.options import DATA_KEYS
    if key.startswith("data.train."):
        entry = DATA_KEYS.get(key[len("data.train."):])
    else:
        entry = KEYS.get(key)
    return entry[1] if entry else SECTIONS.get(key, "")


_FIELD_DOC = re.compile(r"^(\s*)([a-z_][a-z0-9_]*(?:, [a-z_][a-z0-9_]*)*):\s+(.+)$")


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> description, from the class docstring's `name: text` lines
    (`a, b: text` for several; indented lines below continue the text)."""
    out, names, indent = {}, None, None
    for line in (inspect.getdoc(cls) or "").splitlines():
        m = _FIELD_DOC.match(line)
        if m and (indent is None or len(m.group(1)) <= indent):
            names, indent = [n.strip() for n in m.group(2).split(",")], len(m.group(1))
            for n in names:
                out.setdefault(n, m.group(3).strip())
        elif names and line.strip() and len(line) - len(line.lstrip()) > indent:
            for n in names:
                out[n] += " " + line.strip()
        else:
            names = None
    return out


def help_config(config: Any) -> str:
    """Every key of a config: `key = value  description [allowed range]`, the model's
    fields (with their defaults where the recipe leaves them out) included."""
    from mmjax.families import get_family
    from mmjax.models import MODELS, SUBMODULES, towers
    lines = []

    def row(key, value, doc, kind=None):
        rule = NUMERIC_KEYS.get(key)
        allowed = f" [{describe_range(rule)}]" if rule else ""
        kind = kind or ("" if value is None else type(value).__name__)
        if hasattr(value, "dtype") or isinstance(value, type):
            value = getattr(value, "__name__", value)
        lines.append(f"{key} = {value!r}" + (f"  ({kind})" if kind else "")
                     + (f"\n    {doc}{allowed}" if doc or allowed else ""))

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, (ml_collections.ConfigDict, dict)) and prefix + k not in (
                    "model", "objectives", "init"):
                walk(v, f"{prefix}{k}.")
            elif prefix + k not in ("model", "objectives", "init"):
                row(prefix + k, v, describe(prefix + k))
    walk(config, "")
    name = config.model.get("name")
    family = get_family(config)
    lines.append(f"\nmodel: {describe('model')}")
    sections = {"": MODELS[name]}
    for key, sub in SUBMODULES.get(name, {}).items():
        sections[key] = family.tower(config.model) if sub == "tower" else sub
    for key, cls in sections.items():
        given = dict(config.model.get(key) or {}) if key else dict(config.model)
        docs = field_docs(cls)
        fields = {f: d for f, d in cls.__dataclass_fields__.items() if f not in ("parent", "name")}
        prefix = f"model.{key}." if key else "model."
        if key and "kind" in given:
            row(prefix + "kind", given["kind"], f"the tower: one of {sorted(towers.TOWERS)}")
        for f, d in fields.items():
            if not key and f in sections:
                continue
            value = given.get(f, d.default if d.default is not d.default_factory else None)
            if key and f == "dtype" and f not in given:  # a section computes in model.dtype
                value = config.model.get("dtype", value)
            kind = d.type if isinstance(d.type, str) else getattr(d.type, "__name__", "")
            row(prefix + f, value, docs.get(f, f"field of {cls.__name__}"), kind)
    lines.append(f"\nobjectives: {describe('objectives')}; {family.name} offers "
                 f"{list(family.objectives)}")
    for k, v in config.objectives.items():
        row(f"objectives.{k}", v, "")
    lines.append(f"init: {describe('init')}")
    for k, v in (config.get("init") or {}).items():
        row(f"init.{k}", v, "")
    return "\n".join(lines)
