"""`mmjax compile`: the real train step compiled by a TPU or GPU compiler, on any host.

    mmjax compile --config configs/X.py[:arg] --target v5p-256 [--config.a.b=v ...]
                  [--json PATH] [--max-batch] [--hbm-gib G]
    mmjax compile --list-targets

The step is the one `mmjax train` runs (same Trainer, the config's mesh over
the target's devices, `config.batch_size` as the global batch), lowered with
abstract state and batch (nothing is allocated) and compiled by the target's
own compiler: libtpu deviceless for TPUs, the CUDA plugin with a GPU target
description for NVIDIA GPUs. The report: per-device memory from the compiled
executable vs the device's HBM, whether it fits, compile time, model FLOPs per
step (`mmjax.train.mfu`) and the step time they need at the chip's peak, the
collectives of the compiled step with loop trip counts applied, the dtypes of
its reductions, whether the CPU-only GEMM path leaked in, and the partitioner's
involuntary-rematerialization warnings.

Exit status: 0 the step fits, 1 it does not (one line: needed vs available and
the keys that trade memory), 2 a usage error.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Optional

from mmjax.perf.hlo import summarize_collectives

MEMORY_KEYS = "config.batch_size, model.<tower>.remat (dots_no_batch, full), mesh.fsdp"


@contextlib.contextmanager
def _captured_stderr():
    """Collect what C++ code writes to fd 2 (XLA's partitioner warnings) into a list
    of lines, instead of the terminal."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode("utf-8", "replace").splitlines())


def _out_of_memory(message: str) -> Optional[tuple[float, float]]:
    """`(needed, available)` bytes from a compiler's out-of-memory error, or None.
    The TPU compiler says e.g. "Ran out of memory on HBM, the total memory required
    for HLO temporaries (35.42G) exceeds available HBM (15.75G)"."""
    if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
        return None
    units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    for pattern in (r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT])",
                    r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)"):
        m = re.search(pattern, message)
        if m:
            return (float(m.group(1)) * units[m.group(2)],
                    float(m.group(3)) * units[m.group(4)])
    return (float("nan"), float("nan"))


def compile_for_target(config: Any, target: Any, hbm_gib: Optional[float] = None,
                       hlo_path: Optional[str] = None) -> dict:
    """Compile `config`'s train step for `target` (`targets.Target`) and report;
    with `hlo_path`, also write the optimized HLO text there (for `mmjax.perf.hlo`).

    Returns a dict: `target`, `chip`, `topology`, `devices`, `mesh`, `batch`,
    `params`, `state` (bytes of the sharded train state per device), `compile_s`,
    `hbm` (bytes per device a step may use: the TPU compiler's limit, or on GPU
    `hbm_share` of the device's memory, `targets.memory_share`), `fits`, `memory`
    (`bench.memory_stats`: argument/output/alias/temp/total/peak bytes per
    device, or `needed` from the compiler's out-of-memory error), `flops`,
    `ideal_step_s` (model FLOPs / (devices x peak)), `collectives`
    (`summarize_collectives`), `collective_sources` (the same by the JAX
    operation each came from), `reduction_dtypes`, `unknown_loops`,
    `loss_collectives` (kinds of the losses' shard_map collectives),
    `cpu_path_ops` (ops of the CPU-only GEMM path: must be 0 on an
    accelerator), `remat_warnings`.
    """
    from mmjax.models.ops.matmul import CPU_PATH_SCOPE
    from mmjax.train import sharding as shd
    from mmjax.perf.bench import batch_shapes, count_params, memory_stats, state_bytes_per_device
    from mmjax.train.step import build_trainer
    from mmjax.families import model_train_flops
    from mmjax.perf.hlo import step_collectives
    from mmjax.perf.targets import hbm_bytes, memory_share, target_devices

    with _captured_stderr():  # libtpu's start-up warnings about the absent TPU host
        devices = target_devices(target)
    trainer = build_trainer(config, devices)
    n = len(trainer.mesh.devices.flat)
    flops = model_train_flops(config)
    report = {"target": target.name, "chip": target.chip.device_kind,
              "platform": target.platform, "topology": target.topology, "devices": n,
              "mesh": shd.describe(trainer.mesh),
              "batch": int(config.batch_size), "params": count_params(trainer.abstract_state),
              "state": state_bytes_per_device(trainer.abstract_state),
              "hbm": hbm_bytes(target, hbm_gib), "flops": flops,
              "hbm_share": memory_share(target, hbm_gib),
              "ideal_step_s": flops / (n * target.chip.peak_flops)}
    start = time.perf_counter()
    with _captured_stderr() as log:
        try:
            # Deviceless GPU compiles cannot autotune: pick GEMMs without Triton tiling.
            options = dict(trainer.compiler_options)  # the step's own (config.mesh.fsdp_ring)
            if target.platform == "gpu":
                options.update(xla_gpu_enable_triton_gemm=False, xla_gpu_autotune_level=0)
            compiled = trainer.lower(batch_shapes(config, trainer.batch_sharding)).compile(
                compiler_options=options or None)
            error = None
        except Exception as e:  # the compiler's verdict, e.g. RESOURCE_EXHAUSTED
            compiled, error = None, e
    report["compile_s"] = time.perf_counter() - start
    report["remat_warnings"] = [l.split("] ", 1)[-1][:300] for l in log
                                if "Involuntary full rematerialization" in l]
    if compiled is None:
        oom = _out_of_memory(str(error))
        if oom is None:
            raise error
        report.update(fits=False, memory={"needed": oom[0], "available": oom[1]})
        return report
    mem = memory_stats(compiled)
    report["memory"] = mem
    # The TPU compiler refuses a program that does not fit its HBM (handled above),
    # so a TPU executable fits by construction; GPU compilers do not check.
    report["fits"] = (target.platform == "tpu" and hbm_gib is None) or \
        bool(used_bytes(report) <= report["hbm"])
    text = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(text)
    colls, unknown = step_collectives(text)
    report["collectives"] = summarize_collectives(colls)
    report["collective_sources"] = summarize_collectives(colls, by="source")
    report["reduction_dtypes"] = sorted({d for c in colls if c.kind in ("all-reduce",
                                                                        "reduce-scatter")
                                         for d in c.dtypes if d in ("f32", "bf16", "f16")})
    report["unknown_loops"] = unknown
    # The losses' own collectives (shard_map): SigLIP's ring is collective-permutes only.
    report["loss_collectives"] = sorted({c.kind for c in colls if "shard_map" in c.line})
    report["cpu_path_ops"] = text.count(CPU_PATH_SCOPE)
    return report


def used_bytes(report: dict) -> Optional[float]:
    """Per-device bytes that decide whether a compiled step fits: on TPU XLA's
    peak estimate (`total` = argument + output - alias + temp over-counts
    temporaries that are never live at once: a fitting v5e step can read 18.4 GiB
    total on a 15.75 GiB chip with a 15.2 GiB peak), elsewhere `total`; for a
    step the compiler refused, the `needed` figure of its out-of-memory error."""
    mem = report.get("memory", {})
    if "needed" in mem:
        return mem["needed"]
    if report.get("platform") == "tpu" and mem.get("peak"):
        return mem["peak"]
    return mem.get("total")


def misfit_line(report: dict) -> str:
    """One line for a step that does not fit."""
    mem = report["memory"]
    needed = used_bytes(report)
    from mmjax.perf.bench import format_bytes
    have = mem.get("available") or report["hbm"]
    share = report.get("hbm_share")
    gpu = (f", or let JAX take more of the GPU (XLA_CLIENT_MEM_FRACTION, now {share:g})"
           if share and share < 1 else "")
    return (f"the step does not fit {report['target']}: it needs {format_bytes(needed)} per "
            f"device, {format_bytes(have)} available; trade memory with {MEMORY_KEYS} "
            f"(now batch_size={report['batch']}, mesh {report['mesh'].split(' (')[0]}){gpu}.")


def format_report(report: dict, sources: int = 0) -> str:
    """The text `mmjax compile` prints; with `sources` > 0 also the `sources`
    largest collectives by the JAX operation they came from."""
    from mmjax.perf.bench import format_bytes
    r = report
    lines = [f"mmjax compile: {r['target']} ({r['devices']} x {r['chip']}, topology "
             f"{r['topology']}), mesh {r['mesh']}, global batch {r['batch']}, "
             f"{r['params'] / 1e6:.1f}M parameters, compiled in {r['compile_s']:.1f} s"]
    mem = r["memory"]
    if "total" in mem:
        lines.append("memory per device: " + ", ".join(
            f"{k} {format_bytes(mem[k])}" for k in ("argument", "output", "alias", "temp",
                                                    "total", "peak") if k in mem)
            + f"; {format_bytes(used_bytes(r))} of {format_bytes(r['hbm'])} HBM"
            + (f" ({100 * r['hbm_share']:.0f}% of the GPU's memory, as JAX's allocator takes "
               f"it: XLA_CLIENT_MEM_FRACTION)" if r.get("hbm_share") else "") + ": "
            + ("fits" if r["fits"] else "DOES NOT FIT")
            + (" (on TPU XLA's peak counts: total adds up temporaries not live at once)"
               if r.get("platform") == "tpu" else ""))
    else:
        lines.append("memory per device: compiler out of memory: " + misfit_line(r))
    lines.append(f"model FLOPs per step: {r['flops']:.4e} ({r['flops'] / r['devices']:.3e} per "
                 f"device; {1e3 * r['ideal_step_s']:.1f} ms per step at 100% MFU)")
    if "collectives" in r:
        lines.append(f"gradient/activation reductions in: {', '.join(r['reduction_dtypes']) or '-'}"
                     f"; CPU-only GEMM ops: {r['cpu_path_ops']}")
        lines += ["", "| collective | dtype | group | instructions | runs/step | bytes/step/device |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {c['kind']} | {c['dtype']} | {c['group'] or '-'} | {c['instructions']} | "
                  f"{c['runs_per_step']} | {format_bytes(c['bytes_per_step'])} |"
                  for c in r["collectives"]]
        if sources and r.get("collective_sources"):
            lines += ["", "| collective | dtype | from (op_name) | instructions | runs/step | "
                      "bytes/step/device |", "|---|---|---|---:|---:|---:|"]
            lines += [f"| {c['kind']} | {c['dtype']} | {c['source']} | {c['instructions']} | "
                      f"{c['runs_per_step']} | {format_bytes(c['bytes_per_step'])} |"
                      for c in r["collective_sources"][:sources]]
        if r["unknown_loops"]:
            lines.append(f"(loops without a known trip count, counted once: "
                         f"{len(r['unknown_loops'])})")
    if r["remat_warnings"]:
        lines.append(f"partitioner: {len(r['remat_warnings'])} involuntary full "
                     f"rematerialization(s), first: {r['remat_warnings'][0][:200]}")
    return "\n".join(lines)


def _slack(report: dict) -> Optional[float]:
    """Bytes per device over (> 0) or under (< 0) the limit, from one compile's
    report (`used_bytes` minus HBM, or minus the error's `available`); None when
    the compiler's error gave no figures. The line through two slacks only
    guides the search; the compiler's verdicts decide it."""
    used = used_bytes(report)
    have = report.get("memory", {}).get("available", report.get("hbm"))
    if used is None or have is None or used != used or have != have:
        return None
    return float(used) - float(have)


def largest_fitting(probe: Callable[[int], tuple[bool, Optional[float]]], start: int,
                    top: int) -> int:
    """Largest k in [1, top] with `probe(k)[0]` true (0 if none), for a `probe`
    that fits every k below some boundary and none above it.

    `probe(k) -> (fits, slack)`, slack = bytes over (> 0) or under (< 0) the
    limit, or None. Slack grows about linearly with k, so after two probes the
    line through their slacks predicts the boundary and each further probe lands
    next to it (regula falsi between the largest k known to fit and the smallest
    known not to, with a bisection step whenever the same side has moved twice in
    a row, so the bracket always narrows; doubling / halving until there is a
    bracket, by at most 8x a probe). The answer is always probed on both sides
    (it fits; k + 1 does not, unless k = top)."""
    seen: dict[int, tuple[bool, Optional[float]]] = {}

    def run(k: int) -> bool:
        seen[k] = probe(k)
        return bool(seen[k][0])

    def predicted(a: int, b: int) -> Optional[int]:
        sa, sb = seen[a][1], seen[b][1]
        if sa is None or sb is None or sa == sb:
            return None
        k = a + (b - a) * (-sa) / (sb - sa)
        return int(math.floor(k)) if math.isfinite(k) else None

    k = min(top, max(1, start))
    lo, hi = (k, None) if run(k) else (0, k)  # largest fitting (0: none), smallest not
    stuck, last_side = 0, None
    while hi is None or hi - lo > 1:
        if hi is None:  # everything so far fits: extrapolate up
            if lo >= top:
                break
            ok = sorted(x for x in seen if seen[x][0])
            guess = predicted(ok[-2], ok[-1]) if len(ok) > 1 else None
            cand = min(top, 8 * lo, max(lo + 1, guess) if guess is not None and guess >= lo
                       else 2 * lo)
        elif lo == 0:  # nothing fits yet: extrapolate down
            if hi <= 1:
                break
            miss = sorted(seen)
            guess = predicted(miss[0], miss[1]) if len(miss) > 1 else None
            cand = max(1, hi // 8, guess if guess is not None and guess < hi else hi // 2)
        else:  # bracketed
            guess = predicted(lo, hi) if stuck < 2 else None
            cand = min(hi - 1, max(lo + 1, guess if guess is not None else (lo + hi) // 2))
        side = "lo" if run(cand) else "hi"
        if side == "lo":
            lo = max(lo, cand)
        else:
            hi = cand if hi is None else min(hi, cand)
        stuck, last_side = (stuck + 1 if side == last_side else 1), side
    return lo


def max_batch(config: Any, target: Any, hbm_gib: Optional[float] = None,
              limit: int = 2 ** 20, log=print) -> tuple[int, list[dict]]:
    """Largest global batch (a multiple of data x fsdp) whose step fits `target`,
    by `largest_fitting` over real compiles (memory per device grows about
    linearly with the batch: 4-5 compiles where that holds, bisection steps where
    it does not, e.g. near HBM, where the TPU compiler trades time for memory).
    Returns `(batch or 0, reports)`."""
    from mmjax.perf.targets import target_devices
    from mmjax.train import sharding as shd
    mesh = shd.make_mesh(config.mesh, target_devices(target))
    unit = mesh.shape["data"] * mesh.shape["fsdp"]
    reports: list[dict] = []

    def probe(k: int) -> tuple[bool, Optional[float]]:
        c = config.copy_and_resolve_references()
        c.batch_size = k * unit
        r = compile_for_target(c, target, hbm_gib)
        reports.append(r)
        mem = used_bytes(r)
        used = f"{mem / 2 ** 30:.2f} GiB/device, " if mem == mem and mem is not None else ""
        log(f"batch {k * unit}: {'fits' if r['fits'] else 'does not fit'} "
            f"({used}compile {r['compile_s']:.0f} s)")
        return bool(r["fits"]), _slack(r)

    best = largest_fitting(probe, int(config.batch_size) // unit, max(1, limit // unit))
    return best * unit, reports
