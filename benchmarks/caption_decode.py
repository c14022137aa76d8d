"""Caption decoding speed: KV cache vs full recompute (CoCa, BLIP-2 Q-Former ITG).

Random-weight models (image 64 px, patch 16, text/decoder/Q-Former width 256,
4 layers, vocabulary 1,000), a batch of 8 images, 32 tokens, no EOS so every
row runs to the end. Each variant is compiled first; the median of 5 timed
runs is reported. Both paths produce the same tokens (checked here too).

    python benchmarks/caption_decode.py [--batch 8] [--max-len 32] [--beam 4]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from mmjax.families.captioning import (beam_search, blip2_itg_logits_fn,  # noqa: E402
                                       coca_logits_fn, greedy_decode)
from mmjax.models import Blip2Stage1, CoCa  # noqa: E402

VIT = dict(image_size=64, patch_size=16, width=256, depth=4, heads=4, mlp_dim=1024)
TOWER = dict(width=256, depth=4, heads=4, mlp_dim=1024)
VOCAB, PAD, BOS, NO_EOS = 1000, 0, 1, 10_000


def build(kind: str, max_len: int):
    if kind == "coca":
        model = CoCa(image=VIT, text=dict(vocab_size=VOCAB, max_len=max_len, **TOWER),
                     decoder=dict(vocab_size=VOCAB, **TOWER), embed_dim=256,
                     caption_queries=32, pooler_heads=4)
        return model, coca_logits_fn
    model = Blip2Stage1(image=VIT, qformer=dict(num_queries=32, vocab_size=VOCAB,
                                                max_len=max_len, cross_attention_freq=2,
                                                **TOWER),
                        embed_dim=256, dec_id=3)
    return model, blip2_itg_logits_fn


def timed(fn) -> tuple[float, np.ndarray]:
    out = fn()  # compile
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), np.asarray(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--beam", type=int, default=4)
    args = p.parse_args()
    images = np.random.default_rng(0).standard_normal(
        (args.batch, 64, 64, 3)).astype(np.float32)
    prefix = np.full((args.batch, 1), BOS, np.int32)
    rows = []
    for kind in ("coca", "blip2"):
        model, make = build(kind, args.max_len)
        variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), images[:2],
                                                 np.ones((2, args.max_len), np.int32)))
        fn = make(model, variables, images)
        for name, run in (
                ("greedy", lambda c: greedy_decode(fn, prefix, args.max_len, NO_EOS, PAD,
                                                   use_cache=c)),
                (f"beam {args.beam}", lambda c: beam_search(fn, prefix, args.beam, args.max_len,
                                                            NO_EOS, PAD, use_cache=c))):
            cached, a = timed(lambda: run(True))
            full, b = timed(lambda: run(False))
            assert np.array_equal(a, b), f"{kind} {name}: cached and recomputed tokens differ"
            rows.append((kind, name, cached, full))
    print(f"\nCaption decoding, {args.batch} images x {args.max_len} tokens, "
          f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__}, {jax.devices()[0].platform}\n")
    print("| model | decoding | KV cache (ms) | recompute (ms) | speed-up |")
    print("|---|---|---:|---:|---:|")
    for kind, name, cached, full in rows:
        print(f"| {kind} | {name} | {1e3 * cached:.0f} | {1e3 * full:.0f} | "
              f"{full / cached:.1f}x |")


if __name__ == "__main__":
    main()
