"""The training loop shared by every recipe.

Stages: distributed init -> config/workdir checks -> mesh -> model, optimizer,
sharded state -> restore (state + data position) -> input -> loop
(step, NaN guard, logs, checkpoints, evals) -> final checkpoint and evals.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Optional

import jax
import numpy as np

from mmjax.data.batch import make_global_batch
from mmjax.data.pipeline import build_train_iterator
from mmjax.models import build
from mmjax.train import sharding as shd
from mmjax import workdir as wd
from mmjax.train.checkpoint import Checkpointer
from mmjax.config.schema import check_config, check_model
from mmjax.errors import ConfigError
from mmjax.config.loading import (all_differences, config_fingerprint,
                                      first_difference)
from mmjax.train.init_sources import init_entries
from mmjax.families import get_family, model_train_flops
from mmjax.train.mfu import peak_flops_per_device
from mmjax.train.health import LossHealth
from mmjax.train.logging_utils import MetricsWriter, Progress, format_line, setup_logging
from mmjax.train import multihost
from mmjax.train.step import build_trainer, unmasked_config
from mmjax.errors import UserError
from mmjax.evaluate.runner import run_evals

log = logging.getLogger("mmjax")


class TrainingError(UserError, RuntimeError):
    """A run stopped for a reason the user must act on (message says which)."""


def resolve_train_shards(config: Any) -> None:
    """`data.train.shards = "synthetic"` -> write / reuse the built-in shards."""
    d = config.data.train
    if d.shards is None:
        raise ConfigError("config.data.train.shards is not set: give a shard pattern like "
                          "'/data/{00000..00099}.tar' or 'synthetic' for the built-in data.")
    if d.shards == "synthetic":
        from mmjax.data.builtin import builtin_shards
        with config.unlocked():
            d.shards = "::".join(builtin_shards(config, "train",
                                                get_family(config).media(config.model)))


# Keys that instruct one resume rather than describe the run (they log their own warning).
RESUME_DIRECTIVES = {"config.data.train.reset_stream_on_resume"}


def check_workdir(config: Any, workdir: str) -> None:
    """Refuse to resume a workdir created by a different model/objectives config.

    In a job of several processes, process 0 alone reads and writes
    `config.json` (atomically) and every process raises the same error
    (`multihost.agree_on_error`): no process reads the file while another
    writes it. See `_check_config_file` for what is checked.
    """
    multihost.agree_on_error(lambda: _check_config_file(config, workdir))


def _check_config_file(config: Any, workdir: str) -> None:
    """The fingerprint check and `config.json` update of `check_workdir`.

    Other keys may change when a run is resumed (batch size, steps, learning
    rate, ...): the change is logged as one warning line, `config.json` then
    holds the config in use and its `config_history` lists each change (date
    and `key: [old, new]`).
    """
    path = wd.join(workdir, "config.json")
    mine = config_fingerprint(config)
    if wd.exists(path):
        saved = json.loads(wd.read_text(path))
        diff = first_difference(saved.get("fingerprint", {}), json.loads(json.dumps(mine)))
        if diff:
            raise ConfigError(f"--workdir {workdir} holds a run of another config ({diff}); "
                              "use a new --workdir or the original config.")
        current = json.loads(config.to_json_best_effort())
        changes = [c for c in all_differences(saved.get("config", {}), current)
                   if c[0] not in RESUME_DIRECTIVES]
        if changes:
            log.warning("resuming with a changed config: %s (config.json updated, the "
                        "change is kept in its config_history)",
                        "; ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes))
            import datetime
            history = saved.get("config_history", [])
            history.append({"date": datetime.datetime.now().astimezone().isoformat(
                timespec="seconds"), "changes": {k: [old, new] for k, old, new in changes}})
            wd.write_text(path, json.dumps({**saved, "config": current,
                                            "config_history": history}, indent=1))
    else:
        wd.makedirs(workdir)
        wd.write_text(path, json.dumps({"fingerprint": mine,
                                        "config": json.loads(config.to_json_best_effort())},
                                       indent=1))


def _nan_advice(optim: Any) -> str:
    """What to change after a non-finite loss, given the optimizer config in use."""
    if optim is None:
        return "Lower config.optim.lr."
    lr = optim.get("lr")
    clip = optim.get("clip_norm")
    warmup = optim.get("warmup_steps")
    if clip:
        return (f"Lower config.optim.lr (now {lr:g}) or config.optim.clip_norm (now {clip:g}), "
                f"or lengthen config.optim.warmup_steps (now {warmup}).")
    return (f"Lower config.optim.lr (now {lr:g}) or set config.optim.clip_norm (off now; "
            "1.0 is the default).")


def _nan_check(metrics: dict, step: int, objectives: list[str], optim: Any = None) -> None:
    bad = [k for k in ["loss"] + [f"loss/{o}" for o in objectives]
           if k in metrics and not math.isfinite(float(metrics[k]))]
    if bad:
        which = [b[5:] for b in bad if b.startswith("loss/")] or ["total"]
        raise TrainingError(f"non-finite loss at step {step} (objective: {', '.join(which)}); "
                            "stopped without saving, the last checkpoint is the last good state. "
                            + _nan_advice(optim))


def lock_workdir(workdir: str) -> Optional[wd.WorkdirLock]:
    """Take the run's exclusive lock on `workdir` (WorkdirBusy if another run holds it).

    All processes of a job share the workdir, so the lock is per job: process 0
    takes it (`multihost.agree_on_error`), and every process of a second job on
    the same workdir stops with the same WorkdirBusy. Remote workdirs (object
    stores) have no lock.
    """
    def take() -> Optional[wd.WorkdirLock]:
        if wd.is_remote(workdir):
            log.info("%s is remote: no workdir lock, make sure one run at a time uses it",
                     workdir)
            return None
        return wd.WorkdirLock(workdir).acquire()
    return multihost.agree_on_error(take)


def train(config: Any, workdir: str) -> dict:
    """Train `config` in `workdir`, resuming from its latest checkpoint. Returns final metrics.

    Holds the workdir lock (`lock_workdir`) from start to end. In a
    multi-process job (`multihost`), an error in any process ends every
    process within seconds, each with one line (`multihost.fail_fast`).
    """
    setup_logging()
    check_config(config)  # config errors before anything is built or joined
    multihost.join(config)
    status = multihost.RunStatus()
    watch = multihost.PeerWatch(status, multihost.options(config)["peer_timeout_s"])
    try:
        check_model(config)  # the tokenizer, traced shapes: before the workdir is touched
        workdir = wd.resolve(workdir)
        lock = lock_workdir(workdir)
        try:
            return _train(config, workdir, status)
        finally:
            if lock is not None:
                lock.release()
    except BaseException as e:
        multihost.fail_fast(e, status)  # ends this process in a multi-process job
        raise
    finally:
        watch.done()


def _train(config: Any, workdir: str, status: multihost.RunStatus) -> dict:
    model = build(config.model)
    check_workdir(config, workdir)
    resolve_train_shards(config)

    trainer = build_trainer(config, model=model)
    mesh = trainer.mesh
    local_batch = shd.local_batch_size(int(config.batch_size), mesh)
    total = int(config.total_steps)
    log.info("mesh %s | %d processes | global batch %d", shd.describe(mesh),
             jax.process_count(), config.batch_size)

    ckpt = Checkpointer(workdir, keep=int(config.keep_checkpoints))
    status.last_checkpoint = ckpt.last_complete_step
    if jax.process_index() == 0:  # this run holds the workdir lock
        for path in ckpt.remove_partial():
            log.info("removed %s, left by a save that did not finish", path)
    data_state = None
    reset_stream = bool(config.data.train.get("reset_stream_on_resume"))
    if ckpt.latest_step() is not None:
        try:
            state, data_state, start = trainer.restore(ckpt, reset_stream=reset_stream)
        except UserError:
            raise
        except (ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0][:300]
            raise ConfigError(f"checkpoint in {ckpt.directory} does not fit the model of this "
                              f"config ({first}); use a new --workdir.") from None
        log.info("resumed from step %d in %s", start, ckpt.directory)
    else:
        state, start = trainer.init_state(int(config.seed)), 0
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    log.info("model %s: %.2fM parameters", config.model.name, n_params / 1e6)

    data = build_train_iterator(trainer.family.data_config(config), local_batch,
                                media=trainer.media)
    if start and reset_stream:
        log.warning("config.data.train.reset_stream_on_resume=True: the train state resumes at "
                    "step %d but the data stream starts fresh from its seed (the checkpoint's "
                    "data position is not used)", start)
    elif data_state is not None:
        data.set_state(data_state)  # StreamMismatchError if the stream is another one

    # Model FLOPs of a step: with patch dropout the kept tokens', every patch in the
    # unmasked tail; each logged row takes the mean over the steps it covers.
    flops = model_train_flops(config)
    tail_flops = (model_train_flops(unmasked_config(config))
                  if trainer.unmasked_from is not None else flops)
    interval_flops, interval_steps = 0.0, 0
    peak = peak_flops_per_device(config.get("peak_flops"), mesh.devices.flat[0])
    writer = MetricsWriter(workdir, resume_step=start)
    mh = multihost.options(config)
    stop = multihost.StopAgreement(mesh, every=mh["stop_check_every"],
                                   deadline_s=mh["preemption_deadline_s"], status=status)
    progress = Progress(start, total)
    health = LossHealth.from_config(config)
    batch_keys = trainer.family.batch_keys(config)
    objectives = list(config.objectives.keys())
    evals_every = int(config.evals.get("every", 0) or 0)
    last = {}
    pending: Optional[tuple[int, dict]] = None
    step = start
    try:
        while step < total:
            local = next(data)
            batch = make_global_batch({k: local[k] for k in batch_keys if k in local},
                                      trainer.batch_sharding)
            unmasked = trainer.unmasked(step)
            if unmasked and step in (start, trainer.unmasked_from):
                log.info("steps %d-%d: unmasked tuning (model.image.patch_dropout off, "
                         "unmasked_tuning_steps=%d)", step + 1, total,
                         total - trainer.unmasked_from)
            state, metrics = trainer.step(state, batch, unmasked=unmasked)
            interval_flops += tail_flops if unmasked else flops
            interval_steps += 1
            step += 1
            status.step = step
            stop_now = stop.should_stop()  # the same answer on every process
            # NaN guard with a one-step lag, so the host never stalls the device.
            if pending is not None:
                _nan_check(jax.device_get(pending[1]), pending[0], objectives, config.optim)
            pending = (step, metrics)
            if step == start + 1:
                health.first_step(float(jax.device_get(metrics["loss"])))
            is_last = step == total
            if step % int(config.log_every) == 0 or is_last:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                _nan_check(m, step, objectives, config.optim)
                t = progress.tick(step)
                m["step_time"] = t["step_time"]
                m["samples_per_s"] = config.batch_size / t["step_time"]
                m["step_flops"] = interval_flops / interval_steps
                interval_flops, interval_steps = 0.0, 0
                m["mfu"] = (m["step_flops"] / t["step_time"] / (peak * jax.device_count())
                            if peak else None)
                m["tflops_per_device"] = (m["step_flops"] / t["step_time"] / jax.device_count()
                                          / 1e12)
                warning = health.update(step, m)
                if jax.process_index() == 0:
                    log.info(format_line(step, total, m, t["eta_s"]))
                    if warning:
                        log.warning(warning)
                writer.write(step, m)
                last = m
            if step % int(config.checkpoint_every) == 0 or is_last or stop_now:
                _nan_check(jax.device_get(metrics), step, objectives, config.optim)
                status.saving = step
                ckpt.save(step, trainer.checkpoint_view(state), data.get_state(), force=True,
                          frozen_sources=init_entries(config))
                status.saving = None
            if evals_every and step % evals_every == 0 and not is_last:
                _run_evals(config, model, state, mesh, step, writer, workdir)
            if stop_now:
                status.saving = step
                ckpt.wait()
                log.info("checkpoint at step %d written; exiting for preemption", step)
                return last
        status.saving = step
        ckpt.wait()
        status.saving = None
        results = _run_evals(config, model, state, mesh, step, writer, workdir)
        last.update(results)
        return last
    except BaseException as e:
        multihost.fail_fast(e, status)  # before the cleanup below, which may wait on peers
        raise
    finally:
        stop.close()
        ckpt.close()
        data.close()
        writer.close()


def _run_evals(config, model, state, mesh, step, writer, workdir) -> dict:
    if not config.get("evals") or not config.evals.get("zeroshot"):
        return {}
    results = run_evals(config, model, {"params": state["params"]}, mesh, step=step,
                        workdir=workdir)
    writer.write(step, {f"eval/{k}": v for k, v in results.items()
                        if isinstance(v, (int, float))}, jsonl=False)
    return results
