"""A video tower's frame ViT starts from an image-text run's image tower (`config.init`)."""
import jax
import numpy as np
import pytest

from mmjax.config.loading import load_config
from mmjax.train.init_sources import restore_run_params
from mmjax.train.loop import train
from mmjax.train.step import build_trainer

pytestmark = pytest.mark.usefixtures("mmjax_cache")


def test_frame_vit_starts_from_an_image_text_run(tmp_path):
    image_run = str(tmp_path / "clip")
    train(load_config("clip_b16:tiny", ["evals.zeroshot.shards=", "evals.retrieval.shards="]),
          image_run)
    _, source, _ = restore_run_params(image_run)
    config = load_config("video_clip_tiny:tiny",
                         [f"init.image_tower/frame=workdir:{image_run}#image_tower"])
    # The same ViT layout as the image run (clip_b16:tiny scans its layers).
    with config.unlocked():
        image = load_config("clip_b16:tiny", []).model.image.to_dict()
        config.model.image.update({k: v for k, v in image.items() if k not in ("kind",)})
        config.model.image.posemb = image.get("posemb", "learned")  # (the ViT default)
    state = build_trainer(config, jax.devices()[:1]).init_state(0)
    frame = jax.device_get(state["params"]["image_tower"]["frame"])
    want = source["image_tower"]
    assert jax.tree.structure(frame) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(frame), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Only the frame ViT comes from the image run: the temporal model is new.
    assert any(k.startswith("temporal") for k in state["params"]["image_tower"])
