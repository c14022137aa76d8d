"""Process start-up shared by training and evaluation: joining a multi-process job."""
from __future__ import annotations

import os

import jax


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` when the environment describes several processes.

    Explicit: MMJAX_COORDINATOR (host:port), MMJAX_NUM_PROCESSES, MMJAX_PROCESS_ID.
    Auto-detected by JAX: SLURM (SLURM_NTASKS > 1), Cloud TPU pods, Open MPI.
    """
    env = os.environ
    if jax.distributed.is_initialized():
        return
    if env.get("MMJAX_COORDINATOR"):
        jax.distributed.initialize(env["MMJAX_COORDINATOR"], int(env["MMJAX_NUM_PROCESSES"]),
                                   int(env["MMJAX_PROCESS_ID"]))
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or env.get("TPU_WORKER_HOSTNAMES", "").count(",") \
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()
