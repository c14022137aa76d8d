"""Jitted model methods, cached per model: `model_method(model, "encode_image")` is
one function object for equal models (flax modules compare by their fields), so
`jax.jit` compiles it once per input shape, and a bounded number of models stays
alive (`per_model`). Used by the evaluators and the caption / answer decoders."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping


def _frozen(x: Any) -> Any:
    """A hashable stand-in for `x`, equal for equal values (dataclasses such as flax
    modules by their compared fields, mappings by items); an unhashable leaf of
    another kind stands in as its type (equality then decides)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return (type(x), tuple((f.name, _frozen(getattr(x, f.name)))
                               for f in dataclasses.fields(x) if f.compare))
    if isinstance(x, Mapping):
        return frozenset((k, _frozen(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return tuple(_frozen(v) for v in x)
    try:
        hash(x)
    except TypeError:
        return type(x)
    return x


class ModelKey:
    """A model as a cache key (or a jit-static value): equal to the key of an
    equal model of the same type. Flax modules are dataclasses compared by field
    values, so two models built from one config share compiled code, and a model
    of another config never gets the code of an earlier one (a key by `id` could:
    ids are reused once a model is freed). Hashable even when the model is not
    (flax modules with dict fields). Holds a reference to the model."""
    __slots__ = ("model", "_hash")

    def __init__(self, model: Any):
        self.model = model
        self._hash = hash((type(model), _frozen(model)))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        if not isinstance(other, ModelKey) or type(other.model) is not type(self.model):
            return False
        if other.model is self.model:
            return True
        try:
            return bool(self.model == other.model)
        except Exception:  # a field whose == is not a bool (an array): not known equal
            return False

    def __repr__(self) -> str:
        return f"ModelKey({type(self.model).__name__})"


def per_model(maxsize: int) -> Callable:
    """Decorator: memoize `fn(model, *args, **kwargs)` by `ModelKey(model)` and the
    (hashable) arguments, keeping the `maxsize` most recently used results (so
    a bounded number of models is kept alive). The result made for the first
    of equal models is returned for the others. `fn.cache_info()` /
    `fn.cache_clear()` as in `functools.lru_cache`."""
    def wrap(fn: Callable) -> Callable:
        @functools.lru_cache(maxsize=maxsize)
        def cached(key: ModelKey, *args, **kwargs):
            return fn(key.model, *args, **kwargs)

        @functools.wraps(fn)
        def call(model: Any, *args, **kwargs):
            return cached(ModelKey(model), *args, **kwargs)
        call.cache_info, call.cache_clear = cached.cache_info, cached.cache_clear
        return call
    return wrap


@per_model(maxsize=64)
def model_method(model: Any, method: str) -> Callable:
    """`f(variables, *args) = model.apply(variables, *args, method=method)`.

    The same function object is returned for the same or an equal model and the
    same method (`per_model`), so `jax.jit` compiles it once per input shape
    however often it is requested.
    """
    def apply(variables, *args):
        return model.apply(variables, *args, method=method)
    apply.__name__ = f"{type(model).__name__}.{method}"
    return apply
