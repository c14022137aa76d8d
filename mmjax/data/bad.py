"""`BadSample`: a decoder's way to say "skip this sample and count it".

The pipeline catches it, counts the sample under `reason` (e.g.
"corrupt_audio", "empty_audio", "short_video") in its bad-sample counters,
logs the message (rate-limited) and goes on; too many bad samples raise a
`DataError` (`data.train.max_bad_fraction`).
"""
from __future__ import annotations


class BadSample(ValueError):
    """A sample that cannot be used; `reason` is the counter name."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
