"""Video decoding for video-text training: T frames of a clip, one crop for all of them.

``decode_video(data, ext, rng, options) -> uint8 [T, S, S, 3]``, decoded with
PyAV (FFmpeg) from the encoded bytes (``VIDEO_EXTS``; the container is
probed from the content, not the extension).

Which frames (the frames of a clip are its video packets in presentation
order, so a variable-frame-rate clip is sampled by frame index, not by time):
the N frames are cut into T segments, segment k holding frames
``floor(k N / T) .. max(floor(k N / T), floor((k + 1) N / T) - 1)``.

* eval (``augment="center"``): frame ``floor((k + 1/2) N / T)`` of each
  segment (its centre); a centre square crop; no flip.
* train (``augment="rrc"``, TSN-style): one frame drawn uniformly from each
  segment, then ONE random resized crop (``crop_scale``, ``crop_ratio``,
  drawn on the stream's frame size) and ONE flip decision (``flip``), shared
  by every frame of the clip. Draw order from ``rng``: the T frame indices,
  then the crop box, then the flip.

A clip with fewer than T frames gives segments holding a single frame each,
so frames repeat (a segment's one frame is the frame its start falls in):
a 3-frame clip sampled at T=8 gives frames 0 0 0 1 1 1 2 2 in training and
0 0 0 1 1 2 2 2 (segment centres) in eval.

How the frames are decoded (decode less, convert only what is used):

1. All packets of the first video stream are demuxed (no decoding): their
   count is N, their timestamps give presentation order, and their keyframe
   flags say where decoding may start.
2. The needed frames are visited in decode order. Before each one, if a
   keyframe lies between the decoder's current position and that frame (the
   last keyframe at or before the frame, in decode order and in presentation
   order), the packets in between are skipped: the decoder is drained and
   flushed and restarts at that keyframe. Otherwise it decodes on from where
   it is. This is "seek to the nearest keyframe before each needed frame"
   whenever seeking saves work, and plain sequential decoding when keyframes
   are sparse (e.g. x264's default of one every 250 frames), with no
   threshold to tune. Decoding stops at the last needed frame.
3. Packets that are not needed frames are decoded with
   ``skip_frame="NONREF"``: frames no other frame refers to (most B-frames)
   are skipped, not decoded.
4. Only the needed frames are converted to RGB, and at reduced size: the
   crop box is shrunk by integer factors (per axis, as far as it stays at
   least S pixels) in the same swscale pass that converts YUV to RGB (area
   filter), and the remaining shrink (< 2) is one bilinear warp of the crop
   box (``mmjax.data.decode.resample_box``, flip included).

If the decoder does not hand back a needed frame under its packet's
timestamp (a container without timestamps, a codec that re-times frames),
the clip is decoded again from its start, every frame in output order, and
the sampled indices are taken from those frames (the last one repeated
should there be fewer frames than packets). The decoder runs on one thread
(``options.video_threads``, default 1): the pipeline's parallelism is its
worker processes. Rotation metadata and non-square sample aspect ratios are
ignored.

Bad input raises ``BadSample``: ``corrupt_video`` for bytes FFmpeg cannot
open or decode, a packet flagged corrupt, a sampled frame flagged corrupt,
or a file holding fewer packets than its header's frame count (a truncated
MP4 or AVI); ``empty_video`` for a file without a video stream or without
frames. A Matroska/WebM file cut short between packets has no frame count to
check against and decodes as the shorter clip that its complete packets hold.
"""
from __future__ import annotations

import bisect
import io
from typing import Any, Callable, Sequence

import numpy as np

from mmjax.data.bad import BadSample
from mmjax.data.decode import center_crop_box, random_resized_crop_box, resample_box
from mmjax.errors import ConfigError

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi")

Box = tuple[float, float, float, float]  # left, top, width, height as fractions of the frame


def segment_bounds(n: int, t: int, k: int) -> tuple[int, int]:
    """Frames ``[lo, hi)`` of segment ``k`` of ``t`` over ``n`` frames (never empty)."""
    lo = k * n // t
    return lo, max(lo + 1, (k + 1) * n // t)


def frame_indices(n: int, t: int, rng: np.random.Generator | None) -> list[int]:
    """The ``t`` frame indices sampled from ``n`` frames: segment centres when ``rng``
    is None, else one uniform draw per segment (``t`` draws of ``rng``)."""
    if n < 1 or t < 1:
        raise ValueError(f"need n >= 1 frames and t >= 1 samples, got n={n}, t={t}")
    if rng is None:
        return [(2 * k + 1) * n // (2 * t) for k in range(t)]
    return [int(rng.integers(*segment_bounds(n, t, k))) for k in range(t)]


def decode_video(data: bytes, ext: str, rng: np.random.Generator | None,
                 options: Any) -> np.ndarray:
    """Encoded video bytes -> uint8 ``[T, S, S, 3]`` RGB frames.

    Args:
      data: the encoded file (MP4, WebM, Matroska, AVI, ... anything FFmpeg reads).
      ext: its member extension, for messages (FFmpeg probes the format from the bytes).
      rng: randomness of training sampling and augmentation (None only for
        ``augment="center"``).
      options: any object with ``num_frames`` (T), ``image_size`` (S),
        ``augment`` ("rrc": train sampling, "center": eval), and for "rrc"
        ``crop_scale``, ``crop_ratio``, ``flip``; optional ``video_threads``.

    Raises:
      BadSample: ``corrupt_video`` or ``empty_video`` (see the module docstring).
    """
    import av

    t, size = int(options.num_frames), int(options.image_size)
    augment = options.augment
    if augment not in ("rrc", "center"):
        raise ConfigError(f"data.train.augment must be 'rrc' or 'center' for video, "
                          f"got {augment!r}")
    if augment == "rrc" and rng is None:
        raise ValueError("decode_video with augment='rrc' needs an rng")
    errors = (av.error.FFmpegError, EOFError, OSError, UnicodeError, OverflowError)
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except errors as e:
        raise BadSample("corrupt_video", f"FFmpeg cannot open the {ext}: {e}") from None
    try:
        return _decode(container, t, size, rng if augment == "rrc" else None, options)
    except BadSample:
        raise
    except errors as e:
        raise BadSample("corrupt_video", f"{type(e).__name__} decoding the {ext}: {e}") from None
    finally:
        container.close()


def _decode(container, t: int, size: int, rng: np.random.Generator | None,
            options: Any) -> np.ndarray:
    if not container.streams.video:
        raise BadSample("empty_video", "the file has no video stream")
    stream = container.streams.video[0]
    cc = stream.codec_context
    if cc is None:
        raise BadSample("corrupt_video", "FFmpeg has no decoder for the video stream's codec")
    packets = [p for p in container.demux(stream) if p.size]
    if not packets:
        raise BadSample("empty_video", "the video stream holds no frames")
    if any(p.is_corrupt for p in packets):
        raise BadSample("corrupt_video", "a video packet is flagged corrupt (truncated file?)")
    if stream.frames and len(packets) < stream.frames:
        raise BadSample("corrupt_video", f"truncated: the header declares {stream.frames} "
                        f"frames, the file holds {len(packets)}")
    # Packets the demuxer marks as discarded (outside an edit list) are decoded
    # as references but are not frames of the clip.
    shown = [i for i, p in enumerate(packets) if not p.is_discard] or list(range(len(packets)))
    indices = frame_indices(len(shown), t, rng)

    threads = int(getattr(options, "video_threads", 1) or 1)
    cc.thread_count = threads
    cc.thread_type = "AUTO" if threads > 1 else "NONE"
    width, height = cc.width, cc.height
    if width <= 0 or height <= 0:
        raise BadSample("corrupt_video", f"the video stream declares a {width}x{height} frame")
    if rng is None:
        left, top, cw, ch = center_crop_box(width, height)
        flip = False
    else:
        left, top, cw, ch = random_resized_crop_box(
            width, height, rng, tuple(getattr(options, "crop_scale", (0.9, 1.0))),
            tuple(getattr(options, "crop_ratio", (3 / 4, 4 / 3))))
        flip = bool(getattr(options, "flip", False)) and rng.random() < 0.5
    box = (left / width, top / height, cw / width, ch / height)

    def convert(frame) -> np.ndarray:
        if frame.is_corrupt:
            raise BadSample("corrupt_video", "a sampled frame decoded with errors")
        return crop_frame(frame, box, size, flip)

    frames = _decode_by_pts(cc, packets, shown, indices, convert)
    if frames is None:
        frames = _decode_in_order(cc, packets, indices, convert)
    return np.stack(frames)


def crop_frame(frame, box: Box, size: int, flip: bool) -> np.ndarray:
    """One decoded ``av.VideoFrame`` -> uint8 ``[size, size, 3]``: the crop ``box``
    (fractions of the frame), resized, optionally mirrored.

    The frame is converted to RGB already shrunk by the largest integer factor
    per axis that keeps the crop at least ``size`` pixels (one swscale pass,
    area filter); one bilinear warp does the rest.
    """
    fw, fh = frame.width, frame.height
    cw, ch = box[2] * fw, box[3] * fh
    kx, ky = max(1, int(cw // size)), max(1, int(ch // size))
    if kx > 1 or ky > 1:
        w, h = max(1, round(fw / kx)), max(1, round(fh / ky))
        rgb = frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="AREA")
    else:
        rgb = frame.to_ndarray(format="rgb24")
    h, w = rgb.shape[:2]
    left, top = box[0] * w, box[1] * h
    return resample_box(rgb, (left, top, left + box[2] * w, top + box[3] * h), size, flip=flip)


def _decode_by_pts(cc, packets: Sequence, shown: Sequence[int], indices: Sequence[int],
                   convert: Callable) -> list[np.ndarray] | None:
    """The frames at ``indices`` (into ``shown`` in presentation order), decoding from
    the keyframe before each one when a keyframe lies ahead (module docstring).
    None when timestamps do not identify frames (missing, repeated, or a needed
    frame never came out under its packet's timestamp)."""
    pts = [p.pts for p in packets]
    if any(v is None for v in pts) or len(set(pts)) != len(pts):
        return None
    order = sorted(shown, key=lambda i: pts[i])           # presentation order -> packet index
    wanted = {pts[order[j]]: order[j] for j in set(indices)}  # pts -> packet index
    keys = [i for i, p in enumerate(packets) if p.is_keyframe]
    got: dict[int, np.ndarray] = {}

    def take(frames) -> None:
        for f in frames:
            if f.pts in wanted and f.pts not in got:
                got[f.pts] = convert(f)

    pos, fed = 0, False
    for target in sorted(wanted, key=wanted.get):          # needed frames in decode order
        if target in got:
            continue
        start = _keyframe_before(keys, pts, wanted[target], target)
        if start > pos:                                     # a keyframe lies ahead: skip to it
            if fed:
                take(cc.decode(None))
                cc.flush_buffers()
            pos = start
        while target not in got and pos < len(packets):
            cc.skip_frame = "DEFAULT" if pts[pos] in wanted else "NONREF"
            take(cc.decode(packets[pos]))
            pos, fed = pos + 1, True
        if target not in got:                               # end of stream: drain the decoder
            cc.skip_frame = "DEFAULT"
            take(cc.decode(None))
            break
    cc.skip_frame = "DEFAULT"
    if len(got) < len(wanted):
        cc.flush_buffers()
        return None
    return [got[pts[order[j]]] for j in indices]


def _keyframe_before(keys: Sequence[int], pts: Sequence[int], index: int, target: int) -> int:
    """Packet index of the last keyframe at or before packet ``index`` in decode order
    whose timestamp is at most ``target`` (0 if there is none)."""
    j = bisect.bisect_right(keys, index) - 1
    while j >= 0 and pts[keys[j]] > target:
        j -= 1
    return keys[j] if j >= 0 else 0


def _decode_in_order(cc, packets: Sequence, indices: Sequence[int],
                     convert: Callable) -> list[np.ndarray]:
    """Fallback: every packet decoded from the start; frames numbered in output order."""
    need = set(indices)
    last = max(need)
    got: dict[int, np.ndarray] = {}
    count, latest = 0, None

    def take(frames) -> None:
        nonlocal count, latest
        for f in frames:
            if count in need:
                got[count] = convert(f)
            latest = f
            count += 1

    for p in packets:
        take(cc.decode(p))
        if count > last:
            break
    else:
        take(cc.decode(None))
    if count == 0:
        raise BadSample("empty_video", "no frame decoded from the video stream")
    if count <= last:  # fewer frames than packets: the last frame stands in
        tail = convert(latest)
        return [got.get(i, tail) if i < count else tail for i in indices]
    return [got[i] for i in indices]
