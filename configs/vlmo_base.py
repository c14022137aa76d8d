"""VLMo-Base: a multiway Transformer (Bao et al. 2022): shared self-attention, a
vision and a language FFN in every layer and a vision-language FFN in the top two,
pretrained with image-text contrastive (dual mode), image-text matching with hard
negatives mined from the contrastive similarities, and masked language modelling.

    mmjax train --config configs/vlmo_base.py --workdir /runs/vlmo \\
        --config.data.train.shards='/data/cc_coco_vg_sbu/{00000..04095}.tar'
    mmjax eval --config configs/vlmo_base.py --workdir /runs/vlmo \\
        --config.evals.retrieval.shards='/data/coco_karpathy_test/{0..4}.tar'

VLMo-Base trains 200k steps at 1,024 pairs (AdamW 2e-4, weight decay 0.01, 2.5k
warmup) on 224x224 images (16x16 patches, 197 media tokens) and 40 BERT tokens;
its image side starts from BEiT (`--config.init.*`). Retrieval re-ranks the top 128
contrastive candidates with the matching head. VQA fine-tuning: `:vqa=ANSWERS.txt`
as in `configs/vilt_b32.py`.

`tiny` (after a comma) shrinks it to a 3-step CPU run.
"""
import importlib.util
import os

from mmjax.config.defaults import make_tiny

# The ViLT recipe next to this file holds the shared BERT-base sized part.
_spec = importlib.util.spec_from_file_location(
    "vilt_b32", os.path.join(os.path.dirname(os.path.abspath(__file__)), "vilt_b32.py"))
_vilt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_vilt)
base = _vilt.base


def get_config(arg=None):
    parts = [p for p in (arg or "").split(",") if p]
    c = base("multiway", image_size=224, patch_size=16)
    c.model.update(dict(vl_depth=2, embed_dim=768))
    c.objectives = dict(itc=1.0, itm=1.0, mlm=1.0)
    c.total_steps, c.batch_size = 200_000, 1024
    c.optim.update(dict(lr=2e-4, warmup_steps=2500, schedule="cosine"))
    c.checkpoint_every = 5000
    c.evals.retrieval.rerank_k = 128
    _vilt.vqa_finetune(c, parts, steps=20_000, batch=128, lr=3e-5, warmup=2000)
    if "tiny" in parts:
        c = make_tiny(c)
    return c
