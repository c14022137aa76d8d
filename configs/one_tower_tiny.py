"""One-tower (VLMo-style multiway) pretraining and VQA fine-tuning on the built-in data.

One Transformer over `[text ; image patches]` with a language FFN, a vision FFN
and, in its top layer, a vision-language FFN (`mmjax.models.one_tower`),
pretrained with image-text matching (hard negatives from the contrastive
similarities), masked language modelling and dual-mode contrastive learning,
then fine-tuned for VQA as classification over the built-in answers:

    mmjax train --config configs/one_tower_tiny.py --workdir /tmp/vlmo          # pretrain
    mmjax train --config configs/one_tower_tiny.py:vqa --workdir /tmp/vlmo_vqa \\
        --config.init.all=workdir:/tmp/vlmo                                     # VQA
    mmjax eval --workdir /tmp/vlmo_vqa

Arguments (comma-separated): `vqa` (fine-tuning), `shared` (ViLT's single stream:
one FFN, no dual mode, so ITM + MLM only), `tiny` (a 3-step run).
"""
from mmjax.config.defaults import base_config, make_tiny
from mmjax.data import synthetic


def answers() -> list[str]:
    """Every answer of the built-in questions, in a fixed order (the VQA classes)."""
    return sorted({a for values in synthetic.ANSWERS_BY_TYPE.values() for a in values})


def get_config(arg=None):
    parts = [p for p in (arg or "").split(",") if p]
    c = base_config()
    c.model.name = "one_tower"
    width = 96
    # 4-pixel patches (64 of them): at 8 pixels the stack tells colours apart but
    # hardly shapes, and matching (ITM) with hard negatives hardly learns. Two ViT
    # layers on the patches before the shared stack (`image.depth=2`, +0.22M
    # parameters, +15% step time): the stack's 3 layers alone leave the matching head
    # no better than the contrastive ranking (errors are mostly the big shape
    # confused, cross/triangle and square/circle); with them ITM re-ranking gains.
    c.model.image = dict(image_size=32, patch_size=4, width=width, depth=2, heads=4, pool="cls",
                         posemb="learned", ln_pre=False, ln_post=False, patch_bias=True,
                         embed_dim=None)
    # The word-level BPE of the built-in captions (`tokenizer="synthetic"`, 377 ids, every
    # caption word one token, captions <= 17 tokens) and one more id for [MASK]. On bytes
    # (40 per caption) the same budget learns matching much less well: the fused layers
    # must first assemble words, and re-ranking by ITM loses to the contrastive ranking.
    c.model.text = dict(vocab_size=378, max_len=24, width=width, depth=0, heads=4, pool="none",
                        norm_eps=1e-12)
    c.model.update(dict(depth=3, heads=4, mlp_dim=2 * width, experts="multiway", vl_depth=1,
                        embed_dim=64, pad_id=0, mask_id=377, special_ids=(0, 1, 2),
                        answers=answers()))
    c.objectives = dict(itc=1.0, itm=1.0, mlm=1.0)
    c.total_steps, c.batch_size, c.log_every, c.checkpoint_every = 1500, 32, 100, 500
    c.optim.update(dict(lr=1e-3, warmup_steps=100, weight_decay=0.01, b2=0.98))
    c.synthetic.update(dict(image_size=32, train_samples=20000))
    d = c.data.train
    d.update(dict(shards="synthetic", tokenizer="synthetic", max_len=24, image_size=32,
                  workers=1, shuffle_buffer=1000))
    # Samples of one scene (same shapes, colours and relation) are no ITM negatives of
    # each other: any caption of one is true of the other. (Training on the complete
    # captions, `caption_key="json:full_caption"`, true of exactly their scene, cost
    # 11-16 points of zero-shot and did not make ITM re-ranking gain: see the README.)
    d.group_key = "json:scene"
    c.evals.batch_size = 200
    c.evals.zeroshot.update(dict(shards="synthetic", max_samples=1000))
    # Hits by scene: scenes repeat (1,000 images, 539 scenes), and any caption of an
    # image's scene describes it as well as its own.
    c.evals.retrieval.update(dict(shards="synthetic", max_samples=1000, rerank_k=16,
                                  group_key="json:scene"))
    if "shared" in parts:
        c.model.update(dict(experts="shared", vl_depth=0))
        c.objectives = dict(itm=1.0, mlm=1.0)
        c.evals.zeroshot.shards = c.evals.retrieval.shards = ""
    if "vqa" in parts:
        # Every question of an image in one step, its prompt as VQA evaluation asks it.
        c.objectives = dict(vqa=1.0)
        c.total_steps, c.batch_size = 600, 16
        c.optim.update(dict(lr=5e-4, warmup_steps=50))
        # Question words are outside the caption BPE's words: "Q: ... A:" prompts take
        # up to 22 tokens.
        d.update(dict(text_format="vqa", caption_key="json:qa", num_captions=5, max_len=24,
                      dialog_template="qa", group_key=""))
        c.evals.zeroshot.shards = c.evals.retrieval.shards = ""
        c.evals.vqa.update(dict(shards="synthetic", max_samples=200, max_len=256))
    if "tiny" in parts:
        c = make_tiny(c)
    return c
