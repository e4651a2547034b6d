"""Side-by-side training runs: methods x seeds on one environment, one table and one figure.

  python experiments/compare.py --env treasure --methods grpo grpo_aem --seeds 0 1 2 --out docs/compare_treasure
  python experiments/compare.py --env textworld --methods all --steps 60 --workers 2 --out docs/compare_textworld
  python experiments/compare.py --methods ablations --out docs/ablations_treasure
  python experiments/compare.py --methods default grpo_aem --seeds 0 1 2 3 4 --steps 250 --heldout 64 \
      --runs-dir runs/default_seeds --out docs/default_seeds
  # issue 18: from the supervised warm start WARM (a configs/sft.py export), 5 seeds of every method
  python experiments/compare.py --env treasure --methods all --seeds 0 1 2 3 4 --steps 60 --env-steps 61440 \
      --heldout 128 --warm WARM --workers 2 --runs-dir runs/warm_treasure --out docs/warm_treasure
  # the table so far, from the runs that are finished (nothing is trained)
  python experiments/compare.py ... --report-only

Each run is ``python -m aem_jax.train`` on the method's config file (with the
``:textworld`` variant on TextWorld) plus the method's overrides, for the same
number of training steps. Every method collects the same number of episodes
per step, except DAPO, whose dynamic sampling collects extra batches; so the
comparison is made at equal *environment steps*: the budget is the smallest
total any run took, and each run is read up to that budget (DAPO's curve ends
at an earlier training step). Runs already finished in ``--runs-dir`` are
reused (and an interrupted one resumes from its checkpoint), so a table can be
rebuilt or extended without retraining. With ``--env-steps B`` every run
itself stops at B environment steps (``config.env_steps_budget``), so its
held-out evaluation after training is made at equal environment steps too;
``--steps`` is then the most steps a run may take.

Writes OUT.json (per-run curves and summaries), OUT.md (the table) and OUT.png
(success, token entropy and invalid-action rate against environment steps,
mean +- std over seeds).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import shutil
import subprocess
import sys

import numpy as np

# Every method of a comparison runs with the same PPO clip and learning rate:
# dual clip off and no success gate, as in base(). configs/default.py (the
# default job) turns both on, so its entries turn them off again; "default"
# keeps both and the *_dc entries keep dual clip.
NO_DUAL_CLIP = "--config.loss.dual_clip=0.0"
DUAL_CLIP = "--config.loss.dual_clip=3.0"
NO_GATE = "--config.optim.success_gate=0.0"

# method -> (config file, overrides). The config file carries the algorithm's
# own settings; AEM is switched explicitly so every "+AEM" pair differs in one flag.
METHODS: dict[str, tuple[str, list[str]]] = {
    # The default job as shipped (GRPO + AEM, dual clip 3).
    "default": ("configs/default.py", []),
    "grpo": ("configs/default.py", ["--config.aem.enabled=False", NO_DUAL_CLIP, NO_GATE]),
    "grpo_aem": ("configs/default.py", ["--config.aem.enabled=True", NO_DUAL_CLIP, NO_GATE]),
    "dapo": ("configs/dapo.py", ["--config.aem.enabled=False"]),
    "dapo_aem": ("configs/dapo.py", ["--config.aem.enabled=True"]),
    "rloo": ("configs/rloo.py", ["--config.aem.enabled=False"]),
    "rloo_aem": ("configs/rloo.py", ["--config.aem.enabled=True"]),
    "gigpo": ("configs/gigpo.py", ["--config.aem.enabled=False"]),
    "ppo": ("configs/ppo.py", ["--config.aem.enabled=False"]),
    "archer": ("configs/archer.py", ["--config.aem.enabled=False"]),
    "etpo": ("configs/etpo.py", []),
    # ETPO with 4 Q steps (each with its Polyak step) per minibatch before the policy step
    # (etpo.q_steps; issue 18 item 3's "Q steps per batch"), tried on the dungeon.
    "etpo_q4": ("configs/etpo.py", ["--config.etpo.q_steps=4"]),
    # GRPO and GRPO + AEM with dual clip 3, the default job's setting.
    "grpo_dc": ("configs/default.py", ["--config.aem.enabled=False", DUAL_CLIP, NO_GATE]),
    "grpo_aem_dc": ("configs/default.py", ["--config.aem.enabled=True", DUAL_CLIP, NO_GATE]),
    # Ablations of AEM's choices (GRPO + AEM with one setting changed; grpo_aem
    # is lam=1, scope=group).
    "aem_lam0.5": ("configs/default.py", ["--config.aem.lam=0.5", NO_DUAL_CLIP, NO_GATE]),
    "aem_lam2": ("configs/default.py", ["--config.aem.lam=2.0", NO_DUAL_CLIP, NO_GATE]),
    "aem_scope_batch": ("configs/default.py", ["--config.aem.scope=batch", NO_DUAL_CLIP, NO_GATE]),
    "aem_scope_trajectory": ("configs/default.py", ["--config.aem.scope=trajectory", NO_DUAL_CLIP, NO_GATE]),
    "aem_reversed": ("configs/default.py", ["--config.aem.lam=-1.0", NO_DUAL_CLIP, NO_GATE]),
    "aem_shuffled": ("configs/default.py", ["--config.aem.shuffle=True", NO_DUAL_CLIP, NO_GATE]),
}
# Plain twins of "+ AEM" methods: dashed in the figures.
PLAIN = ("grpo", "grpo_dc", "dapo", "rloo")
GROUPS = {
    "all": ["grpo", "grpo_aem", "dapo", "dapo_aem", "rloo", "rloo_aem", "gigpo", "ppo", "archer", "etpo"],
    "ablations": ["grpo", "grpo_aem", "aem_lam0.5", "aem_lam2", "aem_scope_batch", "aem_scope_trajectory",
                  "aem_reversed", "aem_shuffled"],
    "dual_clip": ["grpo", "grpo_aem", "grpo_dc", "grpo_aem_dc"],
}
# Per-environment overrides applied to every method, so all see the same game.
ENVS: dict[str, tuple[str, list[str]]] = {
    "treasure": ("", []),
    # Whole episodes in one row for every method (ppo, archer and etpo need it),
    # 4 turns so a row fits the 512-token context; 4 games x 8 episodes per step
    # so that 30 runs fit in about an hour of 2 CPU cores.
    "textworld": ("textworld", ["--config.rollout.history=concatenated", "--config.rollout.max_turns=4",
                                "--config.env.kwargs.max_steps=4", "--config.rollout.num_tasks=4"]),
    # The long-horizon dungeon (aem_jax/trainer/defaults.longhorizon, configs/longhorizon.py); from a
    # supervised warm start: --warm WARM_START_DIR.
    "dungeon": ("longhorizon", []),
}

# Per (environment, method) settings, each with its reason.
ENV_METHOD: dict[tuple[str, str], list[str]] = {
    # At 512-token rows ArCHer's 10 critic passes per iteration took 29 s of a
    # 36 s step (GRPO: 2 s); 3 passes keep its 3 seeds within the CPU budget.
    ("textworld", "archer"): ["--config.archer.critic_steps=3"],
    # PPO plays one episode per task: 32 tasks give it the others' 4 x 8 episodes per step.
    ("textworld", "ppo"): ["--config.rollout.num_tasks=32"],
}
# configs/default.py plays 128 tasks per step on the built-in game (one seed in five stalled at
# the 1/4 plateau with 64); the methods built on it compare at base()'s 64, as every other config.
for _m, (_config, _) in METHODS.items():
    if _config == "configs/default.py" and _m != "default":
        ENV_METHOD[("treasure", _m)] = ["--config.rollout.num_tasks=64"]


# From a supervised warm start (``--warm DIR``, issue 18): every method starts from DIR at the
# environment's warm-start learning rate WARM_LR (the scratch configs' 1e-3 moves a cloned policy far
# from its start within a few steps: on the dungeon GRPO + AEM fell from 0.28 to 0.00 success in 3;
# at 1e-4 it stayed flat there for 30 steps, at 3e-4 it rose from 0.22 to about 0.30), the same rate
# for ArCHer's critic and ETPO's Q network. ArCHer and ETPO follow their warm-start recipes
# (docs/results.md, "ArCHer and ETPO from the supervised warm start"): the critic / Q network starts
# as a copy of the policy, ArCHer trains only its critic for 10 iterations, ETPO's Q is the residual
# of that copy (exactly 0 at the start), its target tracks the online Q with tau 0.1 and its KL
# weight beta is 0.1 (0.01 collapsed the policy). On the dungeon ArCHer has no working recipe yet
# (docs/results.md): at actor lr 3e-4, 1e-4, 1e-4 with archer.center_advantages, and 1e-4 after 30
# critic-only iterations, training success fell from 0.22 to 0.03-0.09 within 10 actor iterations;
# experiments/critic_check.py measured why: its advantage Q - V correlates 0.15-0.23 with the
# Monte-Carlo advantage there (0.51 on the built-in game).
WARM_LR = {"treasure": 1e-4, "textworld": 1e-4, "dungeon": 3e-4}
# Policy learning rates that differ from WARM_LR, each with its reason. ArCHer's actor on the dungeon:
# at 3e-4 it took the warm start from 0.22 to 0.03 training success in 10 actor iterations (one step
# with 88 % invalid actions, then 90 % of episodes running to the turn limit); it keeps the built-in
# game's 1e-4 there while its critic learns at the dungeon's 3e-4.
WARM_POLICY_LR = {("dungeon", "archer"): 1e-4}
WARM_METHOD: dict[str, list[str]] = {
    "archer": ["--config.archer.critic.from_policy=True", "--config.archer.actor_warmup=10"],
    "etpo": ["--config.etpo.q.from_policy=True", "--config.etpo.q.residual=True", "--config.etpo.tau=0.1",
             "--config.etpo.beta=0.1"],
}


# Variants of a method that share its warm-start settings.
VARIANT_OF = {"etpo_q4": "etpo"}


def warm_overrides(method: str, env: str, warm: str) -> list[str]:
    lr = WARM_LR[env]
    base = VARIANT_OF.get(method, method)
    rates = {"archer": [f"--config.archer.critic_learning_rate={lr:g}"],
             "etpo": [f"--config.etpo.q_learning_rate={lr:g}"]}.get(base, [])
    policy_lr = WARM_POLICY_LR.get((env, base), lr)
    return [f"--config.model.source={warm}", f"--config.optim.learning_rate={policy_lr:g}", *rates,
            *WARM_METHOD.get(base, [])]


def command(method: str, env: str, seed: int, steps: int, workdir: str, extra: list[str],
            heldout: int = 0, warm: str | None = None, env_steps: int = 0) -> list[str]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)} or a group: {', '.join(GROUPS)}")
    config, overrides = METHODS[method]
    variant, env_overrides = ENVS[env]
    return [sys.executable, "-m", "aem_jax.train", f"--config={config}" + (f":{variant}" if variant else ""),
            *env_overrides, *overrides, *ENV_METHOD.get((env, method), []),
            *(warm_overrides(method, env, warm) if warm else []), *extra,
            f"--config.seed={seed}", f"--config.total_steps={steps}",
            *([f"--config.env_steps_budget={env_steps}"] if env_steps else []),
            f"--config.eval.num_tasks={heldout}", f"--workdir={workdir}"]


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_heldout(workdir: str) -> dict | None:
    """The trainer's held-out evaluation after training (``eval.json``), or None."""
    path = os.path.join(workdir, "eval.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def end_step(rows: list[dict], steps: int, env_steps: int = 0) -> int | None:
    """The step at which a run of at most ``steps`` steps with environment-step budget ``env_steps``
    (0: none) ends: the first whose cumulative environment steps reach the budget, else ``steps``;
    None while ``rows`` (its metrics lines) have not got there."""
    if env_steps:
        hit = np.flatnonzero(np.cumsum([r["env_steps"] for r in rows[:steps]]) >= env_steps)
        if hit.size:
            return int(hit[0]) + 1
    return steps if len(rows) >= steps else None


def finished(workdir: str, steps: int, heldout: int = 0, env_steps: int = 0) -> bool:
    """Whether ``workdir`` has trained to its end (``end_step``) and, with ``heldout`` > 0, holds a
    held-out evaluation of that many tasks at that step."""
    end = end_step(read_metrics(workdir), steps, env_steps)
    if end is None:
        return False
    done = read_heldout(workdir) if heldout else None
    return not heldout or (done is not None and (done["step"], done["num_tasks"]) == (end, heldout))


def run(cmd: list[str], workdir: str, steps: int, core: int | None, heldout: int = 0, env_steps: int = 0) -> str:
    """Runs one training job unless its workdir already holds ``steps`` steps
    (and, with ``heldout`` > 0, a held-out evaluation of that many tasks at
    that step; a finished run without one resumes at its last checkpoint, which
    only evaluates)."""
    if finished(workdir, steps, heldout, env_steps):
        return workdir
    os.makedirs(workdir, exist_ok=True)
    run_pinned(cmd, core, os.path.join(workdir, "train.log"))
    return workdir


def run_pinned(cmd: list[str], core: int | None, log_path: str) -> None:
    """Runs ``cmd`` on one core (taskset, where there is one) with its output appended to ``log_path``."""
    if core is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(core), *cmd]
    print(" ".join(cmd), flush=True)
    with open(log_path, "a") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)


def curves(rows: list[dict]) -> dict:
    return {
        "env_steps": np.cumsum([r["env_steps"] for r in rows]).tolist(),
        "success": [r["success"] for r in rows],
        "token_entropy": [r["token_entropy"] for r in rows],
        "invalid_action_rate": [r.get("invalid_action_rate", float("nan")) for r in rows],
        "approx_kl": [r.get("approx_kl", float("nan")) for r in rows],
        "wall_s": total_wall(rows),
        # Median seconds per step past the first 5 (which compile), rollout and update.
        "step_s": [float(np.median([r.get(k, np.nan) for r in rows[5:] or rows]))
                   for k in ("time_rollout_s", "time_update_s")],
    }


def total_wall(rows: list[dict]) -> float:
    """Wall seconds of a run over all its sessions: ``wall_s`` restarts at 0
    when a run is resumed, so the last value of each session is summed."""
    wall = [r["wall_s"] for r in rows]
    return float(sum(w for w, nxt in zip(wall, wall[1:] + [-1.0]) if nxt < w))


def summarise(run_curves: dict, budget: float, threshold: float, smooth: int = 5) -> dict:
    """Final success and invalid-action rate (means of the last 10 steps within
    ``budget`` environment steps) and the environment steps at which the
    ``smooth``-step moving average of success first reached ``threshold``
    (None: never)."""
    env = np.array(run_curves["env_steps"])
    success = np.array(run_curves["success"])
    n = max(int(np.searchsorted(env, budget, side="right")), 1)
    env, success = env[:n], success[:n]
    invalid = np.array(run_curves.get("invalid_action_rate", [np.nan] * len(env)))[:n]
    hit = first_crossing(success, threshold, smooth)
    return {"final_success": float(success[-10:].mean()), "final_invalid": float(invalid[-10:].mean()),
            "steps_used": n,
            "env_steps_to_threshold": float(env[hit]) if hit is not None else None}


def first_crossing(success: np.ndarray, threshold: float, smooth: int = 5) -> int | None:
    """Index of the step that ends the first ``smooth``-step window (shorter
    runs: all steps) whose mean success is >= ``threshold``; None: never."""
    w = min(smooth, len(success))
    hit = np.flatnonzero(np.convolve(success, np.ones(w) / w, mode="valid") >= threshold)
    return int(hit[0]) + w - 1 if hit.size else None


def table(results: dict, threshold: float, budget: float) -> str:
    lines = [f"| method | seeds | final success (last 10 steps within {budget:,.0f} env steps) | "
             f"env steps to {threshold:.0%} success (5-step mean) | final invalid-action rate | "
             "s per step: rollout + update (median) | wall s per run |",
             "|---|---|---|---|---|---|---|"]
    for method, runs in results.items():
        finals = np.array([r["summary"]["final_success"] for r in runs])
        hits = [r["summary"]["env_steps_to_threshold"] for r in runs]
        reached = [h for h in hits if h is not None]
        hit_text = (f"{np.mean(reached):,.0f} +- {np.std(reached):,.0f}" if reached else "never") + \
                   (f" ({len(reached)}/{len(hits)} seeds)" if len(reached) < len(hits) else "")
        invalid = np.array([r["summary"]["final_invalid"] for r in runs])
        wall = np.mean([r["wall_s"] for r in runs])
        rollout_s, update_s = np.mean([r["step_s"] for r in runs], axis=0)
        lines.append(f"| {method} | {len(runs)} | {finals.mean():.2f} +- {finals.std():.2f} | {hit_text} | "
                     f"{invalid.mean():.2f} +- {invalid.std():.2f} | {rollout_s:.2f} + {update_s:.2f} | {wall:.0f} |")
    return "\n".join(lines)


def seed_table(results: dict, threshold: float, smooth: int = 5) -> str:
    """One row per run over all its steps: when the ``smooth``-step mean of
    success first reached ``threshold``, the lowest success of a step after
    that (how steady the run stayed), the largest approximate KL of one step,
    the mean success of the last 10 steps and, where the run has one, the
    held-out success after training."""
    lines = [f"| method | seed | steps | first step with {smooth}-step mean success >= {threshold:.2f} | "
             "lowest success after it | largest approx KL of a step | success, last 10 steps | "
             "held-out success after training |",
             "|---|---|---|---|---|---|---|---|"]
    for method, runs in results.items():
        for r in runs:
            success = np.array(r["success"])
            hit = first_crossing(success, threshold, smooth)
            first = None if hit is None else hit + 1  # steps count from 1
            after = success[first:] if first else success[:0]
            kl = np.array(r.get("approx_kl", [np.nan]), dtype=float)
            held = r.get("heldout")
            cells = [method, str(r["seed"]), str(len(success)), str(first) if first else "never",
                     f"{after.min():.2f}" if first and after.size else "-",
                     f"{np.nanmax(kl):.2f}" if np.isfinite(kl).any() else "-", f"{success[-10:].mean():.2f}",
                     f"{held['success_after']:.2f} ({held['num_tasks']} tasks)" if held else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def smooth(values: list[float], width: int = 5) -> np.ndarray:
    """Centred moving mean; at the ends, the mean of the values in reach (no zero padding)."""
    kernel = np.ones(min(width, len(values)))
    return np.convolve(values, kernel, mode="same") / np.convolve(np.ones(len(values)), kernel, mode="same")


def plot(results: dict, budget: float, out_png: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(0, budget, 200)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4))
    for method, runs in results.items():
        style = "--" if method in PLAIN else "-"
        for ax, key in zip(axes, ("success", "token_entropy", "invalid_action_rate")):
            ys = np.array([np.interp(grid, r["env_steps"], smooth(r[key]),
                                     right=np.nan) for r in runs])
            mean, std = np.nanmean(ys, 0), np.nanstd(ys, 0)
            line, = ax.plot(grid, mean, style, label=method)
            ax.fill_between(grid, mean - std, mean + std, alpha=0.15, color=line.get_color())
            ax.set_xlabel("environment steps")
            ax.set_title(f"{key} ({title}; 5-step mean, +- std over seeds)", fontsize=9)
    axes[0].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out_png + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(out_png + ".tmp.png", out_png)


def write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="treasure", choices=sorted(ENVS))
    p.add_argument("--methods", nargs="+", default=["grpo", "grpo_aem"],
                   help=f"method names or groups ({', '.join(GROUPS)}); known methods: {', '.join(METHODS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--env-steps", type=int, default=0, metavar="B",
                   help="environment-step budget of every run (config.env_steps_budget): a run ends after the "
                        "first step whose cumulative environment steps reach B, or at --steps (0: --steps only)")
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every run, e.g. rollout.seq_bucket=32")
    p.add_argument("--heldout", type=int, default=0, metavar="N",
                   help="evaluate each run on N held-out tasks after training (eval.num_tasks; 0: none)")
    p.add_argument("--warm", default=None, metavar="DIR",
                   help="start every run from this Hugging Face directory (a configs/sft.py export) with the "
                        "warm-start settings (WARM_LR, WARM_METHOD)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the table from the runs of --runs-dir that are finished "
                        "(methods and seeds without one are left out)")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel (each pinned to one core)")
    p.add_argument("--runs-dir", default=None, help="default: runs/compare_ENV")
    p.add_argument("--out", default=None, help="default: docs/compare_ENV")
    args = p.parse_args()
    if args.env_steps < 0:
        p.error(f"--env-steps must be >= 0, got {args.env_steps}")
    if args.heldout < 0:
        p.error(f"--heldout must be >= 0, got {args.heldout}")
    if args.warm is not None and not args.report_only and not os.path.isfile(os.path.join(args.warm, "config.json")):
        p.error(f"--warm {args.warm!r} is not a Hugging Face model directory (no config.json in it)")
    methods = [m for name in args.methods for m in GROUPS.get(name, [name])]
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; known: {', '.join(METHODS)} or a group: {', '.join(GROUPS)}")
    runs_dir = args.runs_dir or f"runs/compare_{args.env}"
    out = args.out or f"docs/compare_{args.env}"
    extra = [f"--config.{kv}" for kv in args.set]

    # Each worker holds one core while its run lasts (taskset), so parallel runs
    # do not fight over the same core.
    cores: queue.Queue = queue.Queue()
    for i in range(args.workers):
        cores.put(i % (os.cpu_count() or 1) if args.workers > 1 else None)

    def job(m: str, s: int) -> str:
        workdir = os.path.join(runs_dir, f"{m}_s{s}")
        core = cores.get()
        try:
            return run(command(m, args.env, s, args.steps, workdir, extra, args.heldout, args.warm, args.env_steps),
                       workdir, args.steps, core, args.heldout, args.env_steps)
        finally:
            cores.put(core)

    if args.report_only:
        workdirs = {(m, s): os.path.join(runs_dir, f"{m}_s{s}") for s in args.seeds for m in methods}
        workdirs = {k: w for k, w in workdirs.items() if finished(w, args.steps, args.heldout, args.env_steps)}
        if not workdirs:
            p.error(f"--report-only: no finished run of {args.steps} steps in {runs_dir}")
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.workers) as pool:
            # Seed-major order: an interrupted sweep leaves every method with the same seeds done.
            futures = {(m, s): pool.submit(job, m, s) for s in args.seeds for m in methods}
            workdirs = {k: f.result() for k, f in futures.items()}

    def rows_of(workdir: str) -> list[dict]:
        rows = read_metrics(workdir)
        return rows[:end_step(rows, args.steps, args.env_steps)]

    raw = {m: [(s, dict(curves(rows_of(workdirs[(m, s)])),
                        heldout=read_heldout(workdirs[(m, s)]) if args.heldout else None))
               for s in args.seeds if (m, s) in workdirs] for m in methods}
    raw = {m: runs for m, runs in raw.items() if runs}
    budget = min(r["env_steps"][-1] for runs in raw.values() for _, r in runs)
    results = {m: [dict(r, seed=s, summary=summarise(r, budget, args.threshold)) for s, r in runs]
               for m, runs in raw.items()}
    text = table(results, args.threshold, budget) + "\n\nPer run, over all its steps:\n\n" + \
        seed_table(results, 0.9)
    print(text)
    write_atomic(out + ".json", json.dumps({"env": args.env, "budget_env_steps": budget, "steps": args.steps,
                                            "env_steps_budget": args.env_steps,
                                            "overrides": args.set, "warm": args.warm,
                                            "results": results}))
    write_atomic(out + ".md", text + "\n")
    plot(results, budget, out + ".png", args.env)
    print(json.dumps({m: [r["summary"]["final_success"] for r in runs] for m, runs in results.items()}))


if __name__ == "__main__":
    main()
