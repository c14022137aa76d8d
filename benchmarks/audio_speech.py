"""The tiny CLAP recipe on spoken words vs a linear probe on pooled log-mel features.

    python benchmarks/audio_speech.py --out /tmp/speech [--steps 400] [--seeds 0 1]
        [--norm fixed example dataset] [-- EXTRA mmjax train FLAGS]

1. Writes the spoken-word set (`mmjax.data.synthetic_speech`: 32 confusable words,
   eSpeak NG voices, noise, random offsets; 12,000 training clips, 960 test clips of
   voices the training split never uses) to `OUT/shards` (once).
2. Linear probe: multinomial logistic regression on the time-pooled log-mel (mean
   and standard deviation of each of 64 mel bins, the recipe's front end) of a
   quarter of the training clips (3,000), L2 weight picked on a held-out fifth of
   them; top-1 on the test clips.
3. For each normalisation in `--norm` and each seed: `mmjax train --config
   configs/clap_tiny.py` on the shards (zero-shot on the test clips at the end):
   `fixed` = AST's AudioSet numbers, `example` = each clip by its own statistics,
   `dataset` = `spec_mean=spec_std=None`, measured on the shards when the run
   starts; with `--builtin`, the same recipe on the built-in sounds too.
Prints one table row per run and writes `OUT/results.json`.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_set(folder: str, train: int, test: int) -> None:
    from mmjax.data.synthetic_speech import CLASSES, write_speech_shards
    if os.path.exists(os.path.join(folder, "classnames.txt")):
        return
    t = time.time()
    write_speech_shards(folder, train, "train", samples_per_shard=1500)
    write_speech_shards(folder, test, "test", samples_per_shard=480)
    with open(os.path.join(folder, "classnames.txt"), "w") as f:
        f.write("\n".join(CLASSES) + "\n")
    print(f"wrote {train} + {test} clips in {time.time() - t:.0f} s", flush=True)


def read_clips(paths: list[str], limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `limit` clips of `paths` -> (waves [N, S] float32, labels [N])."""
    import soundfile as sf
    waves, labels = {}, {}
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.rsplit(".", 1)
                data = tar.extractfile(m).read()
                if ext == "flac":
                    waves[key] = sf.read(io.BytesIO(data), dtype="float32")[0]
                elif ext == "cls":
                    labels[key] = int(data)
        if len(waves) >= limit:
            break
    keys = sorted(waves)[:limit]
    return np.stack([waves[k] for k in keys]), np.array([labels[k] for k in keys])


def pooled_log_mel(waves: np.ndarray) -> np.ndarray:
    """[N, S] -> [N, 128]: mean and std over time of the recipe's 64-bin log-mel."""
    import jax
    from mmjax.models.ast import AST
    tower = AST(sample_rate=16000, clip_seconds=1.0, n_mels=64)
    spec = jax.jit(lambda w: tower.apply({}, w, method="spectrogram"))
    out = [np.asarray(spec(waves[i:i + 256])) for i in range(0, len(waves), 256)]
    s = np.concatenate(out)
    return np.concatenate([s.mean(1), s.std(1)], axis=1)


def logistic_regression(x, y, classes, l2, steps=500):
    """Multinomial logistic regression (L-BFGS, L2 `l2` on the weights) -> (W, b)."""
    import jax
    import jax.numpy as jnp
    import optax

    def loss(p):
        logits = x @ p["w"] + p["b"]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return nll + l2 * jnp.sum(p["w"] ** 2)
    params = {"w": jnp.zeros((x.shape[1], classes)), "b": jnp.zeros(classes)}
    opt = optax.lbfgs()
    state = opt.init(params)
    value_and_grad = optax.value_and_grad_from_state(loss)

    @jax.jit
    def step(params, state):
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(params, updates), state
    for _ in range(steps):
        params, state = step(params, state)
    return params


def linear_probe(folder: str, n_train: int) -> dict:
    from mmjax.data.synthetic_speech import CLASSES
    xtr, ytr = read_clips(sorted(glob.glob(os.path.join(folder, "train-*.tar"))), n_train)
    xte, yte = read_clips(sorted(glob.glob(os.path.join(folder, "test-*.tar"))), 10 ** 9)
    ftr, fte = pooled_log_mel(xtr), pooled_log_mel(xte)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    n_fit = int(0.8 * len(ftr))
    best = None
    for l2 in (0.0, 1e-5, 1e-4, 1e-3, 1e-2):
        p = logistic_regression(ftr[:n_fit], ytr[:n_fit], len(CLASSES), l2)
        acc = float(np.mean(np.argmax(ftr[n_fit:] @ p["w"] + p["b"], 1) == ytr[n_fit:]))
        if best is None or acc > best[1]:
            best = (l2, acc)
    p = logistic_regression(ftr, ytr, len(CLASSES), best[0])
    train_acc = float(np.mean(np.argmax(ftr @ p["w"] + p["b"], 1) == ytr))
    test_acc = float(np.mean(np.argmax(fte @ p["w"] + p["b"], 1) == yte))
    return dict(train_clips=len(ftr), test_clips=len(fte), l2=best[0], train_top1=train_acc,
                top1=test_acc)


def train(workdir: str, flags: list[str]) -> dict:
    cmd = [sys.executable, "-m", "mmjax.cli", "train", "--config",
           os.path.join(ROOT, "configs", "clap_tiny.py"), "--workdir", workdir] + flags
    t = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - t
    evals = sorted(glob.glob(os.path.join(workdir, "eval", "step_*.json")))
    metrics = json.load(open(evals[-1]))
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    return dict(wall_s=round(wall, 1), metrics=metrics, losses=losses)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--norm", nargs="+", default=["fixed", "example", "dataset"])
    ap.add_argument("--builtin", action="store_true", help="also run the built-in sounds")
    ap.add_argument("--skip-probe", action="store_true")
    ap.add_argument("extra", nargs="*", help="further `mmjax train` flags (after --)")
    a = ap.parse_args()
    shards = os.path.join(a.out, "shards")
    write_set(shards, 12000, 960)
    results = {}
    path = os.path.join(a.out, "results.json")
    if os.path.exists(path):
        results = json.load(open(path))
    if not a.skip_probe:
        results["probe"] = linear_probe(shards, 3000)
        print("linear probe:", results["probe"], flush=True)
    data = [f"--config.data.train.shards={shards}/train-{{000000..000007}}.tar",
            f"--config.evals.zeroshot.shards={shards}/test-{{000000..000001}}.tar",
            f"--config.evals.zeroshot.classnames={shards}/classnames.txt",
            "--config.evals.zeroshot.templates=the word {}",
            f"--config.evals.retrieval.shards={shards}/test-{{000000..000001}}.tar"]
    for norm in a.norm:
        for seed in a.seeds:
            for name, flags in [("speech", data)] + ([("builtin", [])] if a.builtin else []):
                tag = f"{name}-{norm}-s{seed}" + ("-" + "_".join(a.extra) if a.extra else "")
                wd = os.path.join(a.out, "runs", tag.replace("/", "_")[:120])
                norm_flags = (["--config.model.image.spec_norm=fixed",
                               "--config.model.image.spec_mean=None",
                               "--config.model.image.spec_std=None"] if norm == "dataset" else
                              [f"--config.model.image.spec_norm={norm}"])
                r = train(wd, flags + norm_flags + [f"--config.seed={seed}"] + a.extra)
                results[tag] = r
                m = r["metrics"]
                z = {k: v for k, v in m.items() if "zeroshot" in k}
                print(f"{tag}: {z} wall {r['wall_s']} s, loss "
                      f"{[round(l, 2) for _, l in r['losses']]}", flush=True)
                json.dump(results, open(path, "w"), indent=1)


if __name__ == "__main__":
    main()
