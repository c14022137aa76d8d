"""Shards written once into a cache folder and reused (the built-in datasets).

`cached_shards` writes into a temporary folder and renames it into place, so
concurrent callers (several processes of one job) never see a partial set; the
loser of the race discards its copy. `params.json`, written last, marks a
complete set; the folder name holds a hash of the parameters.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Callable

log = logging.getLogger("mmjax")


class ProgressLog:
    """Logs 'N/total samples, rate, ETA' through the mmjax logger every `every_s` seconds."""

    def __init__(self, what: str, total: int, every_s: float):
        self.what, self.total, self.every_s = what, total, every_s
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        log.info("%s: %d/%d samples | %.0f samples/s | %s", self.what, done, self.total, rate,
                 f"eta {int(eta // 60)}m{int(eta % 60):02d}s" if done < self.total
                 else f"done in {now - self.start:.1f}s")


def cached_shards(cache_dir: str, name: str, params: dict,
                  write: Callable[[str, ProgressLog], object], *, what: str, detail: str = "",
                  log_every_s: float = 5.0) -> list[str]:
    """Shard paths of `cache_dir/{name}-{hash(params)}`, written by `write(folder,
    progress)` the first time (progress(done) logs rate and ETA of
    `params["num_samples"]`); `detail` is added to the first log line."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    final = os.path.join(os.fspath(cache_dir), f"{name}-{digest}")
    if not os.path.exists(os.path.join(final, "params.json")):
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=cache_dir)
        log.info("writing the %s (%d samples%s) to %s, once: later runs reuse it",
                 what, params["num_samples"], detail, final)
        try:
            write(tmp, ProgressLog(what, int(params["num_samples"]), log_every_s))
            with open(os.path.join(tmp, "params.json"), "w", encoding="utf-8") as f:
                json.dump(params, f, indent=1)
            try:
                os.rename(tmp, final)
            except OSError:
                if not os.path.exists(os.path.join(final, "params.json")):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(glob.glob(os.path.join(final, "*.tar")))
