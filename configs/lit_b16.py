"""LiT: locked-image tuning. A ViT-B/16 image tower that is frozen (no updates,
excluded from the optimizer via optax.multi_transform) and a text tower
trained from scratch with the CLIP softmax loss.

    mmjax train --config configs/lit_b16.py --workdir DIR \
        --config.data.train.shards='/data/cc12m/{0000..1242}.tar'

Start the image tower from pretrained weights by restoring a CLIP/SigLIP
checkpoint into the workdir (see README, "Imported weights"); from random
weights LiT only shows the mechanics. The text is BERT's WordPiece
(`tokenizer="bert-base-uncased"`, 30,522 ids, [CLS] first: the tower pools it), as
LiT's BERT text towers, from the Hugging Face hub cache (fetched on first use).
`:tiny` shrinks it to a 3-step CPU run with the same tokenizer.
"""
from mmjax.config.defaults import base_config, make_tiny


def get_config(arg=None):
    c = base_config()
    c.total_steps = 60_000
    c.batch_size = 16384
    c.log_every = 100
    c.checkpoint_every = 2000
    c.optim.update(dict(lr=1e-3, warmup_steps=5_000, weight_decay=1e-4,
                        freeze=["image_tower"]))
    d = c.data.train
    d.shards = None
    d.image_size, d.max_len, d.augment = 224, 64, "center"
    d.output, d.workers, d.resampled = "uint8", 8, True
    c.model.name = "two_tower"
    c.model.contrastive = "softmax"
    c.model.dtype = "bfloat16"
    c.model.image = dict(image_size=224, patch_size=16, width=768, depth=12, heads=12,
                         pool="gap", posemb="sincos2d", embed_dim=768, scan=True)
    c.data.train.tokenizer = "bert-base-uncased"
    c.model.text = dict(vocab_size=30522, max_len=64, width=768, depth=12, heads=12,
                        embed_dim=768, causal=False, pool="cls", eos_id=102, pad_id=0, scan=True,
                        remat="dots_no_batch")
    c.objectives.softmax_contrastive = 1.0
    return make_tiny(c) if arg == "tiny" else c
