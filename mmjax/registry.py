"""Registering towers and families from outside mmjax (or inside it).

A new media tower is one call: the module class, the media it reads (how a
sample's file becomes an array) and, optionally, built-in data for
`shards="synthetic"` runs (training and zero-shot evaluation without a
dataset)::

    from mmjax.data.media import MediaSpec
    from mmjax.registry import Builtin, register_tower

    register_tower("my_signal", MySignalEncoder,           # class.modality == "signal"
                   media=MediaSpec("signal", ("npy",), "mypkg.signal:decode_signal"),
                   builtin=Builtin(shards=my_shards, classnames=MY_CLASSES))

Then `model.image.kind="my_signal"` trains with every family, through
`mmjax.train.loop.train(config, workdir)` (what `mmjax train` runs).
The `media` decoder is a `"module:function"` reference so that loader worker
processes (spawned) import it themselves. A new family is `register_family`.
The towers and families of mmjax itself are registered in the same tables
(`mmjax.models.towers.TOWERS`, `mmjax.data.media.MEDIA`,
`mmjax.data.builtin.BUILTIN`, `mmjax.models.MODELS`, `mmjax.families.FAMILIES`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from mmjax.data import builtin as builtin_lib
from mmjax.data import media as media_lib
from mmjax.errors import ConfigError
from mmjax.models import towers

__all__ = ["Builtin", "register_tower", "register_family"]


@dataclasses.dataclass(frozen=True)
class Builtin:
    """Built-in data of a modality (`data.train.shards="synthetic"`, evals too).

    Attributes:
      shards: `fn(cache_dir, split, synthetic_config, seed) -> [shard paths]`, where
        `split` is "train" or "test" and `synthetic_config` is `config.synthetic`
        (`train_samples`, `test_samples`, `samples_per_shard`, ...): writes
        webdataset shards once (e.g. with `mmjax.data.cache.cached_shards` and
        `mmjax.data.writer.ShardWriter`) and returns their paths. Or a
        "module:function" reference.
      classnames: the names of the `cls` labels its samples carry (zero-shot
        evaluation), or a "module:NAME" reference.
    """
    shards: Union[Callable[..., list], str]
    classnames: Union[Sequence[str], str]


def register_tower(kind: str, tower: Union[type, str], *, media: Optional[media_lib.MediaSpec] = None,
                   builtin: Optional[Builtin] = None, replace: bool = False) -> None:
    """Register a media tower under `model.image.kind = kind`.

    Args:
      kind: the config value that selects it.
      tower: the Flax module class (or "module:Class"): `__call__(x) -> (pooled
        [B, E] or None, tokens [B, N, D])`, with the static methods of the tower
        protocol (`mmjax.models.towers`) and a `modality` class attribute.
      media: the decoder of its modality (`spec.name == tower.modality`); needed
        unless that modality is registered already ("image", "audio", "video").
      builtin: built-in data of its modality (optional).
      replace: allow replacing an entry registered under the same name.

    Raises ConfigError for a name taken by another tower (without `replace`),
    or media whose name is not the tower's modality.
    """
    if not replace and kind in towers.TOWERS and towers.TOWERS[kind] != tower:
        raise ConfigError(f"tower kind {kind!r} is registered already "
                          f"({towers.TOWERS[kind]}); pick another name or pass replace=True.")
    cls = towers.load_tower(tower)
    modality = cls.modality
    if media is not None and media.name != modality:
        raise ConfigError(f"register_tower({kind!r}): media {media.name!r} is not what "
                          f"{cls.__name__} reads ({modality!r}).")
    if media is not None:
        _put(media_lib.MEDIA, media.name, media, replace, "media")
    if builtin is not None:
        _put(builtin_lib.BUILTIN, modality, (builtin.shards, builtin.classnames), replace,
             "built-in data")
    towers.TOWERS[kind] = tower


def register_family(family: Any, model: type, submodules: Mapping[str, Any],
                    replace: bool = False) -> None:
    """Register a model family under `model.name = family.name`.

    Args:
      family: a `mmjax.families.Family` instance (objectives, losses, inputs,
        FLOPs, `:tiny` shrink, evaluators).
      model: its Flax module class, built from `config.model` by `mmjax.models.build`.
      submodules: its nested config sections and the module each configures
        ("tower" for the media tower, e.g. `{"image": "tower", "text": TextEncoder}`).
    """
    from mmjax import families, models
    name = family.name
    if not replace and name in families.FAMILIES:
        raise ConfigError(f"family {name!r} is registered already; pick another name or "
                          "pass replace=True.")
    models.MODELS[name] = model
    models.SUBMODULES[name] = dict(submodules)
    families.FAMILIES[name] = family


def _put(table: dict, key: str, value: Any, replace: bool, what: str) -> None:
    if not replace and key in table and table[key] != value:
        raise ConfigError(f"{what} for {key!r} is registered already; pass replace=True to "
                          "replace it.")
    table[key] = value
