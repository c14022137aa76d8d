"""TFDS evaluation source: a tiny dataset prepared here (array_record, no TensorFlow)."""
import io

import numpy as np
import pytest
from PIL import Image

import tensorflow_datasets as tfds  # in the test extra

from mmjax.data import decode
from mmjax.data.tfds_source import (TfdsEvalSource, parse_tfds_spec, resize_center_crop,
                                    tfds_batches)

NAMES = ["red_square", "green_circle", "blue_triangle"]


def tiny_images(n: int = 10):
    """(uint8 [H, W, 3] of varied sizes, label) pairs, deterministic."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        h, w = 20 + 3 * i, 44 - 2 * i
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([x * 5 + i, y * 7, (x + y) * 3], -1) % 256
        img = (img + rng.integers(0, 20, img.shape)).clip(0, 255).astype(np.uint8)
        out.append((img, i % len(NAMES)))
    return out


class MmjaxTinyCls(tfds.core.GeneratorBasedBuilder):
    """10 labelled images; stored as PNG bytes so no TensorFlow encoder is needed."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=NAMES),
            "index": tfds.features.Scalar(np.int64)}))

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        for i, (img, label) in enumerate(tiny_images()):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "PNG")
            yield i, {"image": buf.getvalue(), "label": label, "index": i}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    MmjaxTinyCls(data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)


def test_batches_are_center_crops_of_every_example(data_dir):
    src = TfdsEvalSource("mmjax_tiny_cls", "test", data_dir, image_size=16, batch_size=4)
    assert src.classnames == ["red square", "green circle", "blue triangle"]
    assert src.num_examples == 10 and len(src) == 3
    batches = list(src)
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    # TFDS stores examples in its own (hashed) order; read that order back.
    order = [int(r["index"]) for r in
             tfds.builder("mmjax_tiny_cls", data_dir=data_dir).as_data_source("test")]
    assert sorted(order) == list(range(10))
    ref = [tiny_images()[i] for i in order]
    assert labels.tolist() == [lab for _, lab in ref]
    for got, (img, _) in zip(images, ref):
        # Independent reference: short side to 16 (bicubic), centre 16x16.
        h, w = img.shape[:2]
        s = 16 / min(h, w)
        nw, nh = max(16, round(w * s)), max(16, round(h * s))
        big = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))
        top, left = (nh - 16) // 2, (nw - 16) // 2
        assert np.array_equal(got, big[top:top + 16, left:left + 16])
    # Batches in the shard iterator's layout, normalized like it.
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    laid = list(tfds_batches(src, output="float32", mean=mean, std=std))
    np.testing.assert_allclose(np.concatenate([b["image"] for b in laid]),
                               decode.normalize(images, mean, std), rtol=1e-6)
    assert all(b["valid"].all() and b["text"].shape == (len(b["label"]), 1) for b in laid)
    few = TfdsEvalSource("mmjax_tiny_cls", "test[:3]", data_dir, image_size=16, batch_size=4)
    assert few.num_examples == 3
    assert resize_center_crop(ref[0][0], 16).shape == (16, 16, 3)


def test_clear_errors(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TfdsEvalSource("mmjax_tiny_cls", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="not prepared|not found"):
        TfdsEvalSource("no_such_dataset_here", data_dir=data_dir)
    with pytest.raises(ValueError, match="no feature 'img'"):
        TfdsEvalSource("mmjax_tiny_cls", data_dir=data_dir, image_key="img")
    with pytest.raises(ValueError, match="cannot read split 'validation'"):
        TfdsEvalSource("mmjax_tiny_cls", "validation", data_dir)
    assert parse_tfds_spec("tfds:cifar10") == ("cifar10", "test")
    assert parse_tfds_spec("tfds:imagenet2012:5.1.0@validation[:500]") == (
        "imagenet2012:5.1.0", "validation[:500]")
    with pytest.raises(ValueError, match="tfds:NAME"):
        parse_tfds_spec("tfds:")


def test_runner_zero_shot_on_tfds_matches_direct_computation(data_dir):
    # `run_evals` with evals.zeroshot.shards=tfds:... and classnames=tfds, against
    # argmax of cosine scores computed here from the images and prompts directly.
    import jax
    import jax.numpy as jnp

    from mmjax.data.tokenizers import build_tokenizer
    from mmjax.evaluate.runner import EvalError, run_evals
    from mmjax.models import build
    from mmjax.config.loading import load_config

    config = load_config("clip_tiny:tiny", ["evals.zeroshot.shards=tfds:mmjax_tiny_cls@test",
                                            "evals.zeroshot.classnames=tfds",
                                            f"evals.tfds_data_dir={data_dir}",
                                            "evals.retrieval.shards=", "evals.batch_size=4"])
    d = config.data.train
    model = build(config.model)
    size = int(d.image_size)
    variables = model.init(jax.random.key(3), jnp.zeros((1, size, size, 3)),
                           jnp.zeros((1, int(d.max_len)), jnp.int32))
    variables = {"params": jax.tree.map(lambda x: getattr(x, "value", x), variables["params"],
                                        is_leaf=lambda x: hasattr(x, "value"))}
    got = run_evals(config, model, variables)

    order = [int(r["index"]) for r in
             tfds.builder("mmjax_tiny_cls", data_dir=data_dir).as_data_source("test")]
    ref = [tiny_images()[i] for i in order]
    images = decode.normalize(np.stack([resize_center_crop(img, size) for img, _ in ref]),
                              d.mean, d.std)
    labels = np.array([lab for _, lab in ref])
    tok = build_tokenizer(d.tokenizer, int(d.max_len))
    names = [n.replace("_", " ") for n in NAMES]
    text = np.array(model.apply(variables, jnp.asarray(tok([f"a photo of a {n}." for n in names]),
                                                          jnp.int32), method="encode_text"))
    img = np.array(model.apply(variables, jnp.asarray(images), method="encode_image"))
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    pred = (img @ text.T).argmax(-1)
    recall = np.mean([np.mean(pred[labels == c] == c) for c in range(3)])
    assert got["zeroshot/n"] == 10 and got["zeroshot/num_classes"] == 3
    assert got["top1"] == pytest.approx(float(np.mean(pred == labels)), abs=1e-9)
    assert got["zeroshot/mean_per_class_recall"] == pytest.approx(recall, abs=1e-6)

    config.evals.zeroshot.shards = "synthetic"
    with pytest.raises(EvalError, match="classnames='tfds' needs a TFDS source"):
        run_evals(config, model, variables)
    config.evals.zeroshot.shards = "tfds:mmjax_tiny_cls@train"
    with pytest.raises(EvalError, match="cannot read split 'train'"):
        run_evals(config, model, variables)
