"""Metrics output: progress line, `metrics.jsonl`, TensorBoard event files.

Only process 0 writes. One JSON object per logged step with at least
`step` and `loss`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Mapping

import jax

from mmjax import workdir as wd

log = logging.getLogger("mmjax")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is at the time of each record (not the one
    at setup), so a redirected or replaced stdout keeps receiving the log."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int = logging.INFO) -> None:
    if not log.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)


def _row_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # e.g. a line cut short by a killed process


def keep_rows_until(lines: list[str], step: int) -> list[str]:
    """The `metrics.jsonl` lines of steps <= `step` (complete JSON rows only)."""
    out = []
    for line in lines:
        s = _row_step(line)
        if s is not None and s <= step:
            out.append(line if line.endswith("\n") else line + "\n")
    return out


class MetricsWriter:
    """Writes scalars to `workdir/metrics.jsonl` and TensorBoard (process 0 only).

    `resume_step`: the step training starts from (the restored checkpoint's, 0
    for a new run). What an earlier process logged after it is dropped, since
    that part of the run is trained again: `metrics.jsonl` keeps its rows with
    `step <= resume_step`, TensorBoard purges later events (`purge_step`), and
    `eval/step_<N>.json` files with `N > resume_step` are removed.
    """

    def __init__(self, workdir: str, tensorboard: bool = True, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.jsonl = None
        self.tb = None
        self.remote_lines: list[str] | None = None
        if not self.enabled:
            return
        path = wd.join(workdir, "metrics.jsonl")
        if wd.is_remote(workdir):
            # Object stores cannot append: keep the lines and rewrite the file.
            self.remote_path = path
            lines = wd.read_text(path).splitlines(True) if wd.exists(path) else []
            self.remote_lines = keep_rows_until(lines, resume_step)
            if len(self.remote_lines) != len(lines):
                wd.write_text(path, "".join(self.remote_lines))
        else:
            os.makedirs(workdir, exist_ok=True)
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    lines = f.readlines()
                kept = keep_rows_until(lines, resume_step)
                if kept != lines:
                    with open(path + ".tmp", "w", encoding="utf-8") as f:
                        f.writelines(kept)
                    os.replace(path + ".tmp", path)
                    log.info("metrics.jsonl: dropped %d rows after step %d (trained again)",
                             len(lines) - len(kept), resume_step)
            self.jsonl = open(path, "a", encoding="utf-8")
            eval_dir = os.path.join(workdir, "eval")
            if os.path.isdir(eval_dir):
                for name in os.listdir(eval_dir):
                    n = name.removeprefix("step_").removesuffix(".json")
                    if name.startswith("step_") and n.isdigit() and int(n) > resume_step:
                        os.remove(os.path.join(eval_dir, name))
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(wd.join(workdir, "tensorboard"),
                                        purge_step=resume_step + 1)
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                log.warning("tensorboardX not installed; TensorBoard events are off")

    def write(self, step: int, scalars: Mapping[str, Any], jsonl: bool = True) -> None:
        """Log scalars; `jsonl=False` sends them to TensorBoard only (eval results,
        which have their own `eval/step_<N>.json`)."""
        if not self.enabled:
            return
        clean = {k: (float(v) if v is not None else None) for k, v in scalars.items()}
        if jsonl:
            line = json.dumps({"step": int(step), **clean}) + "\n"
            if self.remote_lines is not None:
                self.remote_lines.append(line)
                wd.write_text(self.remote_path, "".join(self.remote_lines))
            else:
                self.jsonl.write(line)
                self.jsonl.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if v is not None and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


class Progress:
    """Rate and ETA for the periodic log line."""

    def __init__(self, first_step: int, total_steps: int):
        self.total = total_steps
        self.start_step = first_step
        self.start = time.perf_counter()
        self.last_step, self.last_time = first_step, self.start

    def tick(self, step: int) -> dict:
        now = time.perf_counter()
        dt = (now - self.last_time) / max(step - self.last_step, 1)
        self.last_step, self.last_time = step, now
        rate = (step - self.start_step) / max(now - self.start, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        return {"step_time": dt, "eta_s": eta}


def format_line(step: int, total: int, m: Mapping[str, Any], eta: float) -> str:
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}"]
    parts += [f"{k[5:]} {v:.4f}" for k, v in m.items() if k.startswith("loss/")]
    for key, fmt in (("lr", ".2e"), ("grad_norm", ".3f"), ("scale", ".2f"), ("bias", ".2f"),
                     ("temp", ".4f"), ("samples_per_s", ".1f"), ("step_time", ".3f")):
        if key in m and m[key] is not None:
            parts.append(f"{key} {m[key]:{fmt}}")
    if m.get("mfu") is not None:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    if math.isfinite(eta):
        parts.append(f"eta {int(eta // 60)}m{int(eta % 60):02d}s")
    return " | ".join(parts)
