"""AEM's mechanism, made visible from the metrics of GRPO + AEM runs.

  python experiments/mechanism.py --runs runs/compare_treasure/grpo_aem_s* --out docs/mechanism_treasure

Reads each run's metrics.jsonl (written by every training run) and draws three
figures, one file each:

* OUT_drift.png: per step, the predicted entropy drift of ALGORITHMS.md
  section 2, ``mean(A * (S - Hresp))``, and its split by the sign of A,
  next to the measured change of the batch's token entropy from the previous
  step. The prediction is first-order and has no step-size factor, so what can
  be checked is its sign and correlation with the measured change, not its
  scale; both are reported (Pearson r, sign agreement).
* OUT_positive.png: the fraction of responses with a positive advantage over
  training, with success.
* OUT_alpha.png: the distribution of AEM's alpha (histogram over
  ``log(alpha) / lam``) in the first and the last ``--window`` steps.

Writes OUT.json with the figures' numbers.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

ALPHA_BINS = 9  # aem_jax.trainer.advantages.ALPHA_HIST_BINS


def load(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def series(rows: list[dict], key: str) -> np.ndarray:
    return np.array([r.get(key, np.nan) for r in rows], dtype=float)


def drift_stats(runs: list[list[dict]]) -> dict:
    """Pearson r and sign agreement of predicted drift vs measured entropy change
    (pooled over runs; steps where the measured change is undefined are dropped)."""
    pred = np.concatenate([series(r, "predicted_entropy_drift") for r in runs])
    meas = np.concatenate([series(r, "measured_entropy_change") for r in runs])
    ok = np.isfinite(pred) & np.isfinite(meas)
    pred, meas = pred[ok], meas[ok]
    return {"pearson_r": float(np.corrcoef(pred, meas)[0, 1]), "sign_agreement": float(np.mean(np.sign(pred) == np.sign(meas))),
            "n_steps": int(ok.sum())}


def alpha_hist(rows: list[dict]) -> np.ndarray:
    h = np.array([[r[f"alpha_hist_{i}"] for i in range(ALPHA_BINS)] for r in rows])
    return h.mean(axis=0)


def save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="workdirs of GRPO + AEM runs (one per seed)")
    p.add_argument("--window", type=int, default=20, help="steps counted as early / late")
    p.add_argument("--out", default="docs/mechanism_treasure")
    args = p.parse_args()
    runs = [load(w) for w in args.runs]
    names = [os.path.basename(os.path.normpath(w)) for w in args.runs]
    missing = [n for n, r in zip(names, runs) if "alpha_hist_0" not in r[0]]
    if missing:
        p.error(f"runs {missing} have no alpha_hist_* metrics (written by aem_jax since the alpha histogram was added)")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # 1. predicted drift (and its split by the sign of A) vs measured entropy change
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 3.2 * len(runs)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]})
    for (ax, ax_sc), rows, name in zip(axes, runs, names):
        step = series(rows, "step")
        ax.plot(step, series(rows, "predicted_entropy_drift"), color="k", label="predicted drift mean(A (S - H))")
        ax.plot(step, series(rows, "predicted_entropy_drift_pos"), color="tab:green", lw=0.8, label="  from A > 0")
        ax.plot(step, series(rows, "predicted_entropy_drift_neg"), color="tab:red", lw=0.8, label="  from A < 0")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_ylabel("predicted drift")
        ax.set_xlabel("training step")
        ax.set_title(name)
        twin = ax.twinx()
        twin.plot(step, series(rows, "measured_entropy_change"), color="tab:blue", alpha=0.5, lw=0.8)
        twin.set_ylabel("measured token-entropy change", color="tab:blue")
        stats = drift_stats([rows])
        ax_sc.scatter(series(rows, "predicted_entropy_drift"), series(rows, "measured_entropy_change"), s=5)
        ax_sc.axhline(0, color="grey", lw=0.5)
        ax_sc.axvline(0, color="grey", lw=0.5)
        ax_sc.set_xlabel("predicted drift")
        ax_sc.set_ylabel("measured change")
        ax_sc.set_title(f"r = {stats['pearson_r']:.2f}, sign agrees {stats['sign_agreement']:.0%}")
    axes[0][0].legend(fontsize=8, loc="lower right")
    save(fig, args.out + "_drift.png")
    plt.close(fig)

    # 2. fraction of positive advantages over training, with success
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for rows, name in zip(runs, names):
        line, = ax.plot(series(rows, "step"), series(rows, "frac_positive_advantage"), label=f"{name}: A > 0")
        ax.plot(series(rows, "step"), series(rows, "success"), ":", color=line.get_color(), label=f"{name}: success")
    ax.set_xlabel("training step")
    ax.set_ylabel("fraction of responses")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    save(fig, args.out + "_positive.png")
    plt.close(fig)

    # 3. alpha distribution, early vs late (pooled over runs)
    early = np.mean([alpha_hist(r[:args.window]) for r in runs], axis=0)
    late = np.mean([alpha_hist(r[-args.window:]) for r in runs], axis=0)
    centres = (np.arange(ALPHA_BINS) + 0.5) / ALPHA_BINS * 2 - 1
    width = 2 / ALPHA_BINS * 0.4
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(centres - width / 2, early, width, label=f"first {args.window} steps")
    ax.bar(centres + width / 2, late, width, label=f"last {args.window} steps")
    ax.set_xlabel("log(alpha) / lam   (-1: damped most, 0: alpha = 1, +1: boosted most)")
    ax.set_ylabel("fraction of responses")
    ax.legend()
    save(fig, args.out + "_alpha.png")
    plt.close(fig)

    summary = {
        "runs": names,
        "drift_vs_measured": drift_stats(runs),
        "frac_positive_first_last": [[float(np.mean(series(r, "frac_positive_advantage")[:args.window])),
                                      float(np.mean(series(r, "frac_positive_advantage")[-args.window:]))] for r in runs],
        "alpha_hist_early": early.tolist(), "alpha_hist_late": late.tolist(),
        "alpha_at_1_early_late": [float(early[ALPHA_BINS // 2]), float(late[ALPHA_BINS // 2])],
    }
    with open(args.out + ".json.tmp", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(args.out + ".json.tmp", args.out + ".json")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
