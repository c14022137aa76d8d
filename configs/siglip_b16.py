"""SigLIP ViT-B/16 (big_vision recipe: sigmoid loss, t' = log 10, b = -10,
MAP head, bidirectional text with last-token pooling, batch 32k).

    mmjax train --config configs/siglip_b16.py --workdir DIR \
        --config.data.train.shards='/data/webli/{00000..99999}.tar'

The sigmoid loss runs as a ring over the batch devices (memory flat in the
device count). Expect (WebLI, 40B examples seen): ~76-78% ImageNet zero-shot.
The text is SigLIP's SentencePiece (`tokenizer="siglip"`, 32,000 ids, padded
with EOS = 1 as Hugging Face's SiglipTokenizer does), from the Hugging Face hub
cache (fetched on first use). `:tiny` shrinks it to a 3-step CPU run with the
same tokenizer.
"""
from mmjax.config.defaults import base_config, make_tiny


def get_config(arg=None):
    c = base_config()
    c.total_steps = 1_200_000
    c.batch_size = 32768
    c.log_every = 100
    c.checkpoint_every = 2000
    c.optim.update(dict(lr=1e-3, warmup_steps=10_000, weight_decay=1e-4, b2=0.95))
    d = c.data.train
    d.shards = None
    d.image_size, d.max_len, d.augment = 224, 64, "center"
    d.mean, d.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    d.output, d.workers, d.resampled = "uint8", 8, True
    c.model.name = "two_tower"
    c.model.contrastive = "sigmoid"
    c.model.dtype = "bfloat16"
    c.model.image = dict(image_size=224, patch_size=16, width=768, depth=12, heads=12,
                         pool="map", posemb="learned", ln_pre=False, patch_bias=True,
                         embed_dim=None, act="gelu_tanh", norm_eps=1e-6, scan=True,
                         remat="dots_no_batch")
    c.data.train.tokenizer = "siglip"
    c.model.text = dict(vocab_size=32000, max_len=64, width=768, depth=12, heads=12,
                        embed_dim=768, proj_bias=True, causal=False, mask_padding=False,
                        pool="last", eos_id=1, pad_id=1, act="gelu_tanh", norm_eps=1e-6,
                        scan=True, remat="dots_no_batch")
    c.objectives.sigmoid_contrastive = 1.0
    c.evals.zeroshot.templates = "simple"
    c = make_tiny(c) if arg == "tiny" else c
    if arg == "tiny":
        c.model.text.embed_dim = 64  # SigLIP: towers share the width
        c.model.image.embed_dim = None
    return c
