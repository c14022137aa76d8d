"""The pod recipes' docstring commands, every one, as written, with only local shards
of the recipe's modality given: `mmjax train --config configs/X.py:tiny ...` through the
CLI, with the recipe's own tokenizer from the session's offline hub cache (`conftest`,
`_hub.py`)."""
import importlib.util
import json
import os
import re
import shlex

import pytest

from _helpers import CONFIG_IDS, ROOT
from mmjax.cli import main
from mmjax.data import synthetic

pytestmark = pytest.mark.usefixtures("mmjax_cache")

# recipe -> the tokenizer it names (the system it reproduces)
TOKENIZERS = {
    "clip_b16": "clip", "coca_b16": "clip", "siglip_b16": "siglip",
    "lit_b16": "bert-base-uncased", "blip2_stage1": "bert-base-uncased",
    "blip2_stage2": "hub:lmsys/vicuna-7b-v1.1", "llava": "hub:lmsys/vicuna-7b-v1.5",
    "vilt_b32": "bert-base-uncased", "vlmo_base": "bert-base-uncased",
    "clap_base": "hub:FacebookAI/roberta-base", "video_clip_b16": "clip",
}
# (recipe, index of the docstring's command) -> the shards it is given (a fixture
# `<kind>_shards`), where not image-text (`image_shards`); None: the command names no
# shards (a laptop variant on the built-in data, with the byte tokenizer).
SHARDS = {("clap_base", 0): "audio", ("video_clip_b16", 0): "video",
          ("llava", 1): "dialog", ("vilt_b32", 1): "vqa", ("llava", 2): None}
# vilt_b32's answer vocabulary file, as its docstring names it (`vqa_shards` gives a
# local one).
VQA_ANSWERS = "/data/vqav2/answers.txt"
# The recipes for accelerators: every one of configs/ not named `*_tiny`.
POD_RECIPES = [name for name in CONFIG_IDS if not name.endswith("_tiny")]


def docstring_commands(recipe):
    """Every `mmjax train --config configs/...` command of a recipe's docstring, in
    order, as argument lists (without `mmjax train`; line continuations joined,
    trailing `# comments` dropped)."""
    spec = importlib.util.spec_from_file_location(recipe, os.path.join(ROOT, "configs",
                                                                       f"{recipe}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = re.sub(r"\\\n\s*", " ", module.__doc__).splitlines()
    return [shlex.split(line.split(" #")[0])[2:] for line in map(str.strip, lines)
            if line.startswith("mmjax train --config configs/")]


def as_tiny_run(args, shards, workdir, files=None):
    """The command at `:tiny` on local shards: the config gets `tiny` (after a comma
    where it has an argument), `--workdir` a test folder, the shard path the local
    shards; `--config.init.*` (weights files that are not here) are dropped, as
    `:tiny` starts every part at random. `files` maps other paths the command names
    (e.g. vilt_b32's `vqa=ANSWERS` file) to local ones."""
    for path, local in (files or {}).items():
        args = [a.replace(path, local) for a in args]
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--config":
            path = args[i + 1]
            out += ["--config", os.path.join(ROOT, path + (",tiny" if ":" in path else ":tiny"))]
            i += 2
            continue
        if a == "--workdir":
            out += ["--workdir", str(workdir)]
            i += 2
            continue
        if a.startswith("--config.init."):
            i += 1 if "=" in a else 2
            continue
        if a.startswith("--config.data.train.shards="):
            a = f"--config.data.train.shards={shards}"
        out.append(a)
        i += 1
    return out


# Local shards as users have them (brace patterns of 2-4 tars), the smallest that
# feed 3 steps of batch 8; `(pattern, {docstring path: local file})`.
@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    """Image-text shards: `key.jpg` + `key.txt` (the built-in images and captions)."""
    folder = tmp_path_factory.mktemp("image_shards")
    synthetic.write_synthetic_shards(str(folder), "train", num_samples=64, image_size=32,
                           samples_per_shard=16)
    return str(folder / "train-{000000..000003}.tar"), {}


@pytest.fixture(scope="module")
def audio_shards(tmp_path_factory):
    """Audio-text shards as LAION-Audio-630K's: `key.flac` + `key.txt` (1 s clips)."""
    from mmjax.data.synthetic_audio import write_audio_shards
    folder = tmp_path_factory.mktemp("audio_shards")
    write_audio_shards(str(folder), num_samples=16, sample_rate=16000, seconds=1.0,
                       samples_per_shard=8)
    return str(folder / "train-{000000..000001}.tar"), {}


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory):
    """Video-text shards as WebVid's: `key.mp4` (8 frames of 32 px) + `key.txt`."""
    from mmjax.data.synthetic_video import write_video_shards
    folder = tmp_path_factory.mktemp("video_shards")
    write_video_shards(str(folder), num_samples=16, frames=8, size=32, samples_per_shard=8)
    return str(folder / "train-{000000..000001}.tar"), {}


def _write_image_json(folder, num_samples, record):
    """Shards `train-00000N.tar` of 8 samples: the built-in image as `key.jpg` and
    `record(sample)` as `key.json`."""
    from mmjax.data.writer import ShardWriter
    with ShardWriter(str(folder), max_count=8, prefix="train") as writer:
        for i in range(num_samples):
            s = synthetic.make_sample(i, "train", 32)
            writer.write({"__key__": f"{i:09d}",
                          "jpg": synthetic.encode_image(s["image"], "jpg"),
                          "json": record(s)})
    return writer.shards


@pytest.fixture(scope="module")
def dialog_shards(tmp_path_factory):
    """Instruction-tuning shards as LLaVA-665K's: `key.jpg` + `key.json` holding only
    LLaVA `conversations` (human `<image>` + question, gpt answer, ...) about the image:
    what `llava.py:finetune` (and its `:tiny`) reads, `json:conversations`."""
    def record(s):
        turns = []
        for k, qa in enumerate(s["qa"]):
            turns += [{"from": "human", "value": ("<image>\n" if k == 0 else "")
                       + qa["question"]}, {"from": "gpt", "value": qa["answer"]}]
        return {"id": s["classname"], "conversations": turns}
    folder = tmp_path_factory.mktemp("dialog_shards")
    _write_image_json(folder, 16, record)
    return str(folder / "train-{000000..000001}.tar"), {}


@pytest.fixture(scope="module")
def vqa_shards(tmp_path_factory):
    """VQAv2-style shards: `key.jpg` + `key.json` {"qa": [{"question", "answers": 10
    human answers}]} (the image's built-in questions, 7 of 10 answers right), and the
    answer vocabulary file (every answer of the built-in questions, one a line) for
    vilt_b32's `vqa=ANSWERS`."""
    answers = sorted({a for values in synthetic.ANSWERS_BY_TYPE.values() for a in values})

    def record(s):
        return {"qa": [{"question": q["question"],
                        "answers": [q["answer"]] * 7 + [answers[i % len(answers)]
                                                        for i in range(3)]}
                       for q in s["qa"]]}
    folder = tmp_path_factory.mktemp("vqa_shards")
    _write_image_json(folder, 16, record)
    (folder / "answers.txt").write_text("".join(a + "\n" for a in answers), encoding="utf-8")
    return str(folder / "train-{000000..000001}.tar"), {VQA_ANSWERS: str(folder / "answers.txt")}


def test_every_pod_recipe_is_run():
    """The tests below cover every accelerator recipe of configs/, each with a
    docstring command."""
    assert sorted(TOKENIZERS) == POD_RECIPES
    for recipe in POD_RECIPES:
        assert docstring_commands(recipe), f"configs/{recipe}.py: no `mmjax train` command"


CASES = [(recipe, i) for recipe in sorted(TOKENIZERS)
         for i in range(len(docstring_commands(recipe)))]


@pytest.mark.parametrize("recipe, index", CASES, ids=[f"{r}-{i}" for r, i in CASES])
def test_docstring_command_runs_tiny_with_the_recipes_tokenizer(recipe, index, request,
                                                                 tmp_path):
    """Each docstring command runs (3 steps and the evaluations) on local shards of its
    modality, and the run's saved config holds the recipe's tokenizer with the
    vocabulary size taken from it (the laptop variant that names no shards: the
    built-in data, bytes)."""
    command = docstring_commands(recipe)[index]
    kind = SHARDS.get((recipe, index), "image")
    shards, files = request.getfixturevalue(f"{kind}_shards") if kind else ("synthetic", {})
    args = as_tiny_run(command, shards, tmp_path / "run", files)
    assert kind is None or f"--config.data.train.shards={shards}" in args
    # In this process: the same programs as `recipe:tiny` elsewhere in the suite
    # (tests/train/test_step.py), which the session's compilation cache holds once.
    assert main(["train"] + args) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    tokenizer = TOKENIZERS[recipe] if kind else "bytes"
    assert saved["data"]["train"]["tokenizer"] == tokenizer
    assert saved["data"]["train"]["shards"] == shards
    from mmjax.data.tokenizers import build_tokenizer
    vocab = build_tokenizer(tokenizer, 8).vocab_size
    sections = {k: v for k, v in saved["model"].items() if isinstance(v, dict)}
    sizes = [v["vocab_size"] for v in sections.values() if "vocab_size" in v]
    assert sizes and min(sizes) >= vocab and min(sizes) <= vocab + 1, sizes
    if kind == "vqa":  # the answer vocabulary is the file's
        answers = open(files[VQA_ANSWERS], encoding="utf-8").read().splitlines()
        assert saved["model"]["answers"] == answers
        assert saved["data"]["train"]["text_format"] == "vqa"
    if kind == "dialog":
        assert saved["data"]["train"]["text_format"] == "dialog"
        assert saved["data"]["train"]["caption_key"] == "json:conversations"
