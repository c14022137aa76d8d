"""`mmjax eval`: reproduces the training run's zero-shot accuracy; clear one-line errors."""
import json
import os

import pytest

from _helpers import cli_error_line
from mmjax import cli
from mmjax.config.loading import load_config
from mmjax.train.loop import train

pytestmark = pytest.mark.usefixtures("mmjax_cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mmjax_cache_dir):
    """A short clip_tiny run on the built-in data (small, so the test stays quick)."""
    workdir = tmp_path_factory.mktemp("clip_tiny")
    overrides = ["total_steps=150", "batch_size=64", "log_every=50", "checkpoint_every=75",
                 "synthetic.train_samples=3000", "synthetic.test_samples=240",
                 "synthetic.samples_per_shard=500", "data.train.workers=0",
                 "optim.warmup_steps=20"]
    config = load_config("clip_tiny", overrides)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMJAX_CACHE", mmjax_cache_dir)
        result = train(config, str(workdir))
    return workdir, result, overrides


def test_trained_model_classifies_held_out_images(trained):
    _, result, _ = trained
    assert result["zeroshot/n"] == 240
    assert result["zeroshot/top1"] > 3 / 24  # chance is 1/24


def test_runner_reproduces_training_accuracy(trained, capsys):
    workdir, result, overrides = trained
    argv = ["eval", "--config", "clip_tiny", "--workdir", str(workdir)]
    argv += [f"--config.{o}" for o in overrides]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"top1: {result['zeroshot/top1']:.4f}" in out
    saved = json.load(open(os.path.join(workdir, "eval", "step_150.json")))
    assert saved["top1"] == pytest.approx(result["zeroshot/top1"], abs=1e-9)
    # An earlier step evaluates too, from its own checkpoint.
    assert cli.main(argv + ["--step", "75"]) == 0
    assert os.path.exists(os.path.join(workdir, "eval", "step_75.json"))


def test_keys_newer_than_the_run_take_their_defaults(trained, tmp_path, capsys):
    """A workdir saved before `health` and `evals.retrieval.group_key` existed is
    evaluated from its own config.json, and the newer keys can be overridden."""
    import shutil
    workdir, result, _ = trained
    old = tmp_path / "old"
    shutil.copytree(workdir, old, ignore=shutil.ignore_patterns("eval"))
    saved = json.loads((old / "config.json").read_text())
    del saved["config"]["health"], saved["config"]["evals"]["retrieval"]["group_key"]
    (old / "config.json").write_text(json.dumps(saved))
    argv = ["eval", "--workdir", str(old), "--config.evals.zeroshot.shards="]
    assert cli.main(argv + ["--config.evals.retrieval.shards=synthetic"]) == 0
    plain = json.loads((old / "eval" / "step_150.json").read_text())
    assert cli.main(argv + ["--config.evals.retrieval.shards=synthetic",
                            "--config.evals.retrieval.group_key=json:scene"]) == 0
    grouped = json.loads((old / "eval" / "step_150.json").read_text())
    assert plain["retrieval/n_images"] == grouped["retrieval/n_images"] == 240
    # The built-in captions repeat: counting the query's scene can only add hits.
    assert grouped["retrieval/i2t_r1"] > plain["retrieval/i2t_r1"]
    assert grouped["retrieval/t2i_r1"] >= plain["retrieval/t2i_r1"]


def test_missing_step_is_one_line(trained, capsys):
    workdir, _, overrides = trained
    msg = cli_error_line(["eval", "--config", "clip_tiny", "--workdir", str(workdir),
                          "--step", "99"] + [f"--config.{o}" for o in overrides], capsys)
    assert "step 99" in msg and "75" in msg and "150" in msg


def test_workdir_without_checkpoint_is_one_line(tmp_path, capsys):
    msg = cli_error_line(["eval", "--config", "clip_tiny", "--workdir", str(tmp_path)], capsys)
    assert "no checkpoint" in msg and str(tmp_path) in msg


def test_eval_hf_clip_folder(tmp_path, capsys):
    """`mmjax eval --hf` on a transformers CLIP folder gives the zero-shot accuracy
    that mmjax's own evaluators compute for the same imported weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mmjax.convert.hf import load_clip
    from mmjax.data.synthetic import CLASSNAMES
    from mmjax.data.tokenizers import build_tokenizer
    from mmjax.evaluate.runner import _batches
    from mmjax.evaluate.zeroshot import zero_shot_classifier, zero_shot_evaluate
    from mmjax.config.defaults import base_config

    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4,
                         max_position_embeddings=32, eos_token_id=2, pad_token_id=0),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=4), projection_dim=16)
    transformers.CLIPModel(cfg).save_pretrained(str(tmp_path))
    overrides = ["synthetic.test_samples=48", "synthetic.image_size=32",
                 "synthetic.samples_per_shard=24"]
    assert cli.main(["eval", "--hf", str(tmp_path)] + [f"--config.{o}" for o in overrides]) == 0
    out = capsys.readouterr().out
    # The same numbers by hand.
    model, variables = load_clip(str(tmp_path))
    config = base_config()
    config.model.name = "two_tower"  # an image tower (the default kind): image batches
    config.data.train.image_size, config.data.train.max_len = 32, 32
    config.synthetic.update(dict(test_samples=48, image_size=32, samples_per_shard=24))
    tok = build_tokenizer("bytes", 32)
    classifier = zero_shot_classifier(model, variables, list(CLASSNAMES), "simple", tok)
    want = zero_shot_evaluate(model, variables, classifier,
                              _batches(config, config.evals.zeroshot))
    assert want["n"] == 48
    assert f"top1: {want['top1']:.4f}" in out
