"""How well does an ArCHer critic checkpoint rank the policy's own actions?

Restores step ``--step`` of an ArCHer run (policy and critic), plays fresh
on-policy batches with that policy, and compares the critic with the
Monte-Carlo returns of the same episodes, per utterance j of episode b:

  G_bj  = sum_{i >= j} gamma^(i - j) r_bi           (discounted return-to-go)
  Q_bj  = min(Q_1, Q_2)(s_j, a_j),  V_bj = min(V_1, V_2)(s_j)
  A_bj  = Q_bj - V_bj                                 (the actor's advantage)
  MC_bj = G_bj - mean of G over the episodes of the same task at turn j
          (a group baseline: the critic-free estimate of the same advantage)

and prints Pearson r(Q, G), r(V, G), r(A, MC), the share of utterances where
A and MC agree in sign (MC != 0), and the mean A on utterances of rewarded and
of unrewarded episodes (return > 0 or not). A critic whose A does not track MC hands the actor noise
(or a bias) instead of credit.

  python experiments/critic_check.py --workdir RUN --step 10 -- \
      --config=configs/archer.py:longhorizon --config.model.source=... (the run's flags)

The flags after ``--`` must reproduce the run's config (the checkpoint's
config check names any key that differs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.dirname(HERE), HERE):  # the repository's aem_jax and the sibling scripts
    if _path not in sys.path:
        sys.path.insert(0, _path)
from mechanism_mc import pearson  # noqa: E402  (float64, nan when one side is constant)
from restore import config_from_flags, restored  # noqa: E402

from aem_jax import objectives as obj  # noqa: E402
from aem_jax.trainer import rollouts
from aem_jax.trainer.critic import critic_values


def returns_to_go(rewards_BK: np.ndarray, valid_BK: np.ndarray, gamma: float) -> np.ndarray:
    """G_bj = sum_{i >= j, valid} gamma^(i - j) r_bi (0 on invalid turns): the library's
    ``objectives.discounted_returns``, as float64 numpy."""
    return np.asarray(obj.discounted_returns(jnp.asarray(rewards_BK), jnp.asarray(valid_BK), gamma=gamma),
                      np.float64)


def group_baseline_advantage(G_BK: np.ndarray, valid_BK: np.ndarray, groups_B: np.ndarray) -> np.ndarray:
    """G minus the mean G of the same group's valid episodes at the same turn."""
    out = np.zeros_like(G_BK)
    for g in np.unique(groups_B):
        rows = groups_B == g
        v = valid_BK[rows]
        mean = np.sum(G_BK[rows] * v, axis=0) / np.maximum(np.sum(v, axis=0), 1)
        out[rows] = np.where(v, G_BK[rows] - mean, 0.0)
    return out


def _r(x, y) -> float:
    """Pearson's r, nan with fewer than 3 values."""
    return pearson(x, y) if x.size >= 3 else float("nan")


def compare(Q, V, G, MC, win_B, valid) -> dict[str, float]:
    """The statistics of the module docstring over the valid utterances."""
    A = Q - V
    m = valid.astype(bool)
    win = np.broadcast_to(win_B[:, None], m.shape)
    nz = m & (MC != 0)
    return {
        "utterances": int(m.sum()),
        "r_Q_G": _r(Q[m], G[m]), "r_V_G": _r(V[m], G[m]), "r_A_MC": _r(A[m], MC[m]),
        "sign_agreement": float(np.mean(np.sign(A[nz]) == np.sign(MC[nz]))) if nz.any() else float("nan"),
        "A_mean": float(A[m].mean()), "A_std": float(A[m].std()), "MC_std": float(MC[m].std()),
        "A_mean_won": float(A[m & win].mean()) if (m & win).any() else float("nan"),
        "A_mean_lost": float(A[m & ~win].mean()) if (m & ~win).any() else float("nan"),
        "first_turn_r_A_MC": _r(A[:, 0][m[:, 0]], MC[:, 0][m[:, 0]]),
    }


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: critic_check.py --workdir RUN --step N [--batches K] -- CONFIG FLAGS")
    split = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the ArCHer run directory (has checkpoints/STEP)")
    p.add_argument("--step", type=int, required=True, help="checkpoint step to restore")
    p.add_argument("--batches", type=int, default=2, help="on-policy batches to play")
    p.add_argument("--out", default=None, help="write the statistics as JSON here")
    args = p.parse_args(argv[:split])
    config = config_from_flags(argv[split + 1:])
    if config.algorithm != "archer":
        raise SystemExit(f"config.algorithm is {config.algorithm!r}; this checks ArCHer critics (archer)")
    with restored(config, args.workdir, args.step) as (algorithm, ctx, state):
        step = args.step
        K = ctx.rollout.max_turns
        parts, records_all = [], []
        for i in range(args.batches):
            batch, records, _, _ = rollouts.collect_step(ctx, algorithm, algorithm.policy_params(state), step + i)
            records_all.append(records)
            mb = {k: getattr(batch, k) for k in ("tokens", "attention_mask", "loss_mask", "turn_ids", "turn_valid")}
            vals = jax.tree.map(np.asarray, critic_values(state.critic_graphdef, state.critic.params, mb,
                                                          num_turns=K))
            rewards, turn_valid = np.asarray(batch.turn_rewards, np.float64), np.asarray(batch.turn_valid, bool)
            G = returns_to_go(rewards, turn_valid, config.archer.gamma)
            valid = vals["valid"] & turn_valid
            MC = group_baseline_advantage(G, valid, np.asarray(batch.group_ids) + 10_000 * i)
            win = np.sum(rewards * turn_valid, axis=1) > 0  # a row's episode was rewarded
            parts.append((np.minimum(vals["q1"], vals["q2"]), np.minimum(vals["v1"], vals["v2"]), G, MC, win,
                          valid))
    stats = compare(*(np.concatenate(x) for x in zip(*parts)))
    stats.update(step=step, workdir=os.fspath(args.workdir),
                 success=float(np.mean([r.success for part in records_all for r in part])))
    print(json.dumps(stats, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(stats, indent=1) + "\n")
    return stats


if __name__ == "__main__":
    main()
