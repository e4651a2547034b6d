"""From a rollout TurnBatch to per-token advantages, for every algorithm family.

Turn-level estimators run in the episode layout [E, K] so that concatenated
and windowed batches give the same answer; this module converts a batch to
that layout, applies the base estimator and AEM, and broadcasts the result
back to the batch's tokens. Pure jax functions of arrays and static settings.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from aem_jax import objectives as obj


@dataclasses.dataclass(frozen=True)
class AdvantageSettings:
    """Static settings of the advantage computation (hashable for jit)."""

    estimator: str               # "grpo" | "rloo" | "gigpo" | "none"
    num_groups: int              # N tasks per batch
    num_episodes: int            # E = N * G
    max_turns: int               # turns per episode (episode layout width)
    normalize_std: bool = True   # GRPO std division (False: Dr.GRPO)
    gamma: float = 0.95          # GiGPO step-return discount
    step_weight: float = 1.0     # GiGPO step-advantage weight
    aem_enabled: bool = False
    aem_lam: float = 1.0
    aem_min_range: float = 0.1
    aem_scope: str = "group"
    aem_signal: str = "mean_token_entropy"
    aem_shuffle: bool = False    # ablation: permute alpha within each group

    @classmethod
    def from_config(cls, config, *, estimator: str, normalize_std: bool = True) -> "AdvantageSettings":
        """The settings of ``config`` (its advantage, aem and rollout blocks) for ``estimator``."""
        r, a, aem = config.rollout, config.advantage, config.aem
        return cls(
            estimator=estimator, num_groups=r.num_tasks, num_episodes=r.num_tasks * r.group_size,
            max_turns=r.max_turns, normalize_std=normalize_std and a.normalize_std, gamma=a.gamma,
            step_weight=a.gigpo_step_weight, aem_enabled=aem.enabled, aem_lam=aem.lam,
            aem_min_range=aem.min_range, aem_scope=aem.scope, aem_signal=aem.signal, aem_shuffle=aem.shuffle)


def episode_view(batch, settings: AdvantageSettings):
    """Per-turn arrays of ``batch`` in the episode layout [E, max_turns]."""
    K = batch.turn_rewards.shape[1]
    valid_BK = batch.turn_valid.astype(bool)
    to_ep = lambda x: obj.to_episode_layout(  # noqa: E731
        x, batch.episode_ids, batch.turn_offset, num_episodes=settings.num_episodes,
        max_turns=settings.max_turns, valid=valid_BK)
    logp = batch.old_logp
    ids = jnp.where(batch.loss_mask > 0, batch.turn_ids, -1)
    rel_BK = obj.relative_surprisal(logp, batch.old_entropy, ids, num_turns=K)
    signal_BK = obj.entropy_signal(logp, batch.old_entropy, ids, num_turns=K, signal=settings.aem_signal)
    group_E = jnp.zeros((settings.num_episodes,), jnp.int32).at[batch.episode_ids].max(
        jnp.where(valid_BK.any(axis=1), batch.group_ids, 0), mode="drop")
    return {
        "rewards": to_ep(jnp.where(valid_BK, batch.turn_rewards, 0.0)),
        "valid": to_ep(valid_BK),
        "anchors": to_ep(batch.anchor_ids),
        "rel_surprisal": to_ep(rel_BK),
        "signal": to_ep(signal_BK),
        "groups": group_E,
    }


def _shuffle_within_groups(alpha_EK, valid_EK, groups_E, key):
    """Ablation: a random permutation of alpha among each group's valid responses."""
    E, K = alpha_EK.shape
    flat_alpha = alpha_EK.reshape(-1)
    flat_valid = valid_EK.reshape(-1)
    flat_group = jnp.where(flat_valid, jnp.repeat(groups_E, K), -1)
    noise = jax.random.uniform(key, flat_alpha.shape)
    # sort by (group, noise): a random order inside each group's block
    order = jnp.lexsort((noise, flat_group))
    ident = jnp.lexsort((jnp.arange(E * K), flat_group))
    out = flat_alpha.at[ident].set(flat_alpha[order])
    return jnp.where(valid_EK, out.reshape(E, K), 1.0)


ALPHA_HIST_BINS = 9


def alpha_histogram(alpha_EK, valid_EK, lam: float) -> dict[str, jax.Array]:
    """Fractions of valid responses per bin of ``log(alpha) / |lam|`` over [-1, 1].

    ``ALPHA_HIST_BINS`` equal bins (the middle one holds alpha = 1); logged as
    ``alpha_hist_0`` (strongest damping) ... ``alpha_hist_8`` (strongest boost)
    so the distribution of alpha can be compared across training.
    """
    u = jnp.clip(jnp.log(alpha_EK) / max(abs(lam), 1e-6), -1.0, 1.0)
    idx = jnp.clip(jnp.floor((u + 1.0) / 2.0 * ALPHA_HIST_BINS), 0, ALPHA_HIST_BINS - 1).astype(jnp.int32)
    counts = jnp.sum(jax.nn.one_hot(idx, ALPHA_HIST_BINS) * valid_EK[..., None], axis=(0, 1))
    frac = counts / jnp.maximum(valid_EK.sum(), 1)
    return {f"alpha_hist_{i}": frac[i] for i in range(ALPHA_HIST_BINS)}


def base_advantages_EK(view, settings: AdvantageSettings):
    """The base estimator's advantage per (episode, turn)."""
    valid, rewards, groups = view["valid"], view["rewards"], view["groups"]
    if settings.estimator == "gigpo":
        return obj.gigpo_advantages(
            rewards, valid, view["anchors"], groups, num_groups=settings.num_groups,
            gamma=settings.gamma, step_weight=settings.step_weight,
            normalize_std=settings.normalize_std)
    returns_E = rewards.sum(axis=1)
    adv_E = obj.grpo_advantages(
        returns_E, groups, num_groups=settings.num_groups, normalize_std=settings.normalize_std,
        leave_one_out=settings.estimator == "rloo", valid=valid.any(axis=1))
    return jnp.where(valid, adv_E[:, None], 0.0)


def compute_advantages(batch, settings: AdvantageSettings, key, token_advantages_BT=None):
    """Advantages per token [B,T] plus diagnostics (AEM alpha, predicted drift).

    The base advantages come from ``settings.estimator`` (episode / turn level)
    or, for PPO, from ``token_advantages_BT`` (GAE). AEM's alpha multiplies
    every token of a response by that response's coefficient.

    Returns:
      (adv_BT, info, arrays): info holds scalar diagnostics (alpha statistics,
      the predicted entropy drift and its split by the sign of A); arrays holds
      alpha_EK, adv_EK and valid_EK in the episode layout.
    """
    view = episode_view(batch, settings)
    valid = view["valid"]
    K = batch.turn_rewards.shape[1]
    ids = jnp.where(batch.loss_mask > 0, batch.turn_ids, -1)
    to_rows = lambda x_EK: obj.from_episode_layout(  # noqa: E731
        x_EK, batch.episode_ids, batch.turn_offset, num_turns=K)
    if token_advantages_BT is None:
        base_EK = base_advantages_EK(view, settings)
        base_BT = obj.turn_broadcast(to_rows(base_EK), ids)
    else:
        base_BT = token_advantages_BT
        base_EK = obj.to_episode_layout(
            obj.turn_mean(base_BT, ids, num_turns=K), batch.episode_ids, batch.turn_offset,
            num_episodes=settings.num_episodes, max_turns=settings.max_turns,
            valid=batch.turn_valid.astype(bool))
    if settings.aem_enabled:
        alpha_EK = obj.aem_coefficients(
            view["signal"], view["groups"], valid, num_groups=settings.num_groups,
            lam=settings.aem_lam, min_range=settings.aem_min_range, scope=settings.aem_scope)
        if settings.aem_shuffle:
            alpha_EK = _shuffle_within_groups(alpha_EK, valid, view["groups"], key)
    else:
        alpha_EK = jnp.ones_like(base_EK)
    adv_EK = alpha_EK * base_EK
    adv_BT = obj.turn_broadcast(to_rows(alpha_EK), ids) * base_BT
    drift = obj.entropy_drift_by_sign(adv_EK, view["rel_surprisal"], valid)
    n_valid = jnp.maximum(valid.sum(), 1)
    alpha_mean = jnp.where(valid, alpha_EK, 0.0).sum() / n_valid
    info = {
        **alpha_histogram(alpha_EK, valid, settings.aem_lam),
        "alpha_mean": alpha_mean,
        "alpha_min": jnp.where(valid, alpha_EK, jnp.inf).min(),
        "alpha_max": jnp.where(valid, alpha_EK, -jnp.inf).max(),
        "alpha_std": jnp.sqrt(jnp.where(valid, (alpha_EK - alpha_mean) ** 2, 0.0).sum() / n_valid),
        "predicted_entropy_drift": drift["drift"],
        "predicted_entropy_drift_pos": drift["drift_pos"],
        "predicted_entropy_drift_neg": drift["drift_neg"],
        "frac_positive_advantage": drift["frac_pos"],
        "response_entropy": jnp.where(valid, view["signal"], 0.0).sum() / n_valid,
        "advantage_abs_mean": jnp.abs(jnp.where(valid, adv_EK, 0.0)).sum() / n_valid,
    }
    return adv_BT, info, {"alpha_EK": alpha_EK, "adv_EK": adv_EK, "valid_EK": valid}
