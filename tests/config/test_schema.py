"""The config schema (`mmjax.config.schema`): every key described, and each
cross-key check fails when the config is loaded, before anything is built, with
one line naming the keys."""
import os
import subprocess
import sys

import pytest

from _helpers import ROOT
from mmjax import cli
from mmjax.config import base_config, load_config
from mmjax.config.defaults import KEYS, SECTIONS
from mmjax.config.schema import check_config, check_model, describe, field_docs
from mmjax.data.options import DATA_KEYS
from mmjax.errors import ConfigError
from mmjax.models.vit import ViT


def _leaves(node, prefix=""):
    for k, v in node.items():
        if hasattr(v, "items"):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def test_every_key_of_the_base_config_is_described():
    keys = set(_leaves(base_config()))
    described = set(KEYS) | {f"data.train.{k}" for k in DATA_KEYS}
    assert keys == described
    assert all(describe(k) for k in keys)
    assert set(SECTIONS) == {"model", "objectives", "init"}


def test_help_config_lists_every_key_with_its_value_and_description(capsys):
    assert cli.main(["train", "--config", "clip_tiny", "--help-config",
                     "--config.optim.lr=0.125"]) == 0
    out = capsys.readouterr().out
    for key in _leaves(base_config()):
        assert f"\n{key} = " in "\n" + out, key
    assert "optim.lr = 0.125  (float)\n    peak learning rate [a number >= 0]" in out
    # model fields, with the recipe's values and the tower's descriptions
    assert "model.image.patch_size = 8  (int)" in out
    assert f"model.image.pool = 'gap'  (str)\n    {field_docs(ViT)['pool']}" in out
    assert "objectives.softmax_contrastive = 1.0" in out


@pytest.mark.parametrize("override, match", [
    # family x evaluator
    ("evals.vqa.shards=synthetic", r"config\.evals\.vqa: the two_tower family does not offer "
                                   r"it; use a VisionLM \(llava, blip2_stage2\) or one-tower"),
    # objectives x family
    ("objectives.itm=1.0", r"config\.objectives\.itm: not an objective of TwoTower"),
    # tokenizer vocabulary x model vocabulary (bytes: 259 ids)
    ("model.text.vocab_size=200", r"tokenizer='bytes' has 259 tokens but the model's "
                                  r"vocab_size is 200; raise config\.model\.text\.vocab_size"),
    # frozen prefixes x parameters
    ("optim.freeze=['image_towr']", r"config\.optim\.freeze: 'image_towr' matches no parameter"
                                    r".*'image_tower', 'log_scale', 'text_tower'"),
    # init prefixes x parameters
    ("init.vision=workdir:/nowhere", r"config\.init: 'vision' matches no parameter"),
    # the tower's input x the data keys
    ("data.train.image_size=48", r"config\.data\.train\.image_size=48 but the model's image "
                                 r"tower reads 32 \(model\.image\); set "
                                 r"--config\.data\.train\.image_size=32"),
    # tower x family: two towers contrast pooled embeddings
    ("model.image.pool=none", r"the two_tower family contrasts pooled embeddings, but the "
                              r"'vit' tower pools none \(config\.model\.image\.pool='none'\)"),
    # two towers: embeddings of one size
    ("model.text.embed_dim=24", r"model\.image embeds into \[B, 128\] but config\.model\.text into \[B, 24\]"),
])
def test_cross_key_checks_fail_before_anything_is_built(override, match):
    """`load_config` runs the checks that need no files and no JAX; `check_model`
    (what `train` runs first once the processes joined) the rest."""
    with pytest.raises(ConfigError, match=match):
        check_model(load_config("clip_tiny", [override]))


def test_loading_a_config_leaves_jax_unstarted():
    """A multi-process job loads its config before `jax.distributed.initialize`, which
    must come before JAX starts a backend: loading (its checks included) starts none."""
    code = ("from mmjax.config import load_config\n"
            "from jax._src import xla_bridge\n"
            "for name in ('llava', 'blip2_stage2', 'lit_b16', 'clap_tiny', 'clip_tiny:tiny'):\n"
            "    load_config(name)\n"
            "assert not xla_bridge.backends_are_initialized()\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stderr[-2000:]


def test_patch_dropout_keys_are_checked_when_the_config_loads():
    """`model.image.patch_dropout` (a tower field no recipe sets: settable from the
    command line all the same) is a fraction in [0, 1), refused by the families whose
    media tokens fill fixed places of one sequence; the unmasked tail fits in the run."""
    assert load_config("clip_tiny", ["model.image.patch_dropout=0.5"]).model.image.patch_dropout == 0.5
    with pytest.raises(ConfigError, match=r"config\.model\.image\.patch_dropout=1\.0: must be "
                                          r"a number >= 0 and < 1"):
        load_config("clip_tiny", ["model.image.patch_dropout=1.0"])
    with pytest.raises(ConfigError, match=r"config\.model\.image\.patch_dropout=0\.5: the "
                                          r"vision_lm family places a fixed number of media"):
        load_config("llava", ["model.image.patch_dropout=0.5"])
    with pytest.raises(ConfigError, match=r"config\.unmasked_tuning_steps=401 is more than "
                                          r"config\.total_steps=400"):
        load_config("clip_tiny", ["unmasked_tuning_steps=401"])


def test_unknown_keys_and_towers_are_errors_with_the_choices():
    with pytest.raises(ConfigError, match=r"unknown config key config\.model\.image\.pooll; "
                                          r"did you mean model\.image\.pool"):
        load_config("clip_tiny", ["model.image.pooll=cls"])
    c = load_config("clip_tiny").copy_and_resolve_references()
    c.unlock()
    c.model.image.kind = "vitt"
    with pytest.raises(ConfigError, match=r"config key `model\.image\.kind` is 'vitt'; choose "
                                          r"one of \['ast', 'video_vit', 'vit'\]"):
        check_config(c)
    c.model.image.kind = "vit"
    c.model.image.pooll = "cls"
    with pytest.raises(ConfigError, match=r"config keys \['model\.image\.pooll'\] are not "
                                          r"fields of ViT"):
        check_config(c)


def test_checks_of_the_recipes_pass():
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if name.endswith(".py"):
            load_config(f"configs/{name}")
            load_config(f"configs/{name}:tiny")


def test_builtin_data_must_exist_for_the_tower():
    from mmjax.data import builtin
    c = load_config("clip_tiny").copy_and_resolve_references()
    saved = builtin.BUILTIN.pop("image")
    try:
        with pytest.raises(ConfigError, match=r"config\.data\.train\.shards='synthetic': there "
                                              r"is no built-in data for the model's image tower"):
            check_config(c)
        c.data.train.shards = "/data/{0..9}.tar"
        with pytest.raises(ConfigError, match=r"config\.evals\.zeroshot\.shards='synthetic'"):
            check_config(c)
    finally:
        builtin.BUILTIN["image"] = saved


def test_train_checks_the_config_before_it_touches_the_workdir(tmp_path):
    """A config built in Python (not loaded) is checked by `train` itself."""
    from mmjax.train.loop import train
    c = load_config("clip_tiny:tiny").copy_and_resolve_references()
    c.evals.captioning.shards = "synthetic"
    with pytest.raises(ConfigError, match=r"config\.evals\.captioning: the two_tower family"):
        train(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_every_model_field_of_every_recipe_is_described(capsys):
    """`--help-config` describes each model key from its module's docstring (a field
    without a description prints `field of ClassName`)."""
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if name.endswith(".py"):
            assert cli.main(["train", "--config", f"configs/{name}", "--help-config"]) == 0
            out = capsys.readouterr().out
            assert "field of" not in out, (name, [l for l in out.splitlines()
                                                  if "field of" in l][:3])


def test_a_number_key_left_at_none_takes_a_number_from_the_command_line():
    """`--config.peak_flops=...` (default None) is read as a number, `none` as None, and
    anything else is an error naming the key."""
    assert load_config("clip_tiny", ["peak_flops=1.5e12"]).peak_flops == 1.5e12
    assert load_config("clip_tiny", ["peak_flops=none"]).peak_flops is None
    with pytest.raises(ConfigError, match="config.peak_flops"):
        load_config("clip_tiny", ["peak_flops=fast"])
