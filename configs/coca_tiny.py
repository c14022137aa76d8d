"""Tiny CoCa on the built-in synthetic shapes data: contrastive + captioning, on a CPU
in minutes; the captioner of `mmjax curate --captioner` in the README's curation
walk-through.

    mmjax train --config configs/coca_tiny.py --workdir ./mmjax_runs/coca_tiny

Same data, tokenizer (bytes) and image tower as configs/clip_tiny.py; a 2-layer
multimodal decoder with cross-attention to 16 caption queries of an attentional
pooler. Evaluates zero-shot classification and captioning (BLEU-4, CIDEr) on the
held-out built-in images at the end.
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

    c.model.name = "coca"
    c.model.embed_dim = 128
    c.model.caption_queries = 16
    c.model.pooler_heads = 4
    c.model.image = dict(image_size=32, patch_size=8, width=128, depth=2, heads=4,
                         posemb="learned", ln_pre=False)
    c.model.text = dict(vocab_size=259, max_len=32, width=128, depth=2, heads=4,
                        causal=True, pool="eos", eos_id=2, pad_id=0)
    c.model.decoder = dict(vocab_size=259, width=128, depth=2, heads=4)
    c.objectives.softmax_contrastive = 1.0
    c.objectives.caption = 2.0
    c.evals.captioning.shards = "synthetic"
    return make_tiny(c) if arg == "tiny" else c
