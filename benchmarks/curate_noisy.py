"""Curation on a noisy web stand-in: train -> curate -> train, against a random subset.

The built-in training images (configs/clip_tiny.py's 20,000 at 32x32) with a
fraction (default 50%) of their captions replaced by captions of other images
(`"noisy": true` in each replaced sample's JSON, which nothing but this report
reads). Then, each through the `mmjax` command line:

1. `mmjax train` (the default job, clip_tiny) on the noisy shards;
2. `mmjax curate` with that run, keeping `--keep-fraction` (default 0.5) by
   CLIP score;
3. `mmjax train` on the curated shards, and on a random subset of the noisy
   shards of the same size, for the same number of steps;
4. with `--captioner-recipe`, also a CoCa captioner trained on the noisy
   shards and a CapFilt curate (web + synthetic captions kept by the same
   filter), then a run on those shards.

Prints a markdown table (held-out zero-shot top-1 of each run on the built-in
test split, kept pairs, the fraction of kept pairs that were noisy) and writes
it as JSON to `--out/results.json`.

    python benchmarks/curate_noisy.py --out /tmp/curate_noisy
    python benchmarks/curate_noisy.py --out /tmp/curate_noisy --steps 400 --seeds 0 1
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax.data.tario import iter_tar_samples  # noqa: E402
from mmjax.evaluate.curate import write_shard  # noqa: E402


def run(cmd: list[str], log: str) -> None:
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}); see {log}")
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)


def write_noisy(clean_dir: str, noisy_dir: str, fraction: float, seed: int) -> None:
    """The clean shards with `fraction` of the captions moved to other images."""
    import io
    import tarfile
    paths = sorted(glob.glob(os.path.join(clean_dir, "*.tar")))
    samples = []
    for p in paths:
        with open(p, "rb") as f:
            samples += [(p, key, members) for _, key, members in iter_tar_samples(f)]
    rng = np.random.default_rng(seed)
    n = len(samples)
    noisy = rng.permutation(n)[:int(round(fraction * n))]
    # A cyclic shift of the chosen samples' captions: each gets another image's.
    captions = {int(i): samples[int(j)][2]["txt"] for i, j in zip(noisy, np.roll(noisy, 1))}
    os.makedirs(noisy_dir, exist_ok=True)
    by_shard = {}
    for i, (p, key, members) in enumerate(samples):
        m = dict(members)
        doc = json.loads(m.get("json", b"{}"))
        if i in captions:
            m["txt"] = captions[i]
            doc["noisy"] = True
        m["json"] = json.dumps(doc, sort_keys=True).encode()
        by_shard.setdefault(p, []).append((key, m))
    for p, items in by_shard.items():
        with tarfile.open(os.path.join(noisy_dir, os.path.basename(p)), "w",
                          format=tarfile.GNU_FORMAT) as tar:
            for key, m in items:
                for ext in sorted(m):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(m[ext])
                    tar.addfile(info, io.BytesIO(m[ext]))


def noisy_share(shard_dir: str) -> tuple[int, float]:
    """(samples, fraction whose JSON says noisy) of the shards in `shard_dir`."""
    n = bad = 0
    for p in sorted(glob.glob(os.path.join(shard_dir, "*.tar"))):
        with open(p, "rb") as f:
            for _, _, m in iter_tar_samples(f):
                n += 1
                bad += bool(json.loads(m.get("json", b"{}")).get("noisy"))
    return n, bad / max(n, 1)


def random_subset(noisy_dir: str, out_dir: str, count: int, seed: int) -> None:
    """`count` samples of the noisy shards drawn at random, written as curate writes."""
    paths = sorted(glob.glob(os.path.join(noisy_dir, "*.tar")))
    keys = []
    for p in paths:
        with open(p, "rb") as f:
            keys += [(p, key) for _, key, _ in iter_tar_samples(f)]
    pick = np.random.default_rng(seed + 1).permutation(len(keys))[:count]
    chosen = {}
    for i in pick:
        chosen.setdefault(keys[i][0], {})[keys[i][1]] = {"random": True}
    os.makedirs(out_dir, exist_ok=True)
    for p in paths:
        write_shard(p, os.path.join(out_dir, os.path.basename(p)), chosen.get(p, {}), {})


def zeroshot(workdir: str) -> float:
    files = sorted(glob.glob(os.path.join(workdir, "eval", "step_*.json")),
                   key=lambda f: int(f.rsplit("_", 1)[1][:-5]))
    with open(files[-1]) as f:
        return float(json.load(f)["zeroshot/top1"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--noise", type=float, default=0.5)
    p.add_argument("--keep-fraction", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--captioner-recipe", default=None,
                   help="e.g. configs/coca_tiny.py: also CapFilt with a captioner trained on "
                        "the noisy shards")
    a = p.parse_args()
    mmjax = [sys.executable, "-m", "mmjax.cli"]
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    clean, noisy = os.path.join(out, "clean"), os.path.join(out, "noisy")
    if not os.path.isdir(clean):
        run(mmjax + ["shards", "--synthetic", "--num-samples", "20000", "--image-size", "32",
                     "--max-count", "2000", "--out", clean, "--quiet"], f"{out}/shards.log")
    if not os.path.isdir(noisy):
        write_noisy(clean, noisy, a.noise, 0)
    pattern = os.path.join(noisy, "*.tar")
    common = [f"--config.total_steps={a.steps}"]
    rows = []
    for seed in a.seeds:
        res = {"seed": seed}
        train = lambda name, shards, extra=(): run(  # noqa: E731
            mmjax + ["train", "--config", "configs/clip_tiny.py", "--workdir",
                     f"{out}/{name}_s{seed}", f"--config.data.train.shards={shards}",
                     f"--config.seed={seed}"] + common + list(extra),
            f"{out}/{name}_s{seed}.log")
        if not os.path.exists(f"{out}/noisy_s{seed}/eval"):
            train("noisy", pattern)
        res["noisy"] = zeroshot(f"{out}/noisy_s{seed}")
        cur = f"{out}/curated_s{seed}"
        run(mmjax + ["curate", "--workdir", f"{out}/noisy_s{seed}", "--shards", pattern,
                     "--out", cur, "--keep-fraction", str(a.keep_fraction), "--quiet"],
            f"{cur}.log")
        kept, noisy_kept = noisy_share(cur)
        res.update(kept=kept, kept_noisy=noisy_kept)
        if not os.path.exists(f"{out}/train_curated_s{seed}/eval"):
            train("train_curated", os.path.join(cur, "*.tar"))
        res["curated"] = zeroshot(f"{out}/train_curated_s{seed}")
        rnd = f"{out}/random_s{seed}"
        if not os.path.isdir(rnd):
            random_subset(noisy, rnd, kept, seed)
        res["random_noisy"] = noisy_share(rnd)[1]
        if not os.path.exists(f"{out}/train_random_s{seed}/eval"):
            train("train_random", os.path.join(rnd, "*.tar"))
        res["random"] = zeroshot(f"{out}/train_random_s{seed}")
        if a.captioner_recipe:
            cap = f"{out}/captioner_s{seed}"
            if not os.path.exists(f"{cap}/eval"):
                run(mmjax + ["train", "--config", a.captioner_recipe, "--workdir", cap,
                             f"--config.data.train.shards={pattern}", f"--config.seed={seed}",
                             f"--config.total_steps={a.steps}"], f"{cap}.log")
            cf = f"{out}/capfilt_s{seed}"
            run(mmjax + ["curate", "--workdir", f"{out}/noisy_s{seed}", "--shards", pattern,
                         "--out", cf, "--keep-fraction", str(a.keep_fraction),
                         "--captioner", cap, "--quiet"], f"{cf}.log")
            with open(os.path.join(cf, "curate.json")) as f:
                res["capfilt_synthetic"] = json.load(f)["summary"]["kept_synthetic"]
            res["capfilt_samples"] = noisy_share(cf)[0]
            if not os.path.exists(f"{out}/train_capfilt_s{seed}/eval"):
                train("train_capfilt", os.path.join(cf, "*.tar"))
            res["capfilt"] = zeroshot(f"{out}/train_capfilt_s{seed}")
        rows.append(res)
        print(json.dumps(res), flush=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(noise=a.noise, keep_fraction=a.keep_fraction, steps=a.steps, rows=rows),
                  f, indent=1)
    print("| seed | noisy run | curated | random subset | kept | noisy among kept | "
          "noisy in random |" + (" CapFilt |" if a.captioner_recipe else ""))
    for r in rows:
        print(f"| {r['seed']} | {r['noisy']:.1%} | {r['curated']:.1%} | {r['random']:.1%} | "
              f"{r['kept']} | {r['kept_noisy']:.1%} | {r['random_noisy']:.1%} |" +
              (f" {r['capfilt']:.1%} (+{r['capfilt_synthetic']} captions) |"
               if a.captioner_recipe else ""))


if __name__ == "__main__":
    main()
