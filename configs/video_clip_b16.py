"""Video CLIP ViT-B/16 (CLIP4Clip seqTransf) on WebVid-style shards, from CLIP weights.

    mmjax train --config configs/video_clip_b16.py --workdir gs://bucket/runs/video_b16 \
        --config.data.train.shards='/data/webvid/{00000..02499}.tar' \
        --config.init.image_tower/frame=workdir:gs://bucket/runs/clip_b16#image_tower

Shards hold `key.mp4` (or webm/mkv/avi) + `key.txt`. Training takes 8 frames
per clip (one random frame per segment, one crop and flip for the whole clip),
224 px, global batch 1024 (8192 frames per step), bf16, full remat, FSDP over
the 8 chips of a v5p-16: `mmjax compile --config configs/video_clip_b16.py --target v5p-16`
shows the step fitting (BENCHMARKS.md). CLIP4Clip (ViT-B/32, seqTransf)
reports MSR-VTT text-to-video R@1 44.5 after fine-tuning on MSR-VTT.
The frame ViT initialises from an image-text run's image tower (`config.init`)
or imported CLIP weights (`hf_clip:PATH#image_tower`). The text is CLIP's BPE
(`tokenizer="clip"`, from the Hugging Face hub cache, fetched on first use).
"""
from mmjax.config.defaults import base_config, make_tiny


def get_config(arg=None):
    c = base_config()
    c.total_steps = 50_000
    c.batch_size = 1024
    c.log_every = 100
    c.checkpoint_every = 2000
    c.optim.update(dict(lr=1e-4, warmup_steps=2000, weight_decay=0.2))
    # FSDP weights gathered once in the forward pass and kept for the backward (+0.1 GiB
    # a chip): the step's collectives drop below the FSDP minimum (BENCHMARKS.md).
    c.mesh.update(dict(data=-1, fsdp=8, tensor=1, fsdp_weights="gather_once"))
    d = c.data.train
    d.num_frames = 8
    d.shards = None  # set to your shards
    d.image_size, d.max_len, d.augment, d.crop_scale = 224, 77, "rrc", (0.5, 1.0)
    d.output, d.workers, d.resampled = "uint8", 8, True
    c.model.name = "two_tower"
    c.model.contrastive = "softmax"
    c.model.dtype = "bfloat16"
    c.model.image = dict(kind="video_vit", num_frames=8, temporal="transformer",
                         temporal_depth=4, temporal_heads=8,
                         image_size=224, patch_size=16, width=768, depth=12, heads=12,
                         pool="cls", ln_pre=True, patch_bias=False, embed_dim=512,
                         act="gelu", scan=True, remat="full")
    c.data.train.tokenizer = "clip"
    c.model.text = dict(vocab_size=49408, max_len=77, width=512, depth=12, heads=8,
                        embed_dim=512, causal=True, pool="eos", eos_id=49407, pad_id=49407,
                        act="gelu", scan=True, remat="full")
    c.objectives.softmax_contrastive = 1.0
    c.evals.zeroshot.shards = ""
    return make_tiny(c) if arg == "tiny" else c
