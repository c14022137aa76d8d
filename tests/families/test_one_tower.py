"""One-tower family (ViLT / VLMo, `mmjax.models.one_tower`, `mmjax.families.one_tower`):
multiway routing proven by gradients, scan = unrolled, invariances of the one-stream
stack (patch order, padding), config checks, ITM hard negatives from the dual-mode
similarities, the VQA loss's question layout, and pretraining -> VQA fine-tuning
end to end."""
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _helpers import mmjax_log
from mmjax.config.loading import apply_override, load_config
from mmjax.config.schema import check_config, check_model
from mmjax.data import synthetic
from mmjax.data.pipeline import build_train_iterator
from mmjax.errors import ConfigError
from mmjax.families import get_family
from mmjax.losses import vqa_targets
from mmjax.models.layers import stack_layer_params
from mmjax.models.one_tower import OneTower
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.init_sources import restore_run_params
from mmjax.train.loop import resolve_train_shards, train
from mmjax.train.step import build_trainer

IMAGE = dict(image_size=16, patch_size=4, width=32, depth=0, heads=2, pool="cls",
             posemb="learned", ln_pre=False, ln_post=False, patch_bias=True, embed_dim=None)
TEXT = dict(vocab_size=50, max_len=20, width=32, depth=0, heads=2, pool="none", norm_eps=1e-12)
ANSWERS = ("yes", "no", "red", "blue", "two")
B, L = 4, 10
N = (16 // 4) ** 2 + 1  # patches + class token
FAMILY = get_family("one_tower")


def _model(**kw):
    args = dict(image=IMAGE, text=TEXT, depth=3, heads=2, mlp_dim=64, experts="multiway",
                vl_depth=1, embed_dim=16, pad_id=0, mask_id=49, special_ids=(0, 1, 2),
                answers=ANSWERS)
    args.update(kw)
    return OneTower(**args)


def _inputs(seed=0, b=B, length=L):
    """Random images and rows `[BOS] ids [EOS] pad...` of different lengths."""
    rng = np.random.RandomState(seed)
    images = rng.randn(b, 16, 16, 3).astype(np.float32)
    text = rng.randint(3, 49, (b, length)).astype(np.int32)
    text[:, 0] = 1
    for row, n in zip(text, rng.randint(3, length - 1, b)):
        row[n] = 2
        row[n + 1:] = 0
    return jnp.asarray(images), jnp.asarray(text)


def _perturbed(params, seed=0, scale=0.3):
    """Every kernel/embedding/class token/position table moved by N(0, scale): away
    from the init, where LayerNorms are 1/0 and small weights make every path weak."""
    rng = np.random.RandomState(seed)

    def one(path, x):
        name = jax.tree_util.keystr(path)
        if any(k in name for k in ("kernel", "embedding", "'cls'", "posemb")):
            return x + (scale * rng.randn(*x.shape)).astype(x.dtype)
        return x
    return jax.tree_util.tree_map_with_path(one, params)


_JITTED = {}


def _jitted(model, name, make):
    """One jitted function per (model, name) for the whole module (compiled once)."""
    key = (id(model), name)
    if key not in _JITTED:
        _JITTED[key] = (model, jax.jit(make()))  # (the model kept alive: its id stays unique)
    return _JITTED[key][1]


def _apply(model, variables, *args, method="__call__"):
    """`model.apply(variables, *args, method=method)`, jitted."""
    return _jitted(model, method, lambda: functools.partial(model.apply, method=method))(
        variables, *args)


def _losses(model, params, batch, objectives, rng):
    """`OneTowerFamily.losses`, jitted."""
    return _jitted(model, ("losses",) + tuple(objectives), lambda: functools.partial(
        FAMILY.losses, model, objectives=dict(objectives)))(params, batch, rng=rng)


def _params(model, seed=0):
    images, text = _inputs()
    return _perturbed(nn.unbox(_jitted(model, "init", lambda: model.init)(
        jax.random.key(seed), images, text)["params"]), seed)


@pytest.fixture(scope="module")
def multiway():
    model = _model()
    return model, _params(model)


def _norms(tree):
    """'/'-joined path -> L2 norm of every leaf."""
    return {"/".join(str(getattr(k, "key", k)) for k in path): float(np.linalg.norm(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _under(norms, *prefixes):
    out = {k: v for k, v in norms.items() if any(k.startswith(p + "/") for p in prefixes)}
    assert out, prefixes
    return out


# ----------------------------------------------------------------- multiway routing


def test_dual_mode_passes_train_only_their_modality_expert(multiway):
    """The gradient of the text-only pass is exactly zero on every vision (and
    vision-language) FFN and its norm, nonzero on every language FFN; the media-only
    pass the other way round. The attention of every layer serves both."""
    model, params = multiway
    images, text = _inputs(1)
    layers = ("encoder/layers_0", "encoder/layers_1", "encoder/vl_layers_0")
    for method, x, own, other, tower in (("encode_text", text, "text", "media", "image_tower"),
                                         ("encode_image", images, "media", "text", "text_tower")):
        g = _norms(jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(
            model.apply({"params": p}, x, method=method)))))(params))
        for layer in layers:
            assert all(v == 0.0 for v in _under(g, f"{layer}/mlp_{other}",
                                               f"{layer}/norm2_{other}").values()), (method, layer)
            assert all(v > 0.0 for v in _under(g, f"{layer}/mlp_{own}", f"{layer}/norm2_{own}",
                                              f"{layer}/attn").values()), (method, layer)
        assert all(v == 0.0 for v in _under(g, "encoder/vl_layers_0/mlp_vl",
                                           "encoder/vl_layers_0/norm2_vl").values()), method
        assert all(v == 0.0 for v in _under(g, tower).values()), method  # the other embedding


def test_fused_pass_uses_modality_experts_below_and_the_vl_expert_on_top(multiway):
    """ITM logits of [text ; media]: in the top (vision-language) layer only `mlp_vl`
    gets a gradient; in the layers below both the language and the vision FFN do
    (text tokens through one, media tokens through the other)."""
    model, params = multiway
    images, text = _inputs(2)

    def itm(p):
        tokens = model.apply({"params": p}, images, method="image_tokens")
        return jnp.sum(model.apply({"params": p}, tokens, text, method="itm_logits")[:, 1])
    g = _norms(jax.jit(jax.grad(itm))(params))
    top = "encoder/vl_layers_0"
    assert all(v == 0.0 for v in _under(g, f"{top}/mlp_text", f"{top}/norm2_text",
                                       f"{top}/mlp_media", f"{top}/norm2_media").values())
    assert all(v > 0.0 for v in _under(g, f"{top}/mlp_vl", f"{top}/norm2_vl").values())
    for layer in ("encoder/layers_0", "encoder/layers_1"):
        assert not any("mlp_vl" in k for k in g if k.startswith(layer + "/"))
        assert all(v > 0.0 for v in _under(g, f"{layer}/mlp_text", f"{layer}/mlp_media",
                                          f"{layer}/norm2_text",
                                          f"{layer}/norm2_media").values()), layer
    # The fused pass does not touch the dual-mode projections.
    assert all(v == 0.0 for v in _under(g, "itc_text_proj", "itc_image_proj").values())


def test_shared_experts_have_one_ffn_per_layer_and_no_dual_mode():
    model = _model(experts="shared", vl_depth=0)
    params = _params(model)
    enc = params["encoder"]
    assert sorted(enc) == ["final_norm", "layers_0", "layers_1", "layers_2"]
    for i in range(3):
        assert sorted(enc[f"layers_{i}"]) == ["attn", "mlp", "norm1", "norm2"]
    assert "itc_text_proj" not in params and "log_scale" not in params
    images, text = _inputs()
    out = _apply(model, {"params": params}, images, text)
    assert sorted(out) == ["itm_logits", "mlm_logits", "vqa_logits"]
    with pytest.raises(ConfigError, match="multiway"):
        model.apply({"params": params}, text, method="encode_text")
    with pytest.raises(ConfigError, match="vl_depth"):
        _model(experts="shared", vl_depth=1).init(jax.random.key(0), images, text)


# ----------------------------------------------------------------- scan, invariances


def test_scan_equals_unrolled(multiway):
    model, params = multiway
    scanned = _model(scan=True)
    images, text = _inputs(3)
    stacked = dict(params)
    stacked["encoder"] = stack_layer_params(stack_layer_params(params["encoder"], 2, "layers"),
                                            1, "vl_layers")
    shapes = jax.tree.map(lambda x: x.shape, nn.unbox(
        jax.eval_shape(scanned.init, jax.random.key(0), images, text)["params"]))
    assert shapes == jax.tree.map(lambda x: x.shape, stacked)
    want = _apply(model, {"params": params}, images, text)
    got = _apply(scanned, {"params": stacked}, images, text)
    assert sorted(got) == sorted(want) == ["itm_logits", "mlm_logits", "scale", "vqa_logits",
                                           "zimg", "ztxt"]
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-5,
                                   atol=1e-5, err_msg=k)


@pytest.mark.parametrize("experts", ["multiway", "shared"])
def test_fused_pass_is_invariant_to_the_order_of_patch_tokens(experts):
    """Positions are in the embeddings only: permuting the media tokens after the
    class token leaves the text outputs, the class token and the pooled output as
    they are and permutes the patch outputs alike (HF ViLT samples patches in a
    random order and relies on it)."""
    model = _model(experts=experts, vl_depth=1 if experts == "multiway" else 0)
    params = _params(model, seed=1)
    v = {"params": params}
    images, text = _inputs(4)
    tokens = _apply(model, v, images, method="image_tokens")
    assert tokens.shape == (B, N, 32)
    perm = np.random.RandomState(0).permutation(N - 1) + 1
    moved = tokens[:, np.concatenate([[0], perm])]
    seq = np.asarray(_apply(model, v, tokens, text, method="fuse"))
    seq_p = np.asarray(_apply(model, v, moved, text, method="fuse"))
    np.testing.assert_allclose(seq_p[:, :L + 1], seq[:, :L + 1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(seq_p[:, L + 1:], seq[:, L + perm], rtol=1e-5, atol=1e-5)
    for method in ("itm_logits", "mlm_logits", "answer_logits"):
        np.testing.assert_allclose(np.asarray(_apply(model, v, moved, text, method=method)),
                                   np.asarray(_apply(model, v, tokens, text, method=method)),
                                   rtol=1e-5, atol=1e-5, err_msg=method)
    # Not a vacuous property: the text outputs do depend on the patch tokens.
    other = tokens.at[:, 1:].set(tokens[::-1, 1:])
    assert np.abs(np.asarray(_apply(model, v, other, text, method="fuse"))[:, :L]
                  - seq[:, :L]).max() > 1e-3


def test_pad_keys_are_masked(multiway):
    """What follows a row's EOS when it is pad changes nothing at the real positions:
    neither more padding (a longer row) nor another embedding of the pad id; fused
    outputs, pooled heads, MLM logits and the text-only embedding all agree."""
    model, params = multiway
    v = {"params": params}
    images, text = _inputs(5)
    real = np.asarray(text) != 0
    assert not real.all()  # some pads
    longer = jnp.pad(text, ((0, 0), (0, 6)))  # 6 more pad ids
    tokens = _apply(model, v, images, method="image_tokens")
    seq = np.asarray(_apply(model, v, tokens, text, method="fuse"))
    seq_long = np.asarray(_apply(model, v, tokens, longer, method="fuse"))
    np.testing.assert_allclose(seq_long[:, :L][real], seq[:, :L][real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(seq_long[:, L + 6:], seq[:, L:], rtol=1e-5, atol=1e-5)
    for method in ("itm_logits", "answer_logits"):
        np.testing.assert_allclose(np.asarray(_apply(model, v, tokens, longer, method=method)),
                                   np.asarray(_apply(model, v, tokens, text, method=method)),
                                   rtol=1e-5, atol=1e-5, err_msg=method)
    mlm = np.asarray(_apply(model, v, tokens, text, method="mlm_logits"))
    np.testing.assert_allclose(np.asarray(_apply(model, v, tokens, longer,
                                                      method="mlm_logits"))[:, :L][real],
                               mlm[real], rtol=1e-5, atol=1e-5)
    ztxt = np.asarray(_apply(model, v, text, method="encode_text"))
    np.testing.assert_allclose(np.asarray(_apply(model, v, longer, method="encode_text")), ztxt,
                               rtol=1e-5, atol=1e-5)
    # Another pad embedding: the same outputs at the real positions.
    emb = params["text_tower"]["token_embedding"]["embedding"]
    moved = jax.tree.map(lambda x: x, params)
    shift = jnp.asarray(3 * np.random.RandomState(5).randn(emb.shape[1]), emb.dtype)
    # (a random direction: the embedding LayerNorm removes a constant shift)
    moved["text_tower"]["token_embedding"]["embedding"] = emb.at[0].add(shift)
    w = {"params": moved}
    np.testing.assert_allclose(np.asarray(_apply(model, w, tokens, text, method="fuse"))[:, :L][real],
                               seq[:, :L][real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(_apply(model, w, text, method="encode_text")), ztxt,
                               rtol=1e-5, atol=1e-5)
    # ... while a real token's embedding does matter (the check can fail).
    moved["text_tower"]["token_embedding"]["embedding"] = emb.at[int(text[0, 1])].add(shift)
    assert np.abs(np.asarray(_apply(model, w, text, method="encode_text")) - ztxt).max() > 1e-3


# ----------------------------------------------------------------- config checks


def test_check_objectives_refuses_what_the_model_cannot_train():
    shared = _model(experts="shared", vl_depth=0)
    with pytest.raises(ConfigError, match=r"objectives\.itc.*multiway"):
        FAMILY.check_objectives(shared, {"itm": 1.0, "itc": 1.0})
    FAMILY.check_objectives(shared, {"itm": 1.0, "mlm": 1.0})
    with pytest.raises(ConfigError, match=r"model\.answers"):
        FAMILY.check_objectives(_model(answers=()), {"vqa": 1.0})
    with pytest.raises(ConfigError, match=r"vqa.*\['itm'\]"):
        FAMILY.check_objectives(_model(), {"vqa": 1.0, "itm": 1.0})
    FAMILY.check_objectives(_model(), {"vqa": 1.0})
    FAMILY.check_objectives(_model(), {"itc": 1.0, "itm": 1.0, "mlm": 1.0})
    with pytest.raises(ConfigError, match=r"objectives\.lm"):
        FAMILY.check_objectives(_model(), {"lm": 1.0})


def test_check_config_names_the_keys():
    config = load_config("one_tower_tiny:tiny")
    check_model(config)  # the recipe itself passes
    load_config("one_tower_tiny:shared,tiny")
    load_config("one_tower_tiny:vqa,tiny")
    with pytest.raises(ConfigError, match=r"model\.image\.width=32.*model\.text\.width=64"):
        check_model(load_config("one_tower_tiny:tiny", ["model.image.width=32"]))
    with pytest.raises(ConfigError, match=r"evals\.zeroshot.*experts"):
        check_model(load_config("one_tower_tiny:shared,tiny", ["evals.zeroshot.shards=synthetic"]))
    with pytest.raises(ConfigError, match=r"evals\.retrieval"):
        check_model(load_config("one_tower_tiny:shared,tiny",
                                ["evals.retrieval.shards=synthetic"]))
    with pytest.raises(ConfigError, match=r"model\.mask_id=260.*vocab_size=260"):
        check_model(load_config("one_tower_tiny:tiny", ["model.mask_id=260"]))
    with pytest.raises(ConfigError, match=r"text_format='vqa'"):
        check_model(load_config("one_tower_tiny:vqa,tiny", ["data.train.text_format=caption"]))
    with pytest.raises(ConfigError, match=r"text_format='dialog'"):
        check_model(load_config("one_tower_tiny:tiny", ["data.train.text_format=dialog"]))
    # The objectives are checked when the config loads (schema.check_config).
    with pytest.raises(ConfigError, match=r"objectives\.itc"):
        load_config("one_tower_tiny:tiny", ["model.experts=shared", "model.vl_depth=0"])
    config = load_config("one_tower_tiny:vqa,tiny")
    with config.unlocked():
        config.model.answers = []
    with pytest.raises(ConfigError, match=r"model\.answers"):
        check_config(config)


# ----------------------------------------------------------------- losses


def _ce(logits, labels):
    x = np.float64(logits)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    return (lse - x[np.arange(len(x)), labels]).mean()


def test_itm_never_draws_a_sample_of_the_same_group_as_negative(multiway):
    """`group` (data.train.group_key) marks samples of the same content: at scale e^20
    the hardest negative of each sample is its most similar other sample of ANOTHER
    group; without groups the class (`label`) plays that part."""
    model, params = multiway
    b = 6
    images, text = _inputs(6, b=b)
    params = dict(params, log_scale=jnp.float32(20.0))
    v = {"params": params}
    tokens = _apply(model, v, images, method="image_tokens")
    dual = _apply(model, v, tokens, text, method="dual")
    sim = np.float64(dual["zimg"]) @ np.float64(dual["ztxt"]).T
    group = np.array([0, 0, 1, 1, 2, 2], np.int32)
    banned = np.equal.outer(group, group)
    off = np.where(banned, -np.inf, sim)
    neg_text, neg_image = off.argmax(1), off.argmax(0)
    ar = np.arange(b)
    labels = np.concatenate([np.ones(b, int), np.zeros(2 * b, int)])
    logits = _apply(model, v, tokens[np.concatenate([ar, neg_image, ar])],
                    text[np.concatenate([ar, ar, neg_text])], method="itm_logits")
    want = _ce(logits, labels)
    for key, other in (("group", {"label": np.full(b, -1, np.int32)}),
                       ("label", {})):
        batch = {"image": images, "text": text, key: group, **other}
        terms, _ = _losses(model, params, batch, {"itc": 1.0, "itm": 1.0}, jax.random.key(0))
        np.testing.assert_allclose(float(terms["itm"]), want, rtol=1e-5)
    # the group wins over the label where both are given: all groups distinct, so
    # only the sample itself is banned (its partner in `label` may be drawn)
    off = np.where(np.eye(b, dtype=bool), -np.inf, sim)
    assert (off.argmax(1) != neg_text).any() or (off.argmax(0) != neg_image).any()
    logits = _apply(model, v, tokens[np.concatenate([ar, off.argmax(0), ar])],
                    text[np.concatenate([ar, ar, off.argmax(1)])], method="itm_logits")
    batch = {"image": images, "text": text, "group": np.arange(b, dtype=np.int32),
             "label": group}
    terms, _ = _losses(model, params, batch, {"itc": 1.0, "itm": 1.0}, jax.random.key(0))
    np.testing.assert_allclose(float(terms["itm"]), _ce(logits, labels), rtol=1e-5)


def test_itm_negatives_are_the_hardest_by_dual_similarity(multiway):
    """With the contrastive scale at e^20 the sampling of ITM negatives from the
    similarities is an argmax: each image's negative text is its most similar other
    text and each text's negative image its most similar other image. The family's
    ITM loss equals the cross-entropy of the model's matching logits on exactly those
    triples, for any rng; at scale 1 the rng picks other negatives."""
    model, params = multiway
    b = 6
    images, text = _inputs(6, b=b)
    params = dict(params, log_scale=jnp.float32(20.0))
    v = {"params": params}
    dual = _apply(model, v, _apply(model, v, images, method="image_tokens"), text,
                  method="dual")
    sim = np.float64(dual["zimg"]) @ np.float64(dual["ztxt"]).T
    off = np.where(np.eye(b, dtype=bool), -np.inf, sim)
    for s in (np.sort(off, 1)[:, -2:], np.sort(off, 0)[-2:].T):
        assert (s[:, 1] - s[:, 0]).min() > 1e-3  # well-separated maxima at this seed
    neg_text, neg_image = off.argmax(1), off.argmax(0)
    ar = np.arange(b)
    image_index = np.concatenate([ar, neg_image, ar])
    text_index = np.concatenate([ar, ar, neg_text])
    labels = np.concatenate([np.ones(b, int), np.zeros(2 * b, int)])
    tokens = _apply(model, v, images, method="image_tokens")
    logits = _apply(model, v, tokens[image_index], text[text_index], method="itm_logits")
    want = _ce(logits, labels)
    batch = {"image": images, "text": text}
    for seed in range(3):
        terms, extra = _losses(model, params, batch, {"itc": 1.0, "itm": 1.0},
                                     jax.random.key(seed))
        np.testing.assert_allclose(float(terms["itm"]), want, rtol=1e-5)
        np.testing.assert_allclose(float(extra["scale"]), np.exp(20.0), rtol=1e-5)
    # Other negatives give another loss (the check can tell them apart) ...
    easy = np.where(np.eye(b, dtype=bool), np.inf, sim)
    other = _apply(model, v, tokens[np.concatenate([ar, easy.argmin(0), ar])],
                        text[np.concatenate([ar, ar, easy.argmin(1)])], method="itm_logits")
    assert abs(_ce(other, labels) - want) > 1e-3
    # ... and at scale 1 the draw depends on the key.
    soft = dict(params, log_scale=jnp.float32(0.0))
    got = {round(float(_losses(model, soft, batch, {"itc": 1.0, "itm": 1.0},
                               jax.random.key(seed))[0]["itm"]), 6) for seed in range(4)}
    assert len(got) > 1


def test_vqa_loss_pairs_each_question_with_its_own_image(multiway):
    """The family's VQA term (questions `[B, Q, L]` flattened with their images
    repeated) equals NumPy BCE of logits computed one (image, question) at a time,
    summed over answers and averaged over the questions that have an answer."""
    model, params = multiway
    q, k = 3, 2
    images, _ = _inputs(7)
    rng = np.random.RandomState(7)
    text = np.zeros((B, q, L), np.int32)
    answer_ids = np.full((B, q, k), -1, np.int32)
    scores = np.zeros((B, q, k), np.float32)
    for i in range(B):
        for j in range(1 + i % q):  # 1, 2, 3, 1 questions; the other rows pad / -1
            n = rng.randint(4, L)
            text[i, j, :n] = np.concatenate([[1], rng.randint(3, 49, n - 1)])
            m = 1 + (i + j) % 2
            answer_ids[i, j, :m] = rng.choice(len(ANSWERS), m, replace=False)
            scores[i, j, :m] = [1.0, 1 / 3][:m]
    batch = {"image": images, "text": jnp.asarray(text), "answer_ids": jnp.asarray(answer_ids),
             "answer_scores": jnp.asarray(scores)}
    terms, _ = _losses(model, params, batch, {"vqa": 1.0}, jax.random.key(0))
    assert sorted(terms) == ["vqa"]
    total, count = 0.0, 0
    for i in range(B):
        for j in range(q):
            if (answer_ids[i, j] < 0).all():
                continue
            x = np.float64(_apply(model, {"params": params}, images[i:i + 1],
                                       jnp.asarray(text[i, j][None]), method="vqa_logits")[0])
            z = np.zeros(len(ANSWERS))
            for a, s in zip(answer_ids[i, j], scores[i, j]):
                if a >= 0:
                    z[a] += s
            total += (z * np.logaddexp(0, -x) + (1 - z) * np.logaddexp(0, x)).sum()
            count += 1
    assert count == 1 + 2 + 3 + 1
    np.testing.assert_allclose(float(terms["vqa"]), total / count, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(vqa_targets(batch["answer_ids"], batch["answer_scores"],
                                                      len(ANSWERS))).sum(-1), scores.sum(-1),
                               rtol=1e-6)


@pytest.mark.usefixtures("mmjax_cache")
def test_vqa_pipeline_batches_match_the_family_batch_spec():
    """`one_tower_tiny:vqa` on the built-in data: the family fills the answer
    vocabulary into the data config, and the batches have every field of its
    `batch_spec` with that shape and dtype; every built-in question has an answer."""
    config = load_config("one_tower_tiny:vqa,tiny")
    resolve_train_shards(config)  # "synthetic" -> the built-in shards
    family = get_family(config)
    data = family.data_config(config)
    assert list(data.answers) == list(config.model.answers) == sorted(
        {a for answers in synthetic.ANSWERS_BY_TYPE.values() for a in answers})
    it = build_train_iterator(data, config.batch_size, process_index=0, process_count=1,
                              media=family.media(config.model))
    try:
        batch = next(it)
    finally:
        it.close()
    spec = family.batch_spec(config, config.batch_size)
    assert set(spec) <= set(batch)
    for key, (shape, dtype) in spec.items():
        assert batch[key].shape == tuple(shape) and batch[key].dtype == dtype, key
    assert spec["text"][0] == (8, 5, 32) and spec["answer_ids"][0] == (8, 5, 10)
    assert (batch["answer_ids"][..., 0] >= 0).all() and (batch["answer_ids"][..., 1:] == -1).all()
    assert (batch["answer_scores"][..., 0] == 1.0).all()


# ----------------------------------------------------------------- end to end


@pytest.mark.usefixtures("mmjax_cache")
def test_pretrain_then_finetune_for_vqa(tmp_path):
    """`one_tower_tiny:tiny` for 40 steps (ITC + ITM + MLM: the loss falls; its eval has
    the ITM re-ranked retrieval), then `:vqa,tiny` from it with `init.all`: the VQA
    run starts from the pretrained parameters (the heads VQA does not train, such as
    the ITM and MLM biases, end exactly as pretraining left them, far from their zero
    init) and its eval reports VQA accuracy."""
    pt, vqa = str(tmp_path / "pt"), str(tmp_path / "vqa")
    config = load_config("one_tower_tiny:tiny", ["total_steps=40", "log_every=5",
                                                 "checkpoint_every=40",
                                                 "evals.zeroshot.shards="])
    result = train(config, pt)
    lines = [json.loads(line) for line in open(os.path.join(pt, "metrics.jsonl"))]
    assert [line["step"] for line in lines] == list(range(5, 41, 5))
    first, last = np.mean([l["loss"] for l in lines[:2]]), np.mean([l["loss"] for l in lines[-2:]])
    assert last < first - 0.3, (first, last)
    assert lines[-1]["loss/mlm"] < lines[0]["loss/mlm"]
    with open(os.path.join(pt, "eval", "step_40.json")) as f:
        ev = json.load(f)
    for k in ("i2t_r1", "t2i_r1", "itm_i2t_r1", "itm_t2i_r1", "itm_t2i_r10"):
        assert 0.0 <= ev[f"retrieval/{k}"] <= 1.0 and result[f"retrieval/{k}"] == ev[
            f"retrieval/{k}"], k
    assert ev["retrieval/n_images"] == 32

    config = load_config("one_tower_tiny:vqa,tiny", ["total_steps=20", "log_every=5",
                                                     "checkpoint_every=20"])
    apply_override(config, f"init.all=workdir:{pt}")
    with mmjax_log() as records:
        result = train(config, vqa)
    loaded = [r.getMessage() for r in records if "under 'all'" in r.getMessage()]
    assert len(loaded) == 1 and f"workdir:{pt}" in loaded[0], loaded
    lines = [json.loads(line) for line in open(os.path.join(vqa, "metrics.jsonl"))]
    assert [line["step"] for line in lines] == [5, 10, 15, 20]
    assert all(np.isfinite(line["loss/vqa"]) for line in lines)
    assert lines[-1]["loss/vqa"] < lines[0]["loss/vqa"]
    with open(os.path.join(vqa, "eval", "step_20.json")) as f:
        ev = json.load(f)
    assert 0.0 <= ev["vqa_accuracy"] <= 1.0 and ev["vqa/count"] == 8 * 5
    assert ev["vqa_accuracy"] == result["vqa_accuracy"]
    assert not any(k.startswith("retrieval/") for k in ev)

    finals = []
    for workdir in (pt, vqa):
        ckpt = Checkpointer(workdir, async_save=False)
        params, _ = ckpt.restore_params_to_host(None)
        ckpt.close()
        finals.append(jax.tree.map(np.asarray, params))
    before, after = finals
    # Never used by the VQA loss (no gradient) and never decayed (biases, norms, the
    # scale): exactly the pretrained values, which pretraining moved off their init.
    for path in (("itm_head", "bias"), ("mlm_bias",), ("mlm_dense", "bias"),
                 ("mlm_norm", "bias"), ("log_scale",)):
        a, b = before, after
        for key in path:
            a, b = a[key], b[key]
        np.testing.assert_array_equal(b, a, err_msg=str(path))
    assert np.abs(before["itm_head"]["bias"]).max() > 1e-3  # init: zeros
    assert np.abs(before["mlm_bias"]).max() > 1e-3
    # The state the VQA run starts from (`init_state` applies `init.all`): every
    # parameter, the encoder's included, is the pretrained one.
    start = jax.device_get(build_trainer(config).init_state(int(config.seed))["params"])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(start), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))
    # What VQA trains moved.
    assert not np.array_equal(before["vqa_fc2"]["kernel"], after["vqa_fc2"]["kernel"])
    assert not np.array_equal(before["encoder"]["layers_0"]["mlp_text"]["fc1"]["kernel"],
                              after["encoder"]["layers_0"]["mlp_text"]["fc1"]["kernel"])
    # Its model is the pretraining one (same tree, same shapes).
    assert jax.tree.structure(before) == jax.tree.structure(after)
    # A run that was initialized with `init.all` restores as a source itself.
    run_config, restored, step = restore_run_params(vqa)
    assert step == 20 and run_config.init.all == f"workdir:{pt}"
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(a), b)
