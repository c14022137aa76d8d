"""Bad-sample accounting: per-reason counters, rate-limited logging, ``DataError``."""
from __future__ import annotations

import logging
import time
from collections import Counter

from mmjax.errors import UserError

# Skipped samples are logged under the pipeline's name, whichever part found them.
log = logging.getLogger("mmjax.data.pipeline")


class DataError(UserError, RuntimeError):
    """Too much bad data, or no readable data at all."""


class RateLimitedLog:
    """At most one log line per reason per ``period`` seconds."""

    def __init__(self, period: float = 10.0):
        self.period, self.last = period, {}

    def __call__(self, reason: str, message: str, count: int):
        now = time.monotonic()
        if now - self.last.get(reason, -1e9) >= self.period:
            self.last[reason] = now
            log.warning("skipped (%s, %d so far): %s", reason, count, message)


def is_lost_shard(reason: str) -> bool:
    """Whether ``reason`` names a whole shard lost (counted as one bad event)."""
    return reason.endswith("_shard") or reason in ("not_tar", "truncated_tar")


class Counters:
    """Per-worker counts: "ok" (samples emitted) and bad samples by reason.

    ``seen``: samples parsed so far (plus one per lost shard). ``options``
    supplies ``min_bad_count`` and ``max_bad_fraction``; ``state`` a worker
    state to continue from (its ``stats`` and ``seen``).
    """

    def __init__(self, options, state: dict | None = None):
        self.o = options
        self.counts: Counter = Counter(state["stats"] if state else {})
        self.seen = state["seen"] if state else 0
        self._log = RateLimitedLog()

    def bad(self, reason: str, path: str, message: str):
        """Counts one bad sample (or lost shard); raises DataError once too many
        of the samples judged so far (``ok`` + bad: not those still waiting in
        the shuffle buffer) were bad."""
        self.counts[reason] += 1
        if is_lost_shard(reason):
            self.seen += 1  # a lost shard counts as one bad event
        self._log(reason, f"{path}: {message}", self.counts[reason])
        n_bad = sum(v for k, v in self.counts.items() if k != "ok")
        judged = n_bad + self.counts["ok"]
        if n_bad >= self.o.min_bad_count and n_bad > self.o.max_bad_fraction * judged:
            counts = ", ".join([f"ok={self.counts['ok']}"] + [
                f"{k}={v}" for k, v in sorted(self.counts.items()) if k != "ok" and v])
            raise DataError(
                f"{n_bad} of {judged} samples were bad (over data.train.max_bad_fraction="
                f"{self.o.max_bad_fraction}; a lost shard counts as one sample); last bad "
                f"shard: {path} ({reason}: {message}). Counts: {counts}")
