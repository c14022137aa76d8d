"""float32 GEMMs of the CPU train step: XLA (jax.jit) vs PyTorch on this CPU.

The matrix products of `benchmarks/cpu_train_step.py`'s CLIP (rows M = 64 x 50 image
tokens or 64 x 32 text tokens, width 256, MLP 1024) in the three layouts a
Dense layer's training step runs:

    fwd  y  = x @ W          [M, K] @ [K, N]      (NN)
    dx   dx = dy @ W^T       [M, N] @ [K, N]^T    (NT)
    dW   dW = x^T @ dy       [M, K]^T @ [M, N]    (TN: contraction over the rows)

Each side runs in its own process with all cores (no shared thread pools); the
median of `--reps` calls is reported per product with GFLOP/s and the ratio.

    python benchmarks/cpu_gemm.py [--reps 40]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

WIDTH, MLP = 256, 1024
ROWS = {"image": 64 * 50, "text": 64 * 32}
LAYERS = {"qkv": (WIDTH, 3 * WIDTH), "out": (WIDTH, WIDTH), "fc1": (WIDTH, MLP),
          "fc2": (MLP, WIDTH)}
LAYOUTS = ("fwd", "dx", "dW")


def cases():
    """(tower, layer, layout, M, K, N): the product `[M, K] x [K, N]` in `layout`."""
    return [(t, name, lay, m, k, n) for t, m in ROWS.items()
            for name, (k, n) in LAYERS.items() for lay in LAYOUTS]


def _median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2] * 1e3


def _operands(lay, m, k, n, rng):
    """Row-major operands as the step holds them: x [M, K], W [K, N], dy [M, N]."""
    x, w, dy = (rng.standard_normal(s).astype("float32") for s in ((m, k), (k, n), (m, n)))
    return {"fwd": (x, w), "dx": (dy, w), "dW": (x, dy)}[lay]


def _worker(side: str, reps: int, conn) -> None:
    import numpy as np
    rng = np.random.default_rng(0)
    out = []
    if side == "xla":
        from mmjax.perf.host_memory import reuse_host_memory
        reuse_host_memory()
        import jax
        import jax.numpy as jnp
        jax.config.update("jax_platforms", "cpu")
        fns = {"fwd": jax.jit(lambda a, b: a @ b), "dx": jax.jit(lambda a, b: a @ b.T),
               "dW": jax.jit(lambda a, b: a.T @ b)}
        for _, _, lay, m, k, n in cases():
            a, b = (jnp.asarray(v) for v in _operands(lay, m, k, n, rng))
            f = fns[lay]
            out.append(_median_ms(lambda: f(a, b).block_until_ready(), reps))
    else:
        import torch
        torch.set_num_threads(os.cpu_count())
        fns = {"fwd": lambda a, b: a @ b, "dx": lambda a, b: a @ b.t(),
               "dW": lambda a, b: a.t() @ b}
        for _, _, lay, m, k, n in cases():
            a, b = (torch.from_numpy(v) for v in _operands(lay, m, k, n, rng))
            f = fns[lay]
            with torch.no_grad():
                out.append(_median_ms(lambda: f(a, b), reps))
    conn.send(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=40)
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    res = {}
    for side in ("xla", "pytorch"):  # one after the other: no competition for the cores
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(side, args.reps, child), daemon=True)
        proc.start()
        res[side] = parent.recv()
        proc.join(timeout=30)
    print("| tower | layer | product | M x K x N | XLA ms | PyTorch ms | XLA GFLOP/s | "
          "PyTorch GFLOP/s | XLA / PyTorch speed |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    tot = {lay: [0.0, 0.0] for lay in LAYOUTS}
    for (t, name, lay, m, k, n), xs, ts in zip(cases(), res["xla"], res["pytorch"]):
        flop = 2.0 * m * k * n
        tot[lay][0] += xs
        tot[lay][1] += ts
        print(f"| {t} | {name} | {lay} | {m} x {k} x {n} | {xs:.2f} | {ts:.2f} | "
              f"{flop / xs / 1e6:.0f} | {flop / ts / 1e6:.0f} | {ts / xs:.2f}x |")
    for lay, (xs, ts) in tot.items():
        print(f"{lay}: all products {xs:.1f} ms (XLA) vs {ts:.1f} ms (PyTorch): {ts / xs:.2f}x")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
