"""BLIP-2 stage 1 family: Q-Former on a (frozen) media tower with ITC, ITM and ITG."""
from __future__ import annotations

from mmjax import losses
from mmjax.families.base import Family, plain, step_captioner
from mmjax.models.flops import cross_attention_flops, cross_attention_layers, layer_flops


class Blip2Family(Family):
    name = "blip2_stage1"
    objectives = ("itc", "itm", "itg")
    evaluators = ("zeroshot", "retrieval", "captioning")
    text_section = "qformer"

    def pad_id(self, model):
        return model.pad_id

    def losses(self, model, params, batch, objectives, rng):
        v = {"params": params}
        media, text = self.model_inputs(model, batch)
        f = self.apply(model, params, media, text, rng=rng, method="itc_features")
        terms, extra = {}, {"temp": f["temp"]}
        itc, sim = losses.blip2_itc_loss(f["image_feats"], f["text_feat"], f["temp"])
        if "itc" in objectives:
            terms["itc"] = itc
        if "itm" in objectives:
            tri = losses.blip2_itm_triples(sim, rng, temp=f["temp"])
            logits = model.apply(v, f["image_tokens"][tri["image_index"]],
                                 text[tri["text_index"]], method="itm_logits")
            terms["itm"] = losses.itm_loss(logits, tri["labels"])
        if "itg" in objectives:
            logits = model.apply(v, f["image_tokens"], text, method="itg_logits")
            terms["itg"] = losses.next_token_loss(logits, text, model.pad_id,
                                                  label_smoothing=0.1)
        return terms, extra

    def train_flops(self, model_cfg, batch, text_len, frozen=()):
        m = plain(model_cfg)
        img, qc = plain(m["image"]), plain(m["qformer"])
        w, nq, depth = qc.get("width", 768), qc.get("num_queries", 32), qc.get("depth", 12)
        mlp, freq = qc.get("mlp_dim", 3072), qc.get("cross_attention_freq", 2)
        n = (img["image_size"] // img["patch_size"]) ** 2 + 1
        dv = img["width"]
        cross = cross_attention_flops(nq, w, n, dv) * cross_attention_layers(depth, freq)

        def qformer(tokens):
            return depth * layer_flops(tokens, w, mlp) + cross
        # ITC: queries pass + text pass; ITM: 3B joint passes; ITG: joint pass + LM head.
        vocab = qc.get("vocab_size", 30523)
        per = qformer(nq) + depth * layer_flops(text_len, w, mlp) + qformer(nq + text_len) \
            + 2 * text_len * w * vocab
        return batch * self.media_flops(m, embed_dim=None) + 3 * batch * per \
            + 3 * 2 * batch * qformer(nq + text_len)

    def shrink(self, c):
        c.model.qformer.update(dict(num_queries=4, max_len=32, vocab_size=260))
        c.evals.captioning.update(dict(shards="synthetic", max_samples=8, max_len=8))

    def captioner(self, model, variables, beam_size):
        from mmjax.evaluate.captioning import blip2_itg_logits_fn
        return step_captioner(blip2_itg_logits_fn, model, variables, beam_size)
