"""`mmjax bench`: compile time, per-device memory, step time, TFLOP/s and MFU of a recipe.

    mmjax bench --config configs/X.py[:arg] [--config.a.b=v ...] [--steps N] [--warmup N]
                [--peak-flops F] [--no-pipeline]
    mmjax bench --aot --config configs/X.py [--devices 64] [--mesh data=8,fsdp=8,tensor=1]
                [--batch 16384] [--config.a.b=v ...]

The first form builds the run exactly as `mmjax train` does, compiles the
train step ahead of time, then times it (1) on random data already on the
devices and (2) end to end with the config's input pipeline. The second form
only compiles (the state stays abstract, nothing is allocated) and reports
per-device memory, so an out-of-memory shows up before a pod is rented; with
`--devices N` above the devices present it runs itself again on N simulated
CPU devices. `benchmarks/aot_memory.py` prints the same report for a large
default (SigLIP ViT-L/14 on 64 devices).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from mmjax.data.batch import make_global_batch
from mmjax.errors import UserError
from mmjax.train import sharding as shd
from mmjax.families import get_family, model_train_flops
from mmjax.train.mfu import peak_flops_per_device
from mmjax.train.step import Trainer, build_trainer

FLOPS_NOTE = ("model FLOPs: matmuls x 6 for training (2 fwd + 4 bwd), attention 4·B·S²·D "
              "per layer (half causal), embedding gathers not counted")
MIB = 2 ** 20
# Set in a re-executed `--aot` process so it never re-executes again.


# ----------------------------------------------------------------------------
# Building blocks (also used by benchmarks/aot_memory.py and the tests)

def batch_shapes(config: Any, sharding: jax.sharding.Sharding) -> dict:
    """ShapeDtypeStructs of the global batch: the family's media field (e.g. `image
    [B, S, S, 3]`, uint8 when `data.train.output="uint8"`) and `text [B, L]` int32."""
    spec = get_family(config).batch_spec(config, int(config.batch_size))
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for k, (shape, dtype) in spec.items()}


def random_batch(config: Any, sharding: jax.sharding.Sharding, seed: int = 0) -> dict:
    """A random global batch shaped like `batch_shapes`, already on the devices.

    Each process makes its own `batch_size / process_count` rows. Text rows
    are random ids below the vocabulary size ending in the EOS id.
    """
    rng = np.random.default_rng(seed + jax.process_index())
    family = get_family(config)
    rows = int(config.batch_size) // jax.process_count()
    local = {}
    for key, (shape, dtype) in family.batch_spec(config, rows).items():
        if key == "text":
            section = config.model[family.text_section]
            vocab, eos = int(section.vocab_size), section.get("eos_id", 2)
            text = rng.integers(3, vocab, shape, dtype=np.int32)
            text[:, -1] = 2 if eos is None else int(eos)
            local[key] = text
        elif dtype == np.uint8:
            local[key] = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            local[key] = rng.standard_normal(shape, dtype=np.float32)
    return make_global_batch(local, sharding)


def memory_stats(compiled: Any) -> dict:
    """Per-device bytes of a compiled executable: argument, output, alias, temp, total, peak, code.

    `total` = argument + output - alias + temp: buffers live at once when
    donated inputs are reused for outputs.
    """
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["peak"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0)  # XLA's own estimate
    return out


def state_bytes_per_device(abstract_state: Any) -> int:
    """Bytes of the (sharded) train state one device holds, from its shardings."""
    total = 0
    for x in jax.tree.leaves(abstract_state):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


def count_params(abstract_state: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state["params"]))


def aot_memory_report(config: Any, devices: Optional[Sequence[jax.Device]] = None) -> dict:
    """Compile the train step of `config` ahead of time and report per-device memory.

    Nothing is allocated: the state and batch are ShapeDtypeStructs with their
    shardings. Use simulated CPU devices (`--xla_force_host_platform_device_count`)
    to plan a pod; numbers come from the CPU compiler, so treat them as an
    estimate of what a TPU/GPU compiler will need.

    Returns a dict: `mesh` (str), `devices`, `batch`, `params`, `compile_s`,
    `state` (bytes of the sharded state per device) and the `memory_stats`
    fields (bytes per device).
    """
    trainer = build_trainer(config, devices)
    start = time.perf_counter()
    compiled = trainer.lower(batch_shapes(config, trainer.batch_sharding)).compile()
    report = {"mesh": shd.describe(trainer.mesh), "devices": int(trainer.mesh.devices.size),
              "batch": int(config.batch_size), "params": count_params(trainer.abstract_state),
              "compile_s": time.perf_counter() - start,
              "state": state_bytes_per_device(trainer.abstract_state)}
    report.update(memory_stats(compiled))
    return report


def format_bytes(n: float) -> str:
    """`1536 * 2**20` -> "1.50 GiB"; below 1 GiB in MiB."""
    return f"{n / 2**30:,.2f} GiB" if n >= 2 ** 30 else f"{n / MIB:,.1f} MiB"


def aot_table(rows: list[dict], names: Sequence[str]) -> str:
    """Markdown table of `aot_memory_report` results (bytes per device).

    total = argument + output - aliased (donated) + temp; "n/a": not reported
    by this backend (the CPU compiler gives no code size).
    """
    fit = any("fits" in r for r in rows)
    lines = ["| config | mesh | global batch | params | state/dev | argument/dev (state+batch) "
             "| output/dev | temp/dev | total/dev | code | compile |" + (" fits |" if fit else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if fit else "")]
    for name, r in zip(names, rows):
        mesh = r["mesh"].split(" (")[0]
        cells = [format_bytes(r[k]) if r.get(k) else "n/a" for k in
                 ("state", "argument", "output", "temp", "total", "generated_code")]
        lines.append(f"| {name} | {mesh} | {r['batch']} | {r['params'] / 1e6:.1f}M | "
                     + " | ".join(cells) + f" | {r['compile_s']:.0f} s |"
                     + ((" yes |" if r.get("fits") else " no |") if fit else ""))
    return "\n".join(lines)


def parse_mesh(text: str) -> dict:
    """`"data=8,fsdp=8"` -> `{"data": 8, "fsdp": 8, "tensor": 1}` (missing axes are 1)."""
    sizes = dict.fromkeys(shd.MESH_AXES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in sizes or not value.lstrip("-").isdigit():
            raise UserError(f"--mesh {text!r}: expected AXIS=SIZE pairs with axes "
                            f"{', '.join(shd.MESH_AXES)}, e.g. data=8,fsdp=8.")
        sizes[key] = int(value)
    return sizes


def mesh_overrides(mesh: Optional[str], batch: Optional[int]) -> list[str]:
    """`--mesh` / `--batch` as config overrides (`mesh.data=8`, `batch_size=...`)."""
    out = [f"mesh.{k}={v}" for k, v in parse_mesh(mesh).items()] if mesh else []
    return out + ([f"batch_size={batch}"] if batch else [])


# ----------------------------------------------------------------------------
# Timing

def _block(tree):
    return jax.block_until_ready(tree)


def time_random_data(compiled, trainer: Trainer, state: dict, batch: dict, steps: int,
                     warmup: int) -> tuple[dict, list[float]]:
    """Run `warmup` then `steps` steps on one device-resident batch, blocking each step.

    Returns the final state (the input state is donated) and the step times in s.
    """
    times = []
    with trainer.context():
        for i in range(warmup + steps):
            start = time.perf_counter()
            state, metrics = _block(compiled(state, batch))
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return state, times


def time_pipeline(compiled, trainer: Trainer, state: dict, config: Any, steps: int,
                  warmup: int) -> tuple[dict, float, float]:
    """End-to-end steps fed by the config's input pipeline, as the train loop runs them.

    Steps are dispatched without blocking (the device works while the host
    loads the next batch); the clock stops when the last step is done.
    Returns `(state, seconds per step, fraction of that time spent waiting for input)`.
    """
    from mmjax.data.pipeline import build_train_iterator
    from mmjax.train.loop import resolve_train_shards
    resolve_train_shards(config)
    data = build_train_iterator(trainer.family.data_config(config),
                                shd.local_batch_size(int(config.batch_size), trainer.mesh),
                                media=trainer.media)
    keys = tuple(trainer.family.batch_spec(config, 1))  # the compiled step's inputs
    try:
        with trainer.context():
            def one():
                nonlocal state
                t = time.perf_counter()
                local = next(data)
                batch = make_global_batch({k: local[k] for k in keys},
                                          trainer.batch_sharding)
                waited = time.perf_counter() - t
                state, metrics = compiled(state, batch)
                return metrics, waited
            for _ in range(warmup):  # includes worker start-up
                _block(one()[0])
            start, wait = time.perf_counter(), 0.0
            for _ in range(steps):
                metrics, waited = one()
                wait += waited
            _block((state, metrics))
            total = time.perf_counter() - start
    finally:
        data.close()
    return state, total / steps, wait / total


# ----------------------------------------------------------------------------
# The command

def run_bench(config: Any, steps: int = 10, warmup: int = 2, peak_flops: Optional[float] = None,
              pipeline: bool = True) -> dict:
    """Compile, then time `config`'s train step; returns every number `mmjax bench` prints.

    Keys: `compile_s`, `memory` (`memory_stats`), `flops` (model FLOPs per
    step), `step_s` (median, random data), `samples_per_s`, `tflops_per_device`,
    `peak` (FLOP/s per device or None), `mfu` (None without a peak) and, with
    `pipeline`, `pipeline_step_s`, `pipeline_samples_per_s`, `input_wait`.
    """
    if steps < 1 or warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0 (got {steps}, {warmup}).")
    trainer = build_trainer(config)
    batch_size, n = int(config.batch_size), jax.device_count()
    out = {"mesh": shd.describe(trainer.mesh), "batch": batch_size, "devices": n,
           "platform": trainer.mesh.devices.flat[0].platform,
           "params": count_params(trainer.abstract_state)}
    start = time.perf_counter()
    compiled = trainer.lower(batch_shapes(config, trainer.batch_sharding)).compile()
    out["compile_s"] = time.perf_counter() - start
    out["memory"] = memory_stats(compiled)
    # What `mmjax compile` reports for this step, to set beside the measurement.
    from mmjax.perf.hlo import step_collectives, summarize_collectives
    out["collectives"] = summarize_collectives(step_collectives(compiled.as_text())[0])

    state = trainer.init_state(int(config.seed))
    batch = random_batch(config, trainer.batch_sharding, int(config.seed))
    state, times = time_random_data(compiled, trainer, state, batch, steps, warmup)
    step_s = statistics.median(times)
    flops = model_train_flops(config, batch_size)
    peak = peak_flops_per_device(peak_flops or config.get("peak_flops"),
                                 trainer.mesh.devices.flat[0])
    out.update(flops=flops, step_s=step_s, samples_per_s=batch_size / step_s,
               tflops_per_device=flops / step_s / n / 1e12, peak=peak,
               mfu=flops / step_s / (n * peak) if peak else None)
    if pipeline:
        del batch
        state, step_s, wait = time_pipeline(compiled, trainer, state, config, steps, warmup)
        out.update(pipeline_step_s=step_s, pipeline_samples_per_s=batch_size / step_s,
                   input_wait=wait)
    return out


def format_bench(result: dict, spec: str, steps: int) -> str:
    """The header lines and markdown table `mmjax bench` prints."""
    r, mem = result, result["memory"]
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else \
        f"n/a (no peak FLOP/s known for {r['platform']}; pass --peak-flops)"
    rows = [("compile time", f"{r['compile_s']:.2f} s")]
    rows += [(f"memory per device: {k}", format_bytes(mem[k]))
             for k in ("argument", "output", "temp", "total") if k in mem]
    rows += [(f"step time (random data, median of {steps})", f"{1e3 * r['step_s']:.2f} ms"),
             ("samples/s", f"{r['samples_per_s']:,.1f}"),
             ("model TFLOP/s per device", f"{r['tflops_per_device']:.4g}"),
             ("MFU", mfu)]
    if "pipeline_step_s" in r:
        rows += [(f"step time (input pipeline, mean of {steps})",
                  f"{1e3 * r['pipeline_step_s']:.2f} ms"),
                 ("samples/s (input pipeline)", f"{r['pipeline_samples_per_s']:,.1f}"),
                 ("waiting for input", f"{100 * r['input_wait']:.0f}% of step time")]
    lines = [f"mmjax bench --config {spec}: {r['params'] / 1e6:.2f}M parameters, mesh {r['mesh']}, "
             f"{r['platform']}, global batch {r['batch']}",
             FLOPS_NOTE,
             f"model FLOPs per step: {r['flops']:.6e}",
             "", "| measure | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if r.get("collectives"):
        lines += ["", "compiled step's collectives (as `mmjax compile` reports them):",
                  "| collective | dtype | group | runs/step | bytes/step/device |",
                  "|---|---|---:|---:|---:|"]
        lines += [f"| {c['kind']} | {c['dtype']} | {c['group'] or '-'} | {c['runs_per_step']} "
                  f"| {format_bytes(c['bytes_per_step'])} |" for c in r["collectives"]]
    return "\n".join(lines)
