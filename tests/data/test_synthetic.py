"""Synthetic dataset: determinism, disjoint splits, captions that match the pixels,
learnability, shard writing and the shard cache."""
import hashlib
import io
import json
import os
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from mmjax.data.synthetic import (ANSWERS_BY_TYPE, CLASSNAMES, COLORS, QUESTIONS, SHAPES,
                                  ensure_synthetic_shards, majority_answer_baselines,
                                  make_batch, make_sample, sample_qa, write_synthetic_shards)

RELATIONS = {"above": (0, -1), "below": (0, 1), "to the left of": (-1, 0),
             "to the right of": (1, 0)}  # (dx, dy) sign of class object vs second
INVERSE = {"above": "below", "below": "above", "to the left of": "to the right of",
           "to the right of": "to the left of"}


def test_classnames():
    assert len(CLASSNAMES) == 24 == len(set(CLASSNAMES))
    assert CLASSNAMES[0] == f"{list(COLORS)[0]} {SHAPES[0]}"


def test_deterministic_and_varied():
    a, b = make_sample(5, "train", 32, seed=0), make_sample(5, "train", 32, seed=0)
    assert np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert a["image"].shape == (32, 32, 3) and a["image"].dtype == np.uint8
    assert not np.array_equal(a["image"], make_sample(5, "train", 32, seed=1)["image"])
    assert not np.array_equal(a["image"], make_sample(6, "train", 32, seed=0)["image"])
    # Captions vary in wording, not one string per class.
    samples = [make_sample(i, "train", 16) for i in range(300)]
    per_class = {}
    for s in samples:
        per_class.setdefault(s["label"], set()).add(s["caption"])
    assert np.mean([len(c) for c in per_class.values()]) > 4
    labels = np.bincount([s["label"] for s in samples], minlength=24)
    assert labels.min() > 0  # every class occurs


def test_splits_disjoint():
    def digests(split):
        return {hashlib.sha1(make_sample(i, split, 16)["image"].tobytes()).hexdigest()
                for i in range(300)}
    train, test = digests("train"), digests("test")
    assert len(train) == 300 and len(test) == 300
    assert not train & test


def _pixel_colour_labels(image):
    """Per pixel: index of the nearest palette colour, or -1 for grey background and
    for edge pixels blended with it (far from every palette colour)."""
    img = image.astype(np.float64)
    palette = np.array(list(COLORS.values()), np.float64)
    dist = np.sqrt(((img[:, :, None, :] - palette) ** 2).sum(-1))
    return np.where(dist.min(-1) < 55, dist.argmin(-1), -1)


def _shape_of(mask):
    """Classify a filled blob: the ideal shape (drawn here, in the blob's bounding
    box) that overlaps it best (intersection over union). Rows/columns with
    fewer than 3 pixels are noise and do not count for the box."""
    ys = np.nonzero(mask.sum(1) >= 3)[0]
    xs = np.nonzero(mask.sum(0) >= 3)[0]
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = box.shape
    v, u = np.meshgrid((np.arange(h) + 0.5) / h * 2 - 1, (np.arange(w) + 0.5) / w * 2 - 1,
                       indexing="ij")
    ideal = {"square": np.ones_like(box),
             "circle": u ** 2 + v ** 2 <= 1,
             "triangle": np.abs(u) <= (v + 1) / 2,  # apex up
             "cross": (np.abs(u) <= 1 / 3) | (np.abs(v) <= 1 / 3)}
    iou = {k: (box & t).sum() / (box | t).sum() for k, t in ideal.items()}
    return max(iou, key=iou.get)


def test_caption_and_label_match_pixels():
    colour_names = list(COLORS)
    n_pairs = n_rel = 0
    for i in range(300):
        s = make_sample(i, "test", 64)
        colour, shape = CLASSNAMES[s["label"]].split()
        assert s["classname"] == f"{colour} {shape}"
        words = s["caption"].split()
        # The class object is the first colour and shape named in the caption.
        assert [w for w in words if w in COLORS][0] == colour
        assert [w for w in words if w in SHAPES][0] == shape
        # Its colour dominates the coloured pixels; its blob has its shape.
        lab = _pixel_colour_labels(s["image"])
        counts = np.bincount(lab[lab >= 0], minlength=len(COLORS))
        main = colour_names.index(colour)
        assert counts.argmax() == main, (i, s["caption"])
        assert _shape_of(lab == main) == shape, (i, s["caption"])
        # A second object: its colour is drawn, and the relation word is true.
        others = [w for w in words if w in COLORS][1:]
        if others:
            n_pairs += 1
            second = colour_names.index(others[0])
            assert counts[second] > 10
            rel = next((r for r in RELATIONS if f" {r} " in f" {s['caption']} "), None)
            if rel is None:
                continue
            if s["caption"].endswith(" it"):  # "X with Y below it": Y is below X
                rel = INVERSE[rel]
            n_rel += 1
            y1, x1 = np.argwhere(lab == main).mean(0)
            y2, x2 = np.argwhere(lab == second).mean(0)
            dx, dy = RELATIONS[rel]
            assert (x1 - x2) * dx + (y1 - y2) * dy > 0, (i, s["caption"])
    assert n_pairs > 50 and n_rel > 30


def test_qa_answers_match_drawing():
    colour_names = list(COLORS)
    n_where = 0
    orders = set()
    for i in range(200):
        s = make_sample(i, "test", 64)
        qa = s["qa"]
        assert qa == sample_qa(i, "test") == make_sample(i, "test", 16)["qa"]
        orders.add(tuple(q["type"] for q in qa))
        assert sorted(q["type"] for q in qa) == sorted(QUESTIONS)
        ans = {q["type"]: q["answer"] for q in qa}
        for q in qa:
            assert q["question"] == QUESTIONS[q["type"]]
            assert q["answer"] in ANSWERS_BY_TYPE[q["type"]], q
        colour, shape = s["classname"].split()
        assert ans["color"] == colour and ans["shape"] == shape
        named = [w for w in s["caption"].split() if w in COLORS]
        lab = _pixel_colour_labels(s["image"])
        counts = np.bincount(lab[lab >= 0], minlength=len(COLORS))
        if len(named) == 1:
            assert (ans["count"], ans["small_color"], ans["where"]) == ("one", "none", "none"), i
            continue
        assert ans["count"] == "two" and ans["small_color"] == named[1], (i, s["caption"])
        small = colour_names.index(named[1])
        assert counts[small] > 10
        # The small object's centroid lies on the answered side of the big one's.
        y1, x1 = np.argwhere(lab == colour_names.index(colour)).mean(0)
        y2, x2 = np.argwhere(lab == small).mean(0)
        side = {"above": y1 - y2, "below": y2 - y1, "left": x1 - x2, "right": x2 - x1}
        assert side[ans["where"]] > 0, (i, s["caption"], ans["where"])
        n_where += 1
    assert n_where > 80
    assert len(orders) > 20  # the question order is shuffled per sample


def test_qa_baselines():
    got = majority_answer_baselines("train", num_samples=300)
    # Independent count over the rendered samples' own QA lists.
    answers = [(q["type"], q["answer"]) for i in range(300)
               for q in make_sample(i, "train", 8)["qa"]]
    words = [a for _, a in answers]
    top = max(set(words), key=words.count)
    prior = sum(max(sum(1 for u, a in answers if u == t and a == w) for w in ANSWERS_BY_TYPE[t])
                for t in QUESTIONS) / len(answers)
    assert got["majority_answer"] == top == "none"
    assert got["majority_accuracy"] == pytest.approx(words.count(top) / len(answers))
    assert got["per_type_prior_accuracy"] == pytest.approx(prior)
    # "none" answers small_color and where when there is one object (40%): ~0.16.
    assert 0.1 < got["majority_accuracy"] < 0.3
    # Priors 1/6, 1/4, 0.6, 0.4, 0.4: ~0.36.
    assert got["majority_accuracy"] < got["per_type_prior_accuracy"] < 0.5


def test_learnable_from_raw_pixels():
    """Softmax regression on 16x16 pixels (float64 NumPy) is far above chance (1/24)."""
    xtr, ytr, _ = make_batch(range(2000), "train", 32)
    xte, yte, _ = make_batch(range(500), "test", 32)

    def features(x):
        x = x.astype(np.float64).reshape(len(x), 16, 2, 16, 2, 3).mean((2, 4)) / 255
        return x.reshape(len(x), -1)
    ftr, fte = features(xtr), features(xte)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    w, b, onehot = np.zeros((ftr.shape[1], 24)), np.zeros(24), np.eye(24)[ytr]
    for _ in range(150):
        z = ftr @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(ftr)
        w -= 0.5 * (ftr.T @ g + 1e-3 * w)
        b -= 0.5 * g.sum(0)
    pred = (fte @ w + b).argmax(1)
    accuracy = (pred == yte).mean()
    colour_accuracy = (pred // len(SHAPES) == yte // len(SHAPES)).mean()
    assert accuracy > 0.25, accuracy           # chance is 0.042
    assert colour_accuracy > 0.8, colour_accuracy


def _read_samples(shards):
    out = {}
    for p in shards:
        with tarfile.open(p) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_write_shards_png_exact_and_jpg_close(tmp_path):
    shards = write_synthetic_shards(str(tmp_path / "png"), "train", num_samples=7,
                                    image_size=24, samples_per_shard=3, image_format="png")
    assert [os.path.basename(p) for p in shards] == [f"train-{i:06d}.tar" for i in range(3)]
    assert json.loads((tmp_path / "png" / "sizes.json").read_text()) == \
        {"train-000000.tar": 3, "train-000001.tar": 3, "train-000002.tar": 1}
    got = _read_samples(shards)
    assert sorted(got) == [f"{i:09d}" for i in range(7)]
    for i in range(7):
        ref = make_sample(i, "train", 24)
        s = got[f"{i:09d}"]
        assert set(s) == {"png", "txt", "cls", "json"}
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), ref["image"])
        assert s["txt"].decode() == ref["caption"] and int(s["cls"]) == ref["label"]
        assert json.loads(s["json"]) == {"caption": ref["caption"], "label": ref["label"],
                                         "classname": CLASSNAMES[ref["label"]],
                                         "qa": ref["qa"], "scene": ref["scene"],
                                         "full_caption": ref["full_caption"],
                                         "conversations": [
                                             t for q in ref["qa"]
                                             for t in ({"from": "human", "value": q["question"]},
                                                       {"from": "gpt", "value": q["answer"]})]}
    jpg = _read_samples(write_synthetic_shards(str(tmp_path / "jpg"), "train", 3, 24))
    decoded = np.asarray(Image.open(io.BytesIO(jpg["000000001"]["jpg"]))).astype(float)
    ref = make_sample(1, "train", 24)["image"].astype(float)
    # JPEG drops the pixel noise; 4x4 block means must still agree.
    def blocks(x):
        return x.reshape(6, 4, 6, 4, 3).mean((1, 3))
    assert np.abs(blocks(decoded) - blocks(ref)).mean() < 3


def test_group_key_marks_the_samples_of_one_scene(tmp_path):
    """`data.train.group_key="json:scene"`: batches carry one group id per scene (the
    same for samples no caption tells apart, different otherwise; -1 on pad rows);
    without the key batches have no `group`."""
    from mmjax.data import pipeline
    shards = write_synthetic_shards(str(tmp_path), "train", num_samples=300, image_size=16,
                                    samples_per_shard=300, image_format="png")
    cfg = pipeline.default_data_config()
    cfg.update(dict(shards=shards[0], tokenizer="bytes", max_len=48, image_size=16,
                    workers=0, group_key="json:scene"))
    batches = list(pipeline.build_eval_iterator(cfg, 128, process_index=0, process_count=1))
    group = np.concatenate([b["group"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert (group[~valid] == -1).all() and (group[valid] >= 0).all()
    scenes = [make_sample(i, "train", 16)["scene"] for i in range(300)]
    assert len(set(scenes)) < 300  # some scenes repeat, most do not
    same_scene = np.equal.outer(scenes, scenes)
    same_group = np.equal.outer(group[valid], group[valid])
    assert (same_scene == same_group).all()
    # a scene names what every caption of the image can say
    s = make_sample(0, "train", 16)
    assert s["classname"] in s["scene"] and s["classname"] in s["caption"]
    cfg.group_key = ""
    assert "group" not in next(pipeline.build_eval_iterator(cfg, 8, process_index=0,
                                                            process_count=1))


def _scene_of(caption: str) -> str:
    """The scene a complete caption states, read back from its words (independent of
    the generator's templates: prefixes, sizes and articles dropped, the relation
    inverted where the small shape is named first)."""
    inverse = {"above": "below", "below": "above", "to the left of": "to the right of",
               "to the right of": "to the left of"}
    for prefix in ("a photo of ", "a picture of ", "a drawing of ", "there is "):
        caption = caption.removeprefix(prefix)
    caption = caption.removesuffix(" on a grey background")

    def name(phrase):
        words = [w for w in phrase.split() if w not in ("a", "an", "big", "large", "small")]
        return " ".join(words)
    if " with " in caption:  # "A with S REL it": S is REL A
        main, rest = caption.split(" with ")
        rel = next(r for r in sorted(inverse, key=len, reverse=True) if f" {r} it" in rest)
        return f"{name(main)} {inverse[rel]} {name(rest.removesuffix(f' {rel} it'))}"
    for rel in sorted(inverse, key=len, reverse=True):
        if f" {rel} " in caption:
            left, right = caption.split(f" {rel} ")
            if "small" in left.split():
                return f"{name(right)} {inverse[rel]} {name(left)}"
            return f"{name(left)} {rel} {name(right)}"
    return name(caption)


def test_full_caption_states_exactly_the_scene():
    """`full_caption` says both shapes with their sizes and the relation, so reading it
    back gives the sample's scene (the plain `caption` may leave the relation out);
    it is drawn from its own stream: image and caption are those of the draws alone."""
    samples = [make_sample(i, "train", 16) for i in range(300)]
    assert all(_scene_of(s["full_caption"]) == s["scene"] for s in samples)
    assert sum(_scene_of(s["caption"]) != s["scene"] for s in samples) > 30
    phrasings = {s["full_caption"].split(" a ")[0] for s in samples}
    assert len(phrasings) > 5  # several phrasings, not one template


def test_ensure_shards_cached_and_concurrent(tmp_path):
    cache = tmp_path / "cache"
    results = []
    kw = dict(split="train", num_samples=6, image_size=16, samples_per_shard=4)
    threads = [threading.Thread(target=lambda: results.append(
        ensure_synthetic_shards(str(cache), **kw))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1] and len(results[0]) == 2
    assert len(os.listdir(cache)) == 1  # one set, no leftover temp folders
    mtimes = [os.path.getmtime(p) for p in results[0]]
    again = ensure_synthetic_shards(str(cache), **kw)
    assert again == results[0] and [os.path.getmtime(p) for p in again] == mtimes
    assert len(_read_samples(again)) == 6
    other = ensure_synthetic_shards(str(cache), **{**kw, "seed": 1})
    assert os.path.dirname(other[0]) != os.path.dirname(again[0])
    assert len(os.listdir(cache)) == 2
