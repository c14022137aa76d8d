"""The base config every recipe starts from (all keys, with their defaults).

Recipes in `configs/` call `base_config()` and fill in the model, data and
objectives. Keys scripts rely on: `total_steps`, `log_every`,
`checkpoint_every`, `data.train.shards`, `data.train.tokenizer`.
"""
from __future__ import annotations

import ml_collections

from mmjax.data.pipeline import default_data_config


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 256                 # global batch
    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.peak_flops = None                # per-device peak FLOP/s for MFU (None: device table)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Multi-process jobs (mmjax/train/multihost.py; README "Running on a pod"):
    # init_timeout_s: how long a process waits for all to join before it exits;
    # heartbeat_timeout_s: JAX's coordination service declares a silent process dead;
    # shutdown_timeout_s: JAX's wait for the others at a normal exit;
    # peer_timeout_s: a process whose heartbeat (mmjax's, every 2 s) stopped this long
    # is lost: the others exit with one line (0: off);
    # preemption_deadline_s: after a SIGTERM, exit without saving if the job has not
    # agreed to stop by then (0: no deadline); stop_check_every: steps between the
    # agreements on a stop request (a max-reduction of one int32 per device).
    c.multihost = ml_collections.ConfigDict(dict(
        init_timeout_s=300, heartbeat_timeout_s=100, shutdown_timeout_s=60,
        peer_timeout_s=30, preemption_deadline_s=300, stop_check_every=1))

    c.model = ml_collections.ConfigDict()
    c.objectives = ml_collections.ConfigDict()

    c.optim = ml_collections.ConfigDict(dict(
        lr=5e-4, warmup_steps=100, schedule="cosine", end_lr_frac=0.0,
        b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, clip_norm=1.0,
        accum_steps=1, freeze=[],
        decay_embeddings=False,        # weight decay on embeddings too (kernels always)
        # dtype of the cross-replica gradient sum of low-precision matmuls: "float32"
        # (float32 dW GEMMs) or "compute" (the compute dtype: half the bytes).
        grad_reduce_dtype="float32",
        frozen_dtype=None))            # e.g. "bfloat16": store frozen weights (a frozen LM) smaller
    # Parameter prefix -> source ("workdir:DIR[@STEP][#SUBTREE]", "hf_llama:PATH", ...);
    # see mmjax/train/init_sources.py. Frozen sourced parameters are not checkpointed.
    c.init = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    c.data.train = default_data_config()
    # Built-in data (used when data.train.shards == "synthetic"), of data.train.modality:
    # images / video frames of image_size px, video_frames frames per clip,
    # audio_seconds of sound at audio_sample_rate.
    c.synthetic = ml_collections.ConfigDict(dict(
        train_samples=20000, test_samples=1000, image_size=64, samples_per_shard=2500,
        video_frames=16, audio_seconds=2.0, audio_sample_rate=16000))

    c.evals = ml_collections.ConfigDict()
    c.evals.every = 0                  # steps between periodic evals (0: only at the end)
    c.evals.batch_size = 256
    c.evals.tfds_data_dir = ""         # TFDS data_dir for "tfds:NAME[@SPLIT]" sources
    c.evals.zeroshot = ml_collections.ConfigDict(dict(
        shards="synthetic",            # webdataset with `cls` labels, "synthetic", or
                                       # "tfds:NAME[@SPLIT]" (a prepared TFDS dataset)
        classnames="synthetic",        # file (one name per line), list, "synthetic", or
                                       # "tfds" (the dataset's label names)
        templates="simple",            # built-in set name, one "{}" template, or a file
        max_samples=0))                # 0: all
    # Image-text retrieval (Recall@1/5/10). caption_key "" = data.train.caption_key; a JSON
    # list field (e.g. "json:captions", COCO / Flickr30k style) gives several captions per
    # image, up to num_captions; an image-to-text hit is any of its captions.
    c.evals.retrieval = ml_collections.ConfigDict(dict(shards="", max_samples=0, caption_key="",
                                                       num_captions=5))
    # Captioning (CoCa, BLIP-2): greedy (beam_size=1) or beam search; BLEU-4, CIDEr.
    c.evals.captioning = ml_collections.ConfigDict(dict(
        shards="", max_samples=256, beam_size=1, max_len=32))
    # VQA accuracy (VisionLM): every question of dialog samples (JSON `text_key`), greedy.
    c.evals.vqa = ml_collections.ConfigDict(dict(
        shards="", text_key="json:qa", max_samples=256, max_new_tokens=8))
    return c


def make_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink any recipe to a few-second CPU run on the built-in data (`:tiny` arg).

    Keeps the recipe's structure (model kind, pooling, heads, objectives,
    freezing) and only reduces sizes, steps and data: the generic part here,
    the media tower's sizes from its `tiny()`, the family's own sections and
    evaluators from `Family.shrink` (`mmjax.families`).
    """
    from mmjax.families import get_family
    family = get_family(c)
    c.total_steps, c.batch_size, c.log_every, c.checkpoint_every = 3, 8, 1, 3
    c.optim.warmup_steps = 1
    c.synthetic.update(dict(train_samples=64, test_samples=32, image_size=32,
                            samples_per_shard=16))
    d = c.data.train
    d.update(dict(shards="synthetic", tokenizer="bytes", max_len=32, image_size=32,
                  workers=0, shuffle_buffer=16))
    c.evals.batch_size = 32
    c.evals.zeroshot.shards = c.evals.retrieval.shards = "synthetic"
    m = c.model
    small = dict(width=64, depth=2, heads=4, mlp_dim=128)
    if "image" in m:
        m.image.update(family.tower(m).tiny(m.image.to_dict()))
        for key in ("sample_rate", "clip_seconds", "num_frames"):  # the data feeds the tower
            if key in m.image:
                d[key] = m.image[key]
    if "text" in m:
        m.text.update(dict(vocab_size=259, max_len=32, **small))
        if m.text.get("embed_dim"):
            m.text.embed_dim = 32
    if "decoder" in m:
        m.decoder.update(dict(vocab_size=259, **small))
    if "qformer" in m:
        m.qformer.update(small)
    for key, value in (("embed_dim", 32), ("caption_queries", 4), ("pooler_heads", 4)):
        if key in m:
            m[key] = value
    family.shrink(c)
    return c
