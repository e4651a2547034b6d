"""Memory and speed of one attention layer's forward + backward, per implementation.

  python bench/attention.py                 # xla and blockwise on CPU, then splash on a v5p topology
  python bench/attention.py --no-splash     # CPU only
  python bench/attention.py --block 256     # blockwise with other query/key blocks

Setting: B=1, 4 query heads, 2 key/value heads, head_dim 64, float32, one
segment per row: the layer the issue measured (the bench model of
bench/generate.py has 8 query heads; every figure here scales linearly in the
heads). The
program is `aem_jax.models.attention.attend` followed by a loss <out, probe>,
differentiated with respect to q, k and v, jit-compiled on CPU. For each
sequence length T it reports the compiled temporaries
(`compiled.memory_analysis().temp_size_in_bytes`: every buffer XLA allocates
besides arguments and outputs, i.e. what grows with T) and, up to
--time-max-t, the median wall time of the compiled forward + backward.

"splash" is compiled ahead of time for a deviceless TPU v5p 2x2x2 topology
(8 chips; needs libtpu; run in a subprocess so that this process stays on
CPU) with the same global shapes, batch 8 split over (data, fsdp) = 4 and
heads over tensor = 2; its temporaries are per chip. It is not run.

Prints a table, then one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from aem_jax.models import attention

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 64
MIB = 2 ** 20


def loss_and_grads(impl: str):
    """(q, k, v, segments, probe) -> (<attend(q, k, v), probe>, (dq, dk, dv))."""
    def loss(q, k, v, seg, probe):
        out = attention.attend(q, k, v, seg, seg, impl=impl)
        return jnp.sum(out.astype(jnp.float32) * probe)
    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def shapes(batch: int, t: int, dtype=jnp.float32):
    return ((batch, HEADS, t, HEAD_DIM, dtype), (batch, KV_HEADS, t, HEAD_DIM, dtype),
            (batch, KV_HEADS, t, HEAD_DIM, dtype), (batch, t, jnp.int32), (batch, HEADS, t, HEAD_DIM, jnp.float32))


def measure_cpu(impl: str, t: int, *, timed: bool, repeats: int) -> dict:
    fn = jax.jit(loss_and_grads(impl))
    r = np.random.default_rng(0)
    args = [jnp.asarray(r.normal(size=s[:-1]), s[-1]) if s[-1] != jnp.int32 else jnp.ones(s[:-1], jnp.int32)
            for s in shapes(1, t)]
    compiled = fn.lower(*args).compile()
    row = {"impl": impl, "T": t, "temp_mib": compiled.memory_analysis().temp_size_in_bytes / MIB}
    if timed:
        jax.block_until_ready(compiled(*args))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - start)
        row["seconds"] = statistics.median(times)
    return row


def splash_temps(lengths) -> dict:
    """{T: per-chip temporaries (MiB)} of splash forward+backward on a v5p 2x2x2 topology (this process)."""
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P

    from aem_jax import sharding

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2", chip_config_name="default",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1)
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2}, devices=topo.devices)
    heads = NamedSharding(mesh, P(("data", "fsdp"), "tensor"))
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    out = {}
    with sharding.use_mesh(mesh):
        for t in lengths:
            args = [jax.ShapeDtypeStruct(s[:-1], s[-1], sharding=rows if len(s) == 3 else heads)
                    for s in shapes(8, t, jnp.bfloat16)]
            compiled = jax.jit(loss_and_grads("splash")).lower(*args).compile()
            out[t] = compiled.memory_analysis().temp_size_in_bytes / MIB
    return out


def splash_in_subprocess(lengths) -> dict | str:
    """`splash_temps` in a child process (this script with --splash-child); a reason string if it fails.

    JAX_PLATFORMS=cpu still lets the child build the deviceless TPU topology
    and lower Mosaic kernels for it; ALLOW_MULTIPLE_LIBTPU_LOAD lets it load
    libtpu while another process holds libtpu's lock file.
    """
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.abspath(__file__), "--splash-child", "--lengths", *map(str, lengths)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return f"splash compile failed: {lines[-1] if lines else proc.returncode}"
    return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--impls", nargs="+", default=["xla", "blockwise"])
    parser.add_argument("--time-max-t", type=int, default=4096, help="time only up to this T")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block", type=int, default=None, help="blockwise query and key block")
    parser.add_argument("--no-splash", action="store_true")
    parser.add_argument("--splash-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.splash_child:
        print(json.dumps(splash_temps(args.lengths)))
        return
    if args.block:
        attention.BLOCK_Q = attention.BLOCK_K = args.block
    results = [measure_cpu(impl, t, timed=t <= args.time_max_t, repeats=args.repeats)
               for t in args.lengths for impl in args.impls]
    splash = None if args.no_splash else splash_in_subprocess(args.lengths)
    print(f"attention forward+backward, B=1 N={HEADS} K={KV_HEADS} H={HEAD_DIM} float32, CPU "
          f"({jax.device_count()} devices, block {attention.BLOCK_Q})")
    header = "| T | " + " | ".join(f"{i} temp MiB | {i} fwd+bwd s" for i in args.impls) + " |"
    if isinstance(splash, dict):
        header += " splash temp MiB per v5p chip (B=8 bf16) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for t in args.lengths:
        cells = []
        for r in (r for r in results if r["T"] == t):
            cells += [f"{r['temp_mib']:.1f}", f"{r['seconds']:.3f}" if "seconds" in r else "-"]
        if isinstance(splash, dict):
            cells.append(f"{splash[t]:.1f}")
        print(f"| {t} | " + " | ".join(cells) + " |")
    if isinstance(splash, str):
        print(splash)
    print(json.dumps({"results": results, "splash_temp_mib": splash, "block": attention.BLOCK_Q}))


if __name__ == "__main__":
    main()
