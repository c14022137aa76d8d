"""Prompt templates and class names for zero-shot classification.

`resolve_templates(spec)` turns the config value `evals.zeroshot.templates`
into a list of format strings with one `{}` each (the class name goes there);
`resolve_classnames(spec)` turns `evals.zeroshot.classnames` into a list whose
entry i is the name of label i.
"""
from __future__ import annotations

import os
from typing import Sequence, Union

from mmjax.errors import ConfigError

# The 80 ImageNet prompt templates of the CLIP paper's zero-shot evaluation,
# in their published order.
IMAGENET80: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

SIMPLE: tuple[str, ...] = ("a photo of a {}.",)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"imagenet80": IMAGENET80, "simple": SIMPLE}

_TEMPLATES_KEY = "evals.zeroshot.templates"
_CLASSNAMES_KEY = "evals.zeroshot.classnames"
_TEMPLATE_FORMS = (f"a set name {sorted(TEMPLATE_SETS)}, one template string containing "
                   "'{}', a path to a text file with one template per line, or a list of "
                   "templates")


def _read_lines(path: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped of surrounding whitespace."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _check_templates(templates: Sequence, where: str) -> list[str]:
    out = []
    for i, t in enumerate(templates):
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ConfigError(f"{_TEMPLATES_KEY}: template {i} of {where} is {t!r}; every "
                              "template must be a string with exactly one '{}' where the class "
                              "name goes.")
        out.append(t)
    if not out:
        raise ConfigError(f"{_TEMPLATES_KEY}: {where} holds no templates; give at least one.")
    return out


def resolve_templates(spec: Union[str, Sequence[str]]) -> list[str]:
    """Prompt templates from a config value.

    Args:
      spec: a built-in set name ("imagenet80", "simple"), a single template
        containing "{}", a path to a file with one template per line (blank
        lines ignored), or a list of templates.

    Returns:
      list of T format strings, each with exactly one "{}".

    Raises:
      ValueError (naming `evals.zeroshot.templates`) for anything else.
    """
    if isinstance(spec, str):
        if spec in TEMPLATE_SETS:
            return list(TEMPLATE_SETS[spec])
        if "{}" in spec:
            return _check_templates([spec], "the template string")
        path = os.path.expanduser(spec)
        if os.path.isfile(path):
            return _check_templates(_read_lines(path), f"file {path}")
        raise ConfigError(f"{_TEMPLATES_KEY} is {spec!r}: not a built-in set, has no '{{}}' and "
                          f"is not an existing file. Give {_TEMPLATE_FORMS}.")
    if isinstance(spec, (list, tuple)):
        return _check_templates(spec, "the list")
    raise ConfigError(f"{_TEMPLATES_KEY} has type {type(spec).__name__}; give {_TEMPLATE_FORMS}.")


def resolve_classnames(spec: Union[str, Sequence[str]]) -> list[str]:
    """Class names from a config value: a list, or a path to a text file.

    In a file, line i (counting non-empty lines from 0) is the name of label i.

    Returns:
      list of C non-empty strings.

    Raises:
      ValueError (naming `evals.zeroshot.classnames`) for a missing file, an
      empty list or a non-string entry.
    """
    if isinstance(spec, str):
        path = os.path.expanduser(spec)
        if not os.path.isfile(path):
            raise ConfigError(f"{_CLASSNAMES_KEY} is {spec!r}, which is not an existing file; "
                              "give a list of class names or a path to a text file with one "
                              "name per line (line i = label i).")
        names, where = _read_lines(path), f"file {path}"
    elif isinstance(spec, (list, tuple)):
        names, where = list(spec), "the list"
    else:
        raise ConfigError(f"{_CLASSNAMES_KEY} has type {type(spec).__name__}; give a list of "
                          "class names or a path to a text file with one name per line.")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{_CLASSNAMES_KEY}: entry {i} of {where} is {name!r}; class names "
                              "must be non-empty strings.")
    if not names:
        raise ConfigError(f"{_CLASSNAMES_KEY}: {where} holds no class names.")
    return [n.strip() for n in names]
