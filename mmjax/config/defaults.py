"""The base config every recipe starts from (all keys, with their defaults).

Recipes in `configs/` call `base_config()` and fill in the model, data and
objectives. Keys scripts rely on: `total_steps`, `log_every`,
`checkpoint_every`, `data.train.shards`, `data.train.tokenizer`.
"""
from __future__ import annotations

import ml_collections

from mmjax.data.options import default_data_config
from mmjax.data.tokenizers import token_ids


# Every key of the base config: dotted name -> (default, one-line description);
# `data.train.*` is the data pipeline's (`mmjax.data.options.DATA_KEYS`). The
# open sections `model`, `objectives` and `init` are described in `SECTIONS`.
KEYS: dict[str, tuple] = {
    "seed": (0, "seed of the parameter init and of the step's random numbers"),
    "total_steps": (1000, "optimizer steps of the run"),
    "unmasked_tuning_steps": (0, "the last N of total_steps train with the media tower's "
                                 "patch dropout off (FLIP's unmasked tuning; "
                                 "model.image.patch_dropout; 0: none)"),
    "batch_size": (256, "global batch: rows per step over all processes and devices"),
    "log_every": (50, "steps between metric rows (metrics.jsonl, TensorBoard, the log line)"),
    "checkpoint_every": (1000, "steps between checkpoints (and one at the end)"),
    "keep_checkpoints": (3, "checkpoints kept; older ones are deleted"),
    "peak_flops": (None, "peak FLOP/s per device for MFU (None: the table in "
                         "mmjax/train/mfu.py by device kind)"),
    "mesh.data": (-1, "data-parallel axis size (-1: the devices left)"),
    "mesh.fsdp": (1, "FSDP axis: batch and parameter shards (-1: the devices left)"),
    "mesh.tensor": (1, "tensor-parallel axis: heads, MLP and vocabulary (-1: the devices left)"),
    "mesh.fsdp_ring": ("one_way", "TPU: FSDP weight gathers and gradient reduce-scatters run "
                                  "as windowed matmuls around the ring; 'one_way' moves 7/8 "
                                  "of each weight on 8 chips (the minimum), 'two_way' (XLA's "
                                  "default) 9/8 in half the ring steps"),
    "mesh.fsdp_weights": ("in_matmul", "FSDP weights of bfloat16 matmuls: 'in_matmul' (the "
                                       "partitioner gathers them inside each matmul, again "
                                       "in the backward pass) or 'gather_once' (gathered "
                                       "once in the forward pass and kept for the backward: "
                                       "less traffic, the layers' bf16 weights in memory)"),
    "multihost.init_timeout_s": (300, "seconds a process waits for all processes to join "
                                      "before it exits with status 75"),
    "multihost.heartbeat_timeout_s": (100, "JAX's coordination service declares a silent "
                                           "process dead after this long"),
    "multihost.shutdown_timeout_s": (60, "JAX's wait for the other processes at a normal exit"),
    "multihost.peer_timeout_s": (30, "a peer whose heartbeat (every 2 s) stopped this long is "
                                     "lost: every process exits with one line (0: off)"),
    "multihost.preemption_deadline_s": (300, "after a SIGTERM, exit without saving if the job "
                                             "has not agreed to stop by then (0: no deadline)"),
    "multihost.stop_check_every": (1, "steps between the agreements on a stop request"),
    "optim.lr": (5e-4, "peak learning rate"),
    "optim.warmup_steps": (100, "steps of linear warmup from 0"),
    "optim.schedule": ("cosine", "'cosine', 'linear' or 'const' after the warmup"),
    "optim.end_lr_frac": (0.0, "final learning rate as a fraction of lr"),
    "optim.b1": (0.9, "AdamW beta1"),
    "optim.b2": (0.98, "AdamW beta2"),
    "optim.eps": (1e-6, "AdamW epsilon"),
    "optim.weight_decay": (0.2, "AdamW decoupled weight decay (kernels; embeddings with "
                                "decay_embeddings)"),
    "optim.clip_norm": (1.0, "clip the global gradient norm to this (None: off)"),
    "optim.accum_steps": (1, "micro-batches per step (gradient accumulation)"),
    "optim.freeze": ([], "parameter path prefixes that are not trained (e.g. 'image_tower')"),
    "optim.decay_embeddings": (False, "weight decay on embeddings too (kernels always)"),
    "optim.grad_reduce_dtype": ("float32", "dtype of the cross-replica gradient sum of "
                                           "low-precision matmuls: 'float32' or 'compute'"),
    "optim.frozen_dtype": (None, "store frozen weights in this dtype (e.g. 'bfloat16'; "
                                 "None: as initialized)"),
    "synthetic.train_samples": (20000, "built-in data: training samples"),
    "synthetic.test_samples": (1000, "built-in data: held-out samples (evaluations)"),
    "synthetic.image_size": (64, "built-in data: side of images and video frames in pixels"),
    "synthetic.samples_per_shard": (2500, "built-in data: samples per tar shard"),
    "synthetic.video_frames": (16, "built-in data: frames per video clip"),
    "synthetic.audio_seconds": (2.0, "built-in data: length of a sound in seconds"),
    "synthetic.audio_sample_rate": (16000, "built-in data: audio samples per second"),
    "health.patience": (3, "log rows after the warmup with the loss still at its first "
                           "step's value before one warning naming the likely keys (0: off)"),
    "health.tolerance": (0.05, "relative change of the loss that counts as moving (health)"),
    "evals.every": (0, "steps between periodic evaluations (0: only at the end)"),
    "evals.batch_size": (256, "rows per evaluation batch (per process)"),
    "evals.tfds_data_dir": ("", "TFDS data_dir for 'tfds:NAME[@SPLIT]' sources"),
    "evals.zeroshot.shards": ("synthetic", "zero-shot classification data: webdataset shards "
                                           "with cls labels, 'synthetic', 'tfds:NAME[@SPLIT]' "
                                           "or '' (off)"),
    "evals.zeroshot.classnames": ("synthetic", "a file (one name per line), a list, "
                                               "'synthetic' or 'tfds' (the dataset's)"),
    "evals.zeroshot.templates": ("simple", "built-in template set, one '{}' template, or a file"),
    "evals.zeroshot.max_samples": (0, "evaluate at most this many samples (0: all)"),
    "evals.retrieval.shards": ("", "retrieval (Recall@1/5/10) data, 'synthetic' or '' (off)"),
    "evals.retrieval.max_samples": (0, "at most this many samples (0: all)"),
    "evals.retrieval.caption_key": ("", "caption member ('': data.train.caption_key); a JSON "
                                        "list field (json:captions) gives several per sample"),
    "evals.retrieval.num_captions": (5, "most captions per sample from a JSON list"),
    "evals.retrieval.group_key": ("", "member ('txt', 'json:FIELD') whose value marks samples "
                                      "showing the same content: any caption or image of the "
                                      "query's group is a hit ('': only its own)"),
    "evals.retrieval.rerank_k": (0, "re-rank the k best contrastive candidates of every query "
                                    "with the image-text matching head (BLIP-2, one_tower; "
                                    "0: off; at least 10)"),
    "evals.captioning.shards": ("", "captioning (BLEU-4, CIDEr) data, 'synthetic' or '' (off)"),
    "evals.captioning.max_samples": (256, "at most this many samples (0: all)"),
    "evals.captioning.beam_size": (1, "1: greedy decoding; more: beam search"),
    "evals.captioning.max_len": (32, "most tokens per generated caption"),
    "evals.vqa.shards": ("", "VQA (VisionLM, one_tower) dialog data, 'synthetic' or '' (off)"),
    "evals.vqa.text_key": ("json:qa", "JSON key of the question/answer turns"),
    "evals.vqa.max_samples": (256, "at most this many samples (0: all)"),
    "evals.vqa.max_new_tokens": (8, "most tokens per generated answer"),
    "evals.vqa.max_len": (0, "tokens of an evaluation dialog, all its questions (0: "
                             "data.train.max_len)"),
    "evals.grounding.shards": ("", "grounding maps' pointing game: 'synthetic' (the built-in "
                                   "held-out images, which know their shapes' boxes) or '' (off)"),
    "evals.grounding.num_images": (200, "held-out images with two shapes (2 phrases each)"),
    "evals.grounding.examples": (8, "maps kept for the evaluation report"),
}
# The sections whose keys a recipe chooses.
SECTIONS = {
    "model": "the model: `name` picks the family (two_tower, coca, blip2_stage1, vision_lm, "
             "one_tower, or a registered one), the other keys are the fields of its module; `image` is "
             "the media tower (`kind`: vit, ast, video_vit, or a registered one)",
    "objectives": "objective name -> loss weight (the family lists the names it offers)",
    "init": "parameter prefix -> source ('workdir:DIR[@STEP][#SUBTREE]', 'hf_clip:PATH', "
            "'hf_llama:PATH', ...): parts of the model loaded after the random init; the "
            "prefix 'all' loads every parameter the source has (fine-tuning a whole "
            "pretrained model, new heads keep their init)",
}


def base_config() -> ml_collections.ConfigDict:
    """Every key with its default (`KEYS`, `mmjax.data.options.DATA_KEYS`); recipes
    fill in `model`, `objectives` and what differs."""
    c = ml_collections.ConfigDict()
    for key, (value, _) in KEYS.items():
        node = c
        *parents, name = key.split(".")
        for part in parents:
            if part not in node:
                node[part] = ml_collections.ConfigDict()
            node = node[part]
        node[name] = list(value) if isinstance(value, list) else value
    c.model = ml_collections.ConfigDict()
    c.objectives = ml_collections.ConfigDict()
    c.init = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict()
    c.data.train = default_data_config()
    return c


def make_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink any recipe to a few-second CPU run on the built-in data (`:tiny` arg).

    Keeps the recipe's structure (model kind, pooling, heads, objectives,
    freezing) and its tokenizer (a named one, e.g. `clip`, is read from the hub
    cache; the vocabulary size and special ids follow it; `synthetic` becomes
    `bytes`), and only reduces sizes, steps and data: the generic part here,
    the media tower's sizes from its `tiny()`, the family's own sections and
    evaluators from `Family.shrink` (`mmjax.families`).
    """
    from mmjax.families import get_family
    from mmjax.models import towers
    family = get_family(c)
    c.total_steps, c.batch_size, c.log_every, c.checkpoint_every = 3, 8, 1, 3
    c.optim.warmup_steps = 1
    c.synthetic.update(dict(train_samples=64, test_samples=32, image_size=32,
                            samples_per_shard=16))
    d = c.data.train
    if d.get("tokenizer") in (None, "", "synthetic"):
        d.tokenizer = "bytes"
    d.update(dict(shards="synthetic", max_len=32, image_size=32, workers=0, shuffle_buffer=16))
    ids = token_ids(d.tokenizer, int(d.max_len))
    c.evals.batch_size = 32
    c.evals.zeroshot.shards = c.evals.retrieval.shards = "synthetic"
    m = c.model
    small = dict(width=64, depth=2, heads=4, mlp_dim=128)
    if "image" in m:
        tower, fields = towers.tower_fields(m.image)
        m.image.update(tower.tiny(fields))
        d.update(towers.data_keys(*towers.tower_fields(m.image)))  # what the tower reads
    if "text" in m:
        m.text.update(dict(vocab_size=ids["vocab_size"], max_len=32, **small))
        for key in ("pad_id", "eos_id"):
            if key in m.text:
                m.text[key] = ids[key]
        if m.text.get("embed_dim"):
            m.text.embed_dim = 32
    if "pad_id" in m:
        m.pad_id = ids["pad_id"]
    if "decoder" in m:
        m.decoder.update(dict(vocab_size=ids["vocab_size"], **small))
    if "qformer" in m:
        m.qformer.update(small)
    for key, value in (("embed_dim", 32), ("caption_queries", 4), ("pooler_heads", 4)):
        if key in m:
            m[key] = value
    family.shrink(c)
    return c
