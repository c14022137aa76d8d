"""Loading recipe configs and applying `--config.a.b=value` overrides.

A recipe is a Python file with `get_config(arg: str | None) -> ConfigDict`;
`path.py:arg` passes `arg` (e.g. `configs/clip_b16.py:tiny`). Configs are
locked after overrides, so a mistyped key is an error that names it.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Sequence

import ml_collections

from mmjax.errors import ConfigError  # defined with UserError; importable from here too

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")




def resolve_config_path(spec: str) -> tuple[str, str | None]:
    """`"configs/x.py:arg"` or a bare recipe name `"clip_tiny"` -> (path, arg)."""
    path, _, arg = spec.partition(":")
    if not path.endswith(".py") and os.sep not in path:
        for base in (CONFIG_DIR, os.path.join(os.path.dirname(__file__), "..", "configs")):
            cand = os.path.join(base, path + ".py")
            if os.path.isfile(cand):
                path = cand
                break
    if not os.path.isfile(path):
        raise ConfigError(f"--config {spec}: file {path!r} not found (give a path like "
                          "configs/clip_tiny.py or a recipe name from configs/).")
    return path, (arg or None)


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load a recipe and apply `a.b=value` overrides; returns a locked ConfigDict."""
    path, arg = resolve_config_path(spec)
    module_spec = importlib.util.spec_from_file_location(
        "mmjax_recipe_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config(arg).")
    config = module.get_config(arg)
    for item in overrides:
        apply_override(config, item)
    validate_config(config)
    config.lock()
    return config


# Numeric keys and their allowed values: (kind, low, high, extra). kind "int" takes
# integers, "float" any number; low/high are inclusive bounds (None: open), except
# that a high of 1.0 marked "<1" excludes 1; extra: None allowed ("none"), -1
# allowed ("-1"). Checked once when a config is loaded, recipe values included.
_INT_GE1 = ("int", 1, None, "")
_INT_GE0 = ("int", 0, None, "")
NUMERIC_KEYS = {
    "seed": _INT_GE0, "total_steps": _INT_GE1, "batch_size": _INT_GE1, "log_every": _INT_GE1,
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
    "evals.every": _INT_GE0, "evals.batch_size": _INT_GE1,
    "evals.zeroshot.max_samples": _INT_GE0, "evals.retrieval.max_samples": _INT_GE0,
    "evals.retrieval.num_captions": _INT_GE1, "evals.captioning.max_samples": _INT_GE0,
    "evals.captioning.beam_size": _INT_GE1, "evals.captioning.max_len": _INT_GE1,
    "evals.vqa.max_samples": _INT_GE0, "evals.vqa.max_new_tokens": _INT_GE1,
}
# Model sizes, wherever they appear under config.model (None where a recipe leaves one out).
MODEL_SIZE_KEYS = {"width", "depth", "heads", "num_heads", "mlp_dim", "patch_size",
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
                    checks.append((f"{prefix}{k}", v, ("int", 1, None, "none")))
        walk(config.model, "model.")
    for key, value, rule in checks:
        if not _fits(value, rule):
            raise ConfigError(f"config.{key}={value!r}: must be {describe_range(rule)}.")


def _parse(text: str, current: Any) -> Any:
    low = text.lower()
    if isinstance(current, str):
        return text  # string fields stay strings ("none" is e.g. a remat policy name)
    if isinstance(current, bool):
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"expected true/false, got {text!r}")
    if low in ("none", "null"):
        return None
    if isinstance(current, int) and not isinstance(current, bool):
        try:
            return int(float(text)) if float(text).is_integer() else float(text)
        except ValueError:
            raise ConfigError(f"expected a number, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"expected a number, got {text!r}") from None
    if isinstance(current, (list, tuple)) or text[:1] in "[(":
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = [t.strip() for t in text.split(",")]
        return type(current)(value) if isinstance(current, (list, tuple)) else value
    if current is None or isinstance(current, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# `config.init.<prefix>=<source>` and `config.objectives.<name>=<weight>` may add entries.
OPEN_SECTIONS = {"init": str, "objectives": float}


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Apply one `a.b.c=value` override (the `--config.` prefix already removed)."""
    if "=" not in item:
        raise ConfigError(f"--config.{item}: expected --config.KEY=VALUE.")
    key, value = item.split("=", 1)
    parts = key.split(".")
    node = config
    if len(parts) == 2 and parts[0] in OPEN_SECTIONS and parts[1] not in config[parts[0]]:
        # Sections that map free names to values: a new name is a new entry.
        try:
            with config.unlocked():
                config[parts[0]][parts[1]] = OPEN_SECTIONS[parts[0]](value)
        except ValueError:
            raise ConfigError(f"config.{key}={value!r}: expected a "
                              f"{OPEN_SECTIONS[parts[0]].__name__}") from None
        return
    for i, part in enumerate(parts):
        is_last = i == len(parts) - 1
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            siblings = list(node.keys()) if hasattr(node, "keys") else []
            close = difflib.get_close_matches(part, siblings, n=3)
            hint = f"; did you mean {', '.join('.'.join(parts[:i] + [c]) for c in close)}?" if close \
                else f"; valid keys here: {', '.join(sorted(siblings))}" if siblings else ""
            raise ConfigError(f"unknown config key config.{'.'.join(parts[:i + 1])}{hint}")
        if is_last:
            try:
                node[part] = _parse(value, node[part])
            except ConfigError as e:
                rule = NUMERIC_KEYS.get(key)
                allowed = f" (allowed: {describe_range(rule)})" if rule else ""
                raise ConfigError(f"config.{key}: {e}{allowed}") from None
            except TypeError as e:
                raise ConfigError(f"config.{key}={value!r}: {e}") from None
        else:
            node = node[part]


def config_fingerprint(config: ml_collections.ConfigDict) -> dict:
    """The parts of a config that must not change when a workdir is resumed."""
    return {"model": config.model.to_dict(), "objectives": config.objectives.to_dict()}


def all_differences(a: Any, b: Any, prefix: str = "config") -> list[tuple[str, Any, Any]]:
    """`(dotted key, value in a, value in b)` for every leaf that differs (JSON-like dicts)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += all_differences(a.get(k), b.get(k), f"{prefix}.{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [(prefix, a, b)]


def first_difference(a: Any, b: Any, prefix: str = "config") -> str | None:
    """Dotted path and both values of the first difference between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{prefix}.{k} (present in only one)"
            d = first_difference(a[k], b[k], f"{prefix}.{k}")
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return None if a == b else f"{prefix}: {a!r} vs {b!r}"
