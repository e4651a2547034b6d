"""Side-by-side training runs: methods x seeds, one table and one figure.

  python experiments/compare.py --methods grpo grpo_aem --seeds 0 1 2 --out docs/compare_treasure

Each run is `python -m aem_jax.train` on configs/default.py with the method's
overrides, the same number of steps (so the same number of environment
episodes) for every method. Writes OUT.json (per-run summaries), OUT.md (the
table) and OUT.png (success and token-entropy curves, mean +- std over seeds).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

METHODS = {
    "grpo": ["--config.algorithm=grpo", "--config.aem.enabled=False"],
    "grpo_aem": ["--config.algorithm=grpo", "--config.aem.enabled=True"],
    "dapo": ["--config=configs/dapo.py", "--config.aem.enabled=False"],
    "dapo_aem": ["--config=configs/dapo.py", "--config.aem.enabled=True"],
    "rloo": ["--config=configs/rloo.py", "--config.aem.enabled=False"],
    "rloo_aem": ["--config=configs/rloo.py", "--config.aem.enabled=True"],
    "gigpo": ["--config=configs/gigpo.py"],
    "ppo": ["--config=configs/ppo.py"],
}


def run(method: str, seed: int, steps: int, root: str) -> str:
    workdir = os.path.join(root, f"{method}_s{seed}")
    args = [a for a in METHODS[method] if a.startswith("--config=")] or ["--config=configs/default.py"]
    args += [a for a in METHODS[method] if not a.startswith("--config=")]
    cmd = [sys.executable, "-m", "aem_jax.train", *args, f"--config.seed={seed}",
           f"--config.total_steps={steps}", "--config.eval.num_tasks=0", f"--workdir={workdir}"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return workdir


def summarise(workdir: str, threshold: float) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    success = np.array([r["success"] for r in rows])
    smooth = np.convolve(success, np.ones(5) / 5, mode="valid")
    hit = np.flatnonzero(smooth >= threshold)
    return {
        "final_success": float(success[-10:].mean()),
        "steps_to_threshold": int(hit[0] + 5) if hit.size else None,
        "success": success.tolist(),
        "token_entropy": [r["token_entropy"] for r in rows],
        "wall_s": rows[-1]["wall_s"],
    }


def plot(results: dict, out_png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for method, runs in results.items():
        for ax, key in zip(axes, ("success", "token_entropy")):
            curves = np.array([r[key] for r in runs])
            mean, std = curves.mean(0), curves.std(0)
            x = np.arange(1, len(mean) + 1)
            ax.plot(x, mean, label=method)
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
            ax.set_xlabel("training step")
            ax.set_title(key)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out_png + ".tmp.png", dpi=110)
    os.replace(out_png + ".tmp.png", out_png)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["grpo", "grpo_aem"], choices=sorted(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--runs-dir", default="runs/compare")
    p.add_argument("--out", default="docs/compare_treasure")
    args = p.parse_args()
    results = {m: [summarise(run(m, s, args.steps, args.runs_dir), args.threshold) for s in args.seeds]
               for m in args.methods}
    lines = [f"| method | seeds | final success (mean of last 10 steps) | steps to {args.threshold:.0%} success (5-step mean) |",
             "|---|---|---|---|"]
    for m, runs in results.items():
        finals = np.array([r["final_success"] for r in runs])
        hits = [r["steps_to_threshold"] for r in runs]
        reached = [h for h in hits if h is not None]
        hit_text = (f"{np.mean(reached):.0f} +- {np.std(reached):.0f}" if reached else "never") + \
                   (f" ({len(reached)}/{len(hits)} seeds reached it)" if len(reached) < len(hits) else "")
        lines.append(f"| {m} | {len(runs)} | {finals.mean():.2f} +- {finals.std():.2f} | {hit_text} |")
    table = "\n".join(lines)
    print(table)
    with open(args.out + ".json.tmp", "w") as f:
        json.dump(results, f)
    os.replace(args.out + ".json.tmp", args.out + ".json")
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")
    plot(results, args.out + ".png")
    print(json.dumps({m: [r["final_success"] for r in runs] for m, runs in results.items()}))


if __name__ == "__main__":
    main()
