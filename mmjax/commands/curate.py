"""`mmjax curate`: score every pair of webdataset shards with a trained model (or
imported CLIP / SigLIP weights), optionally re-caption the images with a
captioner (CapFilt), keep the best pairs and write them as new shards
(`mmjax.evaluate.curate` holds the scoring, choosing and writing).

    mmjax curate --workdir RUN --shards 'web/{000000..000099}.tar' --out curated \\
        --keep-fraction 0.5 [--by clip|itm] [--dedup 0.95] [--captioner CAPRUN]
    mmjax train --config configs/clip_tiny.py --config.data.train.shards='curated/*.tar'

Layout of `--out`:

* `<shard>.tar`: the kept samples of each input shard, original keys and
  members, the scores in the JSON member (`"curate": {...}`); a kept
  synthetic caption is a sample of its own, `<key>_syn`;
* `scores/<shard>.jsonl`: the scores table, one line per readable pair (key,
  caption, scores, synthetic caption), `scores/<shard>.emb.npy` the media
  embeddings (de-duplication), `scores/<shard>.scored.json` the shard's counts
  (bad samples by reason);
* `curate.json`: the request, the threshold, totals and per-shard counts;
  `sizes.json`: samples per output shard.

Resumable: a shard whose scores (or output) are complete is not redone, so
after a kill the same command goes on; a new `--keep-fraction` / `--threshold`
/ `--by` / `--dedup` on the same `--out` re-uses the scores and rewrites the
shards. Multi-process: start it as `mmjax train` (launch/, SLURM, TPU pods);
process p scores and writes input shards p, p + P, ... on its own devices;
between the passes each waits for every process's scores (`--wait-timeout`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Optional

import numpy as np

from mmjax.commands.util import error_text, fail, split_overrides, user_errors
from mmjax.errors import UserError

log = logging.getLogger("mmjax")


class CurateError(UserError, RuntimeError):
    """A curate request that cannot run (the message names the flag or file)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmjax curate",
        usage="mmjax curate (--workdir RUN | --hf PATH) --shards PATTERN --out DIR "
              "(--keep-fraction F | --threshold T) [options] [--config.KEY=VALUE ...]",
        description="Score the pairs of webdataset shards with a trained model, keep the best "
                    "(and, with --captioner, the best synthetic captions: CapFilt) and write "
                    "them as new shards with their scores.",
        epilog="--config.a.b=value sets a key of the scoring run's config, e.g. "
               "--config.data.train.caption_key=json:caption for the input shards' caption.")
    p.add_argument("--workdir", default=None, metavar="RUN",
                   help="the scoring model: a training run's folder (two-tower, CoCa: CLIP "
                        "score; BLIP-2 stage 1, one-tower: CLIP score and ITM)")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="its checkpoint step (default latest)")
    p.add_argument("--hf", default=None, metavar="PATH",
                   help="instead of --workdir: a Hugging Face CLIP / SigLIP folder")
    p.add_argument("--shards", required=True, metavar="PATTERN",
                   help="input shards: path, glob or brace pattern, local or remote (fsspec)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (local)")
    p.add_argument("--keep-fraction", type=float, default=None, metavar="F",
                   help="keep the best F of the readable pairs (global, exact)")
    p.add_argument("--threshold", type=float, default=None, metavar="T",
                   help="keep the pairs whose score is >= T")
    p.add_argument("--by", default=None, choices=("clip", "itm"),
                   help="score to filter by (default: itm where the model has it, else clip)")
    p.add_argument("--dedup", type=float, default=None, metavar="COS",
                   help="drop every pair whose media embedding has cosine >= COS with a "
                        "better-scored pair's (near-duplicates), before filtering")
    p.add_argument("--captioner", default=None, metavar="RUN",
                   help="a captioning run (CoCa, BLIP-2 stage 1): re-caption each image and keep "
                        "its synthetic caption when it passes the same filter (CapFilt)")
    p.add_argument("--captioner-step", type=int, default=None, metavar="N",
                   help="the captioner's checkpoint step (default latest)")
    p.add_argument("--caption-max-len", type=int, default=None, metavar="N",
                   help="tokens of a synthetic caption (default the captioner's max_len)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="pairs per model call")
    p.add_argument("--decode-threads", type=int, default=None, metavar="N",
                   help="threads decoding media (default: the CPU cores)")
    p.add_argument("--wait-timeout", type=float, default=3600.0, metavar="S",
                   help="multi-process: seconds to wait for the other processes' scores")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def curate_command(argv: list[str]) -> int:
    """Runs `mmjax curate` with `argv` (without the subcommand); returns the exit code."""
    rest, overrides = split_overrides(argv)
    args = _parser().parse_args(rest)
    try:
        summary = run_curate(args, overrides)
    except user_errors() as e:
        return fail(error_text(e))
    if summary is not None:
        print(summary_line(summary))
    return 0


def summary_line(s: dict) -> str:
    """One line: pairs read, kept, threshold, bad samples."""
    bad = ", ".join(f"{k}={v}" for k, v in sorted(s["bad"].items())) or "none"
    syn = f" + {s['kept_synthetic']} synthetic captions" if s.get("captioner") else ""
    return (f"curated {s['pairs']} pairs from {s['shards']} shards: kept {s['kept']}{syn} "
            f"(by {s['by']} >= {s['threshold']:.4f}; {s['duplicates']} near-duplicates "
            f"dropped); bad samples: {bad}; wrote {s['out']}")


# ---------------------------------------------------------------- the job


def _check_args(args) -> None:
    if (args.keep_fraction is None) == (args.threshold is None):
        raise CurateError("give one of --keep-fraction F (0 < F <= 1) or --threshold T")
    if args.keep_fraction is not None and not 0.0 < args.keep_fraction <= 1.0:
        raise CurateError(f"--keep-fraction {args.keep_fraction}: give a fraction in (0, 1]")
    if bool(args.workdir) == bool(args.hf):
        raise CurateError("give the scoring model: --workdir RUN or --hf PATH")
    if args.batch_size < 1:
        raise CurateError(f"--batch-size {args.batch_size}: give a positive number")
    if "://" in args.out and not args.out.startswith("file://"):
        raise CurateError(f"--out {args.out}: give a local (or mounted) folder")
    if args.dedup is not None and not -1.0 <= args.dedup <= 1.0:
        raise CurateError(f"--dedup {args.dedup}: give a cosine in [-1, 1], e.g. 0.95")


def _out_names(paths: list[str]) -> list[str]:
    """Output shard names: the input basenames, prefixed by their position when two
    input shards share one."""
    base = [os.path.basename(p.rstrip("/")) for p in paths]
    names = base if len(set(base)) == len(base) else [f"{i:06d}-{b}" for i, b in enumerate(base)]
    return [n if n.endswith(".tar") else n + ".tar" for n in names]


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class _Model:
    """The scoring (or captioning) model: config, module, host variables, data options."""

    def __init__(self, config, model, variables, source: dict):
        self.config, self.model, self.variables, self.source = config, model, variables, source


def _load(workdir: Optional[str], hf: Optional[str], step: Optional[int],
          overrides: list[str]) -> _Model:
    from mmjax.commands.eval import load_hf, load_run
    from mmjax.evaluate.gather import host_variables
    if hf:
        config, model, variables, kind = load_hf(hf, overrides)
        return _Model(config, model, variables, {"hf": os.path.abspath(hf), "type": kind})
    config, trainer, state, step = load_run(None, workdir, step, overrides)
    variables = host_variables({"params": state["params"]})
    return _Model(config, trainer.model, variables,
                  {"workdir": os.path.abspath(workdir), "step": int(step)})


def _options(m: _Model, shards: list[str]):
    """Eval `DataOptions` of model `m` over `shards` (center crops, its normalization)."""
    from mmjax.data.options import build_options
    from mmjax.families import get_family
    family = get_family(m.config)
    data = family.data_config(m.config)
    data.shards = "::".join(shards)
    return build_options(data, mode="eval", process_index=0, process_count=1, seed=0,
                         tokenizer=None, media=family.media(m.config.model))


def run_curate(args, overrides: list[str]) -> Optional[dict]:
    """The whole job (see the module docstring); returns the summary on process 0
    (None on the others)."""
    import jax

    from mmjax.data.sources import expand_shards
    from mmjax.train import multihost
    _check_args(args)
    multihost.join()
    pid, nproc = jax.process_index(), jax.process_count()
    try:
        paths = expand_shards(args.shards, key="--shards")
    except UserError as e:
        raise CurateError(str(e)) from None
    out = args.out[len("file://"):] if args.out.startswith("file://") else args.out
    if any(os.path.abspath(os.path.dirname(p)) == os.path.abspath(out) for p in paths
           if "://" not in p):
        raise CurateError(f"--out {args.out} holds input shards; choose another folder")
    os.makedirs(os.path.join(out, "scores"), exist_ok=True)
    names = _out_names(paths)

    scorer = _load(args.workdir, args.hf, args.step, overrides)
    from mmjax.evaluate.curate import available_scores
    kinds = available_scores(scorer.model)
    if not kinds:
        raise CurateError(f"{type(scorer.model).__name__} gives no pair score (needs "
                          "encode_image/encode_text or itm_logits); curate with a two-tower, "
                          "CoCa, BLIP-2 stage-1 or one-tower run")
    by = args.by or ("itm" if "itm" in kinds else "clip")
    if by not in kinds:
        raise CurateError(f"--by {by}: {type(scorer.model).__name__} gives only {list(kinds)}")
    if args.dedup is not None and "clip" not in kinds:
        raise CurateError("--dedup compares media embeddings; this model has no encode_image")
    captioner = _captioner(args) if args.captioner else None
    request = dict(shards=paths, scorer=scorer.source, scores=list(kinds),
                   caption_key=scorer.config.data.train.caption_key,
                   captioner=captioner.source if captioner else None)
    _check_request(out, request)

    options = _options(scorer, paths)
    mine = [i for i in range(len(paths)) if i % nproc == pid]
    _score_pass(args, out, paths, names, mine, scorer, kinds, options, captioner)
    _wait_for(out, names, ".scored.json", args.wait_timeout, "scores")
    selection = dict(by=by, keep_fraction=args.keep_fraction, threshold=args.threshold,
                     dedup=args.dedup)
    choice = _select(out, names, selection, bool(captioner))
    _write_pass(args, out, paths, names, mine, choice, selection, options.caption_key)
    if pid != 0:
        return None
    _wait_for(out, names, ".written.json", args.wait_timeout, "output shards", selection)
    return _finish(out, names, request, selection, choice)


def _captioner(args):
    """The `--captioner` run as a `mmjax.evaluate.curate.Captioner` (greedy decoding,
    so every process and every rerun writes the same captions)."""
    from mmjax.data.tokenizers import build_tokenizer
    from mmjax.evaluate.curate import Captioner
    from mmjax.families import get_family
    m = _load(args.captioner, None, args.captioner_step, [])
    caption = get_family(m.config).captioner(m.model, m.variables, 1)
    if caption is None:
        raise CurateError(f"--captioner {args.captioner}: a {m.config.model.name} model does "
                          "not caption; give a CoCa or BLIP-2 stage-1 run")
    max_len = int(args.caption_max_len or m.config.data.train.max_len)
    c = Captioner(caption, None, build_tokenizer(m.config.data.train.tokenizer, max_len),
                  max_len)
    c.model, c.source = m, dict(m.source, max_len=max_len)
    return c


def _check_request(out: str, request: dict) -> None:
    """Records what the scores in `out/scores` are of; refuses to mix another request's."""
    path = os.path.join(out, "scores", "request.json")
    old = _read_json(path)
    if old is None:
        _write_json(path, request)
    elif old != request:
        diff = sorted(k for k in set(old) | set(request) if old.get(k) != request.get(k))
        raise CurateError(f"--out {out} holds scores of another request (differs in "
                          f"{', '.join(diff)}; see {path}); choose a new --out, or delete "
                          f"{os.path.join(out, 'scores')} to score again")


def _local_mesh():
    import jax
    from jax.sharding import Mesh
    return Mesh(np.array(jax.local_devices()), ("data",))


def _score_pass(args, out, paths, names, mine, scorer, kinds, options, captioner) -> None:
    """Pass 1 over this process's shards: the scores table of each (skips done ones)."""
    from tqdm import tqdm

    from mmjax.data.counters import Counters
    from mmjax.data.samples import make_tokenizer
    from mmjax.evaluate.curate import pair_score_fn, score_shard
    from mmjax.evaluate.retrieval import BatchRunner
    todo = [i for i in mine if _read_json(_marker(out, names[i], ".scored.json")) is None]
    if not todo:
        return
    mesh = _local_mesh()
    runner = BatchRunner(pair_score_fn(scorer.model, kinds), mesh, scorer.variables,
                         rows=args.batch_size)
    tokenize = make_tokenizer(options)
    if captioner is not None:
        captioner.options = _options(captioner.model, paths)
    threads = args.decode_threads or os.cpu_count() or 1
    pairs, start = 0, time.perf_counter()
    bar = tqdm(todo, unit="shard", desc="curate: scoring", disable=args.quiet,
               file=sys.stderr)
    for i in bar:
        t0 = time.perf_counter()
        counters = Counters(options)
        records, emb = score_shard(paths[i], runner, kinds, options, counters, tokenize,
                                   args.batch_size, captioner, threads)
        stem = _marker(out, names[i], "")
        with open(stem + ".jsonl.tmp", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(stem + ".jsonl.tmp", stem + ".jsonl")
        with open(stem + ".emb.npy.tmp", "wb") as f:
            np.save(f, emb)
        os.replace(stem + ".emb.npy.tmp", stem + ".emb.npy")
        _write_json(stem + ".scored.json", dict(
            shard=paths[i], pairs=len(records), counts=dict(counters.counts),
            seconds=round(time.perf_counter() - t0, 3)))
        pairs += len(records)
        bar.set_postfix_str(f"{pairs / max(time.perf_counter() - start, 1e-9):.1f} pairs/s")
    bar.close()


def _marker(out: str, name: str, suffix: str) -> str:
    return os.path.join(out, "scores", name[:-len(".tar")] + suffix)


def _wait_for(out: str, names: list[str], suffix: str, timeout: float, what: str,
              selection: Optional[dict] = None) -> None:
    """Blocks until every shard's marker file exists (the other processes' shares);
    with `selection`, a marker written for that selection."""
    def done(n):
        marker = _read_json(_marker(out, n, suffix))
        return marker is not None and (selection is None or marker["selection"] == selection)
    start, last = time.monotonic(), 0.0
    while True:
        missing = [n for n in names if not done(n)]
        if not missing:
            return
        waited = time.monotonic() - start
        if waited > timeout:
            raise CurateError(
                f"{len(missing)} shards still have no {what} after {timeout:.0f} s "
                f"(--wait-timeout), e.g. {missing[0]}: a process of this job stopped; rerun "
                "the same command (finished shards are kept)")
        if waited - last >= 30:
            last = waited
            log.info("curate: waiting for the %s of %d shards from the other processes",
                     what, len(missing))
        time.sleep(0.5)


def _select(out: str, names: list[str], selection: dict, synthetic: bool) -> dict:
    """The pairs to keep, from every shard's scores (identical in every process)."""
    from mmjax.evaluate.curate import duplicates, keep_mask
    tables, embs = [], []
    for n in names:
        stem = _marker(out, n, "")
        with open(stem + ".jsonl", encoding="utf-8") as f:
            tables.append([json.loads(line) for line in f])
        embs.append(np.load(stem + ".emb.npy"))
    rows = [r for t in tables for r in t]
    by = selection["by"]
    scores = np.asarray([r[by] for r in rows], np.float64)
    drop = None
    if selection["dedup"] is not None and rows:
        drop = duplicates(np.concatenate(embs), scores, selection["dedup"])
    keep, threshold = keep_mask(scores, selection["keep_fraction"], selection["threshold"],
                                drop)
    per_shard, j = [], 0
    n_syn = 0
    for t in tables:
        kept, syn = {}, {}
        for r in t:
            names_ = [k for k in ("clip", "itm") if k in r]
            if keep[j]:
                kept[r["key"]] = {k: r[k] for k in names_}
            if synthetic and (drop is None or not drop[j]) and r[f"synthetic_{by}"] >= threshold:
                syn[r["key"]] = (r["synthetic"], dict(
                    {k: r[f"synthetic_{k}"] for k in names_}, synthetic=True))
            j += 1
        n_syn += len(syn)
        per_shard.append((kept, syn))
    return dict(per_shard=per_shard, threshold=threshold, pairs=len(rows),
                kept=int(keep.sum()), kept_synthetic=n_syn,
                duplicates=int(drop.sum()) if drop is not None else 0)


def _write_pass(args, out, paths, names, mine, choice, selection, caption_key) -> None:
    """Pass 2 over this process's shards: the kept samples (skips shards written with
    the same selection)."""
    from tqdm import tqdm

    from mmjax.evaluate.curate import write_shard
    todo = [i for i in mine
            if (_read_json(_marker(out, names[i], ".written.json")) or {}).get("selection")
            != selection]
    for i in tqdm(todo, unit="shard", desc="curate: writing", disable=args.quiet,
                  file=sys.stderr):
        kept, syn = choice["per_shard"][i]
        n = write_shard(paths[i], os.path.join(out, names[i]), kept, syn, caption_key)
        _write_json(_marker(out, names[i], ".written.json"), dict(
            selection=selection, written=n, kept=len(kept), synthetic=len(syn)))


def _finish(out, names, request, selection, choice) -> dict:
    """Process 0, once every shard is written: sizes.json and curate.json."""
    from collections import Counter
    bad, shards = Counter(), {}
    for n in names:
        scored = _read_json(_marker(out, n, ".scored.json"))
        written = _read_json(_marker(out, n, ".written.json"))
        bad.update({k: v for k, v in scored["counts"].items() if k != "ok"})
        shards[n] = dict(pairs=scored["pairs"], bad=sum(v for k, v in scored["counts"].items()
                                                        if k != "ok"),
                         kept=written["kept"], synthetic=written["synthetic"],
                         written=written["written"])
    _write_json(os.path.join(out, "sizes.json"), {n: s["written"] for n, s in shards.items()})
    summary = dict(out=out, shards=len(names), pairs=choice["pairs"], kept=choice["kept"],
                   kept_synthetic=choice["kept_synthetic"], duplicates=choice["duplicates"],
                   threshold=choice["threshold"], by=selection["by"], bad=dict(bad),
                   captioner=request["captioner"])
    _write_json(os.path.join(out, "curate.json"), dict(
        request=request, selection=selection, summary=summary, per_shard=shards))
    return summary
