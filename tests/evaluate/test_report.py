"""The HTML report of `mmjax eval --report`: every section from given details, and
the page of a real short clip_tiny run, parsed and rendered in headless Chromium."""
import json
import os
import shutil

import numpy as np
import pytest

from mmjax import cli
from mmjax.config.loading import load_config
from mmjax.evaluate.report import format_value, preview, read_report, write_report

STEPS = 40


def _printed(saved: dict) -> dict:
    """`eval/step_N.json`'s pairs as `mmjax eval` prints them."""
    return {k: format_value(v) for k, v in saved.items()}


def _metrics(page) -> dict:
    header, *rows = page.tables["metrics"]
    assert header == ["metric", "value"]
    assert all(len(r) == 2 for r in rows)
    return dict(rows)


def _images_exist(folder, page):
    assert page.images
    for src in page.images:
        assert src and "://" not in src and not os.path.isabs(src), src
        assert os.path.isfile(os.path.join(folder, src)), src


# ---------------------------------------------------------------- from details


def _details(rng):
    """Details of every evaluator, as `run_evals` gathers them (media: uint8
    images, a placeholder and an audio spectrogram among them)."""
    names = ["cat", "dog", "bird"]
    pic = lambda: rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # noqa: E731
    grounding = []
    for i, hit in enumerate([True, False, None]):
        image = pic()
        heat = rng.random((4, 4)).astype(np.float32)
        grounding.append(dict(image=image, text=f"the {names[i]} <b>", map=heat,
                              overlay=(image // 2 + 60).astype(np.uint8),
                              box=None if hit is None else (2, 3, 10, 12), hit=hit))
    return {
        "media_kind": "image",
        "zeroshot": dict(predictions=np.array([0, 1, 1, 2, 0]), labels=np.array([0, 1, 2, 2, 1]),
                         classnames=names,
                         examples=[dict(index=2, prediction=1, label=2, media=pic()),
                                   dict(index=4, prediction=0, label=1, media=None)]),
        "retrieval": dict(text_to_image=np.array([0, 0, 1, 2]),
                          text_to_image_queries=[dict(caption=0, top=[0, 1, 2]),
                                                 dict(caption=2, top=[0, 2, 1])],
                          image_to_text_queries=[dict(image=1, top=[2, 0, 3])],
                          media={0: pic(), 1: pic(), 2: preview(rng.normal(size=4000))},
                          captions={0: "a cat", 2: "a bird & a dog", 3: "a dog"}),
        "captioning": dict(predictions=["a cat", "a dog"], references=["one cat", "a dog"],
                           media={0: pic(), 1: pic()}),
        "vqa": dict(prediction=["red", "2"], answer=["red", "3"], question=["color?", "how many?"],
                    type=["color", "count"], score=[1.0, 0.0], media={0: pic(), 1: None}),
        "grounding": {"examples": grounding},
    }


def test_report_from_details(tmp_path):
    """Every section of a page written from given details (grounding among them),
    its pictures saved beside it, the metrics as printed, hits and misses marked."""
    rng = np.random.default_rng(0)
    results = {"zeroshot/top1": 0.6, "zeroshot/n": 5, "grounding/pointing": 0.5,
               "vqa/examples": [{"question": "color?"}], "top1": 2 / 3}
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in range(1, 30, 4)) + '{"step": 3')
    (run / "eval" / "step_10.json").write_text(json.dumps({"step": 10, "top1": 0.2,
                                                           "zeroshot/top1": 0.2}))
    out = tmp_path / "out"
    path = write_report(str(out), results, _details(rng), workdir=str(run), step=12,
                        info={"recipe": "clip_tiny"})
    assert path == str(out / "index.html")
    page = read_report(str(out))
    assert page.sections == ["run", "scores", "curves", "zeroshot", "retrieval", "captioning",
                             "vqa", "grounding"]
    assert _metrics(page) == _printed({"step": 12, **results})
    assert _metrics(page)["top1"] == "0.6667"
    assert ["recipe", "clip_tiny"] in page.tables["run-info"]
    _images_exist(str(out), page)
    assert "curves.png" in page.images
    # Zero-shot: confusion counts (row = true class), the most confused pairs.
    cm = page.tables["confusion"]
    assert cm[0] == ["", "0", "1", "2"]
    assert cm[1:] == [["0 cat", "1", "", ""], ["1 dog", "1", "1", ""], ["2 bird", "", "1", "1"]]
    assert page.tables["confused-pairs"][1:] == [["dog", "cat", "1"], ["bird", "dog", "1"]]
    assert [r[1:] for r in page.tables["misclassified"][1:]] == [["2", "dog", "bird"],
                                                                 ["4", "cat", "dog"]]
    # Retrieval: caption 2 (of image 1) finds image 1 third; image 1's captions: 2 is its own.
    t2i = page.tables["retrieval-t2i"]
    assert t2i[1][0] == "a cat" and t2i[1][1].split() == ["#1", "hit", "#2", "miss", "#3", "miss"]
    assert t2i[2][0] == "a bird & a dog" and t2i[2][2] == "hit"
    assert page.tables["retrieval-i2t"][1][1:] == ["a bird & a dog (hit) a cat (miss) a dog (miss)",
                                                   "hit"]
    assert page.tables["captioning"][1][1:] == ["a cat", "one cat"]
    assert [r[-1] for r in page.tables["vqa"][1:]] == ["correct", "wrong"]
    # Grounding: the overlay with its text (escaped), hit / miss / no box.
    g = page.tables["grounding"]
    assert [r[1] for r in g[1:]] == ["the cat <b>", "the dog <b>", "the bird <b>"]
    assert [r[-1] for r in g[1:]] == ["hit", "miss", "n/a"]
    assert g[1][2] == "2, 3, 10, 12"
    assert sum(src.startswith("media/grounding_") for src in page.images) == 3
    html = open(path, encoding="utf-8").read()
    assert "the cat &lt;b&gt;" in html and "http" not in html.replace("http-equiv", "")


def test_report_without_run_folder(tmp_path):
    """`--hf` weights: no curves, a line saying why; only the sections with details."""
    write_report(str(tmp_path), {"zeroshot/top1": 0.25}, {}, step=0)
    page = read_report(str(tmp_path))
    assert page.sections == ["run", "scores", "curves"]
    assert page.images == []
    assert "no run folder" in (tmp_path / "index.html").read_text()
    assert not (tmp_path / "curves.png").exists()


def test_preview_of_each_media_kind():
    norm = np.full((8, 8, 3), -1.0, np.float32)               # mean 0.5, std 0.5: black
    assert preview(norm, (0.5,) * 3, (0.5,) * 3).max() == 0
    img = preview(np.ones((8, 8, 3), np.float32), (0.5,) * 3, (0.5,) * 3)
    assert img.dtype == np.uint8 and img.shape == (8, 8, 3) and img.min() == 255
    video = np.zeros((4, 8, 8, 3), np.uint8)
    video[0] = 7
    assert preview(video).shape == (8, 8, 3) and preview(video).max() == 7
    spec = preview(np.sin(np.arange(16000) * 0.3).astype(np.float32))
    assert spec.dtype == np.uint8 and spec.ndim == 3 and spec.shape[2] == 3
    assert preview(np.zeros((10,), np.float32)) is None
    assert preview(np.zeros((3, 5), np.float32)) is None


# ---------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def reported(tmp_path_factory, mmjax_cache_dir):
    """A short clip_tiny run, evaluated by `mmjax eval --report` (zero-shot and
    retrieval): (workdir, report folder, eval/step_N.json)."""
    from mmjax.train.loop import train
    workdir = tmp_path_factory.mktemp("clip_tiny_report")
    overrides = [f"total_steps={STEPS}", "batch_size=32", "log_every=5",
                 f"checkpoint_every={STEPS}", "synthetic.train_samples=640",
                 "synthetic.test_samples=96", "synthetic.samples_per_shard=320",
                 "data.train.workers=0", "optim.warmup_steps=5"]
    out = workdir / "report"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMJAX_CACHE", mmjax_cache_dir)
        train(load_config("clip_tiny", overrides), str(workdir))
        argv = ["eval", "--config", "clip_tiny", "--workdir", str(workdir), "--report", str(out),
                "--config.evals.retrieval.shards=synthetic"]
        assert cli.main(argv + [f"--config.{o}" for o in overrides]) == 0
    saved = json.load(open(workdir / "eval" / f"step_{STEPS}.json"))
    return workdir, out, saved


def test_report_of_a_run(reported, capsys):
    """The page's sections, its metrics (those of eval/step_N.json, as printed), and
    every picture it shows saved beside it; the training curves from metrics.jsonl."""
    workdir, out, saved = reported
    page = read_report(str(out))
    assert page.sections == ["run", "scores", "curves", "zeroshot", "retrieval"]
    assert _metrics(page) == _printed(saved)
    assert saved["zeroshot/n"] == 96 and saved["retrieval/n_images"] == 96
    info = dict(page.tables["run-info"])
    assert info["step"] == str(STEPS) and info["model"] == "two_tower"
    assert info["recipe"] == "clip_tiny" and info["media"] == "image"
    assert info["eval data: retrieval"] == "shards=synthetic"
    _images_exist(str(out), page)
    assert page.images.count("curves.png") == 1
    assert all(href.startswith(("#", "media/")) for href in page.links)
    assert len(page.tables["confusion"]) == 1 + 24
    assert 1 <= len(page.tables["misclassified"]) - 1 <= 8
    assert len(page.tables["retrieval-t2i"]) == 1 + 5 and len(page.tables["retrieval-i2t"]) == 1 + 5
    # Thumbnails are the held-out images, not blank frames.
    from PIL import Image
    thumb = np.asarray(Image.open(out / "media" / "retrieval_image_0.png"))
    assert thumb.shape[2] == 3 and thumb.std() > 5


def _browser():
    """A headless Chromium driven by Selenium with the system's chromedriver (never
    downloaded); skips when either is not installed."""
    for exe in ("chromium", "chromedriver"):
        if shutil.which(exe) is None:
            pytest.skip(f"{exe} is not installed (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")),
                            options=options)


def test_report_renders_in_a_browser(reported):
    """Opened from the file system in Chromium: every image loads and the metrics
    table the browser shows is eval/step_N.json, as printed."""
    _, out, saved = reported
    driver = _browser()
    try:
        driver.set_page_load_timeout(60)
        driver.get((out / "index.html").resolve().as_uri())
        from selenium.webdriver.support.ui import WebDriverWait
        WebDriverWait(driver, 30).until(
            lambda d: d.execute_script("return document.readyState") == "complete")
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), "
            "i.complete && i.naturalWidth > 0])")
        assert len(images) > 10
        assert [src for src, ok in images if not ok] == []
        rows = driver.execute_script(
            "return Array.from(document.querySelectorAll('#metrics tbody tr'))"
            ".map(r => Array.from(r.cells).map(c => c.textContent.trim()))")
        assert all(len(r) == 2 for r in rows)
        assert dict(rows) == _printed(saved)
        assert len(rows) == len(saved)
        assert driver.title.startswith(f"mmjax eval report, step {STEPS}")
    finally:
        driver.quit()
