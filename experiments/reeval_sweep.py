"""Paired re-evaluation of a compare.py sweep's runs on many held-out tasks.

The trainer's held-out numbers (``eval.json``) are one sampled episode on each
of ``--heldout`` tasks before and after training, with different sampling
keys; on the dungeon (about 0.2 success, 128 tasks) that is about +-0.035 per
number, as large as the effects item 3 of issue 18 asks about. For every
finished run of ``experiments/compare.py``'s runs directory this plays its
warm start and its final policy on the same ``--tasks`` held-out tasks with
common random numbers (``experiments/reeval.py``, one run per core), then
tabulates per run the paired difference after - before with its 95% interval
over tasks, and per method the mean difference over seeds with a 95%
bootstrap interval over seeds; ``--pairs A-B`` adds the per-seed difference
of A's and B's "after" (same tasks, same key, same warm start) with the exact
sign-flip p.

  python experiments/reeval_sweep.py --env dungeon --methods etpo etpo_q4 --seeds 0 1 2 3 4 \\
      --steps 100 --env-steps 80000 --heldout 128 --warm WARM --runs-dir runs/etpo_dungeon \\
      --tasks 512 --pairs etpo_q4-etpo --out docs/etpo_dungeon_reeval

The flags that name the runs (--env ... --runs-dir) are compare.py's, so the
runs' configs are rebuilt exactly (``compare.command``). Each run's result is
kept in RUN/reeval_TASKSx SAMPLES.json and reused.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.dirname(HERE), HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)
import compare  # noqa: E402
from summary import bootstrap_ci, sign_flip_p_value  # noqa: E402


def result_path(workdir: str, tasks: int, samples: int) -> str:
    return os.path.join(workdir, f"reeval_{tasks}x{samples}.json")


def config_flags(cmd: list[str]) -> list[str]:
    """The ``--config...`` flags of a compare.py training command."""
    return [a for a in cmd if a.startswith("--config")]


def method_rows(per_seed: list[dict]) -> dict:
    """A method's summary over its seeds' reeval results."""
    d = [r["difference"] for r in per_seed]
    return {"seeds": len(d), "seed_list": [r["seed"] for r in per_seed],
            "before_mean": float(np.mean([r["before"] for r in per_seed])),
            "after_mean": float(np.mean([r["after"] for r in per_seed])),
            "difference_mean": float(np.mean(d)), "difference_ci95": bootstrap_ci(d),
            "seeds_above_start": int(sum(x > 0 for x in d)),
            "seeds_ci_above_zero": int(sum(r["difference_ci95"][0] > 0 for r in per_seed)),
            "runs": per_seed}


def table(methods: dict, pairs: dict, tasks: int, samples: int) -> str:
    lines = [f"Held-out success of the warm start (before) and the final policy (after) on the same {tasks} tasks "
             f"x {samples} episodes with the same sampling key; difference = after - before with its 95% "
             "bootstrap interval over tasks (per seed) or over seeds (mean).", "",
             "| method | seed | before | after | after - before [95% CI] |", "|---|---|---|---|---|"]
    for m, summary in methods.items():
        for r in summary["runs"]:
            lo, hi = r["difference_ci95"]
            lines.append(f"| {m} | {r['seed']} | {r['before']:.3f} | {r['after']:.3f} | "
                         f"{r['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
        lo, hi = summary["difference_ci95"]
        lines.append(f"| **{m}** | mean of {summary['seeds']} | {summary['before_mean']:.3f} | "
                     f"{summary['after_mean']:.3f} | **{summary['difference_mean']:+.3f}** [{lo:+.3f}, {hi:+.3f}]; "
                     f"above start on {summary['seeds_above_start']}/{summary['seeds']} seeds, interval above 0 on "
                     f"{summary['seeds_ci_above_zero']} |")
    if pairs:
        lines += ["", "| paired by seed (after) | seeds | mean difference [95% CI] | p (exact sign-flip) |",
                  "|---|---|---|---|"]
        for name, pr in pairs.items():
            lo, hi = pr["ci95"]
            lines.append(f"| {name} | {pr['seeds']} | {pr['mean_difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
                         f"{pr['p_value']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="dungeon", choices=sorted(compare.ENVS))
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--env-steps", type=int, default=0)
    p.add_argument("--heldout", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--warm", default=None)
    p.add_argument("--runs-dir", required=True)
    p.add_argument("--tasks", type=int, default=512)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--pairs", nargs="*", default=[], metavar="A-B", help="methods compared seed by seed")
    p.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    for m in args.methods:
        if m not in compare.METHODS:
            p.error(f"unknown method {m!r}; known: {', '.join(compare.METHODS)}")
    pairs = []
    for spec in args.pairs:
        a, sep, b = spec.partition("-")
        if not sep or a not in args.methods or b not in args.methods:
            p.error(f"--pairs {spec!r}: use A-B with A and B among --methods {args.methods}")
        pairs.append((a, b))
    extra = [f"--config.{kv}" for kv in args.set]
    cores: queue.Queue = queue.Queue()
    for i in range(args.workers):
        cores.put(i % (os.cpu_count() or 1) if args.workers > 1 else None)

    def job(m: str, s: int) -> dict | None:
        workdir = os.path.join(args.runs_dir, f"{m}_s{s}")
        if not compare.finished(workdir, args.steps, args.heldout, args.env_steps):
            print(f"skipped (not finished): {workdir}", flush=True)
            return None
        out = result_path(workdir, args.tasks, args.samples)
        if not os.path.exists(out):
            cmd = compare.command(m, args.env, s, args.steps, workdir, extra, args.heldout, args.warm, args.env_steps)
            run = [sys.executable, os.path.join(HERE, "reeval.py"), "--workdir", workdir, "--tasks", str(args.tasks),
                   "--samples", str(args.samples), "--out", out, "--", *config_flags(cmd)]
            core = cores.get()
            try:
                compare.run_pinned(run, core, os.path.join(workdir, "reeval.log"))
            finally:
                cores.put(core)
        with open(out) as f:
            return dict(json.load(f), method=m, seed=s)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        futures = {(m, s): pool.submit(job, m, s) for s in args.seeds for m in args.methods}
        done = {k: f.result() for k, f in futures.items()}
    methods = {m: method_rows([done[(m, s)] for s in args.seeds if done[(m, s)] is not None])
               for m in args.methods if any(done[(m, s)] is not None for s in args.seeds)}
    pair_rows = {}
    for a, b in pairs:
        both = [s for s in args.seeds if done[(a, s)] is not None and done[(b, s)] is not None]
        if not both:
            continue
        d = [done[(a, s)]["after"] - done[(b, s)]["after"] for s in both]
        pair_rows[f"{a} - {b}"] = {"seeds": len(d), "seed_list": both, "differences": d,
                                   "mean_difference": float(np.mean(d)), "ci95": bootstrap_ci(d),
                                   "p_value": sign_flip_p_value(d)}
    result = {"env": args.env, "tasks": args.tasks, "samples_per_task": args.samples, "warm": args.warm,
              "methods": methods, "pairs": pair_rows}
    text = table(methods, pair_rows, args.tasks, args.samples)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for suffix, body in ((".json", json.dumps(result, indent=1) + "\n"), (".md", text)):
        tmp = args.out + suffix + ".tmp"
        with open(tmp, "w") as f:
            f.write(body)
        os.replace(tmp, args.out + suffix)
    print(text)
    return result


if __name__ == "__main__":
    main()
