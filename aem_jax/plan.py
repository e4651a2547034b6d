"""``python -m aem_jax.plan --config=configs/swe.py --topology=v5p-64 [--config.KEY=VALUE ...]``.

Compiles a config's real training step and rollout sampler ahead of time for
a named Cloud TPU slice, on any machine with ``libtpu`` installed (no TPU, no
weights), and reports whether they fit in HBM and how long a step should take.

How: libtpu's *deviceless* topology
(``jax.experimental.topologies.get_topology_desc``) gives the slice's TPU
devices without owning them; the config's mesh is laid over them; the model,
optimiser state and batches are ``jax.ShapeDtypeStruct`` with the shardings
the trainer gives them (``aem_jax.sharding``), built from the model's
``config.json`` alone; then

  train    ``aem_jax.trainer.update.pg_update_step`` jitted as
           ``aem_jax.trainer.pg.init`` jits it (graphdef, optimiser,
           ``LossSettings.from_config``, donated state), on one minibatch of
           ``learner.minibatch_size`` rows of ``rollout.max_context_tokens``
           tokens: forward, backward, optimiser update;
  sampler  ``aem_jax.models.sampler._generate`` (prefill + decode loop, one
           key per row) for one rollout turn of the episodes one process
           plays (``num_tasks / hosts * group_size`` rows) at the longest
           prompt the context allows (``max_context_tokens -
           max_action_tokens``), KV cache of ``max_context_tokens`` slots.
           On a multi-host slice it runs as ``trainer.rollouts`` runs it:
           on the host's own chips (its block of the host-blocked mesh
           ``sharding.make_mesh`` builds) with the process-local copy of
           the parameters (``trainer.distributed.process_local``: in the
           compute dtype, split over all the host's chips),

are lowered and compiled by XLA:TPU, and ``compiled.memory_analysis()`` gives
the per-chip HBM of each. During rollouts the optimiser state (and, on a
multi-host slice, the float32 training shards of the parameters the host
copy was cast or regathered from) stays resident next to the sampler, so it
is added to the sampler's figure.

Slice names (what ``gcloud`` calls the accelerator type): for ``v4`` and
``v5p`` the number counts TensorCores, two per chip (``v5p-64`` is 32 chips,
a 2x4x4 torus); for ``v5e`` (alias ``v5litepod``) and ``v6e`` it counts chips
(``v6e-64`` is 64 chips, 8x8). One JAX device per chip (v4 and v5p
"megacore").

The roofline estimate of a step is ``max(FLOPs / (chips * peak bf16 FLOP/s),
bytes / (chips * HBM bandwidth))`` with the per-chip figures of ``CHIPS``.
XLA's own FLOP count (``compiled.cost_analysis()``) counts the body of a
``while``/``scan`` loop once (layers under ``nnx.scan``, the decode loop),
so it is printed, and the estimate uses the larger of it and the model's
analytic count (:func:`train_flops`).

The last line of output is one JSON object (see :func:`plan`). A config
that does not fit (XLA reports HBM exhausted, or the compiled total exceeds
the capacity) ends with ``"fits": false`` and its largest buffers; an unknown
slice name exits with status 2 and one line listing the known ones.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import sys
import types
from collections.abc import Sequence
from typing import Any

# libtpu reads these when it loads: without them it probes the GCE metadata
# server for the VM's accelerator type and worker hostnames and prints
# warnings, and a second process loading it (two plans at once) fails on its
# lockfile. The planner owns no TPU, so it names none and locks none.
STEPS = ("train", "sampler")
_LIBTPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5p-8", "TPU_WORKER_HOSTNAMES": "localhost",
               "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}

GiB = 1024**3
USAGE_ERROR = 2


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: what a chip holds and how fast it is.

    Figures from Google Cloud's system-architecture pages
    (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): HBM per chip, peak
    bfloat16 FLOP/s per chip, HBM bandwidth per chip.
    """

    generation: str
    device_kind: str          # jax Device.device_kind of its devices
    hbm_bytes: int
    peak_flops: float         # bf16 FLOP/s per chip
    hbm_bandwidth: float      # bytes/s per chip
    torus_3d: bool            # v4/v5p: 3-D torus, name counts TensorCores (2 per chip)
    chip_config: str          # libtpu chip config giving one device per chip

    @property
    def cores_per_name_unit(self) -> int:
        return 2 if self.torus_3d else 1


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "TPU v4", 32 * GiB, 275e12, 1200e9, True, "megacore"),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819e9, False, "default"),
    "v5p": Chip("v5p", "TPU v5", 95 * GiB, 459e12, 2765e9, True, "default"),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1640e9, False, "default"),
}
ALIASES = {"v5litepod": "v5e"}

# chips -> torus shape, the standard slice shapes of each topology family.
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str                 # e.g. "v5p-64"
    chip: Chip
    chips: int
    shape: tuple[int, ...]    # torus / mesh of chips

    @property
    def topology_name(self) -> str:  # libtpu's name, e.g. "v5p:2x4x4"
        return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        """Chips per host: 4 (2x2) on v4/v5p and multi-host v5e/v6e; 1 or 8 on single-host v5e/v6e."""
        if not self.chip.torus_3d and self.chips in (1, 8):
            return (1, 1, 1) if self.chips == 1 else (2, 4, 1)
        return (2, 2, 1)

    @property
    def hosts(self) -> int:
        return max(1, self.chips // math.prod(self.host_bounds))

    def one_host(self) -> Slice:
        """A slice of one host's chips (same generation, same shape): what a host's own programs run on."""
        bounds = self.host_bounds if self.chip.torus_3d else self.host_bounds[:2]
        return Slice(f"{self.name}/host", self.chip, math.prod(bounds), bounds)


def known_slices() -> list[str]:
    names = []
    for gen, chip in CHIPS.items():
        shapes = SHAPES_3D if chip.torus_3d else SHAPES_2D
        names += [f"{gen}-{n * chip.cores_per_name_unit}" for n in shapes]
    return names


def parse_slice(name: str) -> Slice:
    """``v5p-64`` -> 32 chips of TPU v5p in a 2x4x4 torus; ValueError (listing the known ones) otherwise."""
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip())
    gen = ALIASES.get(match.group(1), match.group(1)) if match else None
    if gen in CHIPS:
        chip = CHIPS[gen]
        count = int(match.group(2))
        shapes = SHAPES_3D if chip.torus_3d else SHAPES_2D
        chips, rem = divmod(count, chip.cores_per_name_unit)
        if not rem and chips in shapes:
            return Slice(f"{gen}-{count}", chip, chips, shapes[chips])
    raise ValueError(f"--topology={name!r} is not a known slice; known: {', '.join(known_slices())} "
                     "(v4/v5p count TensorCores, 2 per chip; v5e/v6e count chips)")


def topology_devices(sl: Slice) -> list:
    """The slice's TPU devices from libtpu's deviceless topology (no TPU needed)."""
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(
        platform="tpu", topology_name=sl.topology_name,
        chip_config_name=sl.chip.chip_config, chips_per_host_bounds=sl.host_bounds, num_slices=1)
    devices = list(topo.devices)
    if len(devices) != sl.chips:
        raise RuntimeError(f"libtpu gave {len(devices)} devices for {sl.name}, expected {sl.chips} chips")
    return devices


# Model and shapes -----------------------------------------------------------


def model_config(config):
    """The ``ModelConfig`` the trainer builds for ``config.model``, from config.json alone.

    ``model.source`` is a Hugging Face directory (only its config.json is
    read), a hub id (only config.json is downloaded) or "scratch". The
    config's ``model.dtype`` / ``param_dtype`` / ``remat`` / ``attention`` are
    passed on where both the config and ``ModelConfig`` have them.
    """
    from aem_jax import models

    m = config.model
    fields = {f.name for f in dataclasses.fields(models.ModelConfig)}
    extra = {k: m[k] for k in ("param_dtype", "remat", "attention") if k in fields and k in m}
    extra.setdefault("param_dtype", m.dtype)
    if m.source == "scratch":
        from aem_jax.trainer import setup

        vocab = len(setup.scratch_tokenizer(config))
        return models.ModelConfig(
            vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
            num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim, tie_embeddings=m.tie_embeddings, model_type=m.model_type,
            qkv_bias=m.model_type == "qwen2", qk_norm=m.model_type == "qwen3", dtype=m.dtype,
            rope_theta=10_000.0, max_position_embeddings=config.rollout.max_context_tokens, **extra)
    path = os.path.join(m.source, "config.json")
    if not os.path.isdir(m.source):
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(m.source, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.source={m.source!r}: {path} is missing")
    with open(path) as f:
        hf = json.load(f)
    mc = models.from_hf_config(hf, dtype=m.dtype, source=path)
    return mc.replace(**extra)


def num_loss_turns(config) -> int:
    return config.rollout.max_turns if config.rollout.history == "concatenated" else 1


def abstract_batch(config, mesh, rows: int):
    """A ``PGBatch`` of ShapeDtypeStructs: ``rows`` x ``max_context_tokens``, placed as ``put_batch`` places it."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from aem_jax import sharding
    from aem_jax.batch import TurnBatch
    from aem_jax.trainer.update import PGBatch

    B, T, K = rows, config.rollout.max_context_tokens, num_loss_turns(config)

    def sds(shape, dtype):
        spec = sharding.logical_to_spec(("batch",) + (None,) * (len(shape) - 1), shape=shape, mesh=mesh)
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=NamedSharding(mesh, spec))

    bt, bk = (B, T), (B, K)
    tb = TurnBatch(
        tokens=sds(bt, "int32"), loss_mask=sds(bt, "float32"), turn_ids=sds(bt, "int32"),
        old_logp=sds(bt, "float32"), ref_logp=sds(bt, "float32"), old_entropy=sds(bt, "float32"),
        turn_rewards=sds(bk, "float32"), turn_valid=sds(bk, "bool"), anchor_ids=sds(bk, "int32"),
        group_ids=sds((B,), "int32"), episode_ids=sds((B,), "int32"), turn_offset=sds((B,), "int32"),
        attention_mask=sds(bt, "int32"), done=sds(bk, "bool"))
    return PGBatch(batch=tb, advantages=sds(bt, "float32"), returns=sds(bt, "float32"))


def abstract_opt_state(optimizer, trainable, mesh):
    """The optimiser state of ``trainable`` (ShapeDtypeStructs) with the trainer's
    placement (``update.opt_state_shardings``: Adam's moments sharded as their
    parameters, step counts replicated)."""
    import jax

    from aem_jax.trainer import update

    abstract = jax.eval_shape(optimizer.init, trainable)
    shardings = update.opt_state_shardings(optimizer, trainable, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def abstract_train_state(config, mc, mesh, *, value_head: bool):
    """(graphdef, optimizer, TrainState of ShapeDtypeStructs with the trainer's shardings)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from aem_jax import models, sharding
    from aem_jax.trainer import setup
    from aem_jax.trainer.update import TrainState, init_value_head

    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(nnx.eval_shape(lambda: models.Decoder(mc, rngs=nnx.Rngs(0))))
    params = sharding.abstract_state(params, mesh)
    extra = jax.eval_shape(lambda: init_value_head(mc.hidden_size)) if value_head else {}
    replicated = NamedSharding(mesh, PartitionSpec())
    extra = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), extra)
    optimizer = setup.optimizer(config)
    opt_state = abstract_opt_state(optimizer, (params, extra), mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    state = TrainState(step=scalar, params=params, extra=extra, opt_state=opt_state, nonfinite=scalar)
    return graphdef, optimizer, state


def sampler_placement(params, mesh, hosts: int, dtype=None, host_devices=None):
    """(mesh, parameters, bytes per chip of training copies kept besides) of the rollout sampler.

    One host: the training mesh and parameters themselves. Several:
    ``trainer.distributed.process_local``'s layout, for process 0: the
    block of the (host-blocked) mesh on its own chips
    (``distributed.host_layout``), each parameter in ``dtype`` (the compute
    dtype) and split over all of that host's chips
    (``distributed.host_copy_spec``). A parameter whose dtype or layout
    changes is a new buffer, so its training shard stays resident too.
    ``host_devices``: the chips of a one-host slice to lay the local mesh
    over instead of host 0's chips of the slice (the same block shape).
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from aem_jax.trainer import distributed

    if hosts == 1:
        return mesh, params, 0
    layout = distributed.host_layout(mesh)
    local, view = layout.local_mesh(0), layout.view()
    if host_devices is not None:
        from jax.sharding import Mesh

        from aem_jax import sharding

        local = Mesh(sharding.host_blocked_devices(layout.local, host_devices), mesh.axis_names,
                     axis_types=mesh.axis_types)
    out, kept_bytes = [], 0
    leaves, treedef = jax.tree.flatten(params)
    for x in leaves:
        spec = distributed.host_copy_spec(x.sharding.spec, x.shape, local)
        dt = jnp.dtype(dtype) if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        if dt != x.dtype or not distributed.same_shards(x.sharding.spec, spec, view):
            kept_bytes += math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        out.append(jax.ShapeDtypeStruct(x.shape, dt, sharding=NamedSharding(local, spec)))
    return local, jax.tree.unflatten(treedef, out), kept_bytes


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (the most loaded chip)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def largest_arguments(tree, n: int = 5) -> list[dict[str, Any]]:
    """The ``n`` largest per-chip arrays of an abstract tree, with their paths and specs."""
    import jax

    rows = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        rows.append({"name": jax.tree_util.keystr(path), "shape": list(leaf.shape), "dtype": str(leaf.dtype),
                     "spec": str(leaf.sharding.spec), "bytes_per_chip": math.prod(shard) * leaf.dtype.itemsize})
    return sorted(rows, key=lambda r: -r["bytes_per_chip"])[:n]


# Analytic FLOPs ----------------------------------------------------------------


def matmul_params(mc) -> int:
    """Weights that take part in a matmul per token: attention, MLP, unembedding."""
    D, N, K, H, F = mc.hidden_size, mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.intermediate_size
    layer = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F
    return mc.num_layers * layer + D * mc.vocab_size


def forward_flops(mc, batch: int, length: int) -> float:
    """2 FLOPs per weight per token, plus causal attention: q k^T and (p v)
    over the T(T+1)/2 query-key pairs, 2 * 2 * N * H FLOPs each."""
    dense_flops = 2.0 * matmul_params(mc) * batch * length
    attention = 4.0 * mc.num_layers * mc.num_heads * mc.head_dim * batch * length * (length + 1) / 2
    return dense_flops + attention


REMAT_RECOMPUTE = {"none": 0.0, "dots": 0.0, "offload": 0.0, "full": 1.0}


def train_flops(mc, batch: int, length: int) -> float:
    """Forward + backward (2x forward) + the forward recomputed by full remat."""
    return (3.0 + REMAT_RECOMPUTE.get(getattr(mc, "remat", "none"), 0.0)) * forward_flops(mc, batch, length)


# Compiling -------------------------------------------------------------------------


@dataclasses.dataclass
class StepReport:
    name: str
    fits: bool
    memory: dict[str, int] | None = None     # per chip
    total_bytes: int = 0                      # per chip: arguments + outputs + temporaries - aliased + code
    resident_bytes: int = 0                   # per chip, held outside this program (the sampler: optimiser state)
    compiled_flops: float = 0.0               # XLA's count, whole slice (loop bodies once)
    compiled_bytes: float = 0.0               # XLA's bytes accessed, whole slice
    pallas_calls: int = 0                     # Mosaic (Pallas) kernels in the compiled program, e.g. splash
    error: str | None = None
    largest: list[Any] = dataclasses.field(default_factory=list)


_OOM = re.compile(r"RESOURCE_EXHAUSTED|Ran out of memory|exceeds the (?:memory|HBM)|out of memory", re.I)


def _summarise_error(text: str, limit: int = 1500) -> str:
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines)[:limit]


_UNITS = {"K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}


def _oom_required(text: str) -> int | None:
    """Bytes per chip XLA:TPU said the program needs ("... required for HLO temporaries (49.41G) ...")."""
    match = re.search(r"required for [^(]*\(([\d.]+)([KMGT])\)", text)
    return int(float(match.group(1)) * _UNITS[match.group(2)]) if match else None


_HLO_VALUE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.-]+)\s*=\s*([a-z]+\d*)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
             "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def largest_hlo_values(hlo_text: str, n: int = 5) -> list[dict[str, Any]]:
    """The ``n`` largest array values of a compiled (per-chip) HLO module, by bytes."""
    sizes: dict[tuple[str, str], int] = {}
    for line in hlo_text.splitlines():
        match = _HLO_VALUE.match(line)
        if not match or match.group(2) not in _ITEMSIZE:
            continue
        dims = [int(d) for d in match.group(3).split(",") if d]
        shape = f"{match.group(2)}[{match.group(3)}]"
        sizes[(match.group(1), shape)] = math.prod(dims) * _ITEMSIZE[match.group(2)]
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:n]
    return [{"name": name, "shape": shape, "bytes_per_chip": b} for (name, shape), b in top]


@contextlib.contextmanager
def traced_for_tpu():
    """Makes ``jax.default_backend()`` say "tpu" while a step is traced.

    The planner's own backend is the CPU (the TPU devices come from the
    topology), but code may choose by the backend it runs on
    (``remat="offload"`` needs a backend with host memory; attention's
    "auto" follows the mesh's platform): the program compiled here must be
    the one a TPU host would trace.
    """
    import jax

    real = jax.default_backend
    jax.default_backend = lambda: "tpu"
    try:
        yield
    finally:
        jax.default_backend = real


def compile_step(name: str, jitted, args: Sequence[Any], mesh, chips: int, hbm: int,
                 resident: int = 0, largest: list[Any] | None = None) -> tuple[StepReport, Any]:
    """Lowers and compiles ``jitted(*args)``; a failure for lack of HBM is a report, not an exception."""
    import jax  # noqa: F401

    from aem_jax import sharding

    try:
        with sharding.use_mesh(mesh), traced_for_tpu():
            lowered = jitted.lower(*args)
            compiled = lowered.compile()
    except Exception as e:  # XLA raises JaxRuntimeError / ValueError with its message
        text = str(e)
        if not _OOM.search(text):  # not a verdict on memory: say so, but still end with the record
            return StepReport(name, False, resident_bytes=resident, largest=largest or [],
                              error=f"compile failed ({type(e).__name__}): {_summarise_error(text, 600)}"), None
        required = _oom_required(text)  # temporaries; the arguments come on top
        needed = required + per_chip_bytes(args) if required else 0
        return StepReport(name, False, total_bytes=needed, resident_bytes=resident,
                          error=_summarise_error(text), largest=largest or []), None
    m = compiled.memory_analysis()
    mem = {
        "arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes), "aliased": int(m.alias_size_in_bytes),
        "code": int(m.generated_code_size_in_bytes),
        "host_temporaries": int(getattr(m, "host_temp_size_in_bytes", 0)),
    }
    total = mem["arguments"] + mem["outputs"] + mem["temporaries"] - mem["aliased"] + mem["code"]
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    report = StepReport(name, total + resident <= hbm, mem, total, resident,
                        compiled_flops=float(cost.get("flops", 0.0)) * chips,
                        compiled_bytes=float(cost.get("bytes accessed", 0.0)) * chips,
                        largest=largest or [])
    # Counted in the lowered module: reading the compiled one back
    # (compiled.as_text()) fails for some TPU programs with async collectives.
    report.pallas_calls = lowered.as_text().count("tpu_custom_call")
    if not report.fits:
        report.error = (f"needs {fmt_bytes(total + resident)} per chip, the chip has {fmt_bytes(hbm)}")
        try:
            values = largest_hlo_values(compiled.as_text())
        except Exception:  # the compiled module cannot always be read back (see above)
            values = []
        report.largest = (largest or [])[:3] + values
    return report, compiled


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 1024**2:.2f} MiB"


def _variant(config):
    from aem_jax.trainer import algorithms, pg

    alg = algorithms.get(config.algorithm)
    variant = getattr(alg.init, "keywords", {}).get("variant")
    if getattr(alg.init, "func", None) is not pg.init or variant is None:
        raise ValueError(f"config.algorithm={config.algorithm!r}: the planner compiles the policy-gradient "
                         "family's update (grpo, dr_grpo, dapo, gspo, rloo, gigpo, ppo); "
                         f"{config.algorithm} has its own update")
    return variant


def plan(config, sl: Slice, *, steps: Sequence[str] = STEPS, sampler_mode: str = "process-local",
         out=sys.stdout) -> dict[str, Any]:
    """Compiles the train step and the sampler of ``config`` for slice ``sl`` (those of them
    in ``steps``); prints a report to ``out`` and returns the JSON record (also its last line).
    A step left out counts as fitting and has null figures. ``sampler_mode``:
    "process-local" (what the trainer runs: each host samples its share on
    its own chips) or "global" (one sampler program over the whole slice
    for all the step's episodes, for comparison)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from aem_jax import sharding
    from aem_jax.models import sampler
    from aem_jax.trainer.pg import num_loss_turns as pg_turns
    from aem_jax.trainer.update import LossSettings, pg_update_step

    say = functools.partial(print, file=out, flush=True)
    chip = sl.chip
    devices = topology_devices(sl)
    mesh = sharding.make_mesh(dict(config.mesh), devices=devices)
    mc = model_config(config)
    variant = _variant(config)
    r, s = config.rollout, config.learner
    rows = r.num_tasks * r.group_size
    mb = min(s.minibatch_size, rows)
    T = r.max_context_tokens
    say(f"slice {sl.name}: {sl.chips} chips of {chip.device_kind} ({sl.topology_name}, {sl.hosts} hosts), "
        f"{fmt_bytes(chip.hbm_bytes)} HBM, {chip.peak_flops / 1e12:.0f} TFLOP/s bf16, "
        f"{chip.hbm_bandwidth / 1e9:.0f} GB/s per chip")
    say(f"mesh {dict(mesh.shape)}; model {mc.model_type} D={mc.hidden_size} F={mc.intermediate_size} "
        f"L={mc.num_layers} N={mc.num_heads} K={mc.num_kv_heads} H={mc.head_dim} V={mc.vocab_size}, "
        f"params {mc.param_dtype}, compute {mc.dtype}, remat {getattr(mc, 'remat', 'n/a')}, "
        f"attention {getattr(mc, 'attention', 'n/a')}")

    graphdef, optimizer, state = abstract_train_state(config, mc, mesh, value_head=variant.value_head)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    params_chip, opt_chip = per_chip_bytes(state.params), per_chip_bytes(state.opt_state)
    say(f"parameters {n_params / 1e9:.2f} B: {fmt_bytes(params_chip)} per chip; "
        f"optimiser state {fmt_bytes(opt_chip)} per chip")

    # The train step, as pg.init jits it.
    settings = LossSettings.from_config(config, kind=variant.loss,
                                        value_coef=config.ppo.value_coef if variant.value_head else 0.0,
                                        num_turns=pg_turns(config))
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    step = jax.jit(functools.partial(pg_update_step, graphdef=graphdef, optimizer=optimizer, settings=settings),
                   donate_argnums=(0,), out_shardings=(state_sh, None))
    batch = abstract_batch(config, mesh, mb)
    if "train" in steps:
        say(f"compiling the train step: {mb} rows x {T} tokens ...")
        train, _ = compile_step("train", step, (state, batch), mesh, sl.chips, chip.hbm_bytes,
                                largest=largest_arguments(state))
    else:
        train = StepReport("train", True, error="not compiled (--steps)")

    # The sampler: one rollout turn of this process's episodes at the longest prompt,
    # as trainer.rollouts samples them (multi-host: each process with its own
    # copy of the policy on its own chips, distributed.process_local).
    processes = sl.hosts if sampler_mode == "process-local" else 1
    placement_error = None
    try:
        # One host's program, compiled for a one-host slice of the same chips: libtpu's deviceless
        # compiler rejects a program on a subset of a slice's chips whose device ids are not
        # 0..n-1 (v6e hosts are 2x2 blocks of an 8x8 grid: ids 0, 1, 8, 9).
        host_devices = topology_devices(sl.one_host()) if processes > 1 else None
        smesh, sparams, resident_params = sampler_placement(state.params, mesh, processes, dtype=mc.dtype,
                                                            host_devices=host_devices)
    except ValueError as e:  # the trainer would raise the same at its first rollout
        placement_error = f"trainer.distributed.local_mesh: {e}"
        smesh, sparams, resident_params = mesh, state.params, 0
    if r.num_tasks % processes:
        raise ValueError(f"config.rollout.num_tasks={r.num_tasks} must be a multiple of the {processes} hosts "
                         f"of {sl.name} (each process plays an equal share of the tasks)")
    local_rows = r.num_tasks // processes * r.group_size
    b = sampler.bucket(local_rows, minimum=1)
    new = r.max_action_tokens
    p = T - new
    rep = NamedSharding(smesh, PartitionSpec())

    def rows_sds(shape, dtype):
        spec = sharding.logical_to_spec(("batch",) + (None,) * (len(shape) - 1), shape=shape, mesh=smesh)
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=NamedSharding(smesh, spec))

    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b))  # one key per episode row
    keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=rep)
    f32 = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    eos = mc.eos_token_id if isinstance(mc.eos_token_id, tuple) else (mc.eos_token_id or 0,)
    lower = functools.partial(
        sampler._generate.lower, graphdef, num_out=sampler.bucket(new), top_k=int(r.top_k),
        use_top_p=float(r.top_p) < 1.0, stop_ids=tuple(int(t) for t in eos), pad_id=0)
    gen_args = (sparams, rows_sds((b, p), "int32"), rows_sds((b, T), "int32"), rows_sds((b,), "bool"),
                keys, f32, f32, jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))
    sampler_dtype = sorted({str(x.dtype) for x in jax.tree.leaves(sparams)})
    say(f"sampler parameters ({'process-local copy, ' if processes > 1 else ''}{', '.join(sampler_dtype)}): "
        f"{fmt_bytes(per_chip_bytes(sparams))} per chip; training copies kept besides {fmt_bytes(resident_params)}")
    where = (f"process-local mesh {dict(smesh.shape)} of one host" if processes > 1 else f"mesh {dict(smesh.shape)}")
    if "sampler" in steps and not placement_error:
        say(f"compiling the sampler: {b} rows, prompt {p} + {new} new tokens, KV cache {T} slots, on the {where} ...")
    # Resident meanwhile: the optimiser state, the counters, and the training
    # copy of every parameter the process-local copy had to regather.
    resident = opt_chip + 2 * 4 + resident_params
    if placement_error:
        samp = StepReport("sampler", False, error=placement_error)
    elif "sampler" in steps:
        samp, _ = compile_step("sampler", types.SimpleNamespace(lower=lower), gen_args, smesh,
                               smesh.devices.size, chip.hbm_bytes, resident=resident,
                               largest=largest_arguments(sparams))
    else:
        samp = StepReport("sampler", True, error="not compiled (--steps)")

    # Roofline estimates.
    peak, bw, n = chip.peak_flops, chip.hbm_bandwidth, sl.chips
    model_train = train_flops(mc, mb, T)
    train_flop_count = max(model_train, train.compiled_flops)
    train_bytes = max(train.compiled_bytes, n * (train.memory or {}).get("arguments", 0))
    est_train = max(train_flop_count / (n * peak), train_bytes / (n * bw))
    prefill = forward_flops(mc, b, p)
    cache_bytes = 2 * mc.num_layers * b * mc.num_kv_heads * T * mc.head_dim * jnp.dtype(mc.dtype).itemsize
    weight_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(sparams))
    decode_flops = 2.0 * matmul_params(mc) * b + 4.0 * mc.num_layers * mc.num_heads * mc.head_dim * b * T
    ns = smesh.devices.size  # chips one sampler runs on (all processes sample at once)
    est_prefill = max(prefill / (ns * peak), (weight_bytes + cache_bytes) / (ns * bw))
    est_decode = max(decode_flops / (ns * peak), (weight_bytes + cache_bytes) / (ns * bw))
    est_sampler = est_prefill + new * est_decode

    for rep_ in (train, samp):
        say(f"\n[{rep_.name}]")
        if rep_.memory:
            mem = rep_.memory
            say("  per chip: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in mem.items()))
            extra = f" + resident training state {fmt_bytes(rep_.resident_bytes)}" if rep_.resident_bytes else ""
            say(f"  total {fmt_bytes(rep_.total_bytes)}{extra} of {fmt_bytes(chip.hbm_bytes)}: "
                f"{'fits' if rep_.fits else 'DOES NOT FIT'}")
            say(f"  XLA cost analysis: {rep_.compiled_flops:.3e} FLOPs, {rep_.compiled_bytes:.3e} bytes "
                f"(whole slice; a loop body counted once); {rep_.pallas_calls} Pallas kernel calls")
        elif rep_.fits:
            say(f"  {rep_.error}")
        else:
            say(f"  DOES NOT FIT: {rep_.error}")
            if rep_.total_bytes:
                say(f"  needs at least {fmt_bytes(rep_.total_bytes + rep_.resident_bytes)} per chip "
                    "(XLA's temporaries + the arguments)")
        if not rep_.fits:
            say("  largest buffers:")
            for item in rep_.largest:
                say(f"    {item}")
    say(f"\ntrain step: {model_train:.3e} model FLOPs; roofline {est_train:.3f} s per optimiser step "
        f"({mb} rows x {T} tokens)")
    say(f"sampler: prefill {prefill:.3e} FLOPs, {est_prefill:.3f} s; decode {est_decode * 1e3:.2f} ms per "
        f"token x {new} = {est_sampler:.3f} s per turn")

    def total(rep_):  # XLA's figure when it ran out of memory (temporaries only: a lower bound)
        return rep_.total_bytes + rep_.resident_bytes if rep_.total_bytes else None

    fits = train.fits and samp.fits
    record = {
        "topology": sl.name, "chips": sl.chips, "hosts": sl.hosts, "device_kind": chip.device_kind,
        "mesh": dict(mesh.shape), "model": {"layers": mc.num_layers, "hidden": mc.hidden_size,
                                            "params": n_params, "param_dtype": mc.param_dtype,
                                            "dtype": mc.dtype, "remat": getattr(mc, "remat", None),
                                            "attention": getattr(mc, "attention", None)},
        "context_tokens": T, "minibatch_rows": mb,
        "microbatch_rows": config.learner.get("microbatch_size", None),
        "sampler_rows": b, "sampler_mesh": dict(smesh.shape), "sampler_mode": sampler_mode, "hbm_bytes_per_chip": chip.hbm_bytes,
        "params_bytes_per_chip": params_chip, "opt_state_bytes_per_chip": opt_chip,
        "sampler_params_bytes_per_chip": per_chip_bytes(sparams), "sampler_params_dtype": sampler_dtype,
        "train_step_bytes_per_chip": total(train), "sampler_bytes_per_chip": total(samp),
        "train_memory": train.memory, "sampler_memory": samp.memory,
        "flops_per_step": train_flop_count, "model_flops_per_step": model_train,
        "compiled_flops_per_step": train.compiled_flops, "sampler_compiled_flops": samp.compiled_flops,
        "train_pallas_calls": train.pallas_calls, "sampler_pallas_calls": samp.pallas_calls,
        "est_step_seconds": est_train, "est_sampler_seconds": est_sampler,
        "peak_flops_per_chip": peak, "hbm_bandwidth_per_chip": bw, "fits": fits,
    }
    if not fits:
        record["not_fitting"] = {x.name: {"reason": x.error, "largest": x.largest} for x in (train, samp)
                                 if not x.fits}
    say(json.dumps(record))
    return record


# Keys the planner reads that a config may predate: their defaults when the
# config has no such key (the ModelConfig / LossSettings defaults).
PLANNER_KEYS = {"model.param_dtype": None, "model.remat": "none", "model.attention": "auto",
                "learner.microbatch_size": 0}


def load_config(spec: str, overrides: Sequence[str]):
    """``setup.load_config``, plus the keys of ``PLANNER_KEYS`` the config lacks
    (``model.param_dtype`` defaults to ``model.dtype``), which may be overridden too."""
    from aem_jax.trainer import setup
    from aem_jax.trainer.validate import ConfigError

    base = setup.load_config(spec)
    later, now = [], []
    for item in overrides:
        key = item.partition("=")[0]
        block, _, leaf = key.partition(".")
        (later if key in PLANNER_KEYS and leaf not in base.get(block, {}) else now).append(item)
    config = setup.load_config(spec, now)
    for key, default in PLANNER_KEYS.items():
        block, leaf = key.split(".")
        if leaf not in config[block]:
            config[block][leaf] = config.model.dtype if default is None else default
    for item in later:
        key, _, text = item.partition("=")
        block, leaf = key.split(".")
        old = config[block][leaf]
        try:
            config[block][leaf] = type(old)(text)
        except ValueError:
            raise ConfigError(f"config.{key}={text!r} is not allowed; must be of type {type(old).__name__}") from None
    return config


def _parse(argv: Sequence[str]):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m aem_jax.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/swe.py", help="configs/X.py[:variant]")
    parser.add_argument("--topology", required=True, help="slice name, e.g. v5p-64, v6e-64, v5e-16, v4-32")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated programs to compile: train,sampler")
    parser.add_argument("--sampler", default="process-local", choices=("process-local", "global"),
                        help="process-local: each host samples its share on its own chips, as the trainer does; "
                             "global: one sampler over the whole slice (for comparison)")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        match = re.fullmatch(r"--config\.(.+)", item)
        if not match:
            parser.error(f"unrecognised argument {item!r} (overrides look like --config.KEY=VALUE)")
        overrides.append(match.group(1))
    return args, overrides


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = _parse(sys.argv[1:] if argv is None else argv)
    try:
        sl = parse_slice(args.topology)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    for k, v in _LIBTPU_ENV.items():
        os.environ.setdefault(k, v)
    import jax

    jax.config.update("jax_platforms", "cpu")  # the TPU devices come from the topology, not a backend
    from aem_jax.trainer.validate import ConfigError

    try:
        config = load_config(args.config, overrides)
        import libtpu  # noqa: F401  (deviceless compiles need it)
    except (ConfigError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    steps = [x for x in args.steps.split(",") if x]
    if not steps or set(steps) - set(STEPS):
        print(f"error: --steps={args.steps!r}; allowed: a comma-separated subset of {','.join(STEPS)}", file=sys.stderr)
        return USAGE_ERROR
    try:
        plan(config, sl, steps=steps, sampler_mode=args.sampler)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
