"""What the train step optimizes: weight decay by parameter kind, clamped head
scalars, BLIP-2 stage-2 inputs, per-micro-batch randomness."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _helpers import CONFIG_IDS, CONFIGS, mesh_trainer
from mmjax.models import Blip2Stage1, build
from mmjax.config.loading import load_config
from mmjax.families import compute_losses, get_family
from mmjax.train.optimizer import build_optimizer, frozen_labels


def _batch(config, rows=None, seed=0):
    """Random images and built-in captions in the recipe's own tokenizer."""
    from mmjax.data.synthetic import make_sample
    from mmjax.data.tokenizers import build_tokenizer
    rng = np.random.RandomState(seed)
    s, l = config.data.train.image_size, config.data.train.max_len
    b = rows or config.batch_size
    tok = build_tokenizer(config.data.train.tokenizer, l)
    text = tok([make_sample(seed * 1000 + i, "train", 8)["caption"] for i in range(b)])
    return {"image": rng.randn(b, s, s, 3).astype(np.float32), "text": text.astype(np.int32)}


def _name(path):
    return "/".join(str(getattr(k, "key", k)) for k in path)


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_weight_decay_moves_kernels_only(path):
    """One AdamW update with zero gradients (weight decay > 0, no warmup) moves every
    trained kernel by -lr * wd * w and nothing else: no norm scale, bias, head
    scalar or embedding, scanned (a leading layers axis) or not."""
    name = os.path.basename(path)[:-3]
    arg = "finetune,tiny" if name == "llava" else "tiny"
    config = load_config(f"{path}:{arg}", ["optim.warmup_steps=0", "optim.weight_decay=0.1",
                                          "optim.lr=0.01", "optim.clip_norm=0"])
    model = build(config.model)
    images, text = get_family(config).sample_inputs(config)
    params = jax.jit(lambda: jax.tree.map(
        lambda x: getattr(x, "value", x),
        model.init(jax.random.key(0), images, text)["params"],
        is_leaf=lambda x: hasattr(x, "value")))()
    tx, _ = build_optimizer(config.optim, 10)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    frozen = frozen_labels(params, list(config.optim.freeze))
    kinds = {"kernel": 0, "still": 0}
    scanned = False
    for (p, u), w, lab in zip(jax.tree_util.tree_leaves_with_path(updates),
                              jax.tree.leaves(params), jax.tree.leaves(frozen)):
        leaf = _name(p).rsplit("/", 1)[-1]
        scanned |= "/layers/" in _name(p) and leaf == "scale"
        if leaf.endswith("kernel") and lab == "trained":
            np.testing.assert_allclose(u, -0.01 * 0.1 * np.asarray(w), rtol=1e-5, atol=1e-12,
                                       err_msg=_name(p))
            kinds["kernel"] += 1
        else:  # norm scales, biases, logit scale/bias, temperature, embeddings, frozen
            assert not np.any(np.asarray(u)), _name(p)
            kinds["still"] += 1
    assert kinds["kernel"] > 0 and kinds["still"] > 0
    if config.model.get("image", {}).get("scan"):
        assert scanned  # the scanned case is really exercised


def test_decay_embeddings_is_a_choice():
    config = load_config("clip_tiny:tiny", ["optim.decay_embeddings=True",
                                           "optim.warmup_steps=0", "optim.clip_norm=0"])
    params = jax.device_get(mesh_trainer(config).init_state(0)["params"])
    tx, _ = build_optimizer(config.optim, 10)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert np.any(updates["text_tower"]["token_embedding"]["embedding"])
    assert not np.any(updates["text_tower"]["ln_final"]["scale"])


@pytest.mark.parametrize("recipe,clamped", [("clip_b16", True), ("siglip_b16", False)])
def test_logit_scale_clamped_only_for_the_softmax_head(recipe, clamped):
    """open_clip clamps CLIP's log-scale to ln 100 after every step; big_vision's
    SigLIP recipe has no clamp, so a SigLIP log-scale above ln 100 stays."""
    config = load_config(f"{recipe}:tiny", ["optim.lr=0.0", "optim.warmup_steps=0"])
    trainer = mesh_trainer(config)
    state = trainer.init_state(0)
    state["params"]["log_scale"] = jax.device_put(jnp.float32(5.0),
                                                  state["params"]["log_scale"].sharding)
    state, metrics = trainer.step(state, jax.device_put(_batch(config), trainer.batch_sharding))
    got = float(state["params"]["log_scale"])
    if clamped:
        assert got == pytest.approx(math.log(100.0), abs=1e-6)
        # The forward pass takes the parameter as it is (the clamp is not a gradient cut).
        assert float(metrics["scale"]) == pytest.approx(math.exp(5.0), rel=1e-6)
    else:
        assert got == pytest.approx(5.0, abs=1e-6)
        assert float(metrics["scale"]) == pytest.approx(math.exp(5.0), rel=1e-6)


@pytest.fixture(scope="module")
def blip2_trainer():
    """One tiny BLIP-2 stage-1 trainer (two micro-batches of 8) for the tests below:
    its step compiles once for both."""
    config = load_config("blip2_stage1:tiny", ["batch_size=16", "optim.accum_steps=2",
                                               "optim.warmup_steps=0"])
    return config, mesh_trainer(config)


def test_blip2_temperature_keeps_its_gradient_and_is_clamped_after_the_update(blip2_trainer):
    """LAVIS clamps the ITC temperature in place to [0.001, 0.5]; clipping it in the
    forward pass instead zeroes its gradient outside the range, where it then sticks."""
    config, trainer = blip2_trainer
    state = trainer.init_state(0)
    state["params"]["temp"] = jax.device_put(jnp.float32(0.6), state["params"]["temp"].sharding)
    batch = jax.device_put(_batch(config), trainer.batch_sharding)
    _, _, grads = trainer.grads(state, batch)
    assert abs(float(grads["temp"])) > 1e-6
    state, _ = trainer.step(state, batch)
    assert 0.001 <= float(state["params"]["temp"]) <= 0.5
    # init_state puts a temperature from an init source into the range too.
    assert 0.001 <= float(trainer.init_state(0)["params"]["temp"]) <= 0.5


def test_accumulated_micro_batches_draw_their_own_itm_negatives(blip2_trainer):
    """With optim.accum_steps=2 and two identical micro-batches, the ITM loss is the
    mean of the losses under the two folded keys (one per micro-batch), not twice
    the same draw."""
    config, trainer = blip2_trainer
    state = trainer.init_state(0)
    half = _batch(config, rows=8)
    batch = {k: np.concatenate([v, v]) for k, v in half.items()}
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    params = jax.device_get(state["params"])
    _, metrics = trainer.step(state, jax.device_put(batch, trainer.batch_sharding))
    itm = jax.jit(lambda p, b, k: compute_losses(trainer.model, p, b, dict(config.objectives),
                                                 k)[1]["loss/itm"])
    per_micro = [float(itm(params, half, jax.random.fold_in(key, i))) for i in range(2)]
    assert per_micro[0] != per_micro[1]  # the two keys draw different negatives
    assert float(metrics["loss/itm"]) == pytest.approx(np.mean(per_micro), rel=1e-5)


def test_blip2_stage2_qformer_sees_the_stage1_tokens():
    """A stage-1 Q-Former gets the same input in stage 2 (all ViT tokens, class
    token included, as in LAVIS and Hugging Face's Blip2ForConditionalGeneration):
    stage 2's image embeddings equal stage 1's query outputs through the projector."""
    config = load_config("blip2_stage2:tiny", ["model.dtype=float32"])
    vlm = build(config.model)
    images, text = get_family(config).sample_inputs(config, batch=2)
    images = jax.random.normal(jax.random.key(1), images.shape)
    pv = jax.jit(vlm.init)(jax.random.key(0), images, text)
    stage1 = Blip2Stage1(image=dict(config.model.image), qformer=dict(config.model.qformer),
                         embed_dim=32)
    p1 = jax.jit(stage1.init)(jax.random.key(2), images, text)
    p1 = {"params": {**p1["params"], "image_tower": pv["params"]["image_tower"],
                     "qformer_module": pv["params"]["qformer_module"]}}
    queries = jax.jit(lambda p, x: stage1.apply(
        p, x, method=lambda m, x: m.qformer_module(m.image_tokens(x))))(p1, images)
    proj = pv["params"]["projector"]
    want = jnp.einsum("bqd,de->bqe", queries, getattr(proj["kernel"], "value", proj["kernel"]))
    want = want + getattr(proj["bias"], "value", proj["bias"])
    got = jax.jit(lambda p, x: vlm.apply(p, x, method="image_embeds"))(pv, images)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and what the Q-Former attends to is the full token set
    n_tokens = jax.eval_shape(lambda p, x: stage1.apply(p, x, method="image_tokens"),
                              p1, images).shape[1]
    grid = config.model.image.image_size // config.model.image.patch_size
    assert n_tokens == grid * grid + 1
