"""VisionLM family: media tower -> connector (Q-Former or MLP) -> decoder LM (BLIP-2
stage 2, LLaVA); next-token loss on answer/caption tokens."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import losses
from mmjax.errors import ConfigError
from mmjax.families.base import Family, plain
from mmjax.models.flops import (FROZEN, TRAIN, dense_flops, lm_flops, qformer_flops,
                                tower_config, tower_flops)
from mmjax.models import towers
from mmjax.models.jitted import model_method
from mmjax.models.lm import generate
from mmjax.models.vision_lm import language_model, vlm_targets


class VisionLMFamily(Family):
    name = "vision_lm"
    objectives = ("lm",)
    evaluators = ("captioning", "vqa", "grounding")
    text_section = "lm"
    optional_batch_keys = ("loss_mask",)  # dialog data: 1 on answer tokens
    # Padding is found by id (`text != pad_id`): a tokenizer that pads with its EOS
    # would hide every turn's EOS from attention and loss (checked at load time).
    pad_differs_from_eos = True

    def pad_id(self, model):
        return model.pad_id

    def grounding(self, model):
        """The phrase's log-likelihood after the media, tapped at the media tokens the LM
        reads (LLaVA: the projector's output, one per patch) or, with a Q-Former
        connector (BLIP-2 stage 2), at the image features it cross-attends."""
        from mmjax.models.grounding import GroundingSpec, likelihood_score
        tap = (("input_of", ("qformer_module",)) if model.connector == "qformer"
               else ("output_of", ("projector_fc2",)))
        return GroundingSpec(score=likelihood_score, tap=tap, unroll=())

    def losses(self, model, params, batch, objectives, rng):
        media, text = self.model_inputs(model, batch)
        out = self.apply(model, params, media, text, rng=rng)
        targets, weights = vlm_targets(text, batch.get("loss_mask"), out["text_index"],
                                       model.pad_id)
        return {"lm": losses.caption_loss(out["logits"][:, :-1], targets, weights)}, {}

    def train_flops(self, model_cfg, batch, text_len, frozen=("image_tower", "lm_module")):
        """Per example: the media tower (forward only when frozen), the trained
        connector (no gradient into a frozen tower's tokens), the LM over
        T = text_len + media tokens (`FROZEN` when frozen: activation gradients only)."""
        m = plain(model_cfg)
        tower, img, lm = self.tower(m), tower_config(m), plain(m["lm"])
        trained = "image_tower" not in frozen and not m.get("freeze_image", False)
        n, dv, d = tower.num_tokens(img), tower.token_width(img), lm["width"]
        if m.get("connector", "mlp") == "qformer":
            qc = plain(m["qformer"])
            p = qc.get("num_queries", 32)
            conn = (qformer_flops(qc, 0, (n, dv), TRAIN, context_grad=trained)
                    + dense_flops(p, qc.get("width", 768), d, TRAIN))
        else:  # 2-layer MLP on the content tokens (class / distillation tokens dropped)
            p = n - towers.prefix_tokens(tower, img)
            conn = dense_flops(p, dv, d, TRAIN, grad_in=trained) + dense_flops(p, d, d, TRAIN)
        lm_cost = lm_flops(lm, text_len + p, FROZEN if "lm_module" in frozen else TRAIN)
        return batch * (tower_flops(tower, img, trained) + conn + lm_cost)

    def shrink(self, c):
        d = c.data.train
        c.evals.zeroshot.shards = c.evals.retrieval.shards = ""
        c.init = ml_collections.ConfigDict()  # random frozen parts at tiny size
        from mmjax.data.tokenizers import token_ids
        ids = token_ids(c.data.train.tokenizer, int(c.data.train.max_len))
        c.model.lm.update(dict(vocab_size=ids["vocab_size"], width=64, depth=2, num_heads=4,
                               mlp_dim=128, max_len=256, remat="none"))
        if "qformer" in c.model:
            c.model.qformer.update(dict(num_queries=4, max_len=32, vocab_size=260))
        if d.get("text_format") == "dialog":
            # The recipe's caption key stays (the built-in data hold both `qa` and
            # LLaVA `conversations`), so `recipe:tiny` reads users' shards as the
            # recipe does; 192 tokens leave no room for a chat system prompt.
            d.update(dict(max_len=192, dialog_template="qa"))
            c.evals.vqa.update(dict(shards="synthetic", max_samples=4, max_new_tokens=4))
        else:
            c.evals.captioning.update(dict(shards="synthetic", max_samples=8, max_len=8))

    def captioner(self, model, variables, beam_size):
        if beam_size != 1:
            raise ConfigError("config.evals.captioning.beam_size: VisionLM captioning is "
                              "greedy; set it to 1.")
        answer = self.answerer(model, variables)

        def run(media, tokenizer, max_len):
            return answer(media, [caption_prompt(tokenizer)] * len(media), tokenizer, max_len,
                          width=1, chunk=len(media))
        return run

    def answerer(self, model, variables):
        def run(media, prompts, tokenizer, max_new_tokens, width=None, chunk=64):
            return answer_questions(model, variables, image_embeds(model, variables, media),
                                    prompts, tokenizer, max_new_tokens, width=width, chunk=chunk)
        return run


def answer_questions(model, variables, image_embeds, prompts: Sequence[Sequence[int]],
                     tokenizer, max_new_tokens: int = 16, width: int | None = None,
                     chunk: int = 64) -> list[str]:
    """Greedy answers of a `VisionLM` to token prompts about images.

    Args:
      image_embeds: `[N, P, D]` from `model.apply(..., method="image_embeds")`,
        one row per prompt.
      prompts: N prompt id lists (e.g. `dialog.encode_prompt`; `[BOS]` alone
        asks for a caption).
      width: padded prompt width (default: the longest prompt); fixed widths
        and `chunk` rows per call keep one compiled program.
    Returns: N decoded strings (up to EOS, stripped).
    """
    n = len(prompts)
    width = width or max(len(p) for p in prompts)
    lm = language_model(model)
    splice = jax.jit(lambda v, e, t: model.apply(v, e, t, method="splice"))
    out: list[str] = []
    for s in range(0, n, chunk):
        rows = list(prompts[s:s + chunk])
        emb = np.asarray(image_embeds[s:s + chunk])
        real = len(rows)
        rows += [rows[0]] * (chunk - real)  # pad the chunk with copies (results dropped)
        emb = np.concatenate([emb, np.repeat(emb[:1], chunk - real, 0)]) if real < chunk else emb
        text = np.full((chunk, width), tokenizer.pad_id, np.int32)
        for i, r in enumerate(rows):
            if len(r) > width:
                raise ValueError(f"prompt of {len(r)} tokens exceeds the width {width}")
            text[i, :len(r)] = r
        x = splice(variables, jnp.asarray(emb), jnp.asarray(text))
        lengths = np.asarray(x["valid"]).sum(-1)
        toks = generate(lm, {"params": variables["params"]["lm_module"]}, None, lengths,
                        max_new_tokens, prompt_embeds=x["embeds"], eos_id=tokenizer.eos_id,
                        pad_id=tokenizer.pad_id)
        out += [tokenizer.decode(np.asarray(t)).strip() for t in np.asarray(toks)[:real]]
    return out


def caption_prompt(tokenizer) -> list[int]:
    """The prompt that asks a VisionLM for a caption: BOS alone (pad without BOS)."""
    return [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.pad_id]


def image_embeds(model, variables, images) -> np.ndarray:
    """`model.apply(..., method="image_embeds")` jitted: `[B, H, W, 3]` -> `[B, P, D]`
    (compiled once per model and shape)."""
    return np.asarray(jax.jit(model_method(model, "image_embeds"))(variables, images))

