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
of the policy on its own devices (:func:`process_local`: in the compute
dtype, split over all the host's chips; ``sharding.make_mesh`` lays each
host's chips out as one block of the mesh), so it runs only its own
environments and sandboxes; the trainer then assembles the global
batch from every process's rows. :func:`check_agreement` compares a few
integers across processes each step (step, config, keys, parameters).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
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


@dataclasses.dataclass(frozen=True)
class HostLayout:
    """A mesh seen as a grid of host blocks: ``n_a = hosts[a] * local[a]`` on every axis.

    Host ``(i, j, k)`` of the grid holds the devices
    ``[i*l_0:(i+1)*l_0, j*l_1:(j+1)*l_1, k*l_2:(k+1)*l_2]``
    (``sharding.make_mesh`` builds meshes like this for several processes).
    """

    mesh: Mesh
    local: tuple[int, ...]          # one host's block, per mesh axis
    hosts: tuple[int, ...]          # blocks per mesh axis
    owners: np.ndarray              # [*hosts]: the process of each block

    def view(self) -> Mesh:
        """The mesh's devices, in the same order, with each axis ``a`` split into
        ``host_a`` (which block) and ``a`` (where inside the block): a sharding
        over the inner axes alone puts a whole copy on every host's devices."""
        names = [n for a in self.mesh.axis_names for n in (f"host_{a}", a)]
        shape = [n for pair in zip(self.hosts, self.local) for n in pair]
        types = [t for t in self.mesh.axis_types for _ in range(2)]
        return Mesh(self.mesh.devices.reshape(shape), tuple(names), axis_types=tuple(types))

    def block(self, process: int) -> tuple[slice, ...]:
        where = np.argwhere(self.owners == process)
        if len(where) != 1:
            raise ValueError(f"process {process} holds no block of the mesh {dict(self.mesh.shape)}")
        return tuple(slice(i * l, (i + 1) * l) for i, l in zip(where[0], self.local))

    def local_mesh(self, process: int) -> Mesh:
        """Process ``process``'s block, with the mesh's axis names and types."""
        return Mesh(self.mesh.devices[self.block(process)], self.mesh.axis_names, axis_types=self.mesh.axis_types)


def host_layout(mesh: Mesh, process_of: Callable[[Any], int] | None = None) -> HostLayout:
    """``mesh`` as a grid of host blocks; ValueError, naming the mesh and the
    per-process device count, when a process's devices are not one block of a
    grid (e.g. a multi-host mesh from ``jax.make_mesh`` rather than
    ``sharding.make_mesh``). ``process_of`` says which process holds a device
    (default ``Device.process_index``; tests simulate hosts with it)."""
    process_of = process_of or (lambda d: d.process_index)
    owner = np.vectorize(lambda d: int(process_of(d)), otypes=[np.int64])(mesh.devices)
    processes, counts = np.unique(owner, return_counts=True)
    shape = dict(mesh.shape)
    if len(set(counts.tolist())) != 1:
        raise ValueError(f"the mesh {shape} cannot be split by host: its processes hold different numbers of its "
                         f"devices ({dict(zip(processes.tolist(), counts.tolist()))})")
    per_host = int(counts[0])
    first = np.argwhere(owner == owner.flat[0])
    local = tuple(int(n) for n in first.max(axis=0) + 1)
    hosts = tuple(n // l for n, l in zip(owner.shape, local))
    blocked = math.prod(local) == per_host and all(n % l == 0 for n, l in zip(owner.shape, local))
    if blocked:
        grid = owner.reshape([n for pair in zip(hosts, local) for n in pair])
        grid = grid.transpose([2 * i for i in range(owner.ndim)] + [2 * i + 1 for i in range(owner.ndim)])
        grid = grid.reshape(hosts + (per_host,))
        blocked = bool((grid == grid[..., :1]).all())
    if not blocked:
        raise ValueError(f"the mesh {shape} is not laid out by host: each of its {len(processes)} processes' "
                         f"{per_host} devices must form one block of it (build the mesh with "
                         "aem_jax.sharding.make_mesh, which lays hosts out in blocks)")
    return HostLayout(mesh, local, hosts, grid[..., 0])


def local_mesh(mesh: Mesh) -> Mesh:
    """The block of ``mesh`` made of this process's devices, with the same axis names.

    Raises ValueError when this process's devices are not a block of the mesh
    (:func:`host_layout`; ``sharding.make_mesh`` lays processes out in blocks).
    """
    return host_layout(mesh).local_mesh(jax.process_index())


def _axes_of(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def host_copy_spec(spec: PartitionSpec, shape: tuple[int, ...], local: Mesh) -> PartitionSpec:
    """How a host's rollout copy of a parameter is split over that host's chips (``local``).

    A parameter trained with ``spec`` keeps its dimensions' axes, restricted
    to the host's block; a dimension split over ``fsdp`` is split over the
    host's ``data`` devices too (parameters are never split over ``data`` in
    training, where each data replica needs them whole), so the copy is
    spread over every chip of the host rather than repeated on its data
    replicas. Axes of size 1 are dropped, and a dimension keeps the longest
    prefix of its axes whose size product divides it (the rule of
    ``sharding.logical_to_spec``).
    """
    out = []
    for dim, entry in enumerate(spec):
        axes = [a for a in _axes_of(entry) if a != "data"]
        if "fsdp" in axes and "data" in local.shape:
            axes.insert(axes.index("fsdp") + 1, "data")
        axes = [a for a in axes if local.shape.get(a, 1) > 1]
        while axes and shape[dim] % math.prod(local.shape[a] for a in axes):
            axes.pop()
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def same_shards(train_spec: PartitionSpec, copy_spec: PartitionSpec, view: Mesh) -> bool:
    """Whether a host's shards of a parameter trained with ``train_spec`` are
    already those of its host copy split by ``copy_spec`` (then the copy
    re-wraps them, in the same dtype, instead of copying).

    Both are compared in the axes of the view mesh (:meth:`HostLayout.view`),
    where a training axis ``a`` is ``(host_a, a)`` and a copy's axis is
    the inner ``a``, with axes of size 1 and trailing whole dimensions dropped.
    """
    size = dict(view.shape)

    def canonical(spec, training):
        out = [tuple(n for a in _axes_of(e) for n in ((f"host_{a}", a) if training else (a,)) if size[n] > 1)
               for e in spec]
        while out and not out[-1]:
            out.pop()
        return tuple(out)

    return canonical(train_spec, True) == canonical(copy_spec, False)


def host_copy(tree: Any, layout: HostLayout, process: int, dtype: Any = None) -> tuple[Any, Mesh]:
    """(process ``process``'s rollout copy of ``tree``, its local mesh).

    Every array of ``tree`` on ``layout.mesh``'s devices is cast to ``dtype``
    (floating leaves; None keeps them) and split over the process's own
    devices by :func:`host_copy_spec`. One jitted copy, a collective every
    process joins, writes the copies of all hosts at once: its output is
    sharded over the inner axes of :meth:`HostLayout.view` (replicated over
    the host axes), so each host's devices end up with a whole copy, and
    this process's shards are re-wrapped as arrays on its local mesh. A
    leaf already split that way and in ``dtype`` is re-wrapped without a
    copy. Other leaves are returned as they are.
    """
    local = layout.local_mesh(process)
    mine = set(local.devices.flat)
    view = layout.view()
    devices = set(layout.mesh.devices.flat)
    leaves, treedef = jax.tree.flatten(tree)
    targets = {}
    for i, x in enumerate(leaves):
        if not isinstance(x, jax.Array) or set(x.sharding.device_set) != devices:
            continue
        spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else PartitionSpec()
        cast = dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.dtype(dtype)
        targets[i] = (host_copy_spec(spec, x.shape, local), jnp.dtype(dtype) if cast else x.dtype)
    copy = [i for i, (spec, dt) in targets.items()
            if dt != leaves[i].dtype or not isinstance(leaves[i].sharding, NamedSharding)
            or not same_shards(leaves[i].sharding.spec, spec, view)]
    if copy:
        dts = [targets[i][1] for i in copy]
        out = jax.jit(lambda xs: [x.astype(d) for x, d in zip(xs, dts)],
                      out_shardings=[NamedSharding(view, targets[i][0]) for i in copy])([leaves[i] for i in copy])
        for i, x in zip(copy, out):
            leaves[i] = x
    for i, (spec, _) in targets.items():
        x = leaves[i]
        shards = [s.data for s in x.addressable_shards if s.device in mine]
        leaves[i] = jax.make_array_from_single_device_arrays(x.shape, NamedSharding(local, spec), shards)
    return jax.tree.unflatten(treedef, leaves), local


def process_local(tree: Any, mesh: Mesh, dtype: Any = None) -> tuple[Any, Mesh]:
    """(a copy of ``tree`` on this process's devices only, the local mesh).

    Each process samples its own episodes with its own copy of the policy,
    so no sampling step is a collective (processes play different prompts
    for different numbers of turns). The copy (:func:`host_copy`) is in
    ``dtype`` (the compute dtype: float32 master weights are cast to
    bfloat16 once, which the model's matmuls would do anyway) and split over
    all of this host's chips, ``fsdp``-style over its ``data`` and ``fsdp``
    devices plus ``tensor``, rather than repeated on the host's data
    replicas. All processes must call it together. One process:
    ``(tree, mesh)`` unchanged (the sampler uses the training parameters).
    """
    if jax.process_count() == 1:
        return tree, mesh
    return host_copy(tree, host_layout(mesh), jax.process_index(), dtype)


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
