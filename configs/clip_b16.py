"""CLIP ViT-B/16 (open_clip recipe: AdamW 5e-4, betas (0.9, 0.98), wd 0.2,
10k warmup, cosine, global batch 32k, bf16).

    mmjax train --config configs/clip_b16.py --workdir gs://bucket/runs/clip_b16 \
        --config.data.train.shards='/data/laion400m/{00000..41407}.tar'

Expect: on LAION-400M for 32 epochs (~400k steps at 32k) open_clip reports
67.1% ImageNet zero-shot for B/16. `:tiny` shrinks it to a 3-step CPU run.
The text is CLIP's BPE (`tokenizer="clip"`: 49,408 ids, EOS 49407, padded with
EOS as Hugging Face's CLIPTokenizer does), read from the Hugging Face hub cache
(fetched on first use; offline, the error names the command that fetches it);
the model's vocabulary size and ids are checked against it before anything is
built. `:tiny` keeps the tokenizer.
"""
from mmjax.config.defaults import base_config, make_tiny


def get_config(arg=None):
    c = base_config()
    c.total_steps = 400_000
    c.batch_size = 32768
    c.log_every = 100
    c.checkpoint_every = 2000
    c.optim.update(dict(lr=5e-4, warmup_steps=10_000, weight_decay=0.2))
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
    d = c.data.train
    d.shards = None  # set to your shards
    d.image_size, d.max_len, d.augment, d.crop_scale = 224, 77, "rrc", (0.9, 1.0)
    d.output, d.workers, d.resampled = "uint8", 8, True
    c.model.name = "two_tower"
    c.model.contrastive = "softmax"
    c.model.dtype = "bfloat16"
    c.model.image = dict(image_size=224, patch_size=16, width=768, depth=12, heads=12,
                         pool="cls", ln_pre=True, patch_bias=False, embed_dim=512,
                         act="gelu", scan=True, remat="dots_no_batch")
    d.tokenizer = "clip"
    c.model.text = dict(vocab_size=49408, max_len=77, width=512, depth=12, heads=8,
                        embed_dim=512, causal=True, pool="eos", eos_id=49407, pad_id=49407,
                        act="gelu", scan=True, remat="dots_no_batch")
    c.objectives.softmax_contrastive = 1.0
    return make_tiny(c) if arg == "tiny" else c
