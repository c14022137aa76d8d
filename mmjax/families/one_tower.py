"""One-tower family: one Transformer over `[text ; media]` (ViLT, VLMo), trained with
image-text matching, masked language modelling and (multiway) dual-mode contrastive
losses, fine-tuned for VQA as classification over an answer vocabulary.

`model.name = "one_tower"` (`mmjax.models.one_tower.OneTower`). Objectives:
  itm   matching on the fused sequence: for each pair a negative image and a
        negative text drawn from the in-batch similarities (the dual-mode
        contrastive ones when `itc` is trained, VLMo; uniformly otherwise, ViLT),
        with BLIP-2's sharded sampling (`mmjax.losses.blip2_itm_triples`); two
        samples with the very same caption, or of one group (`data.train.group_key`:
        the data marks samples of the same content), or without groups of one class
        where the data labels its samples (`cls`), are not drawn as each other's
        negatives (in-batch false negatives, as BLIP excludes the captions of one
        image);
  mlm   15% of the text tokens masked (BERT's 80/10/10), the loss on them only;
  itc   multiway only: media-only and text-only passes through the stack, the
        sharded softmax contrastive loss (CLIP's, learned scale);
  vqa   fine-tuning: each sample's questions (`data.train.text_format="vqa"`) fused
        with its image, the pooled [CLS] -> MLP -> `len(model.answers)` logits,
        binary cross-entropy on soft scores (ViLT's VQAv2 head).
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import losses
from mmjax.errors import ConfigError
from mmjax.families.base import Family, plain
from mmjax.models.flops import TRAIN, dense_flops, layer_flops, similarity_flops, tower_config

PRETRAINING = ("itm", "mlm", "itc")


def _multiway(model_cfg: Mapping) -> bool:
    return plain(model_cfg).get("experts", "shared") == "multiway"


class OneTowerFamily(Family):
    name = "one_tower"
    objectives = ("itm", "mlm", "itc", "vqa")
    evaluators = ("zeroshot", "retrieval", "vqa", "grounding")
    itm_rerank = True
    # The class (`cls`) and group (`data.train.group_key`) of each sample where the
    # data has them (-1 otherwise).
    optional_batch_keys = ("label", "group")

    def pad_id(self, model):
        return model.pad_id

    def grounding(self, model):
        """ITM log-odds, tapped at the normalized tokens the fused stack's last attention
        reads (its media positions): gradient x activation of the last fused layer."""
        from mmjax.models.grounding import GroundingSpec, itm_score
        return GroundingSpec(score=itm_score, tap=("last_block", ("encoder",)),
                             unroll=("self",))

    # --- checks -------------------------------------------------------------------------
    def check_objectives(self, model, objectives):
        super().check_objectives(model, objectives)
        if "itc" in objectives and model.experts != "multiway":
            raise ConfigError("config.objectives.itc: the contrastive loss needs the dual mode "
                              "of model.experts='multiway' (a shared-expert ViLT stack only "
                              "scores pairs); drop itc or set model.experts='multiway'.")
        if "vqa" in objectives:
            if not model.answers:
                raise ConfigError("config.objectives.vqa needs config.model.answers (the answer "
                                  "vocabulary of the VQA classifier).")
            if set(objectives) & set(PRETRAINING):
                raise ConfigError("config.objectives: vqa is a fine-tuning objective with its own "
                                  f"data (text_format='vqa'); train it alone, not with "
                                  f"{sorted(set(objectives) & set(PRETRAINING))}.")

    def check_config(self, config):
        from mmjax.models import build, towers
        model = build(config.model)  # the fields with their defaults filled in
        tower, fields = towers.tower_fields(model.image)
        image_width = tower(**fields).width
        if image_width != model.width:
            raise ConfigError(f"config.model.image.width={image_width} must equal "
                              f"config.model.text.width={model.width} (one stack reads "
                              "both).")
        vocab = int(model.text["vocab_size"])
        if not 0 <= model.mask_id < vocab:
            raise ConfigError(f"config.model.mask_id={model.mask_id} must be below "
                              f"config.model.text.vocab_size={vocab}.")
        m = plain(config.model)
        d = config.data.train
        if "vqa" in config.objectives and d.get("text_format") != "vqa":
            raise ConfigError("config.objectives.vqa reads questions with answers: set "
                              "config.data.train.text_format='vqa'.")
        if "vqa" not in config.objectives and d.get("text_format") not in ("caption", None):
            raise ConfigError(f"config.data.train.text_format={d.get('text_format')!r}: the "
                              "one-tower pretraining objectives read one caption per image "
                              "('caption').")
        if not _multiway(m):
            dual = [n for n in ("zeroshot", "retrieval") if config.evals[n].get("shards")]
            if dual:
                raise ConfigError(f"config.evals.{dual[0]} ranks dual-mode embeddings, which a "
                                  "shared-expert stack (model.experts='shared', ViLT) does not "
                                  f"have; set config.evals.{dual[0]}.shards='' or "
                                  "model.experts='multiway'.")

    # --- inputs -------------------------------------------------------------------------
    def batch_spec(self, config, batch):
        spec = super().batch_spec(config, batch)
        if "vqa" in config.objectives:
            d = config.data.train
            q, k = int(d.num_captions), int(d.get("max_answers") or 10)
            spec["text"] = ((batch, q, int(d.max_len)), np.int32)
            spec["answer_ids"] = ((batch, q, k), np.int32)
            spec["answer_scores"] = ((batch, q, k), np.float32)
        return spec

    def data_overrides(self, config):
        """The answer vocabulary of `text_format="vqa"` data is the model's."""
        if config.data.train.get("text_format") == "vqa":
            return {"answers": list(config.model.get("answers") or ())}
        return {}

    # --- objectives ---------------------------------------------------------------------
    def losses(self, model, params, batch, objectives, rng):
        v = {"params": params}
        media, text = self.model_inputs(model, batch)
        tokens = model.apply(v, media, method="image_tokens")
        terms, extra = {}, {}
        if "vqa" in objectives:
            b, q, length = text.shape
            ids, scores = batch["answer_ids"], batch["answer_scores"]
            logits = model.apply(v, jnp.repeat(tokens, q, axis=0), text.reshape(b * q, length),
                                 method="answer_logits")
            targets = losses.vqa_targets(ids.reshape(b * q, -1), scores.reshape(b * q, -1),
                                         len(model.answers))
            weights = (ids >= 0).any(-1).reshape(-1)
            terms["vqa"] = losses.vqa_loss(logits, targets, weights)
            return terms, extra
        k_itm, k_mlm = jax.random.split(rng)
        sim, temp = jnp.zeros((text.shape[0],) * 2, jnp.float32), None
        if "itc" in objectives:
            out = model.apply(v, tokens, text, method="dual")
            # CLIP's loss is BLIP-2's ITC with one query, no smoothing and temp = 1/scale;
            # it also returns the global similarity that ITM mines negatives from.
            terms["itc"], sim = losses.blip2_itc_loss(out["zimg"][:, None], out["ztxt"],
                                                      1.0 / out["scale"], label_smoothing=0.0)
            temp = 1.0 / out["scale"]
            extra["scale"] = out["scale"]
        if "itm" in objectives:
            # In-batch false negatives: the very same caption, or one group (samples
            # the data marks as showing the same content, `data.train.group_key`);
            # without groups, one class where the data labels its samples.
            same = (text[:, None, :] == text[None, :, :]).all(-1)
            group = batch.get("group")
            group = batch.get("label") if group is None else group
            if group is not None:
                same = same | ((group[:, None] == group[None, :]) & (group[:, None] >= 0))
            tri = losses.blip2_itm_triples(sim, k_itm, temp=temp, exclude=same)
            logits = model.apply(v, tokens[tri["image_index"]], text[tri["text_index"]],
                                 method="itm_logits")
            terms["itm"] = losses.itm_loss(logits, tri["labels"])
        if "mlm" in objectives:
            masked, chosen = losses.mask_tokens(
                text, k_mlm, mask_id=model.mask_id, vocab_size=int(model.text["vocab_size"]),
                special_ids=tuple(model.special_ids) + (model.pad_id,))
            logits = model.apply(v, tokens, masked, method="mlm_logits")
            terms["mlm"] = losses.masked_lm_loss(logits, text, chosen)
        return terms, extra

    # --- cost ---------------------------------------------------------------------------
    def step_flops(self, config, batch):
        d = config.data.train
        questions = int(d.num_captions) if "vqa" in config.objectives else 1
        return self.train_flops(config.model.to_dict(), batch, int(d.max_len),
                                tuple(config.optim.get("freeze") or ()),
                                objectives=tuple(config.objectives), questions=questions)

    def train_flops(self, model_cfg, batch, text_len, frozen=(), objectives=None,
                    questions: int = 1):
        """Per example (trained: 3x forward): the media embedding; for ITM three
        fused passes over `L + N` tokens with the pooler and 2-way head; for MLM one
        fused pass with the MLM transform and the tied vocabulary projection on the L
        text tokens; for ITC a media-only (N) and a text-only (L) pass with their
        projections, and per step the `[B, B]` similarities; for VQA one fused pass per
        question with the pooler and classifier.

        Counted as the step computes it: the media are embedded once and shared by the
        ITM triples (gathered), the MLM pass and ITC's media-only pass, and once per
        sample for all of its questions (repeated). Each token runs exactly one FFN expert of width `mlp_dim`
        (multiway: its modality's, or the vision-language one in the top `vl_depth`
        layers), so both stacks cost the same. Not model work, not counted: the
        embedding gathers, the ITM negatives' sampling and VQA's soft targets (an
        einsum of one-hot answers and their scores in the loss).
        `frozen`: a frozen `image_tower` (the media embedding) counts 1x; the rest
        is taken as trained. `objectives` default: ViLT's itm + mlm for a shared
        stack, all three pretraining ones for a multiway one."""
        m = plain(model_cfg)
        objectives = tuple(objectives or (PRETRAINING if _multiway(m) else ("itm", "mlm")))
        text = plain(m["text"])
        img = tower_config(m)
        tower = self.tower(m)
        d, depth = int(text["width"]), int(m.get("depth", 12))
        mlp, n = int(m.get("mlp_dim") or 4 * d), tower.num_tokens(img)

        def stack(t):
            return depth * layer_flops(t, d, mlp, mode=TRAIN)
        pooler = dense_flops(1, d, d, TRAIN)
        trained = not any(f.strip("/") == "image_tower" for f in frozen)
        media = (3 if trained else 1) * tower.forward_flops(img)
        per, sims = media, 0.0
        if "vqa" in objectives:
            a = len(m.get("answers") or ())
            per += questions * (stack(text_len + n) + pooler + dense_flops(1, d, 2 * d, TRAIN)
                                + dense_flops(1, 2 * d, a, TRAIN))
            return batch * per
        if "itm" in objectives:
            per += 3 * (stack(text_len + n) + pooler + dense_flops(1, d, 2, TRAIN))
        if "mlm" in objectives:
            per += (stack(text_len + n) + dense_flops(text_len, d, d, TRAIN)
                    + dense_flops(text_len, d, int(text["vocab_size"]), TRAIN))
        if "itc" in objectives:
            e = int(m.get("embed_dim") or d)
            per += stack(n) + stack(text_len) + 2 * dense_flops(1, d, e, TRAIN)
            sims = similarity_flops(batch, e, mode=TRAIN)
        return batch * per + sims

    # --- :tiny --------------------------------------------------------------------------
    def shrink(self, c):
        from mmjax.data.tokenizers import token_ids
        ids, m = token_ids(c.data.train.tokenizer, int(c.data.train.max_len)), c.model
        vocab = ids["vocab_size"]  # [MASK] is one id past the tokenizer's
        special = tuple(ids[k] for k in ("pad_id", "bos_id", "eos_id") if ids[k] is not None)
        m.image.update(dict(depth=0, width=64, heads=4))
        m.text.update(dict(depth=0, vocab_size=vocab + 1, width=64, heads=4))
        m.update(dict(depth=2, heads=4, mlp_dim=128, mask_id=vocab,
                      special_ids=tuple(dict.fromkeys(special)), pad_id=ids["pad_id"]))
        if m.get("vl_depth"):
            m.vl_depth = 1
        if not _multiway(m):
            c.evals.zeroshot.shards = c.evals.retrieval.shards = ""
        if "vqa" in c.objectives:
            c.evals.zeroshot.shards = c.evals.retrieval.shards = ""
            c.evals.vqa.update(dict(shards="synthetic", max_samples=8))

    # --- evaluation ---------------------------------------------------------------------
    def answerer(self, model, variables):
        if not model.answers:
            return None
        from mmjax.models.jitted import model_method
        logits_fn = jax.jit(model_method(model, "vqa_logits"))
        max_len = int(model.text["max_len"])

        def run(media, prompts, tokenizer, max_new_tokens=None, width=None, chunk=64):
            """Classify each (media, prompt) over the answer vocabulary."""
            del max_new_tokens, width  # the answer is one class, the text is max_len wide
            out = []
            for s in range(0, len(prompts), chunk):
                rows = list(prompts[s:s + chunk])
                images = np.asarray(media[s:s + chunk])
                real = len(rows)
                text = np.full((chunk, max_len), tokenizer.pad_id, np.int32)
                for i, r in enumerate(rows):
                    r = list(r)[:max_len]
                    text[i, :len(r)] = r
                if real < chunk:
                    images = np.concatenate([images, np.repeat(images[:1], chunk - real, 0)])
                best = np.asarray(jnp.argmax(logits_fn(variables, images, text), -1))[:real]
                out += [model.answers[int(i)] for i in best]
            return out
        return run
