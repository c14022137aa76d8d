"""Tiny CLIP on the built-in synthetic shapes data: the default of `mmjax train`.

    mmjax train                       # same as:
    mmjax train --config configs/clip_tiny.py --workdir ./mmjax_runs/clip_tiny

Expect (2-core Intel Xeon VM, 2026-11-30): 95 s including the first-time writing of
the built-in shards, final contrastive loss well below
its start (ln 128 ~ 4.85), and zero-shot top-1 on 1,000 held-out built-in
images printed at the end, far above chance (1/24 = 4.2%; see README).
"""
from mmjax.config.defaults import base_config, make_tiny


def get_config(arg=None):
    c = base_config()
    c.total_steps = 400
    c.batch_size = 128
    c.log_every = 50
    c.checkpoint_every = 200
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.05

    c.synthetic.image_size = 32
    c.synthetic.train_samples = 20000
    d = c.data.train
    d.shards = "synthetic"
    d.tokenizer = "bytes"
    d.max_len = 32
    d.image_size = 32
    d.augment = "center"
    d.workers = 1
    d.shuffle_buffer = 2000

    c.model.name = "two_tower"
    c.model.contrastive = "softmax"
    c.model.image = dict(image_size=32, patch_size=8, width=128, depth=2, heads=4,
                         embed_dim=128, pool="gap", posemb="learned", ln_pre=False)
    c.model.text = dict(vocab_size=259, max_len=32, width=128, depth=2, heads=4,
                        embed_dim=128, causal=True, pool="eos", eos_id=2, pad_id=0)
    c.objectives.softmax_contrastive = 1.0
    return make_tiny(c) if arg == "tiny" else c
