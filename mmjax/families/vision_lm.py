"""VisionLM family: media tower -> connector (Q-Former or MLP) -> decoder LM (BLIP-2
stage 2, LLaVA); next-token loss on answer/caption tokens."""
from __future__ import annotations

import ml_collections

from mmjax import losses
from mmjax.errors import ConfigError
from mmjax.families.base import Family, plain
from mmjax.models.flops import cross_attention_flops, cross_attention_layers, layer_flops
from mmjax.models.vlm import vlm_targets


class VisionLMFamily(Family):
    name = "vision_lm"
    objectives = ("lm",)
    evaluators = ("captioning", "vqa")
    text_section = "lm"

    def pad_id(self, model):
        return model.pad_id

    def losses(self, model, params, batch, objectives, rng):
        media, text = self.model_inputs(model, batch)
        out = self.apply(model, params, media, text, rng=rng)
        targets, weights = vlm_targets(text, batch.get("loss_mask"), out["text_index"],
                                       model.pad_id)
        return {"lm": losses.caption_loss(out["logits"][:, :-1], targets, weights)}, {}

    def train_flops(self, model_cfg, batch, text_len, frozen=("image_tower", "lm_module")):
        """Frozen media tower 1x forward; connector 3x; LM 2x forward when frozen
        (activation gradients only) else 3x; T = text_len + image tokens."""
        m = plain(model_cfg)
        img, lm = plain(m["image"]), plain(m["lm"])
        n = (img["image_size"] // img["patch_size"]) ** 2
        d, dv = lm["width"], img["width"]
        heads = lm["num_heads"]
        kv = (lm.get("num_kv_heads") or heads) * (lm.get("head_dim") or d // heads)
        if m.get("connector", "mlp") == "qformer":
            qc = plain(m["qformer"])
            w, p = qc.get("width", 768), qc.get("num_queries", 32)
            depth, freq = qc.get("depth", 12), qc.get("cross_attention_freq", 2)
            n_ctx = n + (1 if img.get("pool", "cls") == "cls" else 0)
            conn = (depth * layer_flops(p, w, qc.get("mlp_dim", 3072))
                    + cross_attention_layers(depth, freq) * cross_attention_flops(p, w, n_ctx, dv)
                    + 2 * p * w * d)
        else:
            p = n
            conn = 2 * p * dv * d + 2 * p * d * d
        t = text_len + p
        layer = 2 * t * (2 * d * d + 2 * d * kv) + 2 * t * d * lm["mlp_dim"] * 3 + 2 * t * t * d
        lm_fwd = lm["depth"] * layer + 2 * t * d * lm["vocab_size"]
        lm_factor = 2 if "lm_module" in frozen else 3
        return batch * (self.media_flops(m, embed_dim=None) + 3 * conn + lm_factor * lm_fwd)

    def shrink(self, c):
        d = c.data.train
        c.evals.zeroshot.shards = c.evals.retrieval.shards = ""
        c.init = ml_collections.ConfigDict()  # random frozen parts at tiny size
        c.model.lm.update(dict(vocab_size=259, width=64, depth=2, num_heads=4, mlp_dim=128,
                               max_len=256, remat="none"))
        if "qformer" in c.model:
            c.model.qformer.update(dict(num_queries=4, max_len=32, vocab_size=260))
        if d.get("text_format") == "dialog":
            # The byte tokenizer and 192 tokens leave no room for a chat system prompt.
            d.update(dict(caption_key="json:qa", max_len=192, dialog_template="qa"))
            c.evals.vqa.update(dict(shards="synthetic", max_samples=4, max_new_tokens=4))
        else:
            c.evals.captioning.update(dict(shards="synthetic", max_samples=8, max_len=8))

    def captioner(self, model, variables, beam_size):
        if beam_size != 1:
            raise ConfigError("config.evals.captioning.beam_size: VisionLM captioning is "
                              "greedy; set it to 1.")
        from mmjax.evaluate.vqa import answer_questions, caption_prompt, image_embeds

        def run(media, tokenizer, max_len):
            return answer_questions(model, variables, image_embeds(model, variables, media),
                                    [caption_prompt(tokenizer)] * len(media), tokenizer,
                                    max_new_tokens=max_len, width=1, chunk=len(media))
        return run
