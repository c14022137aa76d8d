"""LLaVA-1.5: CLIP ViT-L/14-336 patch tokens -> 2-layer GELU MLP -> Vicuna-7B.

Two stages, as in LLaVA-1.5 (arg `pretrain` or `finetune`):

    # 1. feature alignment: only the projector trains (LCS-558K captions)
    mmjax train --config configs/llava.py:pretrain --workdir /runs/llava_pt \
        --config.data.train.shards='/data/lcs558k/{00000..00558}.tar' \
        --config.init.image_tower='hf_clip:/models/clip-vit-large-patch14-336#image_tower' \
        --config.init.lm_module=hf_llama:/models/vicuna-7b-v1.5
    # 2. visual instruction tuning: projector + LM train (665K conversations)
    mmjax train --config configs/llava.py:finetune --workdir /runs/llava_ft \
        --config.data.train.shards='/data/llava665k/{00000..00665}.tar' \
        --config.init.image_tower='hf_clip:/models/clip-vit-large-patch14-336#image_tower' \
        --config.init.lm_module=hf_llama:/models/vicuna-7b-v1.5 \
        --config.init.projector_fc1=workdir:/runs/llava_pt#projector_fc1 \
        --config.init.projector_fc2=workdir:/runs/llava_pt#projector_fc2

The text is Vicuna's own tokenizer (`tokenizer="hub:lmsys/vicuna-7b-v1.5"`, from
the Hugging Face hub cache, fetched on first use; `<unk>` = 0 pads).
Finetune data are webdataset samples whose `json` holds LLaVA `conversations`
(`text_format="dialog"`); the loss covers answer tokens only. Frozen parts
sourced from `init` are not written into checkpoints (only references).

`cpu` is the same recipe at laptop size on the built-in data, stage 2 with
the image tower of a built-in CLIP run (`mmjax train` default = stage 1):

    mmjax train --workdir /tmp/clip                                 # stage 1
    mmjax train --config configs/llava.py:cpu --workdir /tmp/llava \
        --config.init.image_tower=workdir:/tmp/clip#image_tower     # stage 2
    mmjax eval --workdir /tmp/llava                                 # VQA

`tiny` (alone or after a comma, e.g. `pretrain,tiny`) shrinks any variant to
a 3-step run.
"""
from mmjax.config.defaults import base_config, make_tiny

VICUNA_7B = dict(vocab_size=32000, width=4096, depth=32, num_heads=32, mlp_dim=11008,
                 norm_eps=1e-5, max_len=4096, scan=True, remat="full")


def get_config(arg=None):
    parts = [p for p in (arg or "pretrain").split(",") if p]
    stage = next((p for p in parts if p in ("pretrain", "finetune", "cpu")), "pretrain")
    c = base_config()
    c.model.name = "vision_lm"
    c.model.connector = "mlp"
    c.model.dtype = "bfloat16"
    # LLaVA's image features are the penultimate layer's patch tokens
    # (vision_feature_layer=-2, no post-LN): ViT-L/14's first 23 of 24 layers;
    # the init source's 24-layer stack is cut to 23 when loaded.
    c.model.image = dict(image_size=336, patch_size=14, width=1024, depth=23, heads=16,
                         pool="cls", ln_pre=True, ln_post=False, embed_dim=None,
                         act="quick_gelu", scan=True)
    c.model.lm = dict(VICUNA_7B)
    c.model.image_token_id = None  # set to the tokenizer's <image> id when prompts carry it
    c.model.pad_id = 0
    c.objectives.lm = 1.0
    d = c.data.train
    d.shards = None
    d.tokenizer = "hub:lmsys/vicuna-7b-v1.5"
    d.image_size, d.max_len = 336, 2048
    d.output, d.workers, d.resampled = "uint8", 8, True
    d.augment = "center"
    c.evals.zeroshot.shards = ""
    c.evals.retrieval.shards = ""
    c.optim.update(dict(schedule="cosine", weight_decay=0.0, b2=0.999, eps=1e-8,
                        clip_norm=1.0))
    if stage == "pretrain":
        c.total_steps, c.batch_size = 2180, 256        # 558K samples, 1 epoch
        c.optim.update(dict(lr=1e-3, warmup_steps=65, freeze=["image_tower", "lm_module"],
                            frozen_dtype="bfloat16"))
        d.caption_key = "txt"
        c.checkpoint_every = 500
    else:
        c.total_steps, c.batch_size = 5200, 128        # 665K conversations, 1 epoch
        c.optim.update(dict(lr=2e-5, warmup_steps=156, freeze=["image_tower"]))
        d.text_format, d.caption_key = "dialog", "json:conversations"
        d.dialog_template = "vicuna_v1"  # "SYSTEM USER: <image>\nq ASSISTANT: a</s>..."
        c.checkpoint_every = 1000
    c.init.image_tower = "hf_clip:/models/clip-vit-large-patch14-336#image_tower"
    c.init.lm_module = "hf_llama:/models/vicuna-7b-v1.5"

    if stage == "cpu":
        # Built-in data: 5 questions per image; the ViT of configs/clip_tiny.py.
        del c.init["image_tower"], c.init["lm_module"]
        c.model.dtype = "float32"
        c.total_steps, c.batch_size, c.log_every, c.checkpoint_every = 1500, 32, 100, 500
        c.optim.update(dict(lr=1e-3, warmup_steps=100, weight_decay=0.0))
        c.synthetic.image_size, c.synthetic.train_samples = 32, 20000
        d.update(dict(shards="synthetic", tokenizer="bytes", text_format="dialog",
                      caption_key="json:qa", dialog_template="qa", max_len=192,
                      image_size=32, workers=1,
                      shuffle_buffer=1000, output="float32", resampled=False))
        c.model.image = dict(image_size=32, patch_size=8, width=128, depth=2, heads=4,
                             embed_dim=128, pool="gap", posemb="learned", ln_pre=False)
        c.model.lm = dict(vocab_size=259, width=128, depth=2, num_heads=4, mlp_dim=384,
                          max_len=256)
        c.evals.vqa.update(dict(shards="synthetic", max_samples=200))
    if "tiny" in parts:
        c = make_tiny(c)
    return c
