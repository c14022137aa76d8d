"""VisionLM (BLIP-2 stage 2 / LLaVA): splicing, answer-only loss, generation,
frozen sources kept out of checkpoints, init errors, dialog batches."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import cli
from mmjax.data.dialog import encode_dialog
from mmjax.data.pipeline import build_train_iterator, default_data_config
from mmjax.data.tokenizers import build_tokenizer
from mmjax.families.vision_lm import answer_questions
from mmjax.models import VisionLM, build
from mmjax.models.vision_lm import splice_image_tokens
from mmjax.train.checkpoint import Checkpointer
from mmjax.config.loading import apply_override, load_config
from mmjax.errors import ConfigError
from mmjax.train.loop import train
from mmjax.families import compute_losses
from mmjax.train.step import build_trainer

from _helpers import ROOT
from _shards import make_image, write_tar

IMAGE = dict(image_size=32, patch_size=8, width=32, depth=1, heads=2, pool="cls",
             embed_dim=None)
LM = dict(vocab_size=260, width=48, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=96,
          max_len=128)

pytestmark = pytest.mark.usefixtures("mmjax_cache")


def _reference_splice(te, ie, text, lengths, ph):
    """Python lists: the expected sequence of embeddings per row."""
    rows = []
    for b, n in enumerate(lengths):
        ids = list(text[b, :n])
        if ph is not None and ph in ids:
            k = ids.index(ph)
            rows.append([te[b, i] for i in range(k)] + list(ie[b]) +
                        [te[b, i] for i in range(k + 1, n)])
        else:
            rows.append(list(ie[b]) + [te[b, i] for i in range(n)])
    return rows


@pytest.mark.parametrize("placeholder", [None, 99])
def test_splice_matches_reference(placeholder):
    rng = np.random.default_rng(0)
    b, l, p, d = 4, 7, 3, 5
    text = rng.integers(3, 20, (b, l)).astype(np.int32)
    lengths = [7, 4, 5, 2]
    for i, n in enumerate(lengths):
        text[i, n:] = 0
    text[1, 2], text[2, 0] = 99, 99
    te = rng.normal(size=(b, l, d)).astype(np.float32)
    ie = rng.normal(size=(b, p, d)).astype(np.float32)
    out = splice_image_tokens(jnp.asarray(te), jnp.asarray(ie), jnp.asarray(text),
                              jnp.asarray(text != 0), placeholder)
    assert out["embeds"].shape == (b, l + p, d)
    for i, want in enumerate(_reference_splice(te, ie, text, lengths, placeholder)):
        got, valid = np.asarray(out["embeds"][i]), np.asarray(out["valid"][i])
        assert valid[:len(want)].all() and not valid[len(want):].any()  # a prefix per row
        np.testing.assert_array_equal(got[:len(want)], np.stack(want))
        assert not got[len(want):].any()


def test_loss_counts_only_answer_tokens():
    """The `lm` objective equals a NumPy cross-entropy over answer tokens + EOS only."""
    tok = build_tokenizer("bytes", 40)
    pairs = [[("what colour?", "red")], [("how many?", "two"), ("shape?", "cross")]]
    enc = [encode_dialog(tok, p, 40) for p in pairs]
    text = np.stack([e[0] for e in enc])
    mask = np.stack([e[1] for e in enc])
    model = VisionLM(image=IMAGE, lm=LM, connector="mlp")
    images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    params = model.init(jax.random.key(0), images, jnp.asarray(text))["params"]
    loss, _ = compute_losses(model, params, {"image": images, "text": jnp.asarray(text),
                                             "loss_mask": jnp.asarray(mask)},
                             {"lm": 1.0}, jax.random.key(0))
    logits = np.asarray(model.apply({"params": params}, images, jnp.asarray(text))["logits"],
                        np.float64)
    p = 16  # (32 / 8)^2 patch tokens; the class token is dropped
    total, count = 0.0, 0
    for b in range(2):
        for j in range(40):
            if mask[b, j]:  # text position j sits at p + j; predicted from p + j - 1
                row = logits[b, p + j - 1]
                total += np.log(np.exp(row - row.max()).sum()) + row.max() - row[text[b, j]]
                count += 1
    assert count == sum(len(a) + 2 for ps in pairs for _, a in ps)  # " " + answer + EOS
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)


def test_answers_equal_full_recompute():
    """KV-cache generation from spliced embeddings == greedy by re-running the whole model."""
    tok = build_tokenizer("bytes", 32)
    model = VisionLM(image=IMAGE, lm=LM, connector="mlp", image_token_id=259)
    rng = np.random.default_rng(2)
    images = jnp.asarray(rng.normal(size=(3, 32, 32, 3)), jnp.float32)
    prompts = [tok(["Q: colour? A:"])[0][:14].tolist(),
               [1, 259] + tok(["Q: where? A:"])[0][1:13].tolist(),  # placeholder inside
               [1]]
    prompts = [p[:next((i for i, t in enumerate(p) if t in (0, 2)), len(p))] for p in prompts]
    variables = model.init(jax.random.key(3), images, jnp.ones((3, 16), jnp.int32))
    emb = model.apply(variables, images, method="image_embeds")
    steps = 5
    got = answer_questions(model, variables, emb, prompts, tok, max_new_tokens=steps,
                           width=16, chunk=4)
    for i, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(steps):
            x = np.zeros((1, 16 + steps), np.int32)
            x[0, :len(seq)] = seq
            out = model.apply(variables, images[i:i + 1], jnp.asarray(x))
            last = int(np.asarray(out["valid"][0]).sum()) - 1
            seq.append(int(jnp.argmax(out["logits"][0, last])))
        assert got[i] == tok.decode(seq[len(prompt):]).strip()


def _save_hf_llama(path, cfg):
    import torch
    import transformers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["width"],
        num_hidden_layers=cfg["depth"], num_attention_heads=cfg["num_heads"],
        intermediate_size=cfg["mlp_dim"], max_position_embeddings=cfg["max_len"],
        rms_norm_eps=1e-6, tie_word_embeddings=False))
    model.save_pretrained(path, safe_serialization=True)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_stage2_checkpoint_holds_only_trained_parts(tmp_path, tiny_run):
    """BLIP-2 stage 2 from a stage-1 run and a Hugging Face LM: frozen parts
    equal their sources after training, the checkpoint stores only the
    Q-Former + projection (+ their optimizer state) and names the sources,
    and restoring rebuilds the full model."""
    # The stage-1 run of tests/train/test_step.py::test_every_recipe_runs_tiny[blip2_stage1].
    s1 = str(tiny_run(os.path.join(ROOT, "configs", "blip2_stage1.py"))[0])
    no_evals = ["evals.zeroshot.shards=", "evals.retrieval.shards=", "evals.captioning.shards="]
    config = load_config("configs/blip2_stage2.py:tiny", no_evals)
    hf_dir = str(tmp_path / "llama")
    hf = _save_hf_llama(hf_dir, dict(config.model.lm))
    for override in (f"init.image_tower=workdir:{s1}#image_tower",
                     f"init.qformer_module=workdir:{s1}#qformer_module",
                     f"init.lm_module=hf_llama:{hf_dir}"):
        apply_override(config, override)
    s2 = str(tmp_path / "stage2")
    train(config, s2)

    ckpt = Checkpointer(s2, async_save=False)
    saved, step = ckpt.restore_params_to_host(None)
    data = json.loads(open(os.path.join(s2, "checkpoints", str(step), "data",
                                        "metadata")).read())
    ckpt.close()
    assert step == 3 and sorted(saved) == ["projector", "qformer_module"]
    assert data["frozen_sources"]["lm_module"] == f"hf_llama:{hf_dir}"

    stage1 = Checkpointer(s1, async_save=False)
    s1_params, _ = stage1.restore_params_to_host(None)
    stage1.close()
    model = build(config.model)
    trainer = build_trainer(config, model=model)  # (config.total_steps is 3)
    ckpt = Checkpointer(s2, async_save=False)
    state, _, _ = trainer.restore(ckpt)
    ckpt.close()
    full = jax.device_get(state["params"])
    # Frozen: equal to their sources (the LM stored in bf16, config.optim.frozen_dtype).
    for a, b in zip(jax.tree.leaves(full["image_tower"]),
                    jax.tree.leaves(s1_params["image_tower"])):
        np.testing.assert_array_equal(np.asarray(a, np.float32),
                                      np.asarray(b.astype(a.dtype), np.float32))
    emb = np.asarray(full["lm_module"]["token_embedding"]["embedding"], np.float32)
    np.testing.assert_array_equal(emb, np.asarray(
        jnp.asarray(hf["model.embed_tokens.weight"]).astype(jnp.bfloat16), np.float32))
    assert full["lm_module"]["token_embedding"]["embedding"].dtype == jnp.bfloat16
    # Trained: moved away from the stage-1 Q-Former, and what was saved is what restores.
    q_now = jax.tree.leaves(full["qformer_module"])
    q_s1 = jax.tree.leaves({k: v for k, v in s1_params["qformer_module"].items()
                            if k in full["qformer_module"]})
    assert any(not np.array_equal(a, b) for a, b in zip(q_now, q_s1))
    for a, b in zip(jax.tree.leaves(full["projector"]), jax.tree.leaves(saved["projector"])):
        np.testing.assert_array_equal(a, b)

    # `mmjax generate` rebuilds the same model from the workdir (sources included).
    from PIL import Image
    from mmjax.data.decode import normalize
    from mmjax.data.dialog import encode_prompt
    from mmjax.data.synthetic import make_sample
    from mmjax.commands.generate import generate_answer
    # Its parameters are the trained model's, bit for bit and in the same dtypes (the
    # frozen LM in config.optim.frozen_dtype, as training keeps it), so it runs the
    # same programs on the same inputs as answer_questions below: equal answers on
    # any CPU. (Greedy decoding of a random tiny LM meets near-ties, so answers are
    # compared only between identical computations; the eager forward is checked
    # against the jitted one to float32 rounding instead.)
    from mmjax.families.vision_lm import image_embeds
    from mmjax.train.init_sources import restore_run_params
    _, rebuilt, _ = restore_run_params(s2)
    rebuilt = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(rebuilt)}
    for path, a in jax.tree_util.tree_leaves_with_path(full):
        b = rebuilt[jax.tree_util.keystr(path)]
        assert np.asarray(b).dtype == a.dtype, (jax.tree_util.keystr(path), b.dtype, a.dtype)
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    image = make_sample(0, "test", 32)["image"]
    Image.fromarray(image).save(tmp_path / "x.png")
    got = generate_answer(s2, str(tmp_path / "x.png"), "colour?", max_new_tokens=6)
    d = config.data.train
    tok = build_tokenizer(d.tokenizer, 32)  # the recipe's: Vicuna's
    variables = {"params": full}
    pixels = normalize(image[None], d.mean, d.std)
    emb = image_embeds(model, variables, pixels)
    want = answer_questions(model, variables, emb, [encode_prompt(tok, "colour?")],
                            tok, max_new_tokens=6, chunk=1)[0]
    assert got == want
    eager = np.asarray(model.apply(variables, jnp.asarray(pixels), method="image_embeds"))
    np.testing.assert_allclose(eager, emb, rtol=0, atol=1e-5 * np.abs(emb).max())
    assert cli.main(["generate", "--workdir", str(tmp_path / "none"), "--image", "x"]) == 2


def test_init_errors_name_the_key(tmp_path):
    config = load_config("configs/llava.py:tiny", ["init.image_tower=workdir:/nonexistent"])
    with pytest.raises(Exception, match="nonexistent"):
        train(config, str(tmp_path / "a"))
    hf_dir = str(tmp_path / "llama")
    cfg = dict(load_config("configs/llava.py:tiny").model.lm)
    _save_hf_llama(hf_dir, dict(cfg, width=32, mlp_dim=64))
    config = load_config("configs/llava.py:tiny", [f"init.lm_module=hf_llama:{hf_dir}"])
    with pytest.raises(ConfigError, match=r"config.init.lm_module.*has shape \([^)]*32[^)]*\) "
                       r"in the source but \([^)]*64[^)]*\) in the model"):
        train(config, str(tmp_path / "b"))
    config = load_config("configs/llava.py:tiny", [f"init.lm_module=hf_llama:{hf_dir}#nope"])
    with pytest.raises(ConfigError, match="no subtree 'nope'"):
        train(config, str(tmp_path / "c"))


def test_dialog_batches_and_bad_dialogs(tmp_path):
    """Dialog samples give text + loss_mask; malformed ones are skipped and counted."""
    good = {"qa": [{"question": "colour?", "answer": "red"}]}
    bad = {"qa": [{"question": "colour?"}]}  # no answer
    members = []
    for i in range(6):
        members += [(f"{i:03d}.jpg", make_image(i)),
                    (f"{i:03d}.json", json.dumps(bad if i == 2 else good).encode())]
    write_tar(tmp_path / "s.tar", members)
    c = default_data_config()
    c.update(dict(shards=str(tmp_path / "s.tar"), text_format="dialog", caption_key="json:qa",
                  max_len=24, image_size=32, workers=0, shuffle_buffer=0))
    it = build_train_iterator(c, 5, process_index=0, process_count=1)
    batch = next(it)
    stats = it.stats()
    it.close()
    tok = build_tokenizer("bytes", 24)
    ids, mask = encode_dialog(tok, [("colour?", "red")], 24)
    for row, m in zip(batch["text"], batch["loss_mask"]):
        np.testing.assert_array_equal(row, ids)
        np.testing.assert_array_equal(m, mask)
    assert stats["no_dialog"] == 1 and stats["ok"] >= 5
    # The configured dialog template reaches the encoder; an unknown one is a clear error.
    c.update(dict(dialog_template="blip2_vqa", max_len=48))
    it = build_train_iterator(c, 5, process_index=0, process_count=1)
    row = next(it)["text"][0]
    it.close()
    tok = build_tokenizer("bytes", 48)
    want, _ = encode_dialog(tok, [("colour?", "red")], 48, template="blip2_vqa")
    np.testing.assert_array_equal(row, want)
    c.dialog_template = "chatml"
    with pytest.raises(ValueError, match="data.train.dialog_template"):
        build_train_iterator(c, 5, process_index=0, process_count=1)


def test_llava_cpu_recipe_trains_on_dialogs_and_reports_vqa(tmp_path):
    """`configs/llava.py:cpu` at tiny size: dialog batches feed the step and
    the VQA evaluator asks all 5 questions of each held-out image."""
    config = load_config("configs/llava.py:cpu,tiny")
    assert config.data.train.text_format == "dialog"
    result = train(config, str(tmp_path))
    assert result["vqa/count"] == 4 * 5
    assert 0.0 <= result["vqa_accuracy"] <= 1.0 and np.isfinite(result["loss/lm"])
    assert set(result) >= {f"vqa_accuracy/{t}" for t in
                           ("color", "shape", "count", "small_color", "where")}
    saved = json.load(open(tmp_path / "eval" / "step_3.json"))
    assert saved["vqa/baseline_accuracy"] == result["vqa/baseline_accuracy"]
