"""A run's policy before and after training, on many more held-out tasks, paired.

The trainer's own evaluations (``eval.json``) play ``eval.num_tasks`` tasks
once before and once after training with different sampling keys; with 128
dungeon tasks at about 0.2 success one such number has a standard error of
about 0.035, and two seeds of the same warm start measured 0.20 and 0.28
before any update. This script restores a checkpoint of a finished run and
plays the warm start (``ctx.init_params``: the policy the run began from)
and the restored policy on the same ``--tasks`` held-out tasks
(``rng.eval_seeds``, disjoint from every training seed) with the same
sampling key (common random numbers), ``--samples`` episodes per task, and
reports

  before, after          mean success of each over tasks x samples
  difference             after - before, with a 95% bootstrap interval over
                         tasks (each task's mean success after minus before)

  python experiments/reeval.py --workdir RUN [--step N] --tasks 512 --out RUN/reeval.json -- \
      --config=configs/etpo.py:longhorizon ... (the run's flags)

Without ``--step`` the run's last checkpoint is used. The run directory is
only read (``--out`` may point into it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.dirname(HERE), HERE):  # the repository's aem_jax and the sibling scripts
    if _path not in sys.path:
        sys.path.insert(0, _path)
from restore import checkpoint_steps, config_from_flags, restored  # noqa: E402
from summary import bootstrap_ci  # noqa: E402

from aem_jax.trainer import rollouts  # noqa: E402

EVAL_KEY_STEP = 10**6  # the "eval" key's step for both policies: no run evaluates at this step


def paired_difference(before_TN: np.ndarray, after_TN: np.ndarray, *, draws: int = 10_000,
                      seed: int = 0) -> dict[str, float]:
    """Means of [tasks, samples] successes and the per-task paired difference with a percentile
    bootstrap 95% interval over tasks."""
    before_TN, after_TN = np.asarray(before_TN, np.float64), np.asarray(after_TN, np.float64)
    if before_TN.shape != after_TN.shape or before_TN.ndim != 2 or before_TN.shape[0] < 2:
        raise ValueError(f"need two [tasks >= 2, samples] arrays of one shape, got {before_TN.shape} and "
                         f"{after_TN.shape}")
    d_T = after_TN.mean(axis=1) - before_TN.mean(axis=1)
    lo, hi = bootstrap_ci(d_T, resamples=draws, seed=seed)
    return {"before": float(before_TN.mean()), "after": float(after_TN.mean()), "difference": float(d_T.mean()),
            "difference_ci95": [float(lo), float(hi)], "tasks": int(d_T.size),
            "samples_per_task": int(before_TN.shape[1])}


def relative_change(before, after) -> float:
    """||after - before|| / ||before|| over every leaf (float64)."""
    pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64))
             for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    return float(np.sqrt(sum(np.sum((b - a) ** 2) for a, b in pairs)) / np.sqrt(sum(np.sum(a ** 2) for a, _ in pairs)))


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: reeval.py --workdir RUN [--step N] [--tasks 512] [--samples 1] -- --config=... "
                         "(the run's config flags)")
    split = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the run directory (has checkpoints/STEP)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last one)")
    p.add_argument("--tasks", type=int, default=512, help="held-out tasks")
    p.add_argument("--samples", type=int, default=1, help="sampled episodes per task")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv[:split])
    if args.tasks < 2 or args.samples < 1:
        raise SystemExit(f"--tasks must be >= 2 and --samples >= 1, got {args.tasks} and {args.samples}")
    config = config_from_flags(argv[split + 1:])
    steps = checkpoint_steps(args.workdir)
    step = args.step if args.step is not None else (steps[-1] if steps else None)
    if step is None:
        raise SystemExit(f"no checkpoints in {args.workdir}")
    config.eval.num_tasks, config.eval.samples_per_task = args.tasks, args.samples
    config.eval.pass_at = (1,)
    with restored(config, args.workdir, step) as (algorithm, ctx, state):
        before = rollouts.evaluate(ctx, ctx.init_params, EVAL_KEY_STEP)
        trained = algorithm.policy_params(state)
        after = rollouts.evaluate(ctx, trained, EVAL_KEY_STEP)
        moved = relative_change(ctx.init_params, trained)
    result = paired_difference(before.successes, after.successes)
    result["relative_parameter_change"] = moved  # ||after - before|| / ||before|| over the policy's parameters
    result.update(step=step, workdir=os.fspath(args.workdir), algorithm=config.algorithm, seed=config.seed)
    print(json.dumps(result, indent=1))
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(args.out)  # never a half-written file
    return result


if __name__ == "__main__":
    main()
