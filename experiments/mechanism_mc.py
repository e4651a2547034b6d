"""AEM's mechanism on a given policy: alpha against Monte-Carlo relative surprisal.

  # 1. per-response measurements of one policy (a Hugging Face export) on one environment
  python experiments/mechanism_mc.py measure --config=configs/default.py \\
      --policy=/tmp/m_runs/sft_treasure/export/final --num_tasks=8 --group_size=8 --m=8 \\
      --label=treasure_sft --out=/tmp/m_runs/mc_treasure_sft.json
  # 2. tables, scatter plot and drift statistics of several measurements (and RL runs)
  python experiments/mechanism_mc.py report --measurements /tmp/m_runs/mc_*.json \\
      --drift_runs /tmp/m_runs/grpo_aem_treasure --out=docs/mechanism_warm

What is measured (ALGORITHMS.md section 2; ``aem_jax/objectives/aem.py``).
A rollout batch of N tasks x G rollouts is played by the library's own
rollout phase (``trainer.rollouts.play_share``, with the policy, environment
and ``RolloutConfig`` built from the config by ``trainer.loop.build_context``,
as a training step builds them). For every valid response a (one turn of one
episode) in its state s (the prompt it was sampled from: the row's tokens
before the turn's first action token), with the behaviour policy pi:

  S(a|s)   = -sum_t log pi(y_t | s, y_<t)          response surprisal
  Hresp    = sum_t H(pi(. | s, y_<t))              response entropy along a
  Hbar     = Hresp / |a|                           mean token entropy (AEM's signal)
  E[S|s]  ~= (1/M) sum_m S(a_m|s),  a_m ~ pi(.|s)  M extra samples from s
  rel_mc   = S - E[S|s]                            Monte-Carlo relative surprisal
  rel_proxy = S - Hresp                            the trainer's analytic proxy
  alpha    = aem_coefficients(Hbar, ...)           group scope over the G
                                                   rollouts' responses (the
                                                   config's aem block: lam 1,
                                                   min_range 0.1 by default)

``E[S|s] = E[Hresp]`` (the tower rule: E[-log pi(y_t)| prefix] = H_t), so
Hresp is an unbiased one-sample estimate of E[S|s] computed along the same
path as S; rel_proxy therefore has mean 0 in each state, but it is not
independent of the sample: it is sum_t (-log pi(y_t) - H_t), the surprise of
the chosen tokens beyond their own steps' entropies. rel_mc subtracts an
estimate independent of a (its own noise has variance Var(S|s) / M).

The correlation reported is Pearson's and Spearman's r between
x = alpha - 1 and y = rel_mc (and y = rel_proxy), (a) over all responses,
(b) within groups: x and y centred on their group's means (Spearman: the
ranks inside each group, centred on the group's mean rank), then pooled,
(c) both restricted to groups where AEM modulates (entropy range >=
min_range; elsewhere alpha = 1 exactly). 95 % intervals: percentile
bootstrap over task groups (the responses of one task are not independent),
2000 resamples.

The sign. alpha is a decreasing function of Hbar inside each group
(alpha = exp(-lam Htil) / mean_g exp(-lam Htil)), so x = alpha - 1 is large
for the group's most confident responses. A response that sampled an
unlikely token has a large S; after an unlikely token the policy tends to be
less sure of what follows, so its Hbar is high too, and its alpha low. Nothing
in the definitions forces a positive correlation between alpha - 1 and
relative surprisal: with alpha defined as in ALGORITHMS.md the expected sign
is negative (high relative surprisal, high entropy, damped). The paper
reports r = 0.63 for its mechanism check; this script reports the signed
correlation of alpha - 1 as defined here, whichever sign it has, and also
the correlation of Hbar itself with rel_mc (Hbar is what alpha decreases
with) so the reader can see both readings. No sign is flipped.

The per-response rows are saved too (for the scatter plot), and a rescoring
check: the policy's teacher-forced log-probs of each batch row against the
rollout's ``old_logp`` (max absolute difference), which confirms that the row
prefix is the state the response was sampled in.

``report`` also computes, with experiments/mechanism.py's ``drift_stats``,
Pearson r and sign agreement of the per-step predicted entropy drift
``mean(A (S - Hresp))`` against the measured change of token entropy, from
the metrics.jsonl of RL runs (e.g. GRPO + AEM started from the warm start).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # run as a script: the repository's aem_jax
    sys.path.insert(0, os.path.dirname(HERE))
N_BOOT = 2000


# ----------------------------------------------------------------- statistics

def ranks(x) -> np.ndarray:
    """Average ranks (1..n, ties share their mean rank), float64."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    r = np.empty(len(x), np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return r


def pearson(x, y) -> float:
    """Pearson's r in float64; nan when either side is constant."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pearson needs two 1-d arrays of one length; got {x.shape} and {y.shape}")
    dx, dy = x - x.mean(), y - y.mean()
    den = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / den) if den > 0 else float("nan")


def spearman(x, y) -> float:
    """Spearman's rho: Pearson's r of the average ranks."""
    return pearson(ranks(x), ranks(y))


def centre_in_groups(v, groups) -> np.ndarray:
    """``v - mean of v over its group``, float64."""
    v = np.asarray(v, np.float64)
    _, inv = np.unique(np.asarray(groups), return_inverse=True)
    means = np.bincount(inv, weights=v) / np.bincount(inv)
    return v - means[inv]


def ranks_in_groups(v, groups) -> np.ndarray:
    """Average ranks of ``v`` inside each group, centred on the group's mean rank."""
    v = np.asarray(v, np.float64)
    groups = np.asarray(groups)
    out = np.empty(len(v), np.float64)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        r = ranks(v[idx])
        out[idx] = r - r.mean()
    return out


def pearson_within(x, y, groups) -> float:
    """Pearson's r of the group-centred values, pooled over groups."""
    return pearson(centre_in_groups(x, groups), centre_in_groups(y, groups))


def spearman_within(x, y, groups) -> float:
    """Pearson's r of the within-group ranks, each centred on its group's mean rank, pooled."""
    return pearson(ranks_in_groups(x, groups), ranks_in_groups(y, groups))


STATS = {
    "pearson": lambda x, y, g: pearson(x, y),
    "spearman": lambda x, y, g: spearman(x, y),
    "pearson_within": pearson_within,
    "spearman_within": spearman_within,
}


def bootstrap_indices(groups, rng: np.random.Generator):
    """One cluster-bootstrap resample: (row indices, new group labels).

    Task groups are drawn with replacement; a group drawn twice appears as
    two groups (its copies get distinct labels).
    """
    groups = np.asarray(groups)
    labels = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in labels]
    pick = rng.integers(0, len(labels), len(labels))
    idx = np.concatenate([members[p] for p in pick])
    new = np.concatenate([np.full(len(members[p]), j) for j, p in enumerate(pick)])
    return idx, new


def correlations(x, y, groups, *, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """Pearson, Spearman and their within-group versions of (x, y), each with a
    95 % percentile interval from a cluster bootstrap over ``groups``."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    groups = np.asarray(groups)
    if not (x.shape == y.shape == groups.shape) or x.ndim != 1:
        raise ValueError(f"x, y and groups must be 1-d of one length; got {x.shape}, {y.shape}, {groups.shape}")
    out: dict[str, Any] = {"n": int(len(x)), "n_groups": int(len(np.unique(groups)))}
    if len(x) < 3:
        return out
    rng = np.random.default_rng(seed)
    boots = {k: [] for k in STATS}
    for _ in range(n_boot):
        idx, g = bootstrap_indices(groups, rng)
        for k, f in STATS.items():
            boots[k].append(f(x[idx], y[idx], g))
    for k, f in STATS.items():
        b = np.asarray(boots[k])
        b = b[np.isfinite(b)]
        ci = [float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))] if len(b) else [np.nan, np.nan]
        out[k] = {"r": f(x, y, groups), "ci95": ci}
    return out


# ------------------------------------------------------------ the measurement

def load_mechanism():
    """experiments/mechanism.py (the drift statistics), loaded from this folder."""
    spec = importlib.util.spec_from_file_location("experiments_mechanism", os.path.join(HERE, "mechanism.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def policy_config(config_spec: str, policy: str | None, overrides: Sequence[str] = (), *,
                  num_tasks: int | None = None, group_size: int | None = None):
    """The run config of ``config_spec`` (``path.py[:variants]``) playing ``policy``
    (a Hugging Face directory; None keeps the config's own model)."""
    from aem_jax.trainer import setup

    sets = list(overrides)
    if policy is not None:
        if not os.path.isfile(os.path.join(policy, "config.json")):
            raise FileNotFoundError(f"--policy={policy!r} is not a Hugging Face directory (no config.json); "
                                    "pass WORKDIR/export/final of a run with export enabled")
        sets.append(f"model.source={policy}")
    if num_tasks is not None:
        sets.append(f"rollout.num_tasks={num_tasks}")
    if group_size is not None:
        sets.append(f"rollout.group_size={group_size}")
    config = setup.load_config(config_spec, sets)
    episodes = config.rollout.num_tasks * config.rollout.group_size
    if episodes % config.learner.minibatch_size:
        # the minibatch only pads the batch's rows here (no update is made); the
        # config check wants it to divide the batch
        config.learner.minibatch_size = episodes
    if config.rollout.group_size < 2:
        raise ValueError(f"rollout.group_size={config.rollout.group_size}; AEM's groups need >= 2 rollouts per task")
    return config


def build(config):
    """(RunContext, Algorithm) of ``config``, as the training loop builds them."""
    from aem_jax import sharding
    from aem_jax.trainer import loop

    algorithm = loop.check_config(config)
    mesh = sharding.make_mesh(dict(config.mesh))
    return loop.build_context(config, mesh), algorithm


@dataclasses.dataclass
class Responses:
    """The valid responses of a batch, one entry each (episode layout indices e, k)."""

    episode: np.ndarray
    turn: np.ndarray
    group: np.ndarray
    prompts: list[list[int]]
    actions: list[list[int]]
    surprisal: np.ndarray      # S
    entropy_sum: np.ndarray    # Hresp
    entropy_mean: np.ndarray   # Hbar


def batch_responses(batch) -> Responses:
    """Every valid response of a `TurnBatch` with its prompt (the row's tokens
    before the turn's first action token: the context it was sampled in, in
    both history modes) and its S, Hresp and Hbar from the behaviour log-probs
    and entropies."""
    tokens = np.asarray(batch.tokens)
    mask = np.asarray(batch.loss_mask) > 0
    turn_ids = np.asarray(batch.turn_ids)
    logp = np.asarray(batch.old_logp, np.float64)
    ent = np.asarray(batch.old_entropy, np.float64)
    valid = np.asarray(batch.turn_valid, bool)
    cols: dict[str, list] = {k: [] for k in ("episode", "turn", "group", "prompts", "actions", "s", "h", "hbar")}
    for b in range(tokens.shape[0]):
        for k in np.flatnonzero(valid[b]):
            pos = np.flatnonzero(mask[b] & (turn_ids[b] == k))
            if len(pos) == 0:
                continue
            cols["episode"].append(int(batch.episode_ids[b]))
            cols["turn"].append(int(batch.turn_offset[b]) + int(k))
            cols["group"].append(int(batch.group_ids[b]))
            cols["prompts"].append(tokens[b, :pos[0]].tolist())
            cols["actions"].append(tokens[b, pos].tolist())
            cols["s"].append(-logp[b, pos].sum())
            cols["h"].append(ent[b, pos].sum())
            cols["hbar"].append(ent[b, pos].mean())
    return Responses(np.asarray(cols["episode"], np.int64), np.asarray(cols["turn"], np.int64),
                     np.asarray(cols["group"], np.int64), cols["prompts"], cols["actions"],
                     np.asarray(cols["s"]), np.asarray(cols["h"]), np.asarray(cols["hbar"]))


def sample_surprisal(policy, prompts: Sequence[Sequence[int]], *, m: int, key, chunk: int = 128):
    """M fresh responses from each prompt: ([n, M] surprisal S_m, [n, M] response entropy Hresp_m).

    ``policy`` is a `rollout.SamplerPolicy` (its sampling settings: the
    rollout's temperature, top-k/p, stop tokens and ``max_action_tokens``, so
    the responses are drawn as the rollout drew the batch's). Row j * M + i
    samples with ``fold_in(key, j * M + i)``; rows go in chunks of ``chunk``
    (the last padded with the first prompt) so the sampler compiles once per
    prompt-length bucket.
    """
    import jax
    import jax.numpy as jnp

    if m < 1:
        raise ValueError(f"m={m}; the Monte-Carlo estimate needs at least one extra sample per state")
    if chunk < 1:
        raise ValueError(f"chunk={chunk}; must be >= 1")
    rows = [list(p) for p in prompts for _ in range(m)]
    s = np.zeros(len(rows), np.float64)
    h = np.zeros(len(rows), np.float64)
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        n = len(part)
        part = part + [part[0]] * (chunk - n)
        ids = jnp.arange(start, start + chunk, dtype=jnp.uint32)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, ids)
        gens = policy.generate(part, key=keys)
        s[start:start + n] = [-np.sum(np.asarray(g.logprobs, np.float64)) for g in gens[:n]]
        h[start:start + n] = [np.sum(np.asarray(g.entropies, np.float64)) for g in gens[:n]]
    return s.reshape(-1, m), h.reshape(-1, m)


def rescore_gap(model, batch, chunk: int = 32) -> float:
    """max |teacher-forced log pi(token) - old_logp| over the batch's action tokens."""
    import jax

    from aem_jax import models

    tokens = np.asarray(batch.tokens)
    attn = np.asarray(batch.attention_mask)
    mask = np.asarray(batch.loss_mask)[:, 1:] > 0
    old = np.asarray(batch.old_logp)[:, 1:]
    gap = 0.0
    for i in range(0, tokens.shape[0], chunk):
        logits = models.logits(model, tokens[i:i + chunk], attn[i:i + chunk])
        logp_all = np.asarray(jax.nn.log_softmax(logits[:, :-1].astype(np.float32), axis=-1))
        lp = np.take_along_axis(logp_all, tokens[i:i + chunk, 1:, None], -1)[..., 0]  # token t at t - 1
        d = np.abs(lp - old[i:i + chunk])[mask[i:i + chunk]]
        gap = max(gap, float(d.max()) if d.size else 0.0)
    return gap


def measure(config, *, m: int, step: int = 1_000_000, mc_seed: int = 0, n_boot: int = N_BOOT) -> dict[str, Any]:
    """Plays one rollout batch with ``config``'s policy and measures every valid response.

    ``step`` picks the batch's tasks and keys as a training step of that
    index would (``rng.task_seeds``; the default is far from any step of a
    short run). Returns a JSON-able dict: per-response rows, summary
    statistics and correlations.
    """
    import jax
    import jax.numpy as jnp

    from aem_jax import objectives as obj
    from aem_jax import sharding
    from aem_jax.trainer import advantages, rollouts

    c = config
    if c.aem.signal != "mean_token_entropy":
        raise ValueError(f"aem.signal={c.aem.signal!r}; this check measures the paper's mean_token_entropy")
    ctx, algorithm = build(config)
    batch, records, _ = rollouts.play_share(ctx, algorithm, ctx.init_params, step)
    settings = advantages.AdvantageSettings.from_config(c, estimator="grpo")
    view = advantages.episode_view(jax.tree.map(jnp.asarray, batch), settings)
    alpha_EK = np.asarray(obj.aem_coefficients(
        view["signal"], view["groups"], view["valid"], num_groups=settings.num_groups,
        lam=c.aem.lam, min_range=c.aem.min_range, scope=c.aem.scope))
    adv_EK = np.asarray(advantages.base_advantages_EK(view, settings))
    signal_EK = np.asarray(view["signal"])
    rel_EK = np.asarray(view["rel_surprisal"])
    resp = batch_responses(batch)
    e, k = resp.episode, resp.turn
    gap_signal = float(np.max(np.abs(signal_EK[e, k] - resp.entropy_mean))) if len(e) else 0.0
    # group scope: a group whose entropy range is below min_range keeps alpha = 1
    span = {g: np.ptp(resp.entropy_mean[resp.group == g]) for g in np.unique(resp.group)}
    modulated = np.array([span[g] >= c.aem.min_range for g in resp.group]) if c.aem.scope == "group" else \
        np.ones(len(e), bool)

    with sharding.use_mesh(ctx.mesh):
        model = ctx.policy(ctx.init_params)
        policy = rollouts.sampler(ctx, None, model=model)
        s_mc, h_mc = sample_surprisal(policy, resp.prompts, m=m, key=jax.random.key(mc_seed))
        gap_rescore = rescore_gap(model, batch)

    alpha = alpha_EK[e, k].astype(np.float64)
    rel_mc = resp.surprisal - s_mc.mean(axis=1)
    rel_proxy = resp.surprisal - resp.entropy_sum
    x = alpha - 1.0
    sel = modulated
    corr = {
        "alpha_vs_rel_mc": correlations(x, rel_mc, resp.group, n_boot=n_boot),
        "alpha_vs_rel_proxy": correlations(x, rel_proxy, resp.group, n_boot=n_boot),
        "hbar_vs_rel_mc": correlations(resp.entropy_mean, rel_mc, resp.group, n_boot=n_boot),
        "rel_proxy_vs_rel_mc": correlations(rel_proxy, rel_mc, resp.group, n_boot=n_boot),
        "modulated_alpha_vs_rel_mc": correlations(x[sel], rel_mc[sel], resp.group[sel], n_boot=n_boot),
        "modulated_alpha_vs_rel_proxy": correlations(x[sel], rel_proxy[sel], resp.group[sel], n_boot=n_boot),
    }
    se = s_mc.std(axis=1, ddof=1) / np.sqrt(m) if m > 1 else np.full(len(e), np.nan)
    return {
        "config": {"num_tasks": c.rollout.num_tasks, "group_size": c.rollout.group_size, "m": m,
                   "env": c.env.name, "model_source": c.model.source, "step": step, "mc_seed": mc_seed,
                   "aem": {"lam": c.aem.lam, "min_range": c.aem.min_range, "scope": c.aem.scope},
                   "temperature": c.rollout.temperature},
        "summary": {
            "episodes": len(records), "success": float(np.mean([r.success for r in records])),
            "responses": int(len(e)), "responses_modulated": int(sel.sum()),
            "groups_modulated": int(sum(v >= c.aem.min_range for v in span.values())), "groups": len(span),
            "mean_hbar": float(resp.entropy_mean.mean()), "std_hbar": float(resp.entropy_mean.std()),
            "mean_S": float(resp.surprisal.mean()), "mean_S_mc": float(s_mc.mean()),
            "mean_rel_mc": float(rel_mc.mean()), "mean_rel_proxy": float(rel_proxy.mean()),
            "std_rel_mc": float(rel_mc.std()), "std_rel_proxy": float(rel_proxy.std()),
            "mean_mc_standard_error": float(np.nanmean(se)),
            "alpha_min": float(alpha.min()), "alpha_max": float(alpha.max()),
            "check_signal_vs_trainer_max_abs": gap_signal,
            "check_rel_proxy_vs_trainer_max_abs": float(np.max(np.abs(rel_EK[e, k] - rel_proxy))),
            "check_rescore_vs_old_logp_max_abs": gap_rescore,
        },
        "correlations": corr,
        "rows": {"group": resp.group.tolist(), "episode": e.tolist(), "turn": k.tolist(),
                 "alpha": alpha.tolist(), "hbar": resp.entropy_mean.tolist(), "S": resp.surprisal.tolist(),
                 "Hresp": resp.entropy_sum.tolist(), "S_mc_mean": s_mc.mean(axis=1).tolist(),
                 "Hresp_mc_mean": h_mc.mean(axis=1).tolist(), "rel_mc": rel_mc.tolist(),
                 "rel_proxy": rel_proxy.tolist(), "advantage": adv_EK[e, k].tolist(),
                 "modulated": sel.tolist()},
    }


# ---------------------------------------------------------------- the report

def fmt(c: dict, key: str) -> str:
    if key not in c:
        return "-"
    return f"{c[key]['r']:+.2f} [{c[key]['ci95'][0]:+.2f}, {c[key]['ci95'][1]:+.2f}]"


def batch_drift(rows: dict) -> dict[str, float]:
    """The rollout batch's first-order entropy drift ``mean(A (S - E[S|s]))`` (per
    valid response), with the GRPO advantage A alone and with AEM's alpha A,
    using the MC relative surprisal and the trainer's proxy ``S - Hresp``."""
    a = np.asarray(rows["advantage"], np.float64)
    alpha = np.asarray(rows["alpha"], np.float64)
    out = {}
    for key in ("rel_mc", "rel_proxy"):
        rel = np.asarray(rows[key], np.float64)
        out[f"grpo_{key}"] = float(np.mean(a * rel))
        out[f"aem_{key}"] = float(np.mean(alpha * a * rel))
    return out


def report(measurements: list[dict], labels: list[str], drift_runs: list[str], out: str) -> dict:
    """OUT.json (every number) and OUT.png (scatter of alpha - 1 against rel_mc per measurement)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mechanism = load_mechanism()
    summary: dict[str, Any] = {"measurements": {}, "drift": {}}
    for label, meas in zip(labels, measurements):
        summary["measurements"][label] = {k: meas[k] for k in ("config", "summary", "correlations")}
        summary["measurements"][label]["batch_drift"] = batch_drift(meas["rows"])
    for run in drift_runs:
        rows = mechanism.load(run)
        summary["drift"][os.path.basename(os.path.normpath(run))] = {
            **mechanism.drift_stats([rows]),
            "steps": len(rows),
            "success_first_last5": [float(np.mean([r["success"] for r in rows[:5]])),
                                    float(np.mean([r["success"] for r in rows[-5:]]))],
            "alpha_std_mean": float(np.mean([r.get("alpha_std", np.nan) for r in rows])),
            # the step-to-step change compares batches of different tasks; over the run:
            "predicted_negative_frac": float(np.mean([r["predicted_entropy_drift"] < 0 for r in rows])),
            "token_entropy_first_last5": [float(np.mean([r["token_entropy"] for r in rows[:5]])),
                                          float(np.mean([r["token_entropy"] for r in rows[-5:]]))],
        }
    n = len(measurements)
    fig, axes = plt.subplots(n, 2, figsize=(9, 3.4 * n), squeeze=False)
    for j, (label, meas) in enumerate(zip(labels, measurements)):
        r = meas["rows"]
        mod = np.asarray(r["modulated"], bool)
        x = np.asarray(r["alpha"]) - 1
        for i, (key, name) in enumerate((("rel_mc", "MC relative surprisal S - mean_m S_m"),
                                         ("rel_proxy", "proxy S - Hresp"))):
            ax = axes[j][i]
            y = np.asarray(r[key])
            ax.scatter(y[~mod], x[~mod], s=6, color="grey", alpha=0.5, label="alpha = 1 (group range < min_range)")
            ax.scatter(y[mod], x[mod], s=8, color="tab:blue", alpha=0.7, label="modulated groups")
            c = meas["correlations"]["alpha_vs_" + key]
            ax.set_title(f"{label}\nPearson {fmt(c, 'pearson')}\nwithin groups {fmt(c, 'pearson_within')}",
                         fontsize=8)
            ax.set_xlabel(name, fontsize=8)
            ax.set_ylabel("alpha - 1", fontsize=8)
            ax.axhline(0, color="grey", lw=0.5)
            ax.axvline(0, color="grey", lw=0.5)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=110)
    plt.close(fig)
    with open(out + ".json.tmp", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(out + ".json.tmp", out + ".json")
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="play one batch with a policy and measure every response")
    m.add_argument("--config", required=True, help="path/to/config.py[:variants] (environment and rollout)")
    m.add_argument("--policy", default=None, help="Hugging Face directory (e.g. WORKDIR/export/final)")
    m.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    m.add_argument("--num_tasks", type=int, default=None)
    m.add_argument("--group_size", type=int, default=None)
    m.add_argument("--m", type=int, default=8, help="extra samples per state for E[S|s]")
    m.add_argument("--step", type=int, default=1_000_000, help="task/key index of the batch")
    m.add_argument("--seed", type=int, default=0, help="key of the Monte-Carlo samples")
    m.add_argument("--label", required=True)
    m.add_argument("--out", required=True, help="JSON file")
    r = sub.add_parser("report", help="tables, scatter plot and drift statistics")
    r.add_argument("--measurements", nargs="*", default=[], help="JSON files written by measure")
    r.add_argument("--drift_runs", nargs="*", default=[], help="RL workdirs (metrics.jsonl)")
    r.add_argument("--out", required=True, help="OUT.json and OUT.png are written")
    args = p.parse_args(argv)
    if args.command == "measure":
        config = policy_config(args.config, args.policy, args.set, num_tasks=args.num_tasks,
                               group_size=args.group_size)
        result = measure(config, m=args.m, step=args.step, mc_seed=args.seed)
        result["label"] = args.label
        with open(args.out + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(args.out + ".tmp", args.out)
        print(json.dumps({"label": args.label, **result["summary"]}, indent=1))
        for key, c in result["correlations"].items():
            print(f"{key:32s} pearson {fmt(c, 'pearson')}  spearman {fmt(c, 'spearman')}  "
                  f"within {fmt(c, 'pearson_within')} / {fmt(c, 'spearman_within')}  n={c['n']}")
    else:
        measurements = []
        for path in args.measurements:
            with open(path) as f:
                measurements.append(json.load(f))
        labels = [meas.get("label", os.path.basename(path)) for meas, path in zip(measurements, args.measurements)]
        summary = report(measurements, labels, args.drift_runs, args.out)
        print(json.dumps(summary["drift"], indent=1))


if __name__ == "__main__":
    sys.exit(main())
