"""CoCa ViT-B/16 (open_clip coca_ViT-B-32 layout at /16): contrastive 1.0 +
captioning 2.0; attentional pooler (1 contrastive query + 256 caption
queries), 12-layer multimodal decoder with cross-attention.

    mmjax train --config configs/coca_b16.py --workdir DIR \
        --config.data.train.shards='/data/laion2b/{000000..231349}.tar'

Expect: open_clip's CoCa ViT-B/32 on LAION-2B (13B samples) reaches 63.3%
ImageNet zero-shot. The text is CLIP's BPE (`tokenizer="clip"`, as open_clip's
CoCa; from the Hugging Face hub cache, fetched on first use), padded with EOS:
the first EOS of a caption is still a captioning target, so the decoder learns to
stop. `:tiny` shrinks it to a 3-step CPU run with the same tokenizer.
"""
from mmjax.config.defaults import base_config, make_tiny


def get_config(arg=None):
    c = base_config()
    c.total_steps = 400_000
    c.batch_size = 32768
    c.log_every = 100
    c.checkpoint_every = 2000
    c.optim.update(dict(lr=5e-4, warmup_steps=10_000, weight_decay=0.2))
    d = c.data.train
    d.shards = None
    d.image_size, d.max_len = 224, 76
    d.output, d.workers, d.resampled = "uint8", 8, True
    c.model.name = "coca"
    c.model.dtype = "bfloat16"
    c.model.embed_dim = 512
    c.model.caption_queries = 256
    c.model.pooler_heads = 8
    c.model.image = dict(image_size=224, patch_size=16, width=768, depth=12, heads=12,
                         ln_pre=True, patch_bias=False, scan=True, remat="dots_no_batch")
    c.data.train.tokenizer = "clip"
    c.model.text = dict(vocab_size=49408, max_len=76, width=512, depth=12, heads=8,
                        causal=True, pool="eos", eos_id=49407, pad_id=49407, scan=True,
                        remat="dots_no_batch")
    c.model.decoder = dict(vocab_size=49408, width=512, depth=12, heads=8, scan=True,
                           remat="dots_no_batch")
    c.objectives.softmax_contrastive = 1.0
    c.objectives.caption = 2.0
    return make_tiny(c) if arg == "tiny" else c
