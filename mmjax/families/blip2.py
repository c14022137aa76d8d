"""BLIP-2 stage 1 family: Q-Former on a (frozen) media tower with ITC, ITM and ITG."""
from __future__ import annotations

from mmjax import losses
from mmjax.families.base import Family, plain, step_captioner
from mmjax.models.flops import (TRAIN, dense_flops, qformer_flops, similarity_flops,
                                tower_config, tower_flops)


class Blip2Family(Family):
    name = "blip2_stage1"
    objectives = ("itc", "itm", "itg")
    evaluators = ("zeroshot", "retrieval", "captioning", "grounding")
    text_section = "qformer"
    itm_rerank = True
    patch_dropout = True

    def pad_id(self, model):
        return model.pad_id

    def grounding(self, model):
        """ITM log-odds, tapped where the Q-Former reads the image features (the keys
        and values of its cross-attention; LAVIS's Grad-CAM layer)."""
        from mmjax.models.grounding import GroundingSpec, itm_score
        return GroundingSpec(score=itm_score, tap=("input_of", ("qformer_module",)),
                             unroll=())

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
        """Per example: the media tower (forward only when frozen or `freeze_image`),
        ITC's query and text passes with their projections, ITM's 3 joint passes (a
        positive and two negatives) with its head, ITG's joint pass with its LM head;
        per step ITC's `[B, Q, B]` similarities."""
        m = plain(model_cfg)
        qc = plain(m["qformer"])
        tower, img = self.tower(m), tower_config(m)
        trained = not m.get("freeze_image", True) and "image_tower" not in frozen
        ctx = (tower.num_tokens(img), tower.token_width(img))
        w, nq, e = qc.get("width", 768), qc.get("num_queries", 32), m.get("embed_dim", 256)

        def qformer(length, image=None, lm_head=False):
            return qformer_flops(qc, length, image, TRAIN, context_grad=trained, lm_head=lm_head)
        itc = (qformer(0, ctx) + dense_flops(nq, w, e, TRAIN)
               + qformer(text_len) + dense_flops(1, w, e, TRAIN))
        itm = qformer(text_len, ctx) + dense_flops(nq, w, 2, TRAIN)
        itg = qformer(text_len, ctx, lm_head=True)
        return (batch * (tower_flops(tower, img, trained) + itc + 3 * itm + itg)
                + similarity_flops(batch, e, nq, TRAIN))

    def shrink(self, c):
        from mmjax.data.tokenizers import token_ids
        d = c.data.train  # [DEC] is one id past the tokenizer's
        vocab = token_ids(d.tokenizer, int(d.max_len))["vocab_size"]
        c.model.qformer.update(dict(num_queries=4, max_len=32, vocab_size=vocab + 1))
        c.model.dec_id = vocab
        c.evals.captioning.update(dict(shards="synthetic", max_samples=8, max_len=8))

    def captioner(self, model, variables, beam_size):
        from mmjax.families.captioning import blip2_itg_logits_fn
        return step_captioner(blip2_itg_logits_fn, model, variables, beam_size)
