"""Multi-process (multi-host) start-up.

A TPU slice with several hosts, a GPU cluster or several local CPU processes
all run the *same* program once per host; ``jax.distributed.initialize()``
connects them so that ``jax.devices()`` lists every device of every process
and one mesh spans them all. It must run before anything touches a JAX
backend, so the trainer calls :func:`maybe_initialize` first thing in main.

When to initialise (``flag`` argument, e.g. from ``--distributed``):

* ``True``: always (fails loudly if the coordinator cannot be reached);
* ``False``: never (single process);
* ``None``: when the environment asks for it (``AEM_JAX_DISTRIBUTED=1``, set
  by ``launch/tpu.py run``; ``=0`` forbids it) or announces several processes:
  ``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES`` > 1 (and
  ``JAX_PROCESS_ID``), a multi-host Cloud TPU VM (``TPU_WORKER_HOSTNAMES``
  lists several hosts; JAX then auto-detects everything), or a SLURM /
  Open MPI launch with more than one task.

CPU processes exchange collectives through gloo, selected before the
backend starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax

log = logging.getLogger(__name__)

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
REQUEST_ENV = "AEM_JAX_DISTRIBUTED"


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from e


def launched_multi_process(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment says this is one process of several."""
    env = os.environ if env is None else env
    request = env.get(REQUEST_ENV, "").strip().lower()
    if request in ("1", "true", "yes"):
        return True
    if request in ("0", "false", "no"):
        return False
    if request:
        raise ValueError(f"{REQUEST_ENV}={env[REQUEST_ENV]!r} must be one of 1/true/yes or 0/false/no")
    num = _int_env(env, NUM_PROCESSES_ENV)
    if env.get(COORDINATOR_ENV) and (num is None or num > 1):
        return True
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return True
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        count = _int_env(env, name)
        if count is not None and count > 1:
            return True
    return False


def initialize_kwargs(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Arguments for ``jax.distributed.initialize`` read from ``JAX_*`` variables.

    Empty when none are set, which lets JAX auto-detect Cloud TPU, SLURM and
    MPI clusters.
    """
    env = os.environ if env is None else env
    kwargs: dict[str, Any] = {}
    if env.get(COORDINATOR_ENV):
        kwargs["coordinator_address"] = env[COORDINATOR_ENV]
    num = _int_env(env, NUM_PROCESSES_ENV)
    pid = _int_env(env, PROCESS_ID_ENV)
    if num is not None:
        if num < 1:
            raise ValueError(f"{NUM_PROCESSES_ENV}={num} must be >= 1")
        kwargs["num_processes"] = num
    if pid is not None:
        if num is not None and not 0 <= pid < num:
            raise ValueError(f"{PROCESS_ID_ENV}={pid} must be in [0, {NUM_PROCESSES_ENV}={num})")
        kwargs["process_id"] = pid
    return kwargs


def maybe_initialize(
    flag: bool | None = None,
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_collectives: str = "gloo",
) -> bool:
    """Connects this process to the others if asked or announced.

    Explicit arguments override the ``JAX_*`` environment variables. Returns
    whether JAX now runs distributed. Calling it again is harmless.
    """
    if jax.distributed.is_initialized():
        return True
    explicit = {
        k: v
        for k, v in dict(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
        ).items()
        if v is not None
    }
    if flag is False or (flag is None and not explicit and not launched_multi_process()):
        return False
    # Only the CPU client reads this; it must be set before backends start.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs = {**initialize_kwargs(), **explicit}
    log.info("jax.distributed.initialize(%s)", kwargs)
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d, %d local / %d global devices", *_counts())
    return True


def _counts() -> tuple[int, int, int, int]:
    return jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count()


def process_info() -> dict[str, Any]:
    """Process and device counts, for the run's log and metadata."""
    index, count, local, total = _counts()
    return {
        "process_index": index,
        "process_count": count,
        "local_devices": local,
        "devices": total,
        "platform": jax.devices()[0].platform,
    }


def is_primary() -> bool:
    """Whether this process writes logs, metrics and plots (process 0)."""
    return jax.process_index() == 0
