"""`config.init` source `hf_ast:PATH`: a CLAP audio tower starts from a Hugging
Face `ASTModel` folder; the projection head the AST lacks keeps its init."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmjax.config.loading import load_config  # noqa: E402
from mmjax.convert.ast import load_ast  # noqa: E402
from mmjax.models import build  # noqa: E402
from mmjax.train import init_sources  # noqa: E402
from mmjax.train.step import build_trainer  # noqa: E402
from mmjax.train.trees import flat  # noqa: E402

# The AST of clap_tiny:tiny's audio tower: 1 s at 16 kHz = 101 frames of 32 mel
# bins, 16x16 patches with strides 16 (2 x 6 patches), width 64, 2 layers.
AST_CFG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               num_mel_bins=32, max_length=101, patch_size=16, frequency_stride=16,
               time_stride=16)


@pytest.fixture(scope="module")
def ast_dir(tmp_path_factory):
    ref = transformers.ASTModel(transformers.ASTConfig(**AST_CFG)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every parameter random (HF zero-inits tokens and posemb)
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = str(tmp_path_factory.mktemp("ast"))
    ref.save_pretrained(path)
    return path


def _config(scan, overrides=()):
    config = load_config("clap_tiny:tiny", list(overrides))
    with config.unlocked():
        config.model.image.scan = scan
    return config


def _params(config):
    state = build_trainer(config, jax.devices()[:1]).init_state(0)
    return flat(jax.device_get(state["params"]))


@pytest.mark.parametrize("scan", [False, True])
def test_hf_ast_source_fills_the_audio_tower(ast_dir, scan):
    config = _config(scan, [f"init.image_tower=hf_ast:{ast_dir}"])
    assert config.model.image.kind == "ast" and config.model.image.embed_dim
    got = _params(config)
    fresh = _params(_config(scan))  # the same seed, no init source
    want = flat(jax.device_get(load_ast(ast_dir, scan=scan)[1]["params"]))

    tower = {k[len("image_tower/"):]: v for k, v in got.items() if k.startswith("image_tower/")}
    # Every tower parameter but the projection head is the converted AST's.
    assert set(tower) - set(want) == {"proj/kernel"}
    assert set(want) - set(tower) == set()
    for k, v in want.items():
        np.testing.assert_array_equal(tower[k], np.asarray(v), err_msg=k)
        assert not np.array_equal(tower[k], fresh["image_tower/" + k]), k
    # The head the AST lacks keeps its initial value, and so does the rest of
    # the model (text tower, logit scale).
    assert set(got) == set(fresh)
    for k in got:
        if not k.startswith("image_tower/") or k == "image_tower/proj/kernel":
            np.testing.assert_array_equal(got[k], fresh[k], err_msg=k)


def test_kept_head_is_checkpointed_when_the_tower_is_frozen(ast_dir):
    # Frozen sourced parameters are left out of checkpoints and reloaded from
    # the source on restore; the head the source never holds must be stored.
    config = load_config("clap_tiny:tiny", [f"init.image_tower=hf_ast:{ast_dir}",
                                            "optim.freeze=['image_tower']"])
    model = build(config.model)
    from mmjax.families import get_family
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               *get_family(config).sample_inputs(config)))
    params = jax.tree.map(lambda x: getattr(x, "value", x), shapes["params"],
                          is_leaf=lambda x: hasattr(x, "value"))
    refs = init_sources.referenced_keys(params, config)
    tower = {k for k in flat(params) if k.startswith("image_tower/")}
    assert refs == tower - {"image_tower/proj/kernel"}


def test_other_missing_parameters_still_fail(ast_dir):
    # Only the declared head may be absent from the source: anything else
    # (here a parameter the AST does not have) fails the load, named.
    import jax.numpy as jnp
    import ml_collections
    params = {"image_tower": {"extra": jnp.zeros(3), "proj": {"kernel": jnp.zeros((64, 32))}}}
    config = ml_collections.ConfigDict({"init": {"image_tower": f"hf_ast:{ast_dir}"}})
    with pytest.raises(init_sources.InitError, match="extra"):
        init_sources.apply_init(params, config)


def test_unknown_kind_lists_the_registered_importers():
    with pytest.raises(init_sources.InitError, match="hf_ast"):
        init_sources.load_source("hf_nope:/x", "image_tower")
