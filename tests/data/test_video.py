"""Video: decode_video against an independent full decode (frame choice, crop, flip,
short clips, bad files), the synthetic moving-shapes clips, and the VideoViT tower."""
import io
import os
import tarfile
from types import SimpleNamespace

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data import synthetic_video as sv
from mmjax.data import video
from mmjax.data.bad import BadSample
from mmjax.data.decode import center_crop_box, random_resized_crop_box, resample_box
from mmjax.errors import ConfigError
from mmjax.models import towers
from mmjax.models.video import VideoViT
from mmjax.models.vit import ViT

av = pytest.importorskip("av")

W, H = 64, 48


def _frames(n, w=W, h=H, seed=0):
    """n distinct frames: a textured background panning 2 px per frame, a bright bar
    whose row is the frame index, and a left-right asymmetric gradient (so a flip shows)."""
    rng = np.random.default_rng(seed)
    tex = rng.integers(40, 200, (h, w + 2 * n, 3)).astype(np.float32)
    tex = cv2.GaussianBlur(tex, (5, 5), 1.5)
    out = []
    for i in range(n):
        f = tex[:, 2 * i:2 * i + w].copy()
        f[:, : w // 4] *= 0.5
        f[(i * 3) % h, :] = 250
        out.append(np.clip(f, 0, 255).astype(np.uint8))
    return np.stack(out)


def _encode(frames, codec="libx264", fmt="mp4", gop=5, path=None, muxer_options=None):
    buf = path or io.BytesIO()
    with av.open(buf, "w", format=fmt, options=muxer_options or {}) as out:
        st = out.add_stream(codec, rate=25)
        st.height, st.width = frames.shape[1:3]
        st.pix_fmt = "yuv420p"
        st.options = {"g": str(gop), **({"bf": "2"} if codec == "mpeg4" else {})}
        for i, im in enumerate(frames):
            f = av.VideoFrame.from_ndarray(im, format="rgb24")
            f.pts = i
            for p in st.encode(f):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    if path:
        with open(path, "rb") as f:
            return f.read()
    return buf.getvalue()


def _reference(data):
    """Every frame of the file, decoded by PyAV in order, as RGB."""
    with av.open(io.BytesIO(data)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _opts(t, s, augment="center", **kw):
    return SimpleNamespace(num_frames=t, image_size=s, augment=augment, **kw)


def _crop(frame, box, size, flip=False):
    left, top, w, h = box
    return resample_box(frame, (left, top, left + w, top + h), size, flip=flip)


CLIPS = [("libx264", "mp4", "mp4"), ("libvpx-vp9", "webm", "webm"), ("mpeg4", "avi", "avi"),
         ("libx264", "matroska", "mkv")]


@pytest.fixture(scope="module")
def clips():
    frames = _frames(40)
    return frames, {ext: _encode(frames, codec, fmt) for codec, fmt, ext in CLIPS}


@pytest.mark.parametrize("ext", [c[2] for c in CLIPS])
def test_eval_frames_are_segment_centres_of_an_independent_decode(clips, ext):
    _, files = clips
    ref = _reference(files[ext])
    n = len(ref)
    assert n == 40
    for t in (8, 3):
        # segment k of t over n frames is [k n / t, (k+1) n / t); its centre (k + 1/2) n / t
        idx = [int(np.floor((k + 0.5) * n / t)) for k in range(t)]
        box = center_crop_box(W, H)
        out = video.decode_video(files[ext], ext, None, _opts(t, 32))  # crop 48 -> 32: 1 warp
        assert out.shape == (t, 32, 32, 3) and out.dtype == np.uint8
        expect = np.stack([_crop(ref[i], box, 32) for i in idx])
        np.testing.assert_array_equal(out, expect)
        # 48 -> 12 px: converted at 1/4 size first; compare with an area resize of the crop
        small = video.decode_video(files[ext], ext, None, _opts(t, 12))
        l, tp, w, h = box
        area = np.stack([cv2.resize(ref[i][tp:tp + h, l:l + w], (12, 12),
                                    interpolation=cv2.INTER_AREA) for i in idx])
        assert np.abs(small.astype(int) - area).mean() < 3


def test_keyframe_skipping_matches_sequential_decode(clips, monkeypatch):
    """The keyframe-skipping path gives the frames a full decode gives, for B-frame
    streams (x264, mpeg4 with bf=2) whose keyframes lie between needed frames; and
    the in-order fallback gives the same frames too."""
    frames = clips[0]
    for codec in ("libx264", "mpeg4"):
        data = _encode(frames, codec, "mp4", gop=4)
        ref = _reference(data)
        idx = [int(np.floor((k + 0.5) * 40 / 4)) for k in range(4)]
        expect = np.stack([_crop(ref[i], center_crop_box(W, H), 40) for i in idx])
        with monkeypatch.context() as m:
            m.setattr(video, "_decode_in_order", lambda *a: pytest.fail("fell back"))
            np.testing.assert_array_equal(
                video.decode_video(data, "mp4", None, _opts(4, 40)), expect)
        with monkeypatch.context() as m:
            m.setattr(video, "_decode_by_pts", lambda *a: None)
            np.testing.assert_array_equal(
                video.decode_video(data, "mp4", None, _opts(4, 40)), expect)


def test_train_one_frame_per_segment_and_one_crop_and_flip_for_the_clip(clips):
    _, files = clips
    data = files["mp4"]
    ref = _reference(data)
    n, t, size = len(ref), 5, 40  # any crop (<= 64 px) is under 2x: warped, not pre-shrunk
    o = _opts(t, size, "rrc", crop_scale=(0.3, 1.0), crop_ratio=(0.5, 2.0), flip=True)
    seen, flips = [set() for _ in range(t)], set()
    for seed in range(12):
        out = video.decode_video(data, "mp4", np.random.default_rng(seed), o)
        np.testing.assert_array_equal(
            out, video.decode_video(data, "mp4", np.random.default_rng(seed), o))
        # Documented draw order: t frame indices, the crop box, the flip.
        rng = np.random.default_rng(seed)
        drawn = [int(rng.integers(k * n // t, (k + 1) * n // t)) for k in range(t)]
        box = random_resized_crop_box(W, H, rng, o.crop_scale, o.crop_ratio)
        flip = rng.random() < 0.5
        flips.add(flip)
        expect = np.stack([_crop(ref[i], box, size, flip) for i in drawn])
        np.testing.assert_array_equal(out, expect)
        # Identify each output frame among all frames under that crop: it lies in its segment.
        crops = np.stack([_crop(f, box, size, flip) for f in ref]).astype(int)
        for k in range(t):
            found = int(np.argmin(np.abs(crops - out[k]).mean(axis=(1, 2, 3))))
            assert k * n // t <= found < (k + 1) * n // t
            seen[k].add(found)
    assert flips == {True, False}
    assert all(len(s) > 2 for s in seen)  # the draw varies within each segment


def test_short_clip_repeats_frames():
    frames = _frames(3)
    data = _encode(frames, "libx264", "mp4")
    ref = _reference(data)
    box = center_crop_box(W, H)
    out = video.decode_video(data, "mp4", None, _opts(8, 32))
    expect_idx = [int(np.floor((k + 0.5) * 3 / 8)) for k in range(8)]
    assert expect_idx == [0, 0, 0, 1, 1, 2, 2, 2]
    np.testing.assert_array_equal(out, np.stack([_crop(ref[i], box, 32) for i in expect_idx]))
    # Training: each segment holds one frame, the one its start falls in.
    o = _opts(8, 40, "rrc", crop_scale=(1.0, 1.0), crop_ratio=(W / H, W / H), flip=False)
    out = video.decode_video(data, "mp4", np.random.default_rng(0), o)
    train_idx = [k * 3 // 8 for k in range(8)]
    assert train_idx == [0, 0, 0, 1, 1, 1, 2, 2]
    full = (0, 0, W, H)
    np.testing.assert_array_equal(out, np.stack([_crop(ref[i], full, 40) for i in train_idx]))


def _reason(data, ext="mp4"):
    with pytest.raises(BadSample) as e:
        video.decode_video(data, ext, None, _opts(4, 16))
    return e.value.reason


def test_bad_files(clips, tmp_path):
    frames, files = clips
    assert _reason(b"") == "corrupt_video"
    assert _reason(np.random.default_rng(0).bytes(4000)) == "corrupt_video"
    assert _reason(files["mp4"][: len(files["mp4"]) // 2]) == "corrupt_video"   # index at end lost
    faststart = _encode(frames, path=str(tmp_path / "fs.mp4"),
                        muxer_options={"movflags": "faststart"})
    assert video.decode_video(faststart, "mp4", None, _opts(4, 16)).shape == (4, 16, 16, 3)
    assert _reason(faststart[: int(len(faststart) * 0.7)]) == "corrupt_video"  # data cut off
    avi = files["avi"]
    assert _reason(avi[: int(len(avi) * 0.6)], "avi") == "corrupt_video"   # packet cut in two
    with av.open(io.BytesIO(avi)) as c:  # cut between packets: fewer than the header's 40
        pos = [p.pos for p in c.demux(video=0) if p.size]
    assert _reason(avi[: pos[20] - 8], "avi") == "corrupt_video"
    # A file with only an audio stream, and an AVI whose video stream has no frames.
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as out:
        st = out.add_stream("flac", rate=8000)
        st.layout = "mono"
        a = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        a.sample_rate, a.pts = 8000, 0
        for p in list(st.encode(a)) + list(st.encode()):
            out.mux(p)
    assert _reason(buf.getvalue(), "mkv") == "empty_video"
    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as out:
        st = out.add_stream("mpeg4", rate=8)
        st.width = st.height = 16
        out.start_encoding()
    assert _reason(buf.getvalue(), "avi") == "empty_video"


def test_damaged_files_decode_or_raise_bad_sample(clips):
    """Flipped bytes, cuts and holes: a full-size clip or BadSample, never another error."""
    _, files = clips
    rng = np.random.default_rng(0)
    o = _opts(4, 24, "rrc", crop_scale=(0.5, 1.0), crop_ratio=(0.75, 1.33), flip=True)
    reasons = set()
    for ext in ("mp4", "avi", "webm"):
        for trial in range(24):
            b = bytearray(files[ext])
            if trial % 3 == 0:
                for i in rng.integers(0, len(b), 10):
                    b[i] = int(rng.integers(256))
            elif trial % 3 == 1:
                b = b[: int(rng.integers(1, len(b)))]
            else:
                i = int(rng.integers(len(b)))
                del b[i:i + int(rng.integers(1, 500))]
            try:
                out = video.decode_video(bytes(b), ext, np.random.default_rng(trial), o)
                assert out.shape == (4, 24, 24, 3) and out.dtype == np.uint8
            except BadSample as e:
                reasons.add(e.reason)
    assert "corrupt_video" in reasons and reasons <= {"corrupt_video", "empty_video"}


def test_bad_options():
    with pytest.raises(ConfigError, match="augment"):
        video.decode_video(b"", "mp4", None, _opts(4, 16, "flip"))
    with pytest.raises(ValueError, match="rng"):
        video.decode_video(b"", "mp4", None, _opts(4, 16, "rrc"))


# ---- synthetic clips ---------------------------------------------------------------


def _centroid(frame, rgb):
    """Circular-mean position (x, y in [0, 1)) of the pixels close to colour `rgb`."""
    mask = np.abs(frame.astype(int) - np.asarray(rgb)).sum(-1) < 90
    ys, xs = np.nonzero(mask)
    n = frame.shape[0]
    ang = lambda v: np.angle(np.exp(2j * np.pi * (v + 0.5) / n).mean()) / (2 * np.pi) % 1.0
    return np.array([ang(xs), ang(ys)])


def test_synthetic_motion_is_what_separates_same_colour_and_shape():
    vel = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    seen = {}
    for motion, (vx, vy) in vel.items():
        params = {"color": "green", "shape": "square", "motion": motion}
        clip = sv.render_clip(params, np.random.default_rng(7), frames=8, size=32)
        assert clip.shape == (8, 32, 32, 3) and clip.dtype == np.uint8
        pos = np.stack([_centroid(f, sv.COLORS["green"]) for f in clip])
        step = np.diff(pos, axis=0)
        axis = 0 if vx else 1
        assert np.all(np.sign(step[:, axis]) == vx + vy), (motion, step)  # every frame
        assert np.abs(step[:, 1 - axis]).max() < 0.01, (motion, step)     # not across
        assert 0.02 < np.abs(step.mean(0)).max() < 0.05
        seen[motion] = pos
    # Same draws: moving left is moving right backwards (and up is down backwards), so
    # the set of positions, and any one frame's distribution, is the same for both.
    np.testing.assert_allclose(seen["left"], seen["right"][::-1], atol=0.01)
    np.testing.assert_allclose(seen["up"], seen["down"][::-1], atol=0.01)
    assert np.abs(seen["left"][-1] - seen["right"][-1]).max() > 0.15
    # The shape stays whole in the frame, also in clips too long for its speed.
    for frames in (8, 32):
        for seed in range(20):
            params = {"color": "red", "shape": "square", "motion": "right"}
            clip = sv.render_clip(params, np.random.default_rng(seed), frames=frames, size=32)
            red = np.abs(clip.astype(int) - sv.COLORS["red"]).sum(-1) < 60
            area = red.sum((1, 2))
            assert area.min() > 0.8 * area.max(), (frames, seed, area)
    assert len(sv.CLASSES) == 24 and len(set(sv.CLASSES)) == 24
    assert sv.class_label(sv.class_params(13)) == 13


def test_synthetic_writer_is_deterministic_and_decodes(tmp_path):
    kw = dict(num_samples=5, frames=8, size=32, fps=8, samples_per_shard=3, seed=1)
    a = sv.write_video_shards(str(tmp_path / "a"), **kw)
    b = sv.write_video_shards(str(tmp_path / "b"), **kw)
    assert [os.path.basename(p) for p in a] == ["train-000000.tar", "train-000001.tar"]
    for pa, pb in zip(a, b):
        assert open(pa, "rb").read() == open(pb, "rb").read()
    with tarfile.open(a[0]) as tar:
        names = tar.getnames()
        assert names[:4] == ["000000000.mp4", "000000000.txt", "000000000.cls", "000000000.json"]
        mp4 = tar.extractfile("000000001.mp4").read()
        caption = tar.extractfile("000000001.txt").read().decode()
        label = int(tar.extractfile("000000001.cls").read())
    s = sv.make_clip(1, "train", 8, 32, seed=1)
    assert caption == s["caption"] and label == s["label"]
    p = sv.class_params(label)
    assert p["color"] in caption and p["shape"] in caption and p["motion"] in caption
    out = video.decode_video(mp4, "mp4", None, _opts(8, 32))
    assert np.abs(out.astype(int) - s["frames"]).mean() < 8   # the rendered frames, encoded


# ---- VideoViT -----------------------------------------------------------------------

VIT = dict(image_size=16, patch_size=8, width=32, depth=1, heads=2, embed_dim=16)


def _video(b=2, t=3, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, t, 16, 16, 3))


@pytest.fixture(scope="module")
def towers_params():
    """A seqTransf VideoViT and its parameters (unboxed), inited once."""
    seq = VideoViT(**VIT, num_frames=4, temporal="transformer", temporal_depth=2,
                   temporal_heads=2)
    return seq, nn.unbox(jax.jit(seq.init)(jax.random.key(1), _video())["params"])


def test_frame_params_are_an_image_vit_tree(towers_params):
    _, params = towers_params
    image = jax.eval_shape(ViT(**VIT).init, jax.random.key(5), _video()[:, 0])["params"]
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), nn.unbox(tree))
    assert sorted(params) == ["frame", "frame_posemb", "temporal_0", "temporal_1"]
    assert shapes(params["frame"]) == shapes(image)
    assert params["frame_posemb"].shape == (4, 16)
    mean_params = jax.eval_shape(VideoViT(**VIT).init, jax.random.key(0), _video())["params"]
    assert list(mean_params) == ["frame"]


def test_mean_pooling_is_the_mean_of_the_image_vit_on_each_frame(towers_params):
    image = towers_params[1]["frame"]  # a ViT's parameters (previous test): an image tower's
    x = _video()
    apply = jax.jit(lambda p, x: (VideoViT(**VIT).apply({"params": {"frame": p}}, x),
                                  VideoViT(**VIT, normalize_frames=True).apply(
                                      {"params": {"frame": p}}, x),
                                  ViT(**VIT).apply({"params": p}, x.reshape(6, 16, 16, 3))))
    (pooled, tokens), (normed, _), (per_frame, _) = apply(image, x)
    per_frame = np.asarray(per_frame).reshape(2, 3, 16)
    assert pooled.shape == (2, 16) and tokens.shape == (2, 3, 16)
    np.testing.assert_allclose(tokens, per_frame, atol=1e-5)
    np.testing.assert_allclose(pooled, per_frame.mean(1), atol=1e-5)
    unit = per_frame / np.linalg.norm(per_frame, axis=-1, keepdims=True)
    np.testing.assert_allclose(normed, unit.mean(1), atol=1e-5)


def _identity_blocks(params):
    """seqTransf parameters with both temporal blocks zeroed: each block returns its input."""
    return dict(params, **{k: jax.tree.map(jnp.zeros_like, params[k])
                           for k in ("temporal_0", "temporal_1")})


def test_temporal_transformer_shapes_gradients_and_order(towers_params):
    model, params = towers_params
    x = _video()

    @jax.jit
    def run(p, x):
        def loss(p):
            return jnp.sum(model.apply({"params": p}, x)[0] ** 2)
        mean = VideoViT(**VIT).apply  # meanP over the same frame encoder
        frame = {"params": {"frame": p["frame"]}}
        return (model.apply({"params": p}, x), model.apply({"params": p}, x[:, ::-1])[0],
                mean(frame, x)[0], mean(frame, x[:, ::-1])[0], jax.grad(loss)(p))

    (pooled, tokens), rev, mean_fwd, mean_rev, grads = run(params, x)
    assert pooled.shape == (2, 16) and tokens.shape == (2, 3, 16)
    for name in ("frame", "frame_posemb", "temporal_0", "temporal_1"):
        g = jnp.concatenate([v.ravel() for v in jax.tree.leaves(grads[name])])
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0, name
    # seqTransf with identity blocks (all block parameters zero): the blocks return
    # their input x + posemb, and the residual adds x again: pooled = mean(2 x + posemb).
    ident = _identity_blocks(params)
    got, per_frame = jax.jit(lambda p, x: (model.apply({"params": p}, x)[0], ViT(**VIT).apply(
        {"params": p["frame"]}, x.reshape(6, 16, 16, 3))[0]))(ident, x)
    per_frame = np.asarray(per_frame).reshape(2, 3, 16)
    np.testing.assert_allclose(
        got, (2 * per_frame + np.asarray(params["frame_posemb"])[:3]).mean(1), atol=1e-5)
    # Unlike the mean, the transformer sees frame order.
    assert float(jnp.abs(rev - pooled).max()) > 1e-4
    np.testing.assert_allclose(mean_rev, mean_fwd, atol=1e-5)
    with pytest.raises(ConfigError, match="num_frames"):
        jax.eval_shape(VideoViT(**VIT, num_frames=2, temporal="transformer",
                                temporal_heads=2).init, jax.random.key(0), x)


def test_centred_frames_feed_the_temporal_blocks_what_changes(towers_params):
    """`center_frames=True`: the blocks see each clip's frame embeddings minus their
    mean over frames at unit RMS (independent numpy formula), so a clip whose frames
    are all alike gives the blocks zeros, and the output stays x + blocks(...)."""
    _, params = towers_params
    model = VideoViT(**VIT, num_frames=4, temporal="transformer", temporal_depth=2,
                     temporal_heads=2, center_frames=True)
    x = _video()
    still = jnp.repeat(x[:, :1], 3, axis=1)  # three identical frames per clip
    ident = _identity_blocks(params)
    run = jax.jit(lambda p, x: (model.apply({"params": p}, x)[0], ViT(**VIT).apply(
        {"params": p["frame"]}, x.reshape(-1, 16, 16, 3))[0]))
    pe = np.asarray(params["frame_posemb"])[:3]
    for clip in (x, still):
        got, per_frame = run(ident, clip)
        f = np.float64(per_frame).reshape(2, 3, 16)
        d = f - f.mean(1, keepdims=True)
        ms = (d ** 2).mean((1, 2), keepdims=True)
        centred = d / np.sqrt(ms + 1e-4 * (f ** 2).mean((1, 2), keepdims=True))
        # identity blocks return their input (centred + posemb); the residual adds f.
        np.testing.assert_allclose(got, (f + centred + pe).mean(1), atol=1e-4)
        if clip is x:
            np.testing.assert_allclose(np.sqrt((centred ** 2).mean((1, 2))), 1, atol=1e-3)
        else:
            assert np.abs(centred).max() < 1e-3
    # frame_posemb starts at the scale of its centred input (std 1, not 0.02).
    pe_init = nn.unbox(jax.jit(model.init)(jax.random.key(3), x)["params"])["frame_posemb"]
    assert pe_init.shape == (4, 16) and 0.7 < float(jnp.std(pe_init)) < 1.3


def test_registry_and_token_mode():
    assert towers.tower_class("video_vit") is VideoViT
    assert VideoViT.modality == "video"
    data = SimpleNamespace(num_frames=6, image_size=16, get=lambda k, d=None: d)
    assert VideoViT.example_input(VIT, data) == ((6, 16, 16, 3), np.float32)
    assert VideoViT.forward_flops(dict(VIT, num_frames=6)) == pytest.approx(
        6 * ViT.forward_flops(VIT))
    # pool="none": every frame's tokens, for towers read by attention (CoCa, BLIP-2).
    model = VideoViT(**dict(VIT, pool="none", embed_dim=None))
    (pooled, tokens), _ = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x), _video())
    assert pooled is None and tokens.shape == (2, 3 * 4, 32)
