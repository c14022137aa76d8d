"""Parameter trees as flat `{"a/b/c": leaf}` dicts and back."""
from __future__ import annotations

from typing import Any, Mapping

from flax import traverse_util

SEP = "/"


def flat(tree: Any) -> dict:
    """Nested params -> `{"a/b/c": leaf}`."""
    return traverse_util.flatten_dict(dict(tree), sep=SEP) if tree else {}


def nested(flat_tree: Mapping) -> dict:
    return traverse_util.unflatten_dict(dict(flat_tree), sep=SEP)
