"""ViLT-B/32: one single-stream Transformer over BERT word embeddings and 32x32 image
patches (Kim et al. 2021), pretrained with image-text matching and masked language
modelling, fine-tuned for VQAv2 as classification.

    mmjax train --config configs/vilt_b32.py --workdir /runs/vilt \\
        --config.data.train.shards='/data/cc_coco_vg_sbu/{00000..04095}.tar'
    # VQAv2 (a JSON member per image: {"qa": [{"question": ..., "answers": [10 x str]}]}),
    # answers.txt: the 3,129 answers of ViLT's vocabulary, one per line
    mmjax train --config configs/vilt_b32.py:vqa=/data/vqav2/answers.txt \\
        --workdir /runs/vilt_vqa --config.init.all=workdir:/runs/vilt \\
        --config.data.train.shards='/data/vqav2/train-{0000..0255}.tar'

ViLT's pretraining uses 4,096 pairs per step for 100k steps (AdamW 1e-4, weight
decay 0.01, 10% warmup, linear decay); its images keep their aspect ratio (shorter
side 384, up to 640), here square 384x384 crops (144 patches). Imported weights:
`--config.init.all=hf_vilt:/models/vilt-b32-mlm` (`mmjax.convert.vilt`). Text:
BERT's WordPiece (`bert-base-uncased`), 40 tokens.

`tiny` (after a comma) shrinks either variant to a 3-step CPU run.
"""
from mmjax.config.defaults import base_config, make_tiny

BERT_TOKENIZER = "bert-base-uncased"  # from the Hugging Face hub cache


def read_answers(path: str) -> list[str]:
    """The answer vocabulary: one answer per line (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def base(experts: str = "shared", image_size: int = 384, patch_size: int = 32):
    """The shared part of the ViLT and VLMo recipes (BERT-base sized stack)."""
    c = base_config()
    c.model.name = "one_tower"
    c.model.dtype = "bfloat16"
    c.model.image = dict(image_size=image_size, patch_size=patch_size, width=768, depth=0,
                         heads=12, pool="cls", posemb="learned", ln_pre=False, ln_post=False,
                         patch_bias=True, embed_dim=None)
    c.model.text = dict(vocab_size=30522, max_len=40, width=768, depth=0, heads=12,
                        pool="none", norm_eps=1e-12)
    c.model.update(dict(depth=12, heads=12, mlp_dim=3072, act="gelu", norm_eps=1e-12,
                        experts=experts, pad_id=0, mask_id=103, special_ids=(0, 101, 102),
                        scan=True, remat="full"))
    d = c.data.train
    d.update(dict(tokenizer=BERT_TOKENIZER, max_len=40, image_size=image_size,
                  output="uint8", workers=8, resampled=True, augment="rrc",
                  crop_scale=(0.5, 1.0)))
    c.optim.update(dict(lr=1e-4, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
                        schedule="linear", clip_norm=1.0))
    c.evals.zeroshot.shards = c.evals.retrieval.shards = ""
    return c


def vqa_finetune(c, parts: list, *, steps: int, batch: int, lr: float, warmup: int) -> None:
    """The `vqa=ANSWERS.txt` variant (no-op without a `vqa` part): VQA as
    classification over the answers in the file (["yes", "no"] when none is given),
    one question per sample of VQAv2-style shards (`{"qa": [{"question", "answers"}]}`)."""
    vqa = next((p for p in parts if p.startswith("vqa")), None)
    if vqa is None:
        return
    path = vqa.partition("=")[2]
    c.model.answers = read_answers(path) if path else ["yes", "no"]
    c.objectives = dict(vqa=1.0)
    c.total_steps, c.batch_size = steps, batch
    c.optim.update(dict(lr=lr, warmup_steps=warmup))
    c.data.train.update(dict(text_format="vqa", caption_key="json:qa", num_captions=1,
                             max_answers=10, augment="center"))
    c.evals.retrieval.rerank_k = 0


def get_config(arg=None):
    parts = [p for p in (arg or "").split(",") if p]
    c = base("shared")
    c.objectives = dict(itm=1.0, mlm=1.0)
    c.total_steps, c.batch_size = 100_000, 4096
    c.optim.warmup_steps = 10_000
    c.checkpoint_every = 2000
    # ViLT's VQAv2 fine-tuning: 10 epochs of 443K questions at batch 256 questions.
    vqa_finetune(c, parts, steps=17_300, batch=256, lr=1e-4, warmup=1730)
    if "tiny" in parts:
        c = make_tiny(c)
    return c
