"""CoCa family: contrastive + captioning (open_clip layout)."""
from __future__ import annotations

from mmjax import losses
from mmjax.families.base import Family, plain, step_captioner
from mmjax.families.two_tower import contrastive_terms
from mmjax.models.flops import layer_flops, text_flops


class CoCaFamily(Family):
    name = "coca"
    objectives = ("softmax_contrastive", "sigmoid_contrastive", "caption")
    evaluators = ("zeroshot", "retrieval", "captioning")

    def losses(self, model, params, batch, objectives, rng):
        media, text = self.model_inputs(model, batch)
        out = self.apply(model, params, media, text, rng=rng)
        terms, extra = contrastive_terms(out, objectives)
        if "caption" in objectives:
            terms["caption"] = losses.next_token_loss(out["logits"], text, self.pad_id(model))
        return terms, extra

    def train_flops(self, model_cfg, batch, text_len, frozen=()):
        m = plain(model_cfg)
        img, txt, dec = plain(m["image"]), plain(m["text"]), plain(m["decoder"])
        q = m.get("caption_queries", 256)
        n = (img["image_size"] // img["patch_size"]) ** 2
        w = img["width"]
        fwd = self.media_flops(m, pool="none", embed_dim=None)
        fwd += 2 * (q + 1) * 2 * w * w + 2 * n * 2 * w * w + 4 * (q + 1) * n * w  # pooler
        fwd += text_flops({**txt, "embed_dim": m.get("embed_dim")}, text_len)
        dw = dec["width"]
        fwd += dec["depth"] * layer_flops(text_len, dw, dec.get("mlp_dim") or 4 * dw,
                                          causal=True, ctx=(q, w))
        fwd += 2 * text_len * dw * dec["vocab_size"]
        return 3 * batch * fwd

    def shrink(self, c):
        c.evals.captioning.update(dict(shards="synthetic", max_samples=8, max_len=8))

    def captioner(self, model, variables, beam_size):
        from mmjax.evaluate.captioning import coca_logits_fn
        return step_captioner(coca_logits_fn, model, variables, beam_size)
