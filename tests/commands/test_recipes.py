"""The pod recipes' docstring commands, as written, with only local shards given:
`mmjax train --config configs/X.py:tiny ...` through the CLI, with the recipe's own
tokenizer from the session's offline hub cache (`conftest`, `_hub.py`)."""
import importlib.util
import json
import os
import re
import shlex

import pytest

from _helpers import ROOT
from mmjax.cli import main
from mmjax.data.synthetic import write_synthetic_shards

pytestmark = pytest.mark.usefixtures("mmjax_cache")

# recipe -> the tokenizer it names (the system it reproduces)
TOKENIZERS = {
    "clip_b16": "clip", "coca_b16": "clip", "siglip_b16": "siglip",
    "lit_b16": "bert-base-uncased", "blip2_stage1": "bert-base-uncased",
    "blip2_stage2": "hub:lmsys/vicuna-7b-v1.1", "llava": "hub:lmsys/vicuna-7b-v1.5",
    "vilt_b32": "bert-base-uncased", "vlmo_base": "bert-base-uncased",
}


def docstring_commands(recipe):
    """The `mmjax train` commands of a recipe's docstring, as argument lists."""
    spec = importlib.util.spec_from_file_location(recipe, os.path.join(ROOT, "configs",
                                                                       f"{recipe}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = re.sub(r"\\\n\s*", " ", module.__doc__).splitlines()
    return [shlex.split(line.split(" #")[0])[2:] for line in map(str.strip, lines)
            if line.startswith("mmjax train --config configs/")]


def as_tiny_run(args, shards, workdir):
    """The command at `:tiny` on local shards: the config gets `tiny` (after a comma
    where it has an argument), `--workdir` a test folder, the shard path the local
    shards; `--config.init.*` (weights files that are not here) are dropped, as
    `:tiny` starts every part at random."""
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


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    """Image-text webdataset shards as users have them (a brace pattern of 4 tars)."""
    folder = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(str(folder), "train", num_samples=64, image_size=32,
                           samples_per_shard=16)
    return str(folder / "train-{000000..000003}.tar")


@pytest.mark.parametrize("recipe", sorted(TOKENIZERS))
def test_docstring_command_runs_tiny_with_the_recipes_tokenizer(recipe, local_shards,
                                                                 tmp_path):
    """Each docstring command runs (3 steps and the evaluations) and the run's saved
    config holds the recipe's tokenizer with the vocabulary size taken from it."""
    commands = docstring_commands(recipe)
    assert commands, f"configs/{recipe}.py: no `mmjax train` command in its docstring"
    args = as_tiny_run(commands[0], local_shards, tmp_path / "run")
    # In this process: the same programs as `recipe:tiny` elsewhere in the suite
    # (tests/train/test_step.py), which the session's compilation cache holds once.
    assert main(["train"] + args) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert saved["data"]["train"]["tokenizer"] == TOKENIZERS[recipe]
    assert saved["data"]["train"]["shards"] == local_shards
    from mmjax.data.tokenizers import build_tokenizer
    vocab = build_tokenizer(TOKENIZERS[recipe], 8).vocab_size
    sections = {k: v for k, v in saved["model"].items() if isinstance(v, dict)}
    sizes = [v["vocab_size"] for v in sections.values() if "vocab_size" in v]
    assert sizes and min(sizes) >= vocab and min(sizes) <= vocab + 1, sizes
