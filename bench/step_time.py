"""Where a training step's wall time goes at the default config, and AEM's share.

    python bench/step_time.py [--steps 40] [--config configs/default.py] [--set rollout.seq_bucket=32 ...]

Runs ``--steps`` steps of the config (in a temporary workdir, checkpoints
included) and reports the mean wall time per step of rollout, update and
checkpoint over the steps after the first ``--skip`` (compilation). Then times
the jitted advantage computation on the last rollout batch with AEM on and
off: the difference is everything AEM adds to a step (entropy proxy, group
normalisation, alpha, drift diagnostics), reported as a share of the step.
Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import tempfile
import time

import jax
import numpy as np

from aem_jax import sharding
from aem_jax.trainer import loop, rollouts, setup
from aem_jax.trainer.advantages import AdvantageSettings, compute_advantages


def time_call(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.perf_counter() - t0) / repeats


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/default.py")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=5, help="first steps left out (compilation)")
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    config = setup.load_config(args.config, args.set)
    config.total_steps = args.steps
    config.eval.num_tasks = 0

    with tempfile.TemporaryDirectory() as workdir:
        loop.train(config, workdir)
        rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")][args.skip:]
        algorithm = loop.check_config(config)
        ctx = loop.build_context(config, sharding.make_mesh(dict(config.mesh)))
        with sharding.use_mesh(ctx.mesh):
            state = algorithm.init(ctx)
            batch, _, _ = rollouts.collect_batch(ctx, algorithm, algorithm.policy_params(state), args.steps)
            dev = sharding.put_batch(batch, ctx.mesh)
            key = jax.random.key(0)
            timings = {}
            for enabled in (True, False):
                settings = dataclasses.replace(AdvantageSettings.from_config(config, estimator="grpo"),
                                               aem_enabled=enabled)
                fn = jax.jit(functools.partial(compute_advantages, settings=settings))
                timings[enabled] = time_call(lambda: fn(dev, key=key)[0], args.repeats)  # noqa: B023

    parts = {k: float(np.mean([r[f"time_{k}_s"] for r in rows])) for k in ("rollout", "update", "checkpoint")}
    step = float(np.mean(np.diff([r["wall_s"] for r in rows])))
    other = step - sum(parts.values())
    aem = timings[True] - timings[False]
    print(f"{config.algorithm} + AEM={config.aem.enabled}, {args.steps} steps ({args.skip} left out), "
          f"B = {config.rollout.num_tasks} x {config.rollout.group_size} episodes\n")
    print("| part of a step | ms | share |\n|---|---|---|")
    for name, value in [*parts.items(), ("other (metrics, logging)", other)]:
        print(f"| {name} | {value * 1e3:.1f} | {value / step:.1%} |")
    print(f"| **step** | **{step * 1e3:.1f}** | 100% |")
    print(f"| advantages with AEM | {timings[True] * 1e3:.2f} | {timings[True] / step:.2%} |")
    print(f"| advantages without AEM | {timings[False] * 1e3:.2f} | {timings[False] / step:.2%} |")
    print(f"| AEM's share (difference) | {aem * 1e3:.2f} | {aem / step:.2%} |")
    print(json.dumps({"step_s": step, **{f"{k}_s": v for k, v in parts.items()}, "other_s": other,
                      "advantages_aem_s": timings[True], "advantages_plain_s": timings[False],
                      "aem_share": aem / step}))


if __name__ == "__main__":
    main()
