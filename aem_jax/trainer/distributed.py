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

Rollouts: each process plays its own share of a step's tasks
(:func:`task_share`; a task's G rollouts stay together) with its own copy
of the policy on its own devices (:func:`process_local`), so it runs only
its own environments and sandboxes; the trainer then assembles the global
batch from every process's rows. :func:`check_agreement` compares a few
integers across processes each step (step, config, keys, parameters).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


# Process-local rollouts ------------------------------------------------------


def task_share(num_tasks: int, process_index: int | None = None, process_count: int | None = None) -> range:
    """The task indices of a step this process plays: a contiguous block of
    ``num_tasks / process_count`` (all G rollouts of a task stay on one
    process, so its group statistics need no communication)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if num_tasks % count:
        raise ValueError(f"config.rollout.num_tasks={num_tasks} must be a multiple of the number of "
                         f"processes ({count}): each process plays an equal share of the tasks")
    per = num_tasks // count
    return range(index * per, (index + 1) * per)


def local_mesh(mesh: Mesh) -> Mesh:
    """The block of ``mesh`` made of this process's devices, with the same axis names.

    Raises ValueError when this process's devices are not a box of the mesh
    (``sharding.make_mesh`` lays processes out in blocks).
    """
    me = jax.process_index()
    mine = np.vectorize(lambda d: d.process_index == me)(mesh.devices)
    where = np.argwhere(mine)
    lo, hi = where.min(axis=0), where.max(axis=0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    if not mine[box].all() or mine.sum() != mine[box].size:
        raise ValueError(f"process {me}'s devices are not one block of the mesh {dict(mesh.shape)}")
    return Mesh(mesh.devices[box], mesh.axis_names, axis_types=mesh.axis_types)


def process_local(tree: Any, mesh: Mesh) -> tuple[Any, Mesh]:
    """(a copy of ``tree`` on this process's devices only, the local mesh).

    Each process samples its own episodes with its own copy of the policy,
    so no sampling step is a collective (processes play different prompts
    for different numbers of turns). A leaf split only over mesh axes that
    lie inside one process is already whole on every process and is just
    re-wrapped; a leaf split across processes is first regathered over
    those axes (one collective, every process together). One process:
    ``(tree, mesh)`` unchanged.
    """
    if jax.process_count() == 1:
        return tree, mesh
    local = local_mesh(mesh)
    inside = {name for name in mesh.axis_names if local.shape[name] == mesh.shape[name]}

    def axes_of(entry) -> tuple[str, ...]:
        return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)

    def local_spec(x) -> PartitionSpec:
        spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else PartitionSpec()
        kept = []
        for entry in spec:
            axes = tuple(a for a in axes_of(entry) if a in inside)
            kept.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*kept)

    leaves, treedef = jax.tree.flatten(tree)
    arrays = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and not x.is_fully_addressable]
    specs = {i: local_spec(leaves[i]) for i in arrays}
    regather = [i for i in arrays if specs[i] != leaves[i].sharding.spec]
    if regather:
        out = jax.jit(lambda xs: xs, out_shardings=[NamedSharding(mesh, specs[i]) for i in regather])(
            [leaves[i] for i in regather])
        for i, x in zip(regather, out):
            leaves[i] = x
    for i in arrays:
        x = leaves[i]
        leaves[i] = jax.make_array_from_single_device_arrays(
            x.shape, NamedSharding(local, specs[i]), [s.data for s in x.addressable_shards])
    return jax.tree.unflatten(treedef, leaves), local


def gather_rows(x: np.ndarray) -> np.ndarray:
    """[P, ...]: every process's ``x`` (same shape and dtype on each), on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def check_agreement(values: Mapping[str, int]) -> None:
    """Raises RuntimeError unless every process passed the same ``values``.

    A cheap per-step check (one all-gather of a few integers) that the
    processes run the same step of the same config with the same keys and
    parameters: silently diverging hosts would train on inconsistent data.
    All processes must call it together, with the same keys.
    """
    names = sorted(values)
    # int32 (what an all-gather carries without jax_enable_x64): values mod the Mersenne prime 2^31 - 1
    mine = np.array([int(values[n]) % (2**31 - 1) for n in names], np.int32)
    table = gather_rows(mine)
    for column, name in enumerate(names):
        seen = table[:, column]
        if (seen != seen[0]).any():
            per = ", ".join(f"process {p}: {int(v)}" for p, v in enumerate(seen))
            raise RuntimeError(f"processes disagree on {name} ({per}); every host must run the same "
                               "code, config and checkpoint")
