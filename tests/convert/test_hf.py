"""Parity of imported Hugging Face checkpoints with `transformers` (PyTorch, CPU).

Random weights from small configs, saved with `save_pretrained` and loaded
back through `mmjax.convert.hf`; outputs must match to 1e-4 (float32).
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmjax.convert import hf  # noqa: E402
from mmjax.convert.rules import read_hf_checkpoint  # noqa: E402
from mmjax.models.qformer import QFormer  # noqa: E402

TOL = 1e-4


def _out(x):
    """transformers 5 returns output objects from get_*_features."""
    return getattr(x, "pooler_output", x).detach().numpy()


def _images(n, size, seed=0):
    return np.random.RandomState(seed).randn(n, size, size, 3).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=98,
                         bos_token_id=97, pad_token_id=0),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=24)
    model = transformers.CLIPModel(cfg).eval()
    path = str(tmp_path_factory.mktemp("clip"))
    model.save_pretrained(path)
    return path, model


# Rows of different lengths, padded with 0; EOS id 98.
CLIP_IDS = np.array([[97, 5, 6, 7, 98, 0, 0, 0],
                     [97, 9, 98, 0, 0, 0, 0, 0],
                     [97, 3, 4, 5, 6, 7, 8, 98]])


@pytest.mark.parametrize("scan", [False, True])
def test_clip_parity(clip_dir, scan):
    path, ref = clip_dir
    model, variables = hf.load_clip(path, scan=scan)
    img = _images(3, 32)
    with torch.no_grad():
        want_img = _out(ref.get_image_features(pixel_values=_nchw(img)))
        want_txt = _out(ref.get_text_features(input_ids=torch.from_numpy(CLIP_IDS),
                                              attention_mask=torch.from_numpy(CLIP_IDS != 0).long()))
    got_img = np.asarray(model.apply(variables, jnp.asarray(img), method="encode_image"))
    got_txt = np.asarray(model.apply(variables, jnp.asarray(CLIP_IDS, jnp.int32),
                                     method="encode_text"))
    assert np.abs(got_img - want_img).max() <= TOL
    assert np.abs(got_txt - want_txt).max() <= TOL
    # The learned scale comes along.
    assert np.isclose(float(variables["params"]["log_scale"]), float(ref.logit_scale.detach()))


def test_truncated_tower_gives_penultimate_layer_features(clip_dir, scan=True):
    # LLaVA feeds the LM hidden_states[-2] of the CLIP vision tower (no post-LN):
    # a ViT one layer shorter, initialized from the full checkpoint (the scanned
    # stack takes the source's first layers; unrolled, the last is just unused).
    import flax.linen as nn
    import jax
    import ml_collections
    from mmjax.models.vit import ViT
    from mmjax.train import init_sources
    path, ref = clip_dir
    full, _ = hf.load_clip(path, scan=scan)
    vit = ViT(**dict(full.image, depth=1, ln_post=False, embed_dim=None, scan=scan))
    img = _images(2, 32)
    params = {"image_tower": nn.meta.unbox(vit.init(jax.random.key(1), jnp.asarray(img))["params"])}
    config = ml_collections.ConfigDict({"init": {"image_tower": f"hf_clip:{path}#image_tower"}})
    params = init_sources.apply_init(params, config)
    _, tokens = vit.apply({"params": params["image_tower"]}, jnp.asarray(img))
    with torch.no_grad():
        want = ref.vision_model(pixel_values=_nchw(img), output_hidden_states=True)
    assert np.abs(np.asarray(tokens) - want.hidden_states[-2].numpy()).max() <= TOL
    assert np.abs(np.asarray(tokens) - want.hidden_states[-1].numpy()).max() > 100 * TOL


def test_clip_export_roundtrip(clip_dir, tmp_path):
    path, ref = clip_dir
    model, variables = hf.load_clip(path, scan=True)
    out = str(tmp_path / "exported")
    hf.save_clip(out, model, variables)
    again = transformers.CLIPModel.from_pretrained(out).eval()
    img = _images(2, 32, seed=1)
    with torch.no_grad():
        for a, b in [(ref.get_image_features(pixel_values=_nchw(img)),
                      again.get_image_features(pixel_values=_nchw(img))),
                     (ref.get_text_features(input_ids=torch.from_numpy(CLIP_IDS)),
                      again.get_text_features(input_ids=torch.from_numpy(CLIP_IDS)))]:
            assert np.abs(_out(a) - _out(b)).max() <= 1e-6
    # Every tensor of the original checkpoint is reproduced.
    _, state = hf.export_clip(model, variables)
    ref_state = {k: v.numpy() for k, v in ref.state_dict().items() if "position_ids" not in k}
    assert set(ref_state) == set(state)
    for k in ref_state:
        np.testing.assert_array_equal(state[k], ref_state[k])


def test_siglip_parity(tmp_path):
    torch.manual_seed(1)
    cfg = transformers.SiglipConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=10, projection_size=24,
                         pad_token_id=1, eos_token_id=2),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4))
    ref = transformers.SiglipModel(cfg).eval()
    # A non-trivial probe / head so the MAP pooling is really exercised.
    ref.save_pretrained(str(tmp_path))
    model, variables = hf.load_siglip(str(tmp_path))
    img = _images(2, 32, seed=2)
    # SigLIP pads to full length with the pad id and attends to the padding.
    ids = np.array([[5, 6, 7, 2, 1, 1, 1, 1, 1, 1],
                    [9, 10, 2, 1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        want_img = _out(ref.get_image_features(pixel_values=_nchw(img)))
        want_txt = _out(ref.get_text_features(input_ids=torch.from_numpy(ids)))
    got_img = np.asarray(model.apply(variables, jnp.asarray(img), method="encode_image"))
    got_txt = np.asarray(model.apply(variables, jnp.asarray(ids, jnp.int32), method="encode_text"))
    assert np.abs(got_img - want_img).max() <= TOL
    assert np.abs(got_txt - want_txt).max() <= TOL
    assert np.isclose(float(variables["params"]["logit_bias"]), float(ref.logit_bias.detach()))


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    torch.manual_seed(2)
    cfg = transformers.Blip2Config(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4, qkv_bias=True),
        qformer_config=dict(vocab_size=80, hidden_size=32, num_hidden_layers=4,
                            num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=16, cross_attention_frequency=2,
                            encoder_hidden_size=48, use_qformer_text_input=True),
        num_query_tokens=6, image_text_hidden_size=16)
    ref = transformers.Blip2ForImageTextRetrieval(cfg).eval()
    with torch.no_grad():  # non-zero q/v biases and query tokens
        for name, p in ref.named_parameters():
            if name.endswith("qkv.bias") or name == "query_tokens":
                p.normal_(0, 0.5)
    path = str(tmp_path_factory.mktemp("blip2"))
    ref.save_pretrained(path)
    return path, ref


@pytest.mark.parametrize("scan", [False, True])
def test_blip2_qformer_parity(blip2_dir, scan):
    path, ref = blip2_dir
    model, variables = hf.load_blip2_qformer(path, scan=scan)
    img = _images(2, 32, seed=3)
    ids = np.array([[3, 4, 5, 6, 0, 0], [7, 8, 0, 0, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    with torch.no_grad():
        vis = ref.vision_model(pixel_values=_nchw(img)).last_hidden_state
        query = ref.query_tokens.expand(2, -1, -1)
        # Queries only (image side of ITC).
        want_q = ref.qformer(query_embeds=query, encoder_hidden_states=vis).last_hidden_state
        # Text only (text side of ITC), padded batch.
        emb = ref.embeddings(input_ids=torch.from_numpy(ids))
        want_t = ref.qformer(query_embeds=emb, query_length=0,
                             attention_mask=torch.from_numpy(mask)).last_hidden_state
        # Queries + text, bidirectional (ITM).
        emb_qt = ref.embeddings(input_ids=torch.from_numpy(ids), query_embeds=query)
        full_mask = torch.cat([torch.ones(2, 6, dtype=torch.long), torch.from_numpy(mask)], 1)
        want_qt = ref.qformer(query_embeds=emb_qt, query_length=6, attention_mask=full_mask,
                              encoder_hidden_states=vis).last_hidden_state
        want_itm = ref(pixel_values=_nchw(img), input_ids=torch.from_numpy(ids),
                       attention_mask=torch.from_numpy(mask),
                       use_image_text_matching_head=True).logits_per_image
    got_vis = model.apply(variables, jnp.asarray(img), method="image_tokens")
    assert np.abs(np.asarray(got_vis) - vis.numpy()).max() <= TOL
    qf = QFormer(**model.qformer)
    qvars = {"params": variables["params"]["qformer_module"]}
    ids_j = jnp.asarray(ids, jnp.int32)
    got_q = qf.apply(qvars, got_vis, None)
    got_t = qf.apply(qvars, None, ids_j)
    got_qt = qf.apply(qvars, got_vis, ids_j, "bidirectional")
    # Padded text positions are don't-care; compare the real ones.
    real = np.concatenate([np.ones((2, 6), bool), ids != 0], axis=1)
    assert np.abs(np.asarray(got_q) - want_q.numpy()).max() <= TOL
    assert np.abs(np.asarray(got_t) - want_t.numpy())[ids != 0].max() <= TOL
    assert np.abs(np.asarray(got_qt) - want_qt.numpy())[real].max() <= TOL
    got_itm = model.apply(variables, got_vis, ids_j, method="itm_logits")
    assert np.abs(np.asarray(got_itm) - want_itm.numpy()).max() <= TOL


def test_shape_mismatch_names_parameter(clip_dir, tmp_path):
    path, _ = clip_dir
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["projection_dim"] = 20  # checkpoint has 24
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    os.symlink(os.path.join(path, "model.safetensors"), bad / "model.safetensors")
    with pytest.raises(ValueError) as err:
        hf.load_clip(str(bad))
    msg = str(err.value)
    assert "image_tower/proj/kernel" in msg and "(48, 24)" in msg and "(48, 20)" in msg


def test_refuses_pickle_only_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FileNotFoundError, match="safe_serialization"):
        read_hf_checkpoint(str(tmp_path))
