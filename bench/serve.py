"""Rollouts through `python -m aem_jax.serve` against the in-process sampler.

Builds the default config's policy (or ``--config``), saves it as a Hugging
Face directory, starts ``python -m aem_jax.serve`` on it (its own process, on
127.0.0.1 and a free port) and times the trainer's rollout phase
(``rollouts.collect_batch``: 64 tasks x 8 rollouts on the default config) with
``rollout.endpoint`` empty and set. A step through the endpoint includes the
weight push (save + reload) the trainer does before every rollout phase.
Step 0 compiles; the warm figure is the fastest of the next ``--steps``.

    python bench/serve.py [--config configs/default.py] [--steps 3]

Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from aem_jax import models, sharding
from aem_jax.trainer import algorithms, loop, rollouts, setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the compiling one")
    args = parser.parse_args()
    config = setup.load_config(args.config)
    mesh = sharding.make_mesh(dict(config.mesh))
    ctx = loop.build_context(config, mesh)
    work = tempfile.mkdtemp(prefix="bench_serve_")
    models.save_pretrained(ctx.policy(ctx.init_params), ctx.tokenizer, os.path.join(work, "policy"))
    server = subprocess.Popen([sys.executable, "-m", "aem_jax.serve", f"--model={work}/policy", "--port=0"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                raise RuntimeError("python -m aem_jax.serve exited before serving")
        url = re.search(r"on (http://\S+)", line).group(1)
        algorithm, out = algorithms.get(config.algorithm), {}
        for name, endpoint in (("in_process", ""), ("endpoint", url)):
            config.rollout.endpoint, config.rollout.weights_dir = endpoint, os.path.join(work, "pushed")
            times = []
            with sharding.use_mesh(mesh):
                for step in range(1 + args.steps):
                    t = time.perf_counter()
                    batch, _, _ = rollouts.collect_batch(ctx, algorithm, ctx.init_params, step)
                    times.append(time.perf_counter() - t)
            tokens = float(batch.loss_mask.sum())
            out[name] = {"first_s": round(times[0], 2), "warm_s": round(min(times[1:]), 3),
                         "agent_tokens": tokens, "tokens_per_s": round(tokens / min(times[1:]), 1)}
    finally:
        server.terminate()
        server.wait(30)
    out["endpoint_over_in_process"] = round(out["endpoint"]["warm_s"] / out["in_process"]["warm_s"], 3)
    out["load_average"] = round(os.getloadavg()[0], 2)
    print(f"{'rollout phase':<12} {'step 0 (s)':>11} {'warm (s)':>9} {'agent tokens':>13} {'tokens/s':>9}")
    for name in ("in_process", "endpoint"):
        r = out[name]
        print(f"{name:<12} {r['first_s']:>11} {r['warm_s']:>9} {r['agent_tokens']:>13.0f} {r['tokens_per_s']:>9}")
    print(f"endpoint / in-process warm time: {out['endpoint_over_in_process']}  "
          f"(load average {out['load_average']})")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
