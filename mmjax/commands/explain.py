"""`mmjax explain`: where a trained model finds a phrase in an image, a sound or a video.

    mmjax explain --workdir DIR --image photo.png --text "the small red cross" --out map.png
    mmjax explain --workdir DIR --image photo.png --text "a red circle" --text "a blue square" \\
        --out maps.png                                  # one panel per phrase
    mmjax explain --workdir DIR --media clip.wav --text "a dog barking" --out map.png
    mmjax explain --workdir DIR --media clip.mp4 --text "a red ball" --out map.png

The map is the run's family's grounding map (`mmjax.evaluate.grounding`:
gradient x activation of the pair's score at the media tokens) over the patch
grid, upsampled and drawn over the input: the image, the log-mel spectrogram
(frequency up, time to the right) or every frame side by side. Each panel
names its phrase and the model's score of the pair (cosine or ITM log-odds).
With several `--text` phrases, each map explains its phrase's score minus the
mean score of the others: where the phrase differs from the alternatives.
The run's config gives the preprocessing (center crop, mean/std, clip length).
"""
from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np

from mmjax.commands.util import error_text, fail, user_errors

PANEL = 256  # pixels of a panel's longer side: tiny model inputs are drawn larger


def _media_options(config):
    """The data options the media decoders read, for one file decoded as in evaluation."""
    from mmjax.data.options import default_data_config
    d = {**dict(default_data_config()), **dict(config.data.train)}
    return SimpleNamespace(**{**d, "augment": "center", "mode": "eval", "output": "float32"})


def _read_media(config, family, path: str):
    """`(model input [1, ...] float32, the decoded media)` of one file."""
    from mmjax.data.bad import BadSample
    from mmjax.data.media import get_media_spec
    from mmjax.evaluate.runner import EvalError
    modality = family.media(config.model)
    spec = get_media_spec(modality)
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in spec.exts:
        raise EvalError(f"--image/--media {path}: the run's model reads {modality} "
                        f"({', '.join(spec.exts)} files), not .{ext or '?'}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise EvalError(f"--image/--media {path}: cannot read it ({e})") from None
    options = _media_options(config)
    try:
        decoded = spec.decode(data, ext, None, options)
    except BadSample as e:
        raise EvalError(f"--image/--media {path}: cannot decode it as {modality} "
                        f"({e})") from None
    return spec.stack([decoded], options), decoded


def _upscale(image: np.ndarray, long_side: int = PANEL) -> np.ndarray:
    from PIL import Image
    h, w = image.shape[:2]
    k = max(1, long_side // max(h, w))
    return np.asarray(Image.fromarray(image).resize((w * k, h * k), Image.NEAREST))


def _spectrogram_image(model, wave: np.ndarray) -> np.ndarray:
    """The tower's log-mel of `wave [1, num_samples]` as uint8 `[F, T, 3]`, frequency up."""
    from mmjax.models.grounding import media_tower
    tower = media_tower(model)
    spec = np.asarray(tower.apply({}, np.asarray(wave, np.float32), method="spectrogram"))[0]
    img = spec.T[::-1]  # [n_mels, frames], low frequencies at the bottom
    lo, hi = float(img.min()), float(img.max())
    grey = np.round(255 * (img - lo) / (hi - lo if hi > lo else 1.0)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, -1)


def explain_panels(workdir: str, media_path: str, texts: Sequence[str],
                   step: Optional[int] = None) -> list[dict]:
    """Grounding maps of each phrase in one media file for a run's latest (or `step`)
    checkpoint.

    Returns one dict per phrase: `text`, `score` (the pair's score), `map`
    (`[gh, gw]`, `[F, T]` or `[frames, gh, gw]` float32 in [0, 1]) and `picture`
    (uint8 `[H, W, 3]`: the map drawn over the image, spectrogram or frames)."""
    from mmjax.data.tokenizers import build_tokenizer
    from mmjax.evaluate.grounding import Grounder, normalize_maps, overlay
    from mmjax.evaluate.runner import EvalError
    from mmjax.families import get_family
    from mmjax.models import build
    from mmjax.train.init_sources import restore_run_params

    if not texts:
        raise EvalError("give at least one --text PHRASE")
    config, params, _ = restore_run_params(workdir, step)
    model, family = build(config.model), get_family(config)
    media, decoded = _read_media(config, family, media_path)
    d = config.data.train
    tokenizer = build_tokenizer(d.tokenizer, int(d.max_len))
    grounder = Grounder(config, model, {"params": params})
    modality = family.media(config.model)
    text = np.asarray(tokenizer(list(texts)), np.int32)
    # With several phrases each map explains its phrase against the others (the mean
    # of their scores is subtracted): what sets it apart, not what all phrases share.
    ref = None
    if len(texts) > 1:
        ref = np.stack([np.delete(text, i, axis=0) for i in range(len(texts))])
    media = np.repeat(media, len(texts), 0)
    maps, scores = grounder(media, text, ref)
    if ref is not None:  # the panels name each pair's own score
        scores = grounder(media, text)[1]
    maps = normalize_maps(maps)
    panels = []
    for phrase, heat, score in zip(texts, maps, scores):
        if modality == "audio":
            picture = overlay(_upscale(_spectrogram_image(model, media)), heat[::-1])
        elif heat.ndim == 3:  # video: one map per frame
            picture = np.concatenate([overlay(_upscale(f, PANEL // 2), h)
                                      for f, h in zip(decoded, heat)], axis=1)
        else:
            picture = overlay(_upscale(decoded), heat)
        panels.append(dict(text=phrase, score=float(score), map=heat, picture=picture))
    return panels


def render_panels(panels: Sequence[dict]) -> np.ndarray:
    """Panels (from `explain_panels`) stacked top to bottom, each under a line naming
    its phrase and score -> uint8 `[H, W, 3]`."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    width = max(p["picture"].shape[1] for p in panels)
    rows = []
    for p in panels:
        pic = p["picture"]
        canvas = Image.new("RGB", (width, pic.shape[0] + 18), (255, 255, 255))
        ImageDraw.Draw(canvas).text((4, 3), f'"{p["text"]}"  score {p["score"]:.3f}',
                                    fill=(0, 0, 0), font=font)
        canvas.paste(Image.fromarray(pic), (0, 18))
        rows.append(np.asarray(canvas))
    return np.concatenate(rows, axis=0)


def explain_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mmjax explain",
        description="Draw where a trained model finds each phrase in an image, sound or "
                    "video (grounding maps: two-tower, CoCa, BLIP-2 and one-tower runs).")
    p.add_argument("--workdir", required=True, metavar="DIR", help="a training run's folder")
    media = p.add_mutually_exclusive_group(required=True)
    media.add_argument("--image", metavar="PATH", help="image file (png, jpg, webp, ...)")
    media.add_argument("--media", metavar="PATH",
                       help="media file of the run's modality (image, wav/flac/ogg/mp3, "
                            "mp4/webm/mkv/avi)")
    p.add_argument("--text", action="append", required=True, metavar="PHRASE",
                   help="phrase to find; repeat for one panel per phrase")
    p.add_argument("--out", required=True, metavar="PNG", help="the PNG file to write")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="checkpoint step to use; default the latest")
    args = p.parse_args(argv)
    if not os.path.isdir(args.workdir):
        return fail(f"--workdir {args.workdir}: no such folder")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        return fail(f"--out {args.out}: folder {out_dir} does not exist")
    try:
        panels = explain_panels(args.workdir, args.image or args.media, args.text, args.step)
    except user_errors() as e:
        return fail(error_text(e))
    from PIL import Image
    Image.fromarray(render_panels(panels)).save(args.out)
    for panel in panels:
        print(f"{panel['text']!r}: score {panel['score']:.4f}")
    print(f"wrote {args.out}")
    sys.stdout.flush()
    return 0
