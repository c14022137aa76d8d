"""The data pipeline's keys (``config.data.train``) and their checked, typed form.

``default_data_config()`` lists every key with its default and meaning;
``build_options`` checks a config and flattens it into a ``DataOptions``, the
frozen, picklable object that the iterator and its worker processes read
(``o.max_len``, ``o.paths``, ...).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections

from mmjax.data import decode as decode_lib
from mmjax.data import media as media_lib
from mmjax.data import sources as sources_lib
from mmjax.data.dialog import dialog_template
from mmjax.errors import ConfigError

# "caption": one caption -> text [B, L]; "caption_list": a JSON list -> text
# [B, num_captions, L]; "dialog": JSON Q/A turns -> text and loss_mask [B, L];
# "vqa": JSON questions -> text [B, num_captions, L], answer_ids / answer_scores.
TEXT_FORMATS = ("caption", "caption_list", "dialog", "vqa")


# Every key of the data pipeline (``config.data.train``): name -> (default, description).
DATA_KEYS: dict[str, tuple] = {
    "shards": (None, "required: a brace pattern ({000..099}, {a,b}), several joined with "
                     "'::', a list, or 'synthetic' (the built-in data of the model's tower)"),
    "weights": (None, "None, or one sampling weight per pattern (needs resampled=True)"),
    "caption_key": ("txt", "caption member: 'txt', or 'json:FIELD' for a JSON field"),
    "group_key": ("", "member ('txt', 'json:FIELD') whose value is shared by samples with "
                      "the same content (duplicates, one scene): batches gain group int32 [B] "
                      "(-1 where absent) and matching losses never draw such samples as each "
                      "other's negatives; '' = none"),
    "text_format": ("caption", "'caption' (text [B, L]); 'caption_list': text [B, "
                               "num_captions, L] from a JSON list; 'dialog': JSON Q/A turns "
                               "(mmjax.data.dialog), batches gain loss_mask [B, L]; 'vqa': "
                               "questions [B, num_captions, L] with answer_ids and "
                               "answer_scores [B, num_captions, max_answers] (VQA as "
                               "classification over `answers`)"),
    "num_captions": (5, "caption_list / vqa: rows (captions, questions) per sample (missing "
                        "ones are all pad)"),
    "answers": ([], "vqa: the answer vocabulary, class i = answers[i] (the model family fills "
                    "it from model.answers)"),
    "max_answers": (10, "vqa: most distinct answers kept per question (VQAv2 has 10)"),
    "image_token_id": (None, "dialog: id that '<image>' in a question becomes (None: dropped)"),
    "dialog_template": ("qa", "dialog: 'qa' ('Q: {q} A:'), 'vicuna_v1' (LLaVA), 'blip2_vqa'"),
    "tokenizer": ("bytes", "'bytes' | 'sentencepiece:PATH' | 'hf:PATH/tokenizer.json' | "
                           "'clip' | 'siglip' | 'bert-base-uncased' | 't5' | 'hub:ORG/NAME' "
                           "(the Hugging Face hub cache)"),
    "max_len": (32, "text length L of the int32 [B, L] token ids"),
    "image_size": (224, "output side in pixels (images, video frames)"),
    "augment": ("rrc", "'rrc' (random resized crop) or 'center' (resize + center crop)"),
    "crop_scale": ((0.9, 1.0), "rrc: range of the crop's fraction of the image area"),
    "crop_ratio": ((3 / 4, 4 / 3), "rrc: range of the crop's aspect ratio (log-uniform)"),
    "flip": (False, "random horizontal flip"),
    "mean": (decode_lib.CLIP_MEAN, "per-channel mean on a 0..1 scale (CLIP's)"),
    "std": (decode_lib.CLIP_STD, "per-channel std on a 0..1 scale (CLIP's)"),
    "output": ("float32", "'float32' (pixels normalized on the host) or 'uint8' (raw pixels, "
                          "normalized on the device: a quarter of the host-to-device bytes)"),
    "sample_rate": (48000, "audio: samples per second of the decoded waveform"),
    "clip_seconds": (10.0, "audio: every clip is cropped or zero-padded to this length"),
    "num_frames": (8, "video: frames per clip, T of [B, T, S, S, 3]"),
    "shuffle_buffer": (1000, "samples held for shuffling per worker; 0 or 1 = no shuffle"),
    "resampled": (False, "True: infinite, shards drawn with replacement per worker"),
    "workers": (4, "decoding processes per JAX process; 0 = decode in this process"),
    "prefetch": (2, "batches each worker may prepare ahead"),
    "max_pixels": (89_478_485, "skip images whose header declares more pixels (PIL's limit)"),
    "max_bad_fraction": (0.1, "stop once this fraction of the samples seen is bad ..."),
    "min_bad_count": (100, "... and at least this many were bad"),
    "seed": (0, "shard order, shuffle buffer and augmentation RNG seed"),
    "reset_stream_on_resume": (False, "True: a resumed run keeps the checkpoint's train "
                                      "state but starts the data stream afresh (needed after "
                                      "changing shards, seed, shuffle_buffer, resampled, "
                                      "weights, workers or the process count)"),
    "start_method": ("spawn", "multiprocessing start method of the loader workers"),
}


def default_data_config() -> ml_collections.ConfigDict:
    """Every key of the data pipeline (``config.data.train``), with defaults
    (``DATA_KEYS`` describes each)."""
    return ml_collections.ConfigDict({k: v for k, (v, _) in DATA_KEYS.items()})


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """Checked data options of one iterator (what every worker process receives).

    Built by ``build_options``; the keys of ``default_data_config`` plus what
    the iterator derives: ``mode`` ("train" | "eval"), ``paths`` (resolved
    shard list), ``probs`` (per-shard draw probability when resampled, else
    None), the process's place, ``num_workers`` (``max(1, workers)``),
    ``modality`` and ``media`` (the ``MediaSpec`` the model's tower reads:
    the caller names it, the config does not; it travels to spawned workers
    with the options, so a spec registered at run time works with worker
    processes too).
    Eval options have ``augment="center"``, no flip and no shuffle buffer.
    """
    mode: str
    paths: tuple[str, ...]
    probs: tuple[float, ...] | None
    resampled: bool
    seed: int
    process_index: int
    process_count: int
    workers: int
    num_workers: int
    modality: str
    media: media_lib.MediaSpec
    caption_key: str
    group_key: str
    tokenizer: str | Callable
    text_format: str
    image_token_id: int | None
    dialog_template: str
    num_captions: int
    answers: tuple[str, ...]
    max_answers: int
    max_len: int
    image_size: int
    augment: str
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    flip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    output: str
    sample_rate: int
    clip_seconds: float
    num_frames: int
    shuffle_buffer: int
    prefetch: int
    max_pixels: int | None
    max_bad_fraction: float
    min_bad_count: int
    start_method: str


def cfg_get(cfg, key: str, default=None):
    """``cfg[key]`` of a ConfigDict or dict; ``default`` when missing, or when
    the value is None and ``default`` is not."""
    try:
        value = cfg[key]
    except (KeyError, AttributeError):
        return default
    return default if value is None and default is not None else value


def _check_text_format(text_format) -> None:
    if text_format not in TEXT_FORMATS:
        raise ConfigError(f"data.train.text_format must be one of "
                          f"{', '.join(repr(f) for f in TEXT_FORMATS)}, got {text_format!r}")


def _positive(key: str, value, kind):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number <= 0 or (kind is int and number != value):
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"data.train.{key} must be {what} > 0, got {value!r}")
    return number


def build_options(cfg, *, mode: str, process_index: int | None, process_count: int | None,
                  seed: int | None, tokenizer: Callable | None,
                  media: media_lib.MediaSpec | str = "image") -> DataOptions:
    """Checks a ``default_data_config()``-shaped config and flattens it.

    Raises ``ConfigError`` naming the ``data.train.*`` key for a bad value
    (unknown text format, weights without resampling, fewer shards than
    processes x workers, ...). ``media``: the media each sample holds, a
    ``MediaSpec`` or the name of one in ``mmjax.data.media.MEDIA`` (the model's
    tower says which: ``Family.media``). ``process_index`` /
    ``process_count`` default to JAX's.
    """
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    defaults = default_data_config()
    get = lambda k: cfg_get(cfg, k, defaults[k])  # noqa: E731
    weights = cfg_get(cfg, "weights")
    resampled = bool(get("resampled")) and mode == "train"
    if weights is not None and not resampled:
        raise ConfigError("data.train.weights needs data.train.resampled=True (weighted "
                          "sources are sampled with replacement).")
    if not isinstance(media, media_lib.MediaSpec):
        media = media_lib.get_media_spec(media)
    src = sources_lib.build_sources(get("shards"), weights)
    workers = int(get("workers"))
    if workers < 0:
        raise ConfigError(f"data.train.workers must be >= 0, got {workers}")
    num_workers = max(1, workers)
    n = len(src.paths)
    if mode == "train" and not resampled and n < process_count * num_workers:
        raise ConfigError(
            f"data.train.shards has {n} shards but {process_count} processes x {num_workers} "
            f"workers need at least {process_count * num_workers} (one shard per worker per "
            "epoch); lower data.train.workers, use more shards, or set data.train.resampled=True.")
    _check_text_format(get("text_format"))
    template = cfg_get(cfg, "dialog_template", "qa")
    if get("text_format") in ("dialog", "vqa"):
        dialog_template(template)  # unknown name: clear error
    if get("text_format") == "vqa" and not cfg_get(cfg, "answers"):
        raise ConfigError("data.train.text_format='vqa' needs data.train.answers (the answer "
                          "vocabulary; a one-tower model fills it from model.answers).")
    if get("output") not in ("float32", "uint8"):
        raise ConfigError(f"data.train.output must be 'float32' or 'uint8', got {get('output')!r}")
    return DataOptions(
        mode=mode, paths=tuple(src.paths),
        probs=tuple(src.shard_probabilities()) if resampled else None,
        resampled=resampled, seed=int(get("seed") if seed is None else seed),
        process_index=int(process_index), process_count=int(process_count),
        workers=workers, num_workers=num_workers, modality=media.name, media=media,
        caption_key=get("caption_key"), group_key=str(get("group_key") or ""),
        tokenizer=tokenizer or get("tokenizer"),
        text_format=get("text_format"), image_token_id=cfg_get(cfg, "image_token_id"),
        dialog_template=template,
        num_captions=int(get("num_captions")),
        answers=tuple(str(a) for a in (cfg_get(cfg, "answers") or ())),
        max_answers=int(get("max_answers")),
        max_len=int(get("max_len")), image_size=int(get("image_size")),
        augment="center" if mode == "eval" else get("augment"),
        crop_scale=tuple(get("crop_scale")), crop_ratio=tuple(get("crop_ratio")),
        flip=bool(get("flip")) and mode == "train",
        mean=tuple(get("mean")), std=tuple(get("std")), output=get("output"),
        sample_rate=_positive("sample_rate", get("sample_rate"), int),
        clip_seconds=_positive("clip_seconds", get("clip_seconds"), float),
        num_frames=_positive("num_frames", get("num_frames"), int),
        shuffle_buffer=int(get("shuffle_buffer")) if mode == "train" else 0,
        prefetch=int(get("prefetch")), max_pixels=get("max_pixels"),
        max_bad_fraction=float(get("max_bad_fraction")),
        min_bad_count=int(get("min_bad_count")), start_method=get("start_method"),
    )
