"""Every number of the comparison tables in one JSON file (issue 18).

  python experiments/summary.py --compare treasure=docs/warm_treasure.json \
      --compare treasure=docs/warm_ablations_treasure.json \
      --compare dungeon=docs/warm_dungeon.json --out docs/results/summary.json

An environment named twice pools the methods of its files (the ablations
share the runs of grpo and grpo_aem with the comparison; a method found in
two files must have the same per-seed results in both). Each ablation of
GRPO + AEM is paired against grpo_aem in "ablation_pairs".

Reads the OUT.json files that ``experiments/compare.py`` writes and writes

  {"environments": {ENV: {
      "budget_env_steps": b, "steps": n, "source": "docs/compare_ENV.json",
      "methods": {METHOD: {"seeds": n, "seed_list": [...],
                           "start_success": x, "start_success_source": ...,
                           "final_success": [per seed], "final_success_mean": x,
                           "final_success_ci95": [lo, hi], "final_success_source": ...}},
      "aem_pairs": {"grpo"|"rloo"|"dapo": {"seeds": [...], "mean_difference": d,
                    "difference_ci95": [lo, hi], "p_value": p, "test": ...}}}}}

Final success is the held-out success after training where every run of the
method has one (``compare.py --heldout N``), otherwise the mean training
success of the last 10 steps within the comparison's environment-step
budget; ``final_success_source`` says which. The start success is the
held-out success before training (``eval.json``'s ``success_before``), or
the mean training success of the first 5 steps.

``loop_hours`` sums the wall time of the runs' training loops (each run
held one core; start-up and the held-out evaluations are not included), per
method and per environment.

Intervals are percentile bootstrap intervals of the mean over seeds
(10,000 resamples, a fixed generator, so the file is reproducible). A pair
"METHOD" vs "METHOD_aem" is compared on the seeds both ran: the mean of the
per-seed differences (AEM minus plain), its bootstrap interval, and the
two-sided p-value of the exact paired sign-flip permutation test (all 2^n
sign patterns of the differences; with n = 5 seeds the smallest possible
p-value is 2/32 = 0.0625, which the file states rather than hides).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import numpy as np

PAIRS = ("grpo", "rloo", "dapo")
# compare.py's ablations of GRPO + AEM, each paired against grpo_aem.
ABLATIONS = ("aem_lam0.5", "aem_lam2", "aem_scope_batch", "aem_scope_trajectory", "aem_reversed", "aem_shuffled")
RESAMPLES = 10_000


def bootstrap_ci(values, *, resamples: int = RESAMPLES, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean of ``values``."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return [float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))]


def sign_flip_p_value(differences) -> float:
    """Two-sided p-value of the exact paired permutation (sign-flip) test.

    Under the null hypothesis each paired difference d_i is as likely to be
    -d_i, so the p-value is the share of the 2^n sign patterns s whose
    |sum s_i d_i| is at least the observed |sum d_i|.
    """
    d = np.asarray(differences, np.float64)
    if d.size == 0:
        raise ValueError("sign_flip_p_value needs at least one paired difference")
    if d.size > 20:
        raise ValueError(f"{d.size} pairs; the exact test enumerates 2^n patterns, n <= 20 allowed")
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
    observed = abs(d.sum())
    stats = np.abs(signs @ d)
    return float(np.mean(stats >= observed - 1e-12))


def _heldout(run: dict, key: str) -> float | None:
    held = run.get("heldout") or {}
    value = held.get(key)
    return None if value is None else float(value)


def method_summary(runs: list[dict]) -> dict:
    """The summary of one method's runs (one per seed) of a compare.py result."""
    seeds = [int(r["seed"]) for r in runs]
    after = [_heldout(r, "success_after") for r in runs]
    if all(v is not None for v in after):
        finals, final_source = after, "held-out success after training (eval.json)"
    else:
        finals = [float(r["summary"]["final_success"]) for r in runs]
        final_source = "training success, mean of the last 10 steps within the budget"
    before = [_heldout(r, "success_before") for r in runs]
    if all(v is not None for v in before):
        starts, start_source = before, "held-out success before training (eval.json)"
    else:
        starts = [float(np.mean(r["success"][:5])) for r in runs]
        start_source = "training success, mean of the first 5 steps"
    start = float(np.mean(starts))
    walls = [r.get("wall_s") for r in runs]
    return {"seeds": len(runs), "seed_list": seeds,
            "env_steps": [float(r["env_steps"][-1]) for r in runs] if all("env_steps" in r for r in runs) else None,
            "loop_hours": float(sum(walls)) / 3600 if all(w is not None for w in walls) else None,
            "start_success": start, "start_success_per_seed": [float(v) for v in starts],
            "start_success_source": start_source,
            # seeds whose final success is above their own start (same held-out tasks before and after)
            "seeds_above_start": int(sum(f > b for f, b in zip(finals, starts))),
            "final_success": [float(v) for v in finals],
            "final_success_mean": float(np.mean(finals)),
            "final_success_ci95": bootstrap_ci(finals),
            "final_success_source": final_source}


def aem_pair(plain: dict, aem: dict) -> dict | None:
    """Paired comparison of METHOD_aem against METHOD on the seeds both ran."""
    a = dict(zip(plain["seed_list"], plain["final_success"]))
    b = dict(zip(aem["seed_list"], aem["final_success"]))
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = np.array([b[s] - a[s] for s in seeds])
    return {"seeds": seeds, "mean_difference": float(d.mean()), "difference_ci95": bootstrap_ci(d),
            "p_value": sign_flip_p_value(d),
            "smallest_possible_p_value": 2.0 / 2 ** len(seeds) if np.any(d) else 1.0,
            "test": "exact two-sided paired sign-flip permutation test on per-seed final success"}


def environment_summary(compare: dict, source: str) -> dict:
    methods = {m: method_summary(runs) for m, runs in compare["results"].items()}
    return {"loop_hours": loop_hours(methods),"source": source, "budget_env_steps": compare.get("budget_env_steps"),
            "steps": compare.get("steps"), "overrides": compare.get("overrides", []), "warm": compare.get("warm"),
            "methods": methods, "aem_pairs": pairs_of(methods)}


def loop_hours(methods: dict) -> float | None:
    """Hours the methods' training loops ran, summed over runs (each run held one core; start-up and
    held-out evaluations are not included)."""
    hours = [m.get("loop_hours") for m in methods.values()]
    return float(sum(hours)) if hours and all(h is not None for h in hours) else None


def pairs_of(methods: dict) -> dict:
    """The +-AEM pairs (METHOD_aem against METHOD) present in ``methods``."""
    pairs = {}
    for base in PAIRS:
        if base in methods and f"{base}_aem" in methods:
            pair = aem_pair(methods[base], methods[f"{base}_aem"])
            if pair is not None:
                pairs[base] = pair
    return pairs


def ablation_pairs(methods: dict) -> dict:
    """Each ablation of AEM (one setting of GRPO + AEM changed) against GRPO + AEM, paired by seed."""
    if "grpo_aem" not in methods:
        return {}
    out = {}
    for m in ABLATIONS:
        if m in methods:
            pair = aem_pair(methods["grpo_aem"], methods[m])
            if pair is not None:
                out[m] = dict(pair, against="grpo_aem")
    return out


def merge(env: str, summaries: list[dict]) -> dict:
    """One environment from several compare.py files (e.g. the methods and the ablations, which share
    the runs of grpo and grpo_aem): methods are pooled; a method in two files must have the same
    per-seed results there."""
    if len(summaries) == 1:
        merged = summaries[0]
    else:
        merged = {"source": [s["source"] for s in summaries], "methods": {}}
        for key in ("budget_env_steps", "steps", "overrides", "warm"):
            merged[key] = [s.get(key) for s in summaries]
        source_of: dict[str, str] = {}
        for s in summaries:
            for m, ms in s["methods"].items():
                seen = merged["methods"].get(m)
                if seen is not None and (seen["seed_list"], seen["final_success"]) != (ms["seed_list"],
                                                                                       ms["final_success"]):
                    raise ValueError(f"environment {env!r}: method {m!r} differs between {source_of[m]} and "
                                     f"{s['source']}; pool only files that share its runs")
                merged["methods"][m] = ms
                source_of.setdefault(m, s["source"])
        merged["aem_pairs"] = pairs_of(merged["methods"])
        merged["loop_hours"] = loop_hours(merged["methods"])
    ablations = ablation_pairs(merged["methods"])
    if ablations:
        merged["ablation_pairs"] = ablations
    return merged


def markdown(out: dict) -> str:
    """The summary's tables: per environment, one row per method and one per paired comparison."""
    lines = []
    for env, e in out["environments"].items():
        lines += [f"### {env}", "",
                  "| method | seeds | held-out success before | after: mean [95% CI] | after, per seed | "
                  "seeds above their start | env steps per run | loop hours |", "|---|---|---|---|---|---|---|---|"]
        for m, ms in e["methods"].items():
            lo, hi = ms["final_success_ci95"]
            steps = ms.get("env_steps")
            steps_text = f"{min(steps):,.0f}" + (f"-{max(steps):,.0f}" if max(steps) > min(steps) else "") \
                if steps else "-"
            hours = "-" if ms.get("loop_hours") is None else f"{ms['loop_hours']:.2f}"
            lines.append(f"| {m} | {ms['seeds']} | {ms['start_success']:.2f} | **{ms['final_success_mean']:.2f}** "
                         f"[{lo:.2f}, {hi:.2f}] | {', '.join(f'{v:.2f}' for v in ms['final_success'])} | "
                         f"{ms['seeds_above_start']}/{ms['seeds']} | {steps_text} | {hours} |")
        pairs = [(f"{b}_aem - {b}", pr) for b, pr in e.get("aem_pairs", {}).items()] + \
                [(f"{m} - grpo_aem", pr) for m, pr in e.get("ablation_pairs", {}).items()]
        if pairs:
            lines += ["", "| paired by seed | seeds | mean difference [95% CI] | p (exact sign-flip, two-sided) |",
                      "|---|---|---|---|"]
            for name, pr in pairs:
                lo, hi = pr["difference_ci95"]
                lines.append(f"| {name} | {len(pr['seeds'])} | {pr['mean_difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
                             f"{pr['p_value']:.3f} (smallest possible {pr['smallest_possible_p_value']:.3f}) |")
        reeval = e.get("paired_reevaluation")
        if reeval:
            lines += ["", f"Paired re-evaluation against the warm start ({reeval['tasks']} held-out tasks x "
                      f"{reeval['samples_per_task']}, common random numbers; experiments/reeval_sweep.py):", "",
                      "| method | seeds | before | after | after - before: mean [95% CI] | seeds above their start "
                      "| per seed |", "|---|---|---|---|---|---|---|"]
            for m, ms in reeval["methods"].items():
                lo, hi = ms["difference_ci95"]
                per_seed = ", ".join(f"{r['difference']:+.3f}" for r in ms["runs"])
                lines.append(f"| {m} | {ms['seeds']} | {ms['before_mean']:.3f} | {ms['after_mean']:.3f} | "
                             f"**{ms['difference_mean']:+.3f}** [{lo:+.3f}, {hi:+.3f}] | "
                             f"{ms['seeds_above_start']}/{ms['seeds']} | {per_seed} |")
            for name, pr in reeval.get("pairs", {}).items():
                lo, hi = pr["ci95"]
                lines.append(f"| {name} (after) | {pr['seeds']} | | | {pr['mean_difference']:+.3f} "
                             f"[{lo:+.3f}, {hi:+.3f}], p {pr['p_value']:.3f} | | |")
        lines.append("")
    return "\n".join(lines)


def _parse_compare(text: str) -> tuple[str, str]:
    env, sep, path = text.partition("=")
    if not sep or not env or not path:
        raise argparse.ArgumentTypeError(f"--compare {text!r}; expected ENV=PATH.json")
    return env, path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", type=_parse_compare, action="append", required=True, metavar="ENV=PATH.json",
                   help="an OUT.json of experiments/compare.py (repeat per environment)")
    p.add_argument("--reeval", type=_parse_compare, action="append", default=[], metavar="ENV=PATH.json",
                   help="an OUT.json of experiments/reeval_sweep.py, kept as the environment's "
                        "paired_reevaluation")
    p.add_argument("--out", default="docs/results/summary.json")
    p.add_argument("--markdown", default=None, metavar="PATH.md", help="also write the tables as markdown")
    args = p.parse_args(argv)
    per_env: dict[str, list[dict]] = {}
    for env, path in args.compare:
        if not os.path.exists(path):
            p.error(f"--compare {env}={path}: no such file (run experiments/compare.py --out first)")
        with open(path) as f:
            per_env.setdefault(env, []).append(environment_summary(json.load(f), path))
    try:
        envs = {env: merge(env, summaries) for env, summaries in per_env.items()}
    except ValueError as e:
        p.error(str(e))
    for env, path in args.reeval:
        if env not in envs:
            p.error(f"--reeval {env}={path}: no --compare for {env!r} (have: {', '.join(envs)})")
        if not os.path.exists(path):
            p.error(f"--reeval {env}={path}: no such file (run experiments/reeval_sweep.py --out first)")
        with open(path) as f:
            envs[env]["paired_reevaluation"] = dict(json.load(f), source=path)
    out = {"environments": envs}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, args.out)
    if args.markdown:
        with open(args.markdown + ".tmp", "w") as f:
            f.write(markdown(out))
        os.replace(args.markdown + ".tmp", args.markdown)
    for env, e in envs.items():
        for m, s in e["methods"].items():
            lo, hi = s["final_success_ci95"]
            print(f"{env:10s} {m:12s} n={s['seeds']} start {s['start_success']:.2f} "
                  f"final {s['final_success_mean']:.2f} [{lo:.2f}, {hi:.2f}]")
        for base, pr in e["aem_pairs"].items():
            print(f"{env:10s} {base}+aem - {base}: {pr['mean_difference']:+.3f} (p = {pr['p_value']:.3f}, "
                  f"n = {len(pr['seeds'])})")
        for m, pr in e.get("ablation_pairs", {}).items():
            print(f"{env:10s} {m} - grpo_aem: {pr['mean_difference']:+.3f} (p = {pr['p_value']:.3f}, "
                  f"n = {len(pr['seeds'])})")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
