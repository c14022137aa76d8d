"""CLAP with an AST-B/16 audio tower (LAION-CLAP recipe shape) for pods.

    mmjax train --config configs/clap_base.py --workdir gs://bucket/runs/clap \
        --config.data.train.shards='/data/laion-audio-630k/{00000..00999}.tar'

Shards hold `key.flac|wav|ogg|mp3` + `key.txt` (or `key.json` with
`--config.data.train.caption_key=json:text`), the layout of LAION-Audio-630K.
Audio is decoded on the host (mono, resampled to 16 kHz, a random 10.24 s crop
or zero-padding), the log-mel and SpecAugment run on device.

To start the audio tower from AudioSet-pretrained AST weights (a Hugging Face
`ASTModel` or `ASTForAudioClassification` folder, e.g.
MIT/ast-finetuned-audioset-10-10-0.4593), add

        --config.init.image_tower=hf_ast:/path/ast-finetuned-audioset-10-10-0.4593

(`mmjax.train.init_sources`, through `mmjax.convert.ast.load_ast`). The tower
below has those checkpoints' shapes: 128 mel bins, 16x16 patches with strides
10, 12 x 101 patches of a 10.24 s clip (the 1024-frame checkpoints' position
embeddings), width 768, 12 layers; the projection to the 512-d joint space
(`embed_dim`), which `ASTModel` lacks, starts from its random init. The
waveform front end approximates AST's Kaldi fbank (see `mmjax.models.ast`).
LAION-CLAP (HTS-AT + RoBERTa) reports ESC-50 zero-shot top-1 around 0.9 after
training on LAION-Audio-630K and more.

The text is RoBERTa's byte-level BPE, as LAION-CLAP's text encoder reads it
(`tokenizer="hub:FacebookAI/roberta-base"`: 50,265 ids, `<s>` 0 first, `<pad>` 1,
`</s>` 2 last, the id the text tower pools at), from the Hugging Face hub cache
(fetched on first use; offline, the error names the command that fetches it); the
model's vocabulary size and ids are checked against it before anything is built.
The text tower is trained from scratch (a 12-layer, 512-wide causal Transformer,
not RoBERTa's weights). `:tiny` shrinks it to a 3-step CPU run with the same
tokenizer.
"""
from mmjax.config.defaults import base_config, make_tiny


def get_config(arg=None):
    c = base_config()
    c.total_steps = 100_000
    c.batch_size = 2304
    c.log_every = 100
    c.checkpoint_every = 2000
    c.optim.update(dict(lr=1e-4, warmup_steps=3200, weight_decay=0.0))
    # FSDP weights gathered once in the forward pass and kept for the backward (+0.1 GiB
    # a chip): the step's collectives drop below the FSDP minimum (BENCHMARKS.md).
    c.mesh.update(dict(data=-1, fsdp=8, tensor=1, fsdp_weights="gather_once"))
    d = c.data.train
    d.sample_rate = 16000
    d.clip_seconds = 10.24
    d.shards = None  # set to your shards
    d.max_len, d.augment, d.workers, d.resampled = 77, "rrc", 8, True
    c.model.name = "two_tower"
    c.model.contrastive = "softmax"
    c.model.dtype = "bfloat16"
    c.model.image = dict(kind="ast", sample_rate=16000, clip_seconds=10.24, n_mels=128,
                         patch_size=16, frequency_stride=10, time_stride=10,
                         width=768, depth=12, heads=12, pool="cls_dist", embed_dim=512,
                         spec_augment=dict(time_masks=2, time_width=192, freq_masks=2,
                                           freq_width=48),
                         scan=True, remat="full")  # 1,214 tokens a clip: recompute all
    d.tokenizer = "hub:FacebookAI/roberta-base"  # LAION-CLAP's text side is RoBERTa
    c.model.text = dict(vocab_size=50265, max_len=77, width=512, depth=12, heads=8,
                        embed_dim=512, causal=True, pool="eos", eos_id=2, pad_id=1,
                        act="gelu", scan=True, remat="dots_no_batch")
    c.objectives.softmax_contrastive = 1.0
    c.evals.zeroshot.shards = ""
    return make_tiny(c) if arg == "tiny" else c
