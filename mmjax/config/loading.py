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

from mmjax.config.schema import NUMERIC_KEYS, check_config, describe_range
from mmjax.errors import ConfigError

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
    check_config(config)
    config.lock()
    return config


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


def module_field(config: ml_collections.ConfigDict, section: Sequence[str],
                 name: str) -> tuple[bool, Any]:
    """`(is_field, default)`: whether `name` is a field of the module that the config
    section `section` (`["model"]`, `["model", "image"]`, ...) configures (the
    model's class, or the one of its section: the tower of `model.image.kind`), and
    its default. Such a key may be set with `--config.model...=VALUE` although the
    recipe leaves it at its default (what `--help-config` lists)."""
    import dataclasses
    if not section or section[0] != "model" or len(section) > 2:
        return False, None
    from mmjax.models import MODELS, SUBMODULES, towers
    model = config.model
    cls = MODELS.get(model.get("name"))
    if cls is not None and len(section) == 2:
        cls = SUBMODULES.get(model.get("name"), {}).get(section[1])
        if cls == "tower":
            cls = towers.tower_fields(model.get(section[1]), f"model.{section[1]}")[0]
    field = getattr(cls, "__dataclass_fields__", {}).get(name)
    if field is None or name in ("parent", "name") or field.default is dataclasses.MISSING:
        return False, None
    return True, field.default


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
        if is_last and isinstance(node, ml_collections.ConfigDict) and part not in node:
            field, default = module_field(config, parts[:-1], part)
            if field:  # a field of the model's module that the recipe leaves at its default
                with node.unlocked():
                    node[part] = default
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            siblings = list(node.keys()) if hasattr(node, "keys") else []
            close = difflib.get_close_matches(part, siblings, n=3)
            hint = f"; did you mean {', '.join('.'.join(parts[:i] + [c]) for c in close)}?" if close \
                else f"; valid keys here: {', '.join(sorted(siblings))}" if siblings else ""
            raise ConfigError(f"unknown config key config.{'.'.join(parts[:i + 1])}{hint}")
        if is_last:
            try:
                current = node[part]
                if current is None and key in NUMERIC_KEYS:  # a number key left at None
                    current = 0 if NUMERIC_KEYS[key][0] == "int" else 0.0
                node[part] = _parse(value, current)
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
