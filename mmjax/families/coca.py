"""CoCa family: contrastive + captioning (open_clip layout)."""
from __future__ import annotations

from mmjax import losses
from mmjax.families.base import Family, plain, step_captioner
from mmjax.families.two_tower import check_embeddings, contrastive_terms
from mmjax.models.flops import (TRAIN, caption_decoder_flops, dense_flops, pooler_flops,
                                similarity_flops, text_flops, tower_config, tower_flops)


class CoCaFamily(Family):
    name = "coca"
    objectives = ("softmax_contrastive", "sigmoid_contrastive", "caption")
    evaluators = ("zeroshot", "retrieval", "captioning", "grounding")
    patch_dropout = True

    def check_config(self, config):
        check_embeddings(self, config)

    def losses(self, model, params, batch, objectives, rng):
        media, text = self.model_inputs(model, batch)
        out = self.apply(model, params, media, text, rng=rng)
        terms, extra = contrastive_terms(out, objectives)
        if "caption" in objectives:
            terms["caption"] = losses.next_token_loss(
                out["logits"], text, self.pad_id(model), eos_id=dict(model.text).get("eos_id", 2))
        return terms, extra

    def train_flops(self, model_cfg, batch, text_len, frozen=()):
        """All trained: the media tower's tokens, the attentional pooler (a contrastive
        query + `caption_queries`), the text tower, the decoder cross-attending to the
        caption queries, and the `[B, B]` similarities."""
        m = plain(model_cfg)
        tower, img = self.tower(m), tower_config(m, pool="none", embed_dim=None)
        n, w = tower.num_tokens(img), tower.token_width(img)
        q, e = m.get("caption_queries", 256), m.get("embed_dim", 512)
        per = (tower_flops(tower, img, trained=True)
               + pooler_flops(n, w, queries=1 + q, mode=TRAIN) + dense_flops(1, w, e, TRAIN)
               + text_flops({**plain(m["text"]), "embed_dim": e}, text_len, TRAIN)
               + caption_decoder_flops(plain(m["decoder"]), text_len, (q, w), TRAIN))
        return batch * per + similarity_flops(batch, e, mode=TRAIN)

    def shrink(self, c):
        c.evals.captioning.update(dict(shards="synthetic", max_samples=8, max_len=8))

    def grounding(self, model):
        from mmjax.models.grounding import GroundingSpec, cosine_score
        # The attention pooler reads every final token of the tower (built with pool="none").
        tap = ("output_of", ("image_tower", "ln_post")) \
            if plain(model.image).get("ln_post", True) else ("last_block_output", ("image_tower",))
        return GroundingSpec(score=cosine_score, tap=tap)

    def captioner(self, model, variables, beam_size):
        from mmjax.families.captioning import coca_logits_fn
        return step_captioner(coca_logits_fn, model, variables, beam_size)
