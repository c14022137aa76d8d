"""BLIP-2 stage 1: frozen ViT + Q-Former (BERT-base size, 32 queries,
cross-attention every 2nd layer) trained with ITC + ITM (hard negatives) +
ITG, unweighted, as in LAVIS `blip2_qformer.py`.

    mmjax train --config configs/blip2_stage1.py --workdir DIR \
        --config.data.train.shards='/data/coco_vg_cc_sbu_laion/{00000..12999}.tar'

The ViT is frozen (gradient stopped at its output, and excluded from the
optimizer). BLIP-2 starts it from EVA-CLIP ViT-g; here a ViT-L/14 of the same
layout, e.g. imported with `mmjax.convert.hf.load_blip2_qformer`. Expect
(129M images, 250k steps at batch 2320): ITC+ITM+ITG losses falling together,
COCO retrieval near LAVIS's stage-1 numbers when started from EVA ViT-g.
The text is BERT's WordPiece (`tokenizer="bert-base-uncased"`, as LAVIS, from the
Hugging Face hub cache, fetched on first use) with LAVIS's [DEC] token one id past
it (30522) starting the ITG captions. `:tiny` shrinks it to a 3-step CPU run with
the same tokenizer.
"""
from mmjax.config.defaults import base_config, make_tiny


def get_config(arg=None):
    c = base_config()
    c.total_steps = 250_000
    c.batch_size = 2320
    c.log_every = 100
    c.checkpoint_every = 5000
    c.optim.update(dict(lr=1e-4, warmup_steps=5000, weight_decay=0.05, b2=0.999, eps=1e-8,
                        freeze=["image_tower"]))
    d = c.data.train
    d.shards = None
    d.image_size, d.max_len = 224, 32
    d.output, d.workers, d.resampled = "uint8", 8, True
    c.model.name = "blip2_stage1"
    c.model.dtype = "bfloat16"
    c.model.embed_dim = 256
    d.tokenizer = "bert-base-uncased"
    c.model.dec_id = 30522  # [DEC], one id past BERT's vocabulary (LAVIS adds it)
    c.model.pad_id = 0
    c.model.image = dict(image_size=224, patch_size=14, width=1024, depth=24, heads=16,
                         pool="cls", ln_post=True, embed_dim=None, scan=True)
    c.model.qformer = dict(num_queries=32, width=768, depth=12, heads=12, mlp_dim=3072,
                           cross_attention_freq=2, vocab_size=30523, max_len=32, scan=True)
    c.objectives.itc = 1.0
    c.objectives.itm = 1.0
    c.objectives.itg = 1.0
    return make_tiny(c) if arg == "tiny" else c
