"""Zero-shot of trained runs on full images and on images with patches dropped at
evaluation: how much of the class signal half of the patches carry.

    python benchmarks/patch_dropout_eval.py WORKDIR [WORKDIR ...] [--step N]
        [--keep 1.0 0.75 0.5] [--draws 3]

For each run (a `mmjax train` workdir of an image family with a ViT tower, e.g.
the default job) it restores the checkpoint (`--step`, default the latest),
builds the zero-shot classifier of `config.evals.zeroshot` (templates and class
names as the run's own eval) and scores the held-out images with each kept
fraction: 1.0 is the usual evaluation; below it every image keeps its own random
`layers.kept_patches(N, 1 - keep)` patches, as `model.image.patch_dropout` does
in training (same code path, `layers.drop_patches`), `--draws` masks per image,
the accuracy averaged over them. Prints one row per run and a JSON line.

A run trained with patch dropout that scores, on its own training view (half the
patches), no better than an unmasked run scored on that view has learnt nothing
from masking that the unmasked run lacks: the masked task is limited by what the
kept patches show, not by the number of steps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def masked_zero_shot(workdir: str, step, keeps: list[float], draws: int, seed: int = 0) -> dict:
    """Top-1 of a run's checkpoint on the held-out zero-shot images at each kept
    fraction: `{"workdir", "step", "patch_dropout", "unmasked_tuning_steps",
    "keep_<k>": top-1 in [0, 1] for each k of `keeps`}`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mmjax.commands.eval import load_run
    from mmjax.data.tokenizers import build_tokenizer
    from mmjax.evaluate.runner import _batches, _classnames
    from mmjax.evaluate.zeroshot import zero_shot_classifier

    config, trainer, state, step = load_run(None, workdir, step, [])
    zs = config.evals.zeroshot
    if not zs.get("shards"):
        raise SystemExit(f"{workdir}: config.evals.zeroshot.shards is empty; nothing to score")
    tokenizer = build_tokenizer(config.data.train.tokenizer, int(config.data.train.max_len))
    variables = {"params": jax.device_get(state["params"])}
    base = trainer.model
    classifier = jnp.asarray(zero_shot_classifier(
        base, variables, _classnames(config, zs.classnames), zs.templates, tokenizer))
    images, labels = [], []
    for batch in _batches(config, zs):
        valid = np.asarray(batch["valid"], bool)
        images.append(np.asarray(batch["image"])[valid])
        labels.append(np.asarray(batch["label"])[valid])
    images, labels = np.concatenate(images), np.concatenate(labels)
    out = {"workdir": workdir, "step": int(step),
           "patch_dropout": float(base.image.get("patch_dropout") or 0.0),
           "unmasked_tuning_steps": int(config.get("unmasked_tuning_steps") or 0)}
    key = jax.random.PRNGKey(seed)
    for keep in keeps:
        model = base.clone(image={**dict(base.image), "patch_dropout": round(1.0 - keep, 6)})

        @jax.jit
        def predict(v, x, k, model=model):
            e = model.apply(v, x, method="encode_image", rngs={"augment": k})
            return jnp.argmax(e @ classifier.T, axis=-1)  # cosine order: classifier rows are unit

        hits = []
        for _ in range(draws if keep < 1 else 1):
            for s in range(0, len(images), 250):
                key, sub = jax.random.split(key)
                pred = np.asarray(predict(variables, jnp.asarray(images[s:s + 250]), sub))
                hits.append(pred == labels[s:s + 250])
        out[f"keep_{keep:g}"] = float(np.mean(np.concatenate(hits)))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.75, 0.5],
                   help="fractions of the patches kept at evaluation")
    p.add_argument("--draws", type=int, default=3, help="random masks per image below 1.0")
    args = p.parse_args(argv)
    if any(not 0 < k <= 1 for k in args.keep):
        p.error(f"--keep values must be in (0, 1], got {args.keep}")
    rows = [masked_zero_shot(w, args.step, args.keep, args.draws) for w in args.workdirs]
    cols = [f"keep_{k:g}" for k in args.keep]
    print("| run | step | trained with patch_dropout | unmasked tail | "
          + " | ".join(f"zero-shot, {k:g} kept" for k in args.keep) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(cols))
    for r in rows:
        print(f"| {r['workdir']} | {r['step']} | {r['patch_dropout']:g} | "
              f"{r['unmasked_tuning_steps'] or '-'} | "
              + " | ".join(f"{100 * r[c]:.1f}%" for c in cols) + " |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
