"""Train-step speed on this CPU: mmjax vs Hugging Face `transformers` CLIPModel (PyTorch).

The same small CLIP on both sides (ViT width 256, depth 6, patch 16, 112 px;
text width 256, depth 6, length 32; projection 256; batch 64; AdamW; CLIP
softmax loss). Rounds alternate between the two frameworks so that load from
other processes affects both alike; each side lives in its own process (no
shared thread pools) with a pause between rounds; the median step time of each side is
reported with the ratio of samples/s (mmjax / PyTorch).

    python benchmarks/cpu_train_step.py [--dtype float32|bfloat16] [--layers unrolled|scan]
                                        [--rounds 5] [--steps 5]
                                        [--mmjax-malloc reuse|default] [--torch-malloc default|reuse]

The mmjax process starts as `mmjax train` does, with `mmjax.perf.host_memory.reuse_host_memory`
(XLA's per-step temporary buffer reused instead of mapped and zeroed afresh by the kernel)
and glibc's heap on transparent huge pages (`hugepage_environ`, where the kernel and glibc
offer them); `--torch-malloc reuse` gives the PyTorch process the same glibc settings.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

B, IMG, PATCH, WIDTH, DEPTH, HEADS, TXT_LEN, VOCAB, PROJ = 64, 112, 16, 256, 6, 4, 32, 49408, 256


def torch_step_fn(dtype: str):
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                         num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                         max_position_embeddings=TXT_LEN, hidden_act="gelu"),
        vision_config=dict(image_size=IMG, patch_size=PATCH, hidden_size=WIDTH,
                           intermediate_size=4 * WIDTH, num_hidden_layers=DEPTH,
                           num_attention_heads=HEADS, hidden_act="gelu"),
        projection_dim=PROJ)
    model = transformers.CLIPModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6,
                            weight_decay=0.2)
    pixels = torch.randn(B, 3, IMG, IMG)
    ids = torch.randint(3, VOCAB - 1, (B, TXT_LEN))
    ids[:, -1] = VOCAB - 1  # EOT = highest id (legacy CLIP pooling)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = model(input_ids=ids, pixel_values=pixels, return_loss=True)
        out.loss.backward()
        opt.step()
        return float(out.loss.detach())
    return step


def jax_step_fn(dtype: str, scan: bool = False):
    import jax
    import numpy as np
    from mmjax.models import build
    from mmjax.train import sharding as shd
    from mmjax.config.defaults import base_config
    from mmjax.train.optimizer import build_optimizer
    from mmjax.train.step import Trainer

    c = base_config()
    c.batch_size = B
    c.optim.update(dict(lr=1e-4, warmup_steps=0, schedule="const", clip_norm=None))
    c.data.train.image_size, c.data.train.max_len = IMG, TXT_LEN
    c.model.name, c.model.contrastive, c.model.dtype = "two_tower", "softmax", dtype
    c.model.image = dict(image_size=IMG, patch_size=PATCH, width=WIDTH, depth=DEPTH,
                         heads=HEADS, pool="cls", ln_pre=True, patch_bias=False,
                         embed_dim=PROJ, act="gelu", scan=scan)
    c.model.text = dict(vocab_size=VOCAB, max_len=TXT_LEN, width=WIDTH, depth=DEPTH,
                        heads=HEADS, embed_dim=PROJ, causal=True, pool="eos",
                        eos_id=VOCAB - 1, pad_id=0, act="gelu", scan=scan)
    c.objectives.softmax_contrastive = 1.0
    mesh = shd.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    tx, schedule = build_optimizer(c.optim, 1000)
    trainer = Trainer(c, build(c.model), tx, schedule, mesh)
    state = {"s": trainer.init_state(0)}
    rng = np.random.RandomState(0)
    ids = rng.randint(3, VOCAB - 1, (B, TXT_LEN)).astype(np.int32)
    ids[:, -1] = VOCAB - 1
    batch = jax.device_put({"image": rng.randn(B, IMG, IMG, 3).astype(np.float32),
                            "text": ids}, trainer.batch_sharding)

    def step():
        state["s"], metrics = trainer.step(state["s"], batch)
        return float(metrics["loss"])
    return step


def _worker(side: str, dtype: str, scan: bool, conn, reuse_memory: bool) -> None:
    """Owns one framework in its own process; times `n` steps when asked."""
    if reuse_memory:  # what `mmjax train` does first (mmjax.perf.host_memory)
        from mmjax.perf.host_memory import reuse_host_memory
        reuse_host_memory()
    if side == "pytorch":
        import torch
        torch.set_num_threads(os.cpu_count())
    fn = torch_step_fn(dtype) if side == "pytorch" else jax_step_fn(dtype, scan)
    fn(), fn()  # compile / warm up
    conn.send("ready")
    while True:
        n = conn.recv()
        if n is None:
            return
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        conn.send((time.perf_counter() - t0) / n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--layers", choices=("unrolled", "scan"), default="unrolled",
                   help="mmjax layer stack: unrolled (config `scan=False`) or nn.scan")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--torch-malloc", choices=("default", "reuse"), default="default",
                   help="PyTorch's process: glibc as shipped, or the host-memory reuse that "
                        "mmjax's commands switch on (mmjax.perf.host_memory)")
    p.add_argument("--mmjax-malloc", choices=("default", "reuse"), default="reuse",
                   help="mmjax's process: as `mmjax train` runs (reuse) or glibc as shipped")
    args = p.parse_args(argv)
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    sides, procs = {}, []
    from mmjax.perf.host_memory import hugepage_environ
    for side in ("pytorch", "mmjax"):  # one process each: no shared thread pools
        parent, child = ctx.Pipe()
        reuse = (args.torch_malloc if side == "pytorch" else args.mmjax_malloc) == "reuse"
        proc = ctx.Process(target=_worker, daemon=True,
                           args=(side, args.dtype, args.layers == "scan", child, reuse))
        saved = dict(os.environ)
        if reuse:  # glibc reads its tunables when a process starts: the child's environment
            os.environ.update(hugepage_environ() or {})
        proc.start()
        os.environ.clear()
        os.environ.update(saved)
        assert parent.recv() == "ready"
        sides[side], procs = parent, procs + [proc]
    times = {k: [] for k in sides}
    for _ in range(args.rounds):
        for name, conn in sides.items():
            time.sleep(1.0)  # let the other side's thread pool stop spinning
            conn.send(args.steps)
            times[name].append(conn.recv())
    for conn in sides.values():
        conn.send(None)
    for proc in procs:
        proc.join(timeout=30)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("| side | dtype | median step (s) | samples/s |")
    print("|---|---|---:|---:|")
    for k in sides:
        name = f"{k} ({args.layers})" if k == "mmjax" else k
        print(f"| {name} | {args.dtype} | {med[k]:.3f} | {B / med[k]:.1f} |")
    print(f"\nratio mmjax / pytorch samples/s: {med['pytorch'] / med['mmjax']:.2f}x "
          f"(host malloc: mmjax {args.mmjax_malloc}, pytorch {args.torch_malloc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
