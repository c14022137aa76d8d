"""AST tower: parity of imported Hugging Face `ASTModel` checkpoints with
`transformers` (PyTorch, CPU, float32), both checkpoint key layouts, the
classification model's prefix, shape errors, and the waveform front end."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmjax.convert.ast import load_ast  # noqa: E402
from mmjax.errors import ConfigError, ConvertError  # noqa: E402
from mmjax.models import audio  # noqa: E402
from mmjax.models.ast import AST  # noqa: E402
from mmjax.models.towers import build_tower  # noqa: E402

TOL = 1e-4
CFG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
           num_mel_bins=32, max_length=100, patch_size=16, frequency_stride=10, time_stride=10)


def _randomize(model, seed):
    """Every parameter random (HF initializes tokens and position embeddings
    to zeros and LayerNorms to 1/0, which would hide mapping mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm_scale = "layernorm" in name and name.endswith(".weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if norm_scale else 0.0))
    return model


@pytest.fixture(scope="module")
def ast_dir(tmp_path_factory):
    ref = _randomize(transformers.ASTModel(transformers.ASTConfig(**CFG)).eval(), 0)
    path = str(tmp_path_factory.mktemp("ast"))
    ref.save_pretrained(path)
    return path, ref


def _specs(n=3, seed=0):
    return np.random.RandomState(seed).randn(n, CFG["max_length"], CFG["num_mel_bins"]).astype(
        np.float32)


def _compare(model, variables, ref, x):
    pooled, tokens = jax.jit(model.apply)(variables, jnp.asarray(x))
    with torch.no_grad():
        want = ref(input_values=torch.from_numpy(x))
    for got, exp in ((tokens, want.last_hidden_state), (pooled, want.pooler_output)):
        exp = exp.numpy()
        assert got.shape == exp.shape
        err = np.abs(np.asarray(got) - exp).max() / np.abs(exp).max()
        assert err <= TOL, err


@pytest.mark.parametrize("scan", [False, True])
def test_ast_parity(ast_dir, scan):
    path, ref = ast_dir
    model, variables = load_ast(path, scan=scan)
    assert (model.frames, model.n_mels, model.grid) == (100, 32, (2, 9))
    _compare(model, variables, ref, _specs())


def test_ast_current_key_layout_and_classifier_prefix(tmp_path):
    # transformers 5 module names (layers.{i}.attention.q_proj, ...) written
    # directly, and an ASTForAudioClassification checkpoint (prefixed keys,
    # classifier head ignored); qkv_bias=False gets zero biases.
    from safetensors.numpy import save_file
    cfg = transformers.ASTConfig(**CFG, qkv_bias=False, num_labels=5)
    clf = _randomize(transformers.ASTForAudioClassification(cfg).eval(), 1)
    state = {k: v.numpy() for k, v in clf.state_dict().items()}
    assert any(k.startswith("audio_spectrogram_transformer.layers.0.attention.q_proj")
               for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    model, variables = load_ast(str(tmp_path))
    _compare(model, variables, clf.audio_spectrogram_transformer, _specs(2, seed=1))


def test_ast_shape_mismatch_names_parameter(ast_dir, tmp_path):
    path, _ = ast_dir
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["max_length"] = 120  # more time patches than the checkpoint's embeddings
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    os.symlink(os.path.join(path, "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(ConvertError, match=r"posemb/embedding: .* shape \(20, 64\).*\(24, 64\)"):
        load_ast(str(tmp_path))


def test_waveform_input_is_front_end_then_tower():
    # A waveform goes through `spectrogram` (log-mel, pad to max_length,
    # normalization); the result equals feeding that spectrogram.
    model = AST(sample_rate=8000, clip_seconds=0.5, n_fft=256, win_length=200, hop_length=80,
                n_mels=32, max_length=52, width=32, depth=1, heads=2, pool="gap", embed_dim=16)
    wave = np.random.RandomState(0).randn(2, model.num_samples).astype(np.float32) * 0.1
    variables = jax.jit(model.init)(jax.random.key(0), jnp.asarray(wave))
    spec = jax.jit(lambda w: model.apply({}, w, method="spectrogram"))(jnp.asarray(wave))
    raw = audio.log_mel(jnp.asarray(wave), sample_rate=8000, n_fft=256, win_length=200,
                        hop_length=80, n_mels=32, mel_scale="htk", mel_norm=None, log="ln")
    assert raw.shape == (2, 51, 32) and spec.shape == (2, 52, 32)
    norm = (np.asarray(raw) - model.spec_mean) / (2 * model.spec_std)
    np.testing.assert_allclose(np.asarray(spec[:, :51]), norm, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(spec[:, 51]), -model.spec_mean / (2 * model.spec_std),
                               rtol=1e-6)
    apply = jax.jit(model.apply)
    a, ta = apply(variables, jnp.asarray(wave))
    b, tb = apply(variables, spec)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.shape == (2, 16) and ta.shape == (2, 2 + 2 * 4, 32)
    # gap pools the patch tokens only (after ln_post), then projects.
    proj = nn.meta.unbox(variables["params"]["proj"]["kernel"])
    np.testing.assert_allclose(np.asarray(a), np.asarray(tb[:, 2:].mean(1) @ proj), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ConfigError, match="clip_seconds"):
        model.apply(variables, jnp.zeros((2, 100)))


def test_registered_as_tower():
    tower = build_tower({"kind": "ast", "n_mels": 16, "max_length": 20, "width": 16, "depth": 1,
                         "heads": 2}, jnp.float32)
    assert isinstance(tower, AST)
    pooled, tokens = jax.jit(tower.init_with_output)(jax.random.key(0), jnp.zeros((1, 20, 16)))[0]
    assert pooled.shape == (1, 16) and tokens.shape == (1, 3, 16)
