"""Device mesh, logical-axis rules and sharded state creation: the one
implementation of logical -> mesh axis mapping, for parameters and activations.

It sits at the top of the package, not in the trainer, because both sides
need it and data flows one way: the models constrain their activations with
:func:`constrain` and load checkpoints with :func:`logical_to_spec`; the
trainer builds the mesh, places parameters and batches. Neither keeps its
own copy, so a parameter and an activation with the same logical names can
never be laid out by different fallbacks.

Parameters and activations carry *logical* axis names (set by the models
through nnx metadata, e.g. ``nnx.Param(x, out_sharding=("embed", "mlp"))`` or
``nnx.with_partitioning(init, ("embed", "mlp"))``). A small rule table maps
each logical name to zero, one or several *mesh* axes, so changing the
parallelism layout is a config edit, never a code edit:

| logical name | mesh axes          | why |
|--------------|--------------------|-----|
| batch        | ("data", "fsdp")   | every data-parallel replica and FSDP shard sees its own examples |
| length       | None               | sequences stay whole on a device |
| embed        | "fsdp"             | ZeRO-3 style: parameters split along the model dimension |
| mlp, heads, kv_heads, vocab | "tensor" | Megatron-style tensor parallelism of the wide dimensions |
| head_dim, norm | None             | small dimensions are replicated |
| layers       | None               | the stacked layer axis of scanned models: each device holds its share of every layer, and the scan reads one layer at a time |

Mesh axes are always ``("data", "fsdp", "tensor")`` in this order, so the
``tensor`` axis (the most communication-heavy) is the innermost one and lands
on neighbouring chips. A logical dimension whose size is not divisible by the
product of its mesh axes keeps the longest prefix of those axes that divides
it and is replicated on the rest (e.g. ``kv_heads=2`` on ``tensor=4`` is
replicated): the rule stays as written and nothing crashes. The same
fallback applies to activation constraints inside the models.

Activations use the same table minus the mesh axes the batch is split over
(:func:`activation_rules`): an ``[B, T, D]`` activation is split by batch over
``("data", "fsdp")`` and whole along ``embed``.

Axis types are set explicitly to ``AxisType.Auto`` by default: XLA's sharding
propagation then fills in every intermediate from the parameter shardings and
the activation constraints, which is what the logical-annotation style of the
models expects. ``axis_type="explicit"`` is available for code written for
JAX's sharding-in-types mode.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)

_AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


def mesh_shape(shape: Mapping[str, int] | None, num_devices: int) -> tuple[int, ...]:
    """Resolves a ``{"data": d, "fsdp": f, "tensor": t}`` dict to a full shape.

    Missing axes have size 1; at most one axis may be -1, meaning "all the
    devices the other axes leave". The product must equal ``num_devices``.
    """
    shape = dict(shape or {"data": -1})
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh shape has unknown axes {unknown}; allowed axes are {MESH_AXES}")
    sizes = [int(shape.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh shape {shape} is invalid: sizes must be positive, at most one may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh shape {shape}: {num_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh shape {shape} needs {math.prod(sizes)} devices but {num_devices} are available; "
            "make the product of the axis sizes equal the device count (or use -1 for one axis)"
        )
    return tuple(sizes)


def make_mesh(
    shape: Mapping[str, int] | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
    axis_type: str = "auto",
) -> Mesh:
    """Builds a ``("data", "fsdp", "tensor")`` mesh over all (or the given) devices.

    Args:
      shape: axis sizes, e.g. ``{"data": 2, "fsdp": 2, "tensor": 2}``; missing
        axes are 1 and one axis may be -1. ``None`` means pure data parallel.
      devices: devices to use (default: ``jax.devices()``, all processes).
      axis_type: "auto" (XLA propagates shardings) or "explicit"
        (sharding in types); set on every axis.

    Devices of one process are laid out by ``jax.make_mesh`` (physical torus
    order). Devices of several processes are laid out host-blocked
    (:func:`host_blocked_devices`): each process's devices form one block,
    filled from ``tensor`` outwards, so each host can sample on its own chips.
    """
    if axis_type not in _AXIS_TYPES:
        raise ValueError(f"axis_type={axis_type!r} is not one of {sorted(_AXIS_TYPES)}")
    devices = list(devices) if devices is not None else jax.devices()
    sizes = mesh_shape(shape, len(devices))
    types = (_AXIS_TYPES[axis_type],) * len(MESH_AXES)
    if len({d.process_index for d in devices}) > 1:
        return Mesh(host_blocked_devices(sizes, devices), MESH_AXES, axis_types=types)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=types, devices=devices)


def host_block_shape(sizes: Sequence[int], per_host: int) -> tuple[int, ...]:
    """The shape of one process's block of a mesh of axis ``sizes``, ``per_host`` devices each.

    Filled from the innermost axis out: ``l_a = gcd(n_a, r)`` with ``r`` the
    devices still to place (``per_host`` at ``tensor``, then what is left for
    ``fsdp``, then ``data``), so ``tensor`` stays inside a host when it fits
    and the hosts line up along the outer axes. Taking the gcd prime factor by
    prime factor, this succeeds whenever ``per_host`` divides the device count;
    otherwise ValueError.
    """
    left, block = per_host, []
    for n in reversed(tuple(sizes)):
        block.append(math.gcd(n, left))
        left //= block[-1]
    if left != 1 or per_host < 1:
        raise ValueError(f"a mesh of axis sizes {dict(zip(MESH_AXES, sizes))} cannot be split into blocks of "
                         f"{per_host} devices per process: {per_host} must divide the device count "
                         f"{math.prod(sizes)}")
    return tuple(reversed(block))


def host_blocked_devices(
    sizes: Sequence[int],
    devices: Sequence[Any],
    process_of: Callable[[Any], int] = lambda d: d.process_index,
) -> np.ndarray:
    """``devices`` as an array of shape ``sizes`` in which each process's devices
    are one block (a box of :func:`host_block_shape`), the blocks laid out in
    process order.

    That is what lets every process play its rollouts on its own devices
    (``trainer.distributed.process_local``): the mesh is then a grid of
    host blocks, ``n_a = h_a * l_a`` on every axis, and the devices of host
    ``(i, j, k)`` are ``[i*l_d:(i+1)*l_d, j*l_f:(j+1)*l_f, k*l_t:(k+1)*l_t]``.
    ``jax.make_mesh`` orders devices by the physical torus instead and can
    scatter a host's chips over the mesh. Inside a block the devices are
    ordered by ``mesh_utils.create_device_mesh`` (physical neighbours along
    the inner axes on TPU). ``process_of`` says which process holds a device
    (tests simulate hosts with it). ValueError, naming the mesh and the
    per-process device counts, when the processes hold different numbers of
    devices.
    """
    from jax.experimental import mesh_utils

    sizes = tuple(int(s) for s in sizes)
    by_process: dict[int, list[Any]] = {}
    for d in devices:
        by_process.setdefault(int(process_of(d)), []).append(d)
    counts = {p: len(ds) for p, ds in sorted(by_process.items())}
    if len(set(counts.values())) != 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: the processes hold different numbers of its devices "
                         f"({counts}); a host-blocked mesh needs the same number on every process")
    per_host = next(iter(counts.values()))
    local = host_block_shape(sizes, per_host)
    hosts = tuple(n // l for n, l in zip(sizes, local))
    blocks = []
    for p in sorted(by_process):
        mine = by_process[p]
        block = None
        for split in (False, True):
            try:
                block = mesh_utils.create_device_mesh(local, mine, allow_split_physical_axes=split)
                break
            except (ValueError, NotImplementedError, AssertionError):
                continue
        if block is None:  # no layout along physical axes: any order is correct
            block = np.asarray(sorted(mine, key=lambda d: d.id), dtype=object).reshape(local)
        blocks.append(np.asarray(block, dtype=object))
    # [h_d, h_f, h_t, l_d, l_f, l_t] -> [h_d, l_d, h_f, l_f, h_t, l_t] -> sizes
    stacked = np.stack(blocks).reshape(hosts + local)
    n = len(sizes)
    order = [i for pair in zip(range(n), range(n, 2 * n)) for i in pair]
    return stacked.transpose(order).reshape(sizes)


def _as_tuple(axes: str | Sequence[str] | None) -> tuple[str, ...]:
    if axes is None:
        return ()
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: LogicalRules = DEFAULT_RULES,
    *,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """Maps logical axis names to a ``PartitionSpec`` through the rule table.

    A logical name missing from the rules is replicated. A mesh axis already
    used by an earlier dimension is dropped (a mesh axis may shard only one
    dimension). With ``shape`` and ``mesh`` given, each dimension keeps the
    longest prefix of its mesh axes whose size product divides it.
    """
    table = dict(rules)
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for dim, name in enumerate(logical_axes):
        axes = tuple(a for a in _as_tuple(table.get(name) if name else None) if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.shape)
        if shape is not None and mesh is not None:
            while axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
                axes = axes[:-1]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _variable_logical_axes(var: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical names a Variable was annotated with, if any."""
    meta = var.get_metadata()
    for key in ("out_sharding", "sharding", "sharding_names"):
        names = meta.get(key)
        if names:
            return tuple(names)
    return None


def _leaf_sharding(value: Any, names: tuple | None, mesh: Mesh, rules: LogicalRules) -> NamedSharding:
    shape = getattr(value, "shape", ())
    if names is None or len(names) != len(shape):
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, logical_to_spec(names, rules, shape=shape, mesh=mesh))


def state_shardings(tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """A tree of ``NamedSharding`` with the structure of ``tree``.

    ``tree`` is an ``nnx.State`` / graph node / any pytree whose leaves are
    arrays, ``jax.ShapeDtypeStruct`` or ``nnx.Variable``s. Variables annotated
    with logical names are sharded by the rules (divisibility permitting);
    every other leaf is replicated.
    """

    def one(leaf: Any) -> Any:
        if isinstance(leaf, nnx.Variable):
            return leaf.replace(_leaf_sharding(leaf.get_value(), _variable_logical_axes(leaf), mesh, rules))
        return _leaf_sharding(leaf, None, mesh, rules)

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_state(tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """``tree`` with every array replaced by a ``ShapeDtypeStruct`` carrying its
    rule-derived sharding: the restore target for :mod:`checkpoint`."""
    shardings = state_shardings(tree, mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def create_sharded(init_fn: Callable[[], Any], mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """Runs ``init_fn`` (returning an nnx graph node, e.g. a model or an
    ``nnx.Optimizer``) so that every array is born with its sharding.

    The node is first traced abstractly to read shapes and logical names, then
    created under ``jax.jit(..., out_shardings=...)``: no full copy of the
    parameters ever lives on one device. Eager per-variable sharding is turned
    off inside because the jit output shardings already place everything (and
    they apply the divisibility fallback that eager sharding lacks).
    """
    with nnx.use_eager_sharding(False):
        graphdef, abs_state = nnx.split(nnx.eval_shape(init_fn))
    shardings = state_shardings(abs_state, mesh, rules)

    def init_state() -> Any:
        with nnx.use_eager_sharding(False):
            return nnx.split(init_fn())[1]

    with use_mesh(mesh, rules):
        state = jax.jit(init_state, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def activation_rules(rules: LogicalRules = DEFAULT_RULES) -> LogicalRules:
    """``rules`` for activations: every name except ``batch`` loses the mesh
    axes the batch is split over.

    An activation ``[B, T, D]`` has both a batch and an ``embed`` dimension;
    with FSDP both rules name ``fsdp``, and a mesh axis may shard only one
    dimension. Activations keep the batch split (each device computes its own
    examples, which is the point of FSDP) and are whole along ``embed``.
    """
    table = dict(rules)
    batch_axes = set(_as_tuple(table.get("batch")))
    out = []
    for name, axes in rules:
        if name != "batch":
            kept = tuple(a for a in _as_tuple(axes) if a not in batch_axes)
            axes = None if not kept else kept[0] if len(kept) == 1 else kept
        out.append((name, axes))
    return tuple(out)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Iterator[Mesh]:
    """Sets ``mesh`` as the current mesh (``jax.set_mesh``) and
    ``activation_rules(rules)`` as flax's logical axis rules in the block.

    Parameters are placed by :func:`create_sharded` / :func:`state_shardings`
    with ``rules`` themselves; the context rules are what the activation
    constraints (:func:`constrain`, called by the models) read, so code that
    maps names one by one never assigns one mesh axis to two dimensions.
    """
    with jax.set_mesh(mesh), nnx.logical_axis_rules(activation_rules(rules)):
        yield mesh


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: LogicalRules | None = None) -> jax.Array:
    """``with_sharding_constraint`` by logical names against the current mesh.

    The mesh is the one set by ``jax.set_mesh`` (see :func:`use_mesh`); the
    rules, unless given, those of the enclosing ``nnx.logical_axis_rules``
    context, else ``activation_rules(DEFAULT_RULES)``. Dimensions the rules
    cannot split evenly fall back as in :func:`logical_to_spec` instead of
    failing inside XLA. A no-op when no mesh (or a one-device mesh) is set, so
    single-device code paths stay untouched.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    if rules is None:
        rules = _current_rules()
    spec = logical_to_spec(logical_axes, rules, shape=x.shape, mesh=mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def _current_rules() -> LogicalRules:
    # flax keeps the rules of the active nnx.logical_axis_rules context here.
    return tuple(core_spmd.get_logical_axis_rules()) or activation_rules(DEFAULT_RULES)


def batch_sharding(mesh: Mesh, ndim: int, rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a ``[B, ...]`` batch array: leading dim by the ``batch`` rule."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh=mesh))


def put_batch(tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """Places a host pytree of ``[B, ...]`` arrays on the mesh, split along B.

    Every process must pass the *same global* arrays (the trainer derives
    rollouts from shared seeds); each process then uploads only the slices its
    own devices hold, so this works unchanged on one host or many. A batch
    size not divisible by the batch axes falls back to fewer axes.
    """

    def one(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.ndim == 0:
            sharding = NamedSharding(mesh, PartitionSpec())
        else:
            names = ("batch",) + (None,) * (x.ndim - 1)
            sharding = NamedSharding(mesh, logical_to_spec(names, rules, shape=x.shape, mesh=mesh))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
    """Bytes of ``tree``'s arrays held by each addressable device."""
    totals: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals
