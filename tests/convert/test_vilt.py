"""ViLT: parity of imported Hugging Face checkpoints (`ViltModel`,
`ViltForMaskedLM`, `ViltForQuestionAnswering`) with `transformers` (PyTorch,
CPU, float32), and the `hf_vilt:PATH` init source.

Random weights from a small config, every tensor perturbed (HF starts
LayerNorms at 1/0 and the class token at 0, which would hide mapping
mistakes), saved with `save_pretrained` and loaded back through
`mmjax.convert.vilt`.
"""
import json
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmjax.convert.vilt import load_vilt, load_vilt_source, vilt_model  # noqa: E402
from mmjax.errors import ConvertError  # noqa: E402
from mmjax.losses import mask_tokens, masked_lm_loss, vqa_loss  # noqa: E402
from mmjax.models import build  # noqa: E402
from mmjax.train import init_sources  # noqa: E402
from mmjax.train.trees import flat  # noqa: E402

TOL = 1e-4
# vocab above BERT's [MASK] id 103; 4 x 4 patches of 16 px.
CFG = dict(vocab_size=110, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=128, image_size=64, patch_size=16, max_position_embeddings=16,
           hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0)
ANSWERS = ("yes", "no", "2", "red", "dog", "left", "none")
# [CLS] ... [SEP], rows of different lengths padded with 0.
IDS = np.array([[101, 5, 6, 7, 102, 0, 0, 0, 0, 0],
                [101, 9, 10, 11, 12, 13, 14, 15, 16, 102],
                [101, 20, 102, 0, 0, 0, 0, 0, 0, 0]])


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _save(cls, name, tmp_path_factory, seed, **extra):
    torch.manual_seed(seed)
    ref = _randomize(cls(transformers.ViltConfig(**CFG, **extra)), seed)
    path = str(tmp_path_factory.mktemp(name))
    ref.save_pretrained(path)
    return path, ref


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return _save(transformers.ViltModel, "vilt", tmp_path_factory, 0)


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    return _save(transformers.ViltForMaskedLM, "vilt_mlm", tmp_path_factory, 1)


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    return _save(transformers.ViltForQuestionAnswering, "vilt_vqa", tmp_path_factory, 2,
                 num_labels=len(ANSWERS), id2label=dict(enumerate(ANSWERS)))


def _images(n=3, seed=0):
    return np.random.RandomState(seed).randn(n, 64, 64, 3).astype(np.float32)


def _torch_inputs(img, ids):
    return dict(pixel_values=torch.from_numpy(np.ascontiguousarray(img.transpose(0, 3, 1, 2))),
                input_ids=torch.from_numpy(np.array(ids, np.int64)),
                attention_mask=torch.from_numpy((ids != 0).astype(np.int64)))


def _max_err(got, want, where=None):
    err = np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))
    return float((err if where is None else err[where]).max())


def _patch_err(got, want):
    """Max abs error of the patch tokens up to HF's random patch order: every HF row
    is matched to its nearest mmjax row, and the matching must be a bijection."""
    worst = 0.0
    for g, w in zip(got, want):  # [N, D] each
        dist = np.abs(w[:, None, :] - g[None, :, :]).max(-1)  # [N_hf, N_ours]
        match = dist.argmin(1)
        assert len(set(match.tolist())) == len(match), "patch matching is not a bijection"
        worst = max(worst, float(dist[np.arange(len(match)), match].max()))
    return worst


@pytest.mark.parametrize("scan", [False, True])
def test_vilt_model_parity(base_dir, scan):
    path, ref = base_dir
    model, variables = load_vilt(path, scan=scan)
    assert model.answers == () and model.special_ids == (0, 101, 102) and model.mask_id == 103
    img, l = _images(), IDS.shape[1]
    with torch.no_grad():
        want = ref(**_torch_inputs(img, IDS))
    seq_want = want.last_hidden_state.numpy()
    apply = jax.jit(model.apply, static_argnames="method")
    tokens = apply(variables, jnp.asarray(img), method="image_tokens")
    seq = np.asarray(apply(variables, tokens, jnp.asarray(IDS, jnp.int32), method="fuse"))
    pooled = apply(variables, jnp.asarray(seq), method="pooled")
    assert seq.shape == seq_want.shape == (3, l + 1 + 16, 64)
    errs = {"text": _max_err(seq[:, :l], seq_want[:, :l], IDS != 0),
            "pooled": _max_err(pooled, want.pooler_output.numpy()),
            "class token": _max_err(seq[:, l], seq_want[:, l]),
            "patches": _patch_err(seq[:, l + 1:], seq_want[:, l + 1:])}
    assert max(errs.values()) <= TOL, errs


def test_missing_heads_keep_their_init(base_dir, caplog):
    path, _ = base_dir
    with caplog.at_level(logging.INFO, logger="mmjax"):
        model, variables = load_vilt(path, seed=3)
    kept = {"itm_head/kernel", "itm_head/bias", "mlm_dense/kernel", "mlm_dense/bias",
            "mlm_norm/scale", "mlm_norm/bias", "mlm_bias"}
    assert all(k in caplog.text for k in kept)
    params = flat(variables["params"])
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                               jnp.zeros((1, 8), jnp.int32)))
    assert set(params) == set(flat(nn.meta.unbox(shapes["params"])))
    # The kept heads are the seed's initial values (random kernels; biases 0 and
    # LayerNorm scales 1 whatever the seed); the rest is the checkpoint's.
    other = flat(load_vilt(path, seed=4)[1]["params"])
    for k in params:
        same = np.array_equal(params[k], other[k])
        assert same == (k not in kept or not k.endswith("kernel")), k
    np.testing.assert_array_equal(params["mlm_norm/scale"], np.ones(64))
    np.testing.assert_array_equal(params["mlm_bias"], np.zeros(CFG["vocab_size"]))
    # The source kind gives only what the folder holds.
    source = flat(load_vilt_source(path)[1]["params"])
    assert set(source) == set(params) - kept


def test_mlm_parity(mlm_dir):
    path, ref = mlm_dir
    model, variables = load_vilt(path)
    img = _images(seed=1)
    masked, chosen = mask_tokens(jnp.asarray(IDS), jax.random.key(0), mask_id=model.mask_id,
                                 vocab_size=CFG["vocab_size"], special_ids=model.special_ids,
                                 prob=0.5)
    masked, chosen = np.asarray(masked), np.asarray(chosen)
    assert chosen.sum() >= 3 and (masked == 103).any()
    labels = np.where(chosen, IDS, -100)
    with torch.no_grad():
        want = ref(**_torch_inputs(img, masked), labels=torch.from_numpy(labels))
    logits = jax.jit(lambda v, x, t: model.apply(
        v, model.apply(v, x, method="image_tokens"), t, method="mlm_logits"))(
            variables, jnp.asarray(img), jnp.asarray(masked))
    loss = masked_lm_loss(logits, jnp.asarray(IDS), jnp.asarray(chosen))
    assert _max_err(logits, want.logits.numpy(), masked != 0) <= TOL
    assert abs(float(loss) - float(want.loss)) <= TOL * abs(float(want.loss))


def test_vqa_parity(vqa_dir):
    path, ref = vqa_dir
    model, variables = load_vilt(path)
    assert model.answers == ANSWERS
    img = _images(seed=2)
    rng = np.random.RandomState(3)
    targets = np.where(rng.rand(3, len(ANSWERS)) < 0.4, rng.rand(3, len(ANSWERS)), 0.0)
    targets = targets.astype(np.float32)
    with torch.no_grad():
        want = ref(**_torch_inputs(img, IDS), labels=torch.from_numpy(targets))
    logits = jax.jit(lambda v, x, t: model.apply(v, x, t, method="vqa_logits"))(
        variables, jnp.asarray(img), jnp.asarray(IDS))
    loss = vqa_loss(logits, jnp.asarray(targets), jnp.ones(3))
    assert _max_err(logits, want.logits.numpy()) <= TOL
    assert abs(float(loss) - float(want.loss)) <= TOL * abs(float(want.loss))


def _one_tower_config(path, scan, entries):
    with open(os.path.join(path, "config.json")) as f:
        model = vilt_model(json.load(f), scan=scan)
    fields = {f: getattr(model, f) for f in ("image", "text", "depth", "heads", "mlp_dim", "act",
                                             "norm_eps", "experts", "answers", "pad_id",
                                             "mask_id", "special_ids", "scan")}
    return ml_collections.ConfigDict({
        "model": dict(name="one_tower", **fields),
        "init": {k: f"hf_vilt:{path}" + ("" if k == "all" else f"#{k}") for k in entries},
        "optim": {"freeze": []}})


# One entry per top-level subtree the folder holds, or one for the whole model
# (`init.all`, where init_sources has it); itm_head is in no ViLT folder and keeps
# the model's own init either way.
PER_SUBTREE = ("text_tower", "image_tower", "type_embedding", "encoder", "pooler", "mlm_dense",
               "mlm_norm", "mlm_bias")
WHOLE = pytest.param(("all",), True, marks=pytest.mark.skipif(
    not hasattr(init_sources, "ALL"), reason="init_sources has no whole-model prefix"))


def _fresh_params(model, seed):
    """Random stand-ins for the target's initial parameters (a whole-model init
    takes seconds to compile; apply_init needs only their shapes and values)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                               jnp.zeros((1, 8), jnp.int32)))
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape) * 0.02, x.dtype),
                        nn.meta.unbox(shapes["params"]))


@pytest.mark.parametrize("entries,scan", [(PER_SUBTREE, False), (PER_SUBTREE, True), WHOLE],
                         ids=["subtrees", "subtrees-scan", "all-scan"])
def test_init_source_fills_one_tower(mlm_dir, entries, scan):
    path, _ = mlm_dir
    config = _one_tower_config(path, scan, entries)
    model = build(config.model)
    fresh = _fresh_params(model, 7)
    params = init_sources.apply_init(fresh, config)
    want_model, want = load_vilt(path, scan=scan)
    assert want_model == model
    got_flat, want_flat, fresh_flat = flat(params), flat(want["params"]), flat(fresh)
    assert set(got_flat) == set(want_flat)
    for k in got_flat:
        if k.startswith("itm_head/"):  # the folder has none: the target's own init
            np.testing.assert_array_equal(got_flat[k], fresh_flat[k], err_msg=k)
        else:
            np.testing.assert_array_equal(got_flat[k], want_flat[k], err_msg=k)
    img, ids = jnp.asarray(_images(2, seed=4)), jnp.asarray(IDS[:2], jnp.int32)
    outputs = jax.jit(lambda p: model.apply({"params": p}, img, ids))
    got, ref = outputs(params), outputs(want["params"])
    np.testing.assert_array_equal(got["mlm_logits"], ref["mlm_logits"])
    assert {"itm_head", "mlm_dense", "mlm_norm", "mlm_bias", "vqa_fc1", "vqa_norm",
            "vqa_fc2"} <= set(init_sources.IMPORTERS["hf_vilt"].keep_init)


def test_init_source_names_a_head_the_folder_lacks(base_dir):
    path, _ = base_dir
    config = _one_tower_config(path, False, ("itm_head",))
    with pytest.raises(init_sources.InitError, match="itm_head"):
        init_sources.apply_init(_fresh_params(build(config.model), 0), config)


def test_shape_mismatch_names_parameter(base_dir, tmp_path):
    path, _ = base_dir
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["intermediate_size"] = 96  # checkpoint has 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    os.symlink(os.path.join(path, "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(ConvertError) as err:
        load_vilt(str(tmp_path))
    msg = str(err.value)
    assert "encoder/layers_0/mlp/fc1/kernel" in msg and "(64, 128)" in msg and "(64, 96)" in msg


def test_refuses_pickle_only_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vilt", **CFG}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FileNotFoundError, match="safe_serialization"):
        load_vilt(str(tmp_path))
