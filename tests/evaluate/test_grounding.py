"""Grounding maps: the tap computes gradient x activation exactly, every family that
aligns text with media draws maps of its patch grid, a trained model points at the
named shape far above chance (and a uniform or random map does not), and
`mmjax explain` writes a PNG for the README's example image."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmjax import cli
from mmjax.config.loading import load_config
from mmjax.data import synthetic
from mmjax.data.decode import normalize
from mmjax.data.tokenizers import build_tokenizer
from mmjax.evaluate import grounding as G
from mmjax.families import get_family
from mmjax.models import build
from mmjax.train.loop import train

pytestmark = pytest.mark.usefixtures("mmjax_cache")


def _init(config):
    model = build(config.model)
    args = get_family(config).sample_inputs(config, 2)
    variables = jax.jit(model.init)(jax.random.key(0), *args)
    import flax.linen as nn
    return model, {"params": nn.unbox(variables)["params"]}


def _inputs(config, batch=2, seed=1):
    shape, _ = get_family(config).media_example(config)
    rng = np.random.default_rng(seed)
    media = rng.normal(size=(batch,) + tuple(shape)).astype(np.float32)
    tok = build_tokenizer(config.data.train.tokenizer, int(config.data.train.max_len))
    return media, np.asarray(tok(["a red circle", "a small blue square"][:batch]), np.int32)


def test_map_is_gradient_times_activation_of_the_final_tokens():
    """Independent reference: the cosine as a function of the tower's final tokens,
    written out from the parameters (mean pooling, the projection), differentiated
    by JAX directly."""
    config = load_config("clip_tiny:tiny", ["model.image.pool=gap"])
    model, variables = _init(config)
    media, text = _inputs(config)
    maps, scores = G.Grounder(config, model, variables)(media, text)

    tokens = model.apply(variables, media, method=lambda m, x: m.image_tower(x)[1])
    ztxt = model.apply(variables, text, method=lambda m, t: m.encode_text(t))
    kernel = variables["params"]["image_tower"]["proj"]["kernel"]

    def cosine(tok, zt):
        zi = tok.mean(axis=0) @ kernel
        return zi @ zt / (jnp.linalg.norm(zi) * jnp.linalg.norm(zt))

    grid = G.media_grid(model, media.shape)
    for b in range(len(media)):
        g = jax.grad(cosine)(tokens[b], ztxt[b])
        want = np.maximum(np.asarray((g * tokens[b]).sum(-1)), 0).reshape(grid)
        np.testing.assert_allclose(maps[b], want, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(scores[b], cosine(tokens[b], ztxt[b]), rtol=1e-5, atol=1e-6)
    assert maps.shape == (2,) + grid and maps.max() > 0


def test_scanned_model_gives_the_maps_of_the_unrolled_one():
    config = load_config("clip_tiny:tiny", ["model.image.pool=cls"])
    with config.unlocked():
        config.model.image["scan"] = config.model.text["scan"] = True
    model, variables = _init(config)
    media, text = _inputs(config)
    maps, scores = G.Grounder(config, model, variables)(media, text)
    flat, params = G.unrolled(model, variables["params"],
                              get_family(config).sample_inputs(config, 1))
    assert not flat.image["scan"] and "layers_1" in params["image_tower"]
    np.testing.assert_allclose(
        scores, model.apply(variables, media, text, method=lambda m, x, t: (
            get_family(config).grounding(m).score(m, x, t))), rtol=1e-5)
    # class-token pooling: tapped before the last block, the map is not all zero
    assert maps.shape == (2, 4, 4) and (maps.reshape(2, -1).max(1) > 0).all()


@pytest.mark.parametrize("recipe,grid", [
    ("coca_b16:tiny", (4, 4)),
    ("blip2_stage1:tiny", (4, 4)),
    ("one_tower_tiny:tiny", (4, 4)),
    ("one_tower_tiny:shared", None),
    ("clap_tiny:tiny", None),
    ("video_clip_tiny:tiny", None),
    ("llava:tiny", (4, 4)),
    ("blip2_stage2:tiny", (4, 4)),
])
def test_every_aligning_family_draws_maps_over_its_patch_grid(recipe, grid):
    config = load_config(recipe, [])
    model, variables = _init(config)
    media, text = _inputs(config)
    grounder = G.Grounder(config, model, variables)
    maps, scores = grounder(media, text)
    want = G.media_grid(model, media.shape)
    if grid is not None:
        assert want == grid
    if get_family(config).media(config.model) == "video":
        assert want[0] == media.shape[1]  # one map per frame
    assert maps.shape == (2,) + want and np.isfinite(maps).all() and (maps >= 0).all()
    assert maps.max() > 0 and scores.shape == (2,)
    # the map depends on the phrase (the gradient of the pair's score)
    other = grounder(media, text[::-1])[0]
    assert not np.allclose(maps, other[::-1])


def test_generator_boxes_hold_their_shapes():
    for i in range(40):
        s = synthetic.make_sample(i, "test", 64)
        assert s["objects"][0]["size"] == "big" and s["objects"][0]["name"] == s["classname"]
        count = {q["type"]: q["answer"] for q in s["qa"]}["count"]
        assert len(s["objects"]) == (2 if count == "two" else 1)
        img = s["image"].astype(np.float32)
        shape_px = (img.max(-1) - img.min(-1)) > 60  # saturated colour: not the grey ground
        yy, xx = np.mgrid[:64, :64] + 0.5
        covered = np.zeros((64, 64), bool)
        for o in s["objects"]:
            x0, y0, x1, y1 = np.asarray(o["box"]) * 64
            inside = (xx >= x0 - 1) & (xx <= x1 + 1) & (yy >= y0 - 1) & (yy <= y1 + 1)
            covered |= inside
            # the box holds a shape of its colour: the nearest named colour of its pixels
            mean = img[inside & shape_px].mean(0)
            nearest = min(synthetic.COLORS, key=lambda c: np.abs(
                np.asarray(synthetic.COLORS[c]) - mean).sum())
            if o["size"] == "big":
                assert nearest == o["name"].split()[0], (i, o, mean)
        assert shape_px.sum() > 20 and not (shape_px & ~covered).any(), i


def test_pointing_hits_and_chance():
    boxes = np.array([[0, 0, 16, 16], [16, 16, 32, 32]], float)
    peak = np.zeros((2, 4, 4), np.float32)
    peak[0, 0, 0] = peak[1, 3, 3] = 1
    assert G.pointing_hits(peak, boxes, 32).all()
    assert not G.pointing_hits(peak[::-1], boxes, 32).any()
    # a constant map's maximum is the first pixel: inside the first box only
    assert G.pointing_hits(np.ones((2, 4, 4)), boxes, 32).tolist() == [True, False]
    np.testing.assert_allclose(G.box_share(boxes, 32), [0.25, 0.25])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mmjax_cache_dir):
    """A short default (clip_tiny) run on the built-in data."""
    workdir = tmp_path_factory.mktemp("clip_tiny")
    config = load_config("clip_tiny", [
        "total_steps=150", "batch_size=64", "log_every=50", "checkpoint_every=150",
        "synthetic.train_samples=3000", "synthetic.test_samples=64",
        "synthetic.samples_per_shard=500", "data.train.workers=0", "optim.warmup_steps=20",
        "evals.zeroshot.shards="])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMJAX_CACHE", mmjax_cache_dir)
        train(config, str(workdir))
    from mmjax.train.init_sources import restore_run_params
    config, params, _ = restore_run_params(str(workdir), None)
    return str(workdir), config, build(config.model), {"params": params}


def test_trained_model_points_at_the_named_shape(trained):
    _, config, model, variables = trained
    tok = build_tokenizer(config.data.train.tokenizer, int(config.data.train.max_len))
    r = G.pointing_game(config, model, variables, tok, num_images=100)
    assert r["n"] == 200 and 0.1 < r["chance"] < 0.25
    # far above chance, for the small shape too
    assert r["pointing"] > max(2 * r["chance"], r["chance"] + 0.2), r
    assert r["pointing_small"] > 3 * r["chance_small"], r
    # the same scoring fails with uninformative maps
    boxes = np.asarray([row["box"] for row in r["rows"]])
    maps = np.stack([row["map"] for row in r["rows"]])
    size = int(config.data.train.image_size)
    for fake in (np.ones_like(maps),
                 np.random.default_rng(0).random(maps.shape).astype(np.float32)):
        acc = G.pointing_hits(fake, boxes, size).mean()
        assert acc < max(2 * r["chance"], r["chance"] + 0.2) and acc < r["pointing"] - 0.2
    # the evaluator reports the same numbers
    config.evals.grounding.shards = "synthetic"
    config.evals.grounding.num_images = 100
    metrics, details = G.grounding_eval(config, model, variables, tok)
    assert metrics["grounding/pointing"] == pytest.approx(r["pointing"])
    ex = details["examples"][0]
    assert ex["overlay"].shape == ex["image"].shape and ex["map"].max() == pytest.approx(1.0)


def test_explain_writes_a_png_for_the_readme_example(trained, tmp_path, capsys):
    workdir = trained[0]
    shapes = tmp_path / "shapes"
    assert cli.main(["shards", "--synthetic", "--split", "test", "--num-samples", "4",
                     "--export-images", "--out", str(shapes)]) == 0
    out = tmp_path / "map.png"
    assert cli.main(["explain", "--workdir", workdir, "--image", str(shapes / "000000.png"),
                     "--text", "a green triangle", "--text", "an orange triangle",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "'a green triangle': score" in printed and f"wrote {out}" in printed
    picture = np.asarray(Image.open(out))
    assert picture.ndim == 3 and picture.shape[1] >= 256 and picture.shape[0] > 2 * 256
    # the two panels differ (each phrase's own map)
    top, bottom = picture[18:18 + 256], picture[18 + 256 + 18:18 + 2 * 256 + 18]
    assert np.abs(top.astype(int) - bottom.astype(int)).mean() > 5


def test_explain_errors_are_one_line(trained, tmp_path, capsys):
    workdir = trained[0]
    wav = tmp_path / "x.wav"
    wav.write_bytes(b"RIFF")
    assert cli.main(["explain", "--workdir", workdir, "--image", str(wav), "--text", "a",
                     "--out", str(tmp_path / "m.png")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "reads image" in err[-1] and "Traceback" not in "".join(err)
    assert cli.main(["explain", "--workdir", workdir, "--image", str(tmp_path / "no.png"),
                     "--text", "a", "--out", str(tmp_path / "m.png")]) != 0
    assert "cannot read it" in capsys.readouterr().err


@pytest.mark.parametrize("recipe,ext", [("clap_tiny", "flac"), ("video_clip_tiny", "mp4")])
def test_explain_draws_maps_over_a_spectrogram_or_the_frames(recipe, ext, tiny_run, tmp_path,
                                                              capsys):
    """A sound: the map over its log-mel (frequency x time patches); a clip: one map
    per frame, the frames side by side."""
    from mmjax.commands.explain import explain_panels
    from mmjax.data import synthetic_audio, synthetic_video
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    workdir = str(tiny_run(os.path.join(root, "configs", f"{recipe}.py"))[0])
    media = tmp_path / f"clip.{ext}"
    if ext == "flac":
        s = synthetic_audio.make_sample(0, "test", sample_rate=16000, seconds=1.0)
        media.write_bytes(synthetic_audio.encode_flac(s["audio"], 16000))
    else:
        s = synthetic_video.make_clip(0, "test", frames=8, size=32)
        media.write_bytes(synthetic_video.encode_mp4(s["frames"]))
    panels = explain_panels(workdir, str(media), [s["caption"], "something else"])
    heat = panels[0]["map"]
    assert np.isfinite(heat).all() and heat.max() == pytest.approx(1.0)
    pic = panels[0]["picture"]
    if ext == "flac":
        assert heat.ndim == 2 and pic.ndim == 3  # [F, T] over the spectrogram
    else:
        assert heat.ndim == 3  # one map per frame, the frames side by side
        assert pic.shape[1] == heat.shape[0] * pic.shape[0]
    out = tmp_path / "map.png"
    assert cli.main(["explain", "--workdir", workdir, "--media", str(media), "--text",
                     s["caption"], "--out", str(out)]) == 0
    assert Image.open(out).size[0] >= pic.shape[1] // 2 and f"wrote {out}" in \
        capsys.readouterr().out
