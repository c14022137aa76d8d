"""Evaluation images from a prepared TensorFlow Datasets (TFDS) dataset.

Reads through ``builder.as_data_source`` (array_record files, random access),
so TensorFlow itself is not needed. The dataset must already be prepared in
``data_dir`` (``tfds build NAME --data_dir DIR`` on a machine with network);
nothing is downloaded here.

Install with ``pip install "mmjax[tfds]"``.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from mmjax.errors import ConfigError


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "evaluating on a TFDS dataset needs tensorflow-datasets: "
            'pip install "mmjax[tfds]"') from e
    return tfds


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes the short side to ``size`` (bicubic) and crops the centre.

    Args:
      image: uint8 ``[H, W, C]`` with C in {1, 3, 4}, or ``[H, W]``.
    Returns:
      uint8 ``[size, size, 3]``.
    """
    from PIL import Image

    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    pil = Image.fromarray(image.astype(np.uint8)).convert("RGB")
    w, h = pil.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    pil = pil.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(pil.crop((left, top, left + size, top + size)))


class TfdsEvalSource:
    """Batches of (images uint8 ``[N, S, S, 3]``, labels int32 ``[N]``) from a TFDS split.

    Attributes:
      classnames: label i -> name, from ``features[label_key].names``
        (underscores replaced by spaces).
      num_examples: examples in the split (after ``max_examples``).
    """

    def __init__(self, name: str, split: str = "test", data_dir: str | None = None,
                 image_size: int = 224, batch_size: int = 256, image_key: str = "image",
                 label_key: str = "label", max_examples: int | None = None):
        tfds = _import_tfds()
        where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets)"
        hint = (f"prepare it first with `tfds build {name} --data_dir "
                f"{data_dir or '~/tensorflow_datasets'}` on a machine with network "
                "access, or fix the name/data_dir")
        if data_dir is not None and not os.path.isdir(os.path.expanduser(data_dir)):
            raise FileNotFoundError(f"TFDS data_dir {data_dir!r} for dataset {name!r} "
                                    f"does not exist; {hint}")
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # DatasetNotFoundError and friends
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(
                f"TFDS dataset {name!r} not found in {where} ({first_line}); {hint}") from e
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {where}; {hint}")
        features = builder.info.features
        for key in (image_key, label_key):
            if key not in features:
                raise ConfigError(f"TFDS dataset {name!r} has no feature {key!r} "
                                  f"(it has {sorted(features.keys())}); set image_key/label_key")
        if not hasattr(features[label_key], "names"):
            raise ConfigError(f"TFDS feature {name}:{label_key} is not a ClassLabel, "
                              "so it has no class names")
        try:
            self._source = builder.as_data_source(split=split)
        except Exception as e:
            raise ConfigError(
                f"cannot read split {split!r} of TFDS dataset {name!r} in {where} "
                f"(splits: {sorted(builder.info.splits.keys())}): {e}") from e
        self.name, self.split = name, split
        self.classnames = [n.replace("_", " ") for n in features[label_key].names]
        self.image_size, self.batch_size = int(image_size), int(batch_size)
        self.image_key, self.label_key = image_key, label_key
        n = len(self._source)
        self.num_examples = n if max_examples is None else min(n, int(max_examples))

    def __len__(self) -> int:
        """Number of batches."""
        return -(-self.num_examples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, self.num_examples, self.batch_size):
            idx = range(start, min(start + self.batch_size, self.num_examples))
            records = [self._source[i] for i in idx]
            images = np.stack([resize_center_crop(r[self.image_key], self.image_size)
                               for r in records])
            labels = np.array([int(r[self.label_key]) for r in records], np.int32)
            yield images, labels


def parse_tfds_spec(spec: str) -> tuple[str, str]:
    """``"tfds:NAME[@SPLIT]"`` -> ``(NAME, SPLIT)``; SPLIT defaults to "test".

    NAME is what ``tfds.builder`` takes (``cifar10``, ``cifar10:3.0.2``,
    ``imagenet2012``); SPLIT any TFDS split expression (``validation``,
    ``test[:1000]``).
    """
    if not spec.startswith("tfds:") or len(spec) <= 5:
        raise ConfigError(f"TFDS source {spec!r} must look like 'tfds:NAME' or "
                          "'tfds:NAME@SPLIT' (e.g. tfds:cifar10@test)")
    name, _, split = spec[5:].partition("@")
    return name, split or "test"


def tfds_batches(source: TfdsEvalSource, *, output: str = "float32",
                 mean=None, std=None) -> Iterator[dict]:
    """Eval batches in the layout of mmjax's shard iterator.

    Yields ``{"image": [b, S, S, 3] (float32 normalized by mean/std, or uint8),
    "label": int32 [b], "text": int32 [b, 1] (zeros: TFDS classification sets
    have no captions), "valid": bool [b]}``.
    """
    from mmjax.data.decode import normalize
    for images, labels in source:
        if output == "float32":
            images = normalize(images, mean, std)
        n = len(labels)
        yield {"image": images, "label": labels, "text": np.zeros((n, 1), np.int32),
               "valid": np.ones(n, bool)}


def tfds_eval_source(name: str, split: str = "test", data_dir: str | None = None,
                     image_size: int = 224, batch_size: int = 256, **kwargs) -> TfdsEvalSource:
    """Zero-shot evaluation batches from a prepared TFDS dataset.

    Iterating the result yields ``(images uint8 [N, S, S, 3], labels int32 [N])``
    with S = ``image_size`` (short side resized, centre crop); the last batch
    may be smaller. ``.classnames`` holds the class names.

    Raises:
      ImportError: tensorflow-datasets is missing (``pip install "mmjax[tfds]"``).
      FileNotFoundError: the dataset is not prepared in ``data_dir``.
    """
    return TfdsEvalSource(name, split, data_dir, image_size, batch_size, **kwargs)
