"""A training-health line: one warning when the loss has not moved from where it started.

A run whose loss sits at its first value (a contrastive loss at ln(batch), a
captioning loss at ln(vocab)) for many log rows is usually not slow but
broken: the learning rate is 0 or still warming up, the inputs are not
normalised (audio log-mels in the tens, images in 0..255), the batch is too
small for the contrastive task, or the tower is frozen. The trainer feeds
every logged row to `LossHealth.update`; the first time the loss has stayed
within `health.tolerance` (relative) of the first step's loss for
`health.patience` consecutive rows after the warmup (rows during the warmup
do not count: a long warmup moves the loss slowly by design) it returns one
line naming those keys and their values, and the loop logs it. Nothing else
changes: the run goes on.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional


class LossHealth:
    """Watches the logged loss of one run.

    Args:
      config: the run's config (the keys the message names are read from it).
      patience: consecutive log rows at the starting loss before the warning
        (`health.patience`; 0: off).
      tolerance: relative distance from the starting loss that counts as "not
        moved" (`health.tolerance`).
    """

    def __init__(self, config: Any, patience: int, tolerance: float):
        self.config = config
        self.patience = int(patience)
        self.tolerance = float(tolerance)
        self.start: Optional[float] = None
        self.first_flat: Optional[int] = None
        self.rows = 0
        self.warned = False

    @classmethod
    def from_config(cls, config: Any) -> "LossHealth":
        """The watcher of `config.health` (a config saved before the section existed:
        the defaults of `mmjax.config.defaults.KEYS`)."""
        from mmjax.config.defaults import KEYS
        h = config.get("health") or {}
        return cls(config, int(h.get("patience", KEYS["health.patience"][0])),
                   float(h.get("tolerance", KEYS["health.tolerance"][0])))

    def first_step(self, loss: float) -> None:
        """The loss of the run's first step (the value "not moved" is measured from)."""
        if math.isfinite(loss):
            self.start = float(loss)

    def update(self, step: int, metrics: Mapping[str, float]) -> Optional[str]:
        """One logged row -> the warning line the first time the loss has stayed
        at its start for `patience` rows, else None."""
        if self.warned or self.patience <= 0 or self.start is None:
            return None
        loss = float(metrics.get("loss", math.nan))
        warmup = int(self.config.optim.get("warmup_steps", 0) or 0)
        if not math.isfinite(loss) or step < warmup:
            return None
        if abs(loss - self.start) > self.tolerance * max(abs(self.start), 1e-3):
            self.rows, self.first_flat = 0, None
            return None
        self.rows += 1
        self.first_flat = step if self.first_flat is None else self.first_flat
        if self.rows < self.patience:
            return None
        self.warned = True
        return self._message(step, loss, metrics)

    def _message(self, step: int, loss: float, m: Mapping[str, float]) -> str:
        c, o = self.config, self.config.optim
        grad = m.get("grad_norm")
        lr = m.get("lr")
        warmup = int(o.get("warmup_steps", 0) or 0)
        batch = int(c.batch_size)
        d = c.data.train
        parts = [f"optim.lr={o.lr:g} (now {lr:.2e})" if lr is not None else f"optim.lr={o.lr:g}",
                 f"optim.warmup_steps={warmup}"]
        if o.get("freeze"):
            parts.append(f"optim.freeze={list(o.freeze)}")
        parts.append(f"batch_size={batch} (a contrastive loss starts at ln(batch) = "
                     f"{math.log(max(batch, 2)):.3f})")
        parts.append(f"input normalisation (data.train.mean/std={list(d.get('mean') or [])}/"
                     f"{list(d.get('std') or [])}; audio: the log-mel scale)")
        grad_txt = f"; grad_norm {grad:.3g}" if grad is not None else ""
        return (f"training health: the loss has stayed at its starting value {self.start:.4f} "
                f"(now {loss:.4f}, within {100 * self.tolerance:g}%) for {self.rows} log rows, "
                f"steps {self.first_flat}-{step}{grad_txt}. Likely keys: "
                + "; ".join(parts)
                + ". (health.patience=0 turns this check off.)")
