"""Checkpoints: orbax train state (async) + per-process data iterator state.

Layout of `workdir/`:
  config.json                 the run's config (checked on resume)
  checkpoints/<step>/state    orbax PyTree (params, opt_state, step, rng); frozen
                              parameters loaded from `config.init` sources are left out
  checkpoints/<step>/data     JSON: one data-iterator state per process, and the
                              `frozen_sources` those parameters come from
Orbax writes each step into a temporary folder and renames it when complete,
so an interrupted save is never listed; resume picks the latest complete step.
Restoring takes the target shardings of the current mesh, so a run can
resume on a different mesh.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mmjax.train import workdir as wd

log = logging.getLogger("mmjax")


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    """Save / restore `(state, data_states)` under `workdir/checkpoints`."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = wd.join(wd.resolve(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save),
            item_names=("state", "data"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, data_state: Optional[dict], force: bool = False,
             frozen_sources: Optional[dict] = None) -> bool:
        """Start saving `state` at `step` (async). Every process calls this.

        `data_state` is this process's iterator state; the states of all
        processes are gathered so each one can restore its own.
        `frozen_sources` (prefix -> `config.init` source) records where the
        parameters left out of `state` come from.
        """
        payload = {"process_count": jax.process_count(), "frozen_sources": frozen_sources or {}}
        if jax.process_count() > 1:
            import json
            blob = json.dumps(data_state).encode()
            lengths = multihost_utils.process_allgather(np.array([len(blob)], np.int64))
            size = int(np.max(lengths))
            padded = np.zeros(size, np.uint8)
            padded[:len(blob)] = np.frombuffer(blob, np.uint8)
            gathered = multihost_utils.process_allgather(padded)
            payload["processes"] = [json.loads(bytes(gathered[i][:int(lengths[i][0])]).decode())
                                    for i in range(jax.process_count())]
        else:
            payload["processes"] = [data_state]
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(payload)), force=force)

    def resolve_step(self, step: Optional[int]) -> int:
        """`step`, or the latest one when None; CheckpointError when absent."""
        steps = self.all_steps()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint in {self.directory}")
        elif step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                  f"available steps: {steps or 'none'}")
        return step

    def restore_params_to_host(self, step: Optional[int]) -> tuple[dict, int]:
        """`(params as numpy, step)`: only the parameters, on the host, whatever
        mesh wrote them (used to start another run from this one)."""
        step = self.resolve_step(step)
        reader = ocp.CheckpointManager(self.directory, item_names=("state", "data"), item_handlers={
            "state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})
        try:
            meta = reader.item_metadata(step)["state"]
            meta = getattr(meta, "tree", meta)
            cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
            target = {"params": jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), meta["params"])}
            restored = reader.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True)))
        finally:
            reader.close()
        return jax.tree.map(np.asarray, restored["state"]["params"]), step

    def restore(self, step: Optional[int], abstract_state: Any) -> tuple[dict, Optional[dict], int]:
        """`(state, this process's data state, step)`; `step=None` = latest."""
        step = self.resolve_step(step)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        data = restored["data"]
        data_state = None
        if data and data.get("process_count") == jax.process_count():
            data_state = data["processes"][jax.process_index()]
        elif data:
            log.warning("checkpoint %d was written by %s processes, now %d: the data stream "
                        "restarts from its seed instead of the exact position",
                        step, data.get("process_count"), jax.process_count())
        return restored["state"], data_state, step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
