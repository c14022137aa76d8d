"""BLIP-2 stage 2: frozen ViT + Q-Former (from stage 1) -> linear -> frozen decoder LM.

The Q-Former's 32 query outputs are projected to the LM width and put in
front of the caption; only the Q-Former and the projection train, with the
LM loss on the caption tokens (LAVIS `blip2_opt.py` / `blip2_vicuna_instruct.py`
with a Llama-family LM). Start from a stage-1 run and an imported LM:

    mmjax train --config configs/blip2_stage2.py --workdir /runs/blip2_s2 \
        --config.data.train.shards='/data/coco_vg_cc_sbu_laion/{00000..12999}.tar' \
        --config.init.image_tower=workdir:/runs/blip2_s1#image_tower \
        --config.init.qformer_module=workdir:/runs/blip2_s1#qformer_module \
        --config.init.lm_module=hf_llama:/models/vicuna-7b-v1.1

The frozen ViT and LM come from their sources at start and on resume; the
checkpoints hold the Q-Former, the projection and their optimizer state plus
the source references (`optim.frozen_dtype="bfloat16"` keeps the frozen LM
in bf16). Instruction tuning (InstructBLIP-style) is the same recipe with
`--config.data.train.text_format=dialog --config.data.train.caption_key=json:conversations`.
The captions are tokenized by the LM's own tokenizer
(`tokenizer="hub:lmsys/vicuna-7b-v1.1"`, from the Hugging Face hub cache, fetched on
first use; point it at another LM's with `--config.data.train.tokenizer`).
`:tiny` shrinks it to a 3-step CPU run (random frozen parts, the same tokenizer).
"""
from mmjax.config.defaults import base_config, make_tiny


def get_config(arg=None):
    c = base_config()
    c.total_steps = 80_000
    c.batch_size = 1920
    c.log_every = 100
    c.checkpoint_every = 5000
    c.optim.update(dict(lr=1e-4, warmup_steps=2000, weight_decay=0.05, b2=0.999, eps=1e-8,
                        freeze=["image_tower", "lm_module"], frozen_dtype="bfloat16"))
    d = c.data.train
    d.shards = None
    d.image_size, d.max_len = 224, 32
    d.output, d.workers, d.resampled = "uint8", 8, True
    d.tokenizer = "hub:lmsys/vicuna-7b-v1.1"
    c.model.name = "vision_lm"
    c.model.connector = "qformer"
    c.model.dtype = "bfloat16"
    c.model.pad_id = 0
    # Stage-1 layout (configs/blip2_stage1.py) so its checkpoint maps one to one.
    c.model.image = dict(image_size=224, patch_size=14, width=1024, depth=24, heads=16,
                         pool="cls", ln_post=True, embed_dim=None, scan=True)
    c.model.qformer = dict(num_queries=32, width=768, depth=12, heads=12, mlp_dim=3072,
                           cross_attention_freq=2, vocab_size=260, max_len=32, scan=True)
    c.model.lm = dict(vocab_size=32000, width=4096, depth=32, num_heads=32, mlp_dim=11008,
                      norm_eps=1e-6, max_len=2048, scan=True, remat="full")
    c.init.image_tower = "workdir:/runs/blip2_s1#image_tower"
    c.init.qformer_module = "workdir:/runs/blip2_s1#qformer_module"
    c.init.lm_module = "hf_llama:/models/vicuna-7b-v1.1"
    c.objectives.lm = 1.0
    c.evals.zeroshot.shards = ""
    c.evals.retrieval.shards = ""
    if arg == "tiny":
        c.init = type(c.init)()
        c = make_tiny(c)
    return c
