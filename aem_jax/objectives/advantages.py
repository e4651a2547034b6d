"""Advantage estimators: GRPO, Dr.GRPO, RLOO, GiGPO, GAE (token / turn / bi-level).

All estimators are pure functions on arrays. Turn-level estimators take the
episode layout [E, K] (row = episode, column = turn); a windowed batch is
brought to that layout with ``segments.to_episode_layout`` first.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from aem_jax.objectives import _checks, segments


def grpo_advantages(
    scores, group_ids, *, num_groups: int, normalize_std: bool = True,
    leave_one_out: bool = False, eps: float = 1e-6, valid=None,
):
    """Group-relative advantages of GRPO (2402.03300), Dr.GRPO and RLOO.

    For the G valid rollouts of a task group g:
      GRPO:     A_i = (R_i - mean_g R) / (std_g R + eps)      (std with ddof=1)
      Dr.GRPO:  A_i = R_i - mean_g R                        (normalize_std=False,
                2503.20783)
      RLOO:     A_i = R_i - mean_{j != i} R_j = G/(G-1) (R_i - mean_g R)
                (leave_one_out=True; 2402.14740, DeepSWE's GRPO++)

    Groups with one valid rollout get advantage 0; invalid rows get 0.

    Args:
      scores: [B] float episode returns.
      group_ids: [B] int task group of each row, in [0, num_groups).
      num_groups: static number of groups.
      normalize_std: divide by the group's std (GRPO) or not (Dr.GRPO).
      leave_one_out: RLOO baseline (mean of the other rollouts); std is not
        used when True.
      eps: added to the std.
      valid: optional [B] bool; invalid rows neither count nor get advantage.

    Returns:
      [B] float32 advantages.
    """
    _checks.check_rank("scores", scores, 1)
    _checks.check_rank("group_ids", group_ids, 1)
    valid = jnp.ones(scores.shape, bool) if valid is None else valid.astype(bool)
    scores = scores.astype(jnp.float32)
    mean_B, count_B = segments.group_mean(scores, group_ids, valid, num_groups=num_groups)
    centred_B = scores - mean_B
    if leave_one_out:
        adv_B = jnp.where(count_B > 1, centred_B * count_B / jnp.maximum(count_B - 1.0, 1.0), 0.0)
    elif normalize_std:
        std_B = segments.group_std(scores, group_ids, valid, num_groups=num_groups)
        scale_B = std_B + eps
        # a constant group (std 0) has centred scores 0: keep them 0, not 0/0
        adv_B = centred_B / jnp.where(scale_B > 0, scale_B, 1.0)
    else:
        adv_B = centred_B
    return jnp.where(valid & (count_B > 1), adv_B, 0.0)


def rloo_advantages(scores, group_ids, *, num_groups: int, valid=None):
    """RLOO leave-one-out advantages: ``A_i = R_i - mean_{j != i} R_j``."""
    return grpo_advantages(scores, group_ids, num_groups=num_groups, leave_one_out=True, valid=valid)


def discounted_returns(rewards_EK, valid_EK, *, gamma: float):
    """Discounted return from each turn: ``G_k = r_k + gamma * G_{k+1}``.

    Invalid turns are skipped (they neither add reward nor break the chain).
    Computed with a reverse ``lax.scan`` over K.
    """
    _checks.check_rank("rewards_EK", rewards_EK, 2)
    _checks.check_same_shape(rewards_EK=rewards_EK, valid_EK=valid_EK)

    def step(next_return_E, xs):
        r_E, v_E = xs
        ret_E = jnp.where(v_E, r_E + gamma * next_return_E, next_return_E)
        return ret_E, jnp.where(v_E, ret_E, 0.0)

    init = jnp.zeros(rewards_EK.shape[0], jnp.float32)
    _, ret_KE = jax.lax.scan(
        step, init, (rewards_EK.astype(jnp.float32).T, valid_EK.astype(bool).T), reverse=True
    )
    return ret_KE.T


def _dense_step_groups(group_ids_EK, anchor_ids_EK, valid_EK):
    """Dense ids for the (task group, anchor) pairs, by sorting the keys."""
    n = group_ids_EK.size
    g = group_ids_EK.reshape(-1)
    a = anchor_ids_EK.reshape(-1)
    inv = (~valid_EK.reshape(-1)).astype(jnp.int32)
    order = jnp.lexsort((a, g, inv))  # last key is the primary sort key
    gs, as_, invs = g[order], a[order], inv[order]
    new = jnp.concatenate([
        jnp.ones((1,), bool),
        (gs[1:] != gs[:-1]) | (as_[1:] != as_[:-1]) | (invs[1:] != invs[:-1]),
    ])
    seg_sorted = jnp.cumsum(new.astype(jnp.int32)) - 1
    return jnp.zeros((n,), jnp.int32).at[order].set(seg_sorted).reshape(group_ids_EK.shape)


def gigpo_advantages(
    turn_rewards, turn_valid, anchor_ids, group_ids, *, num_groups: int, gamma: float = 0.95,
    step_weight: float = 1.0, normalize_std: bool = True, eps: float = 1e-6,
):
    """GiGPO advantages (2505.10978): episode-level GRPO plus anchor-state steps.

      A_episode_i   = GRPO advantage of the episode return R_i = sum_k r_ik
      G_ik          = sum_{j >= k} gamma^(j-k) r_ij        (discounted step return)
      A_step_ik     = (G_ik - mean_S G) / (std_S G + eps)  over the step group S
                      of turns with the same task group and the same anchor id
      A_ik          = A_episode_i + step_weight * A_step_ik

    Args:
      turn_rewards: [E,K] float reward after each turn (episode layout).
      turn_valid: [E,K] bool, the turn exists.
      anchor_ids: [E,K] int hash of the observation before each turn.
      group_ids: [E] int task group in [0, num_groups).
      num_groups: static number of task groups.
      gamma: discount for step returns.
      step_weight: weight w of the step-level advantage.
      normalize_std: divide both levels by their group std.
      eps: added to stds.

    Returns:
      [E,K] float32 advantages, 0 on invalid turns.
    """
    for name, x in (("turn_rewards", turn_rewards), ("turn_valid", turn_valid), ("anchor_ids", anchor_ids)):
        _checks.check_rank(name, x, 2)
    _checks.check_same_shape(turn_rewards=turn_rewards, turn_valid=turn_valid, anchor_ids=anchor_ids)
    _checks.check_integer("anchor_ids", anchor_ids)
    E, K = turn_rewards.shape
    _checks.check_leading("group_ids", group_ids, (E,), "[E] rows of turn_rewards")
    valid_EK = turn_valid.astype(bool)
    rewards_EK = jnp.where(valid_EK, turn_rewards.astype(jnp.float32), 0.0)
    episode_valid_E = valid_EK.any(axis=1)
    a_episode_E = grpo_advantages(
        rewards_EK.sum(axis=1), group_ids, num_groups=num_groups,
        normalize_std=normalize_std, eps=eps, valid=episode_valid_E,
    )
    returns_EK = discounted_returns(rewards_EK, valid_EK, gamma=gamma)
    groups_EK = jnp.broadcast_to(group_ids[:, None], (E, K))
    step_ids_EK = _dense_step_groups(groups_EK, anchor_ids, valid_EK)
    a_step_EK = grpo_advantages(
        returns_EK.reshape(-1), step_ids_EK.reshape(-1), num_groups=E * K,
        normalize_std=normalize_std, eps=eps, valid=valid_EK.reshape(-1),
    ).reshape(E, K)
    return jnp.where(valid_EK, a_episode_E[:, None] + step_weight * a_step_EK, 0.0)


def gae(rewards, values, mask, *, gamma: float, lam: float, dones=None):
    """Generalised advantage estimation (1506.02438) over masked steps.

      delta_t = r_t + gamma * V_next - V_t
      A_t     = delta_t + gamma * lam * A_next

    Steps are the positions with ``mask == 1``; positions with mask 0 are
    skipped (V_next and A_next are those of the next masked position), so
    environment tokens between agent turns do not break the recursion. After
    a position with ``dones == 1`` the next value and advantage are 0.

    Args:
      rewards: [B,T] float reward at each step.
      values: [B,T] float value estimates.
      mask: [B,T] 1 on steps.
      gamma, lam: discount and GAE lambda.
      dones: optional [B,T], 1 where an episode (or segment) ends.

    Returns:
      (advantages [B,T], returns [B,T] = advantages + values), 0 off mask.
    """
    for name, x in (("rewards", rewards), ("values", values), ("mask", mask)):
        _checks.check_rank(name, x, 2)
    _checks.check_same_shape(rewards=rewards, values=values, mask=mask)
    dones = jnp.zeros(rewards.shape, bool) if dones is None else dones.astype(bool)
    _checks.check_same_shape(rewards=rewards, dones=dones)

    def step(carry, xs):
        next_v, next_a = carry
        r, v, m, d = xs
        next_v = jnp.where(d, 0.0, next_v)
        next_a = jnp.where(d, 0.0, next_a)
        delta = r + gamma * next_v - v
        a = delta + gamma * lam * next_a
        carry = (jnp.where(m, v, next_v), jnp.where(m, a, next_a))
        return carry, jnp.where(m, a, 0.0)

    B = rewards.shape[0]
    init = (jnp.zeros(B, jnp.float32), jnp.zeros(B, jnp.float32))
    xs = (rewards.astype(jnp.float32).T, values.astype(jnp.float32).T, mask.astype(bool).T, dones.T)
    _, adv_TB = jax.lax.scan(step, init, xs, reverse=True)
    adv_BT = adv_TB.T
    returns_BT = jnp.where(mask.astype(bool), adv_BT + values.astype(jnp.float32), 0.0)
    return adv_BT, returns_BT


def turn_gae(turn_rewards, turn_values, turn_valid, *, gamma: float, lam: float):
    """Turn-level GAE across the turns of an episode (episode layout [E,K]).

    ``delta_k = r_k + gamma * V_{k+1} - V_k``, ``A_k = delta_k + gamma*lam*A_{k+1}``,
    skipping invalid turns; the value after the last valid turn is 0.

    Returns:
      (advantages [E,K], lambda-returns [E,K] = A + V), 0 on invalid turns.
    """
    return gae(turn_rewards, turn_values, turn_valid, gamma=gamma, lam=lam)


def whiten(x, mask, *, eps: float = 1e-8):
    """Masked whitening ``(x - mean) / (std + eps)`` over the entries where ``mask`` is set.

    PPO implementations whiten GAE advantages over the batch so the policy
    step does not scale with the size of the rewards: with returns near -0.1
    and a fitted value head, raw advantages of ~1e-3 leave the entropy bonus
    as the only force on the policy. Entries off the mask are 0.

    Args:
      x: advantages, any shape.
      mask: same shape; 1 (or True) where ``x`` counts.
    """
    _checks.check_same_shape(x=x, mask=mask)
    w = mask.astype(x.dtype)
    n = jnp.maximum(jnp.sum(w), 1.0)
    mean = jnp.sum(x * w) / n
    var = jnp.sum(jnp.square(x - mean) * w) / n
    return jnp.where(w > 0, (x - mean) / (jnp.sqrt(var) + eps), 0.0)


def bilevel_gae(
    values, turn_rewards, turn_ids, mask, turn_valid, *, gamma: float, lam: float,
    token_lam: float = 1.0,
):
    """Bi-level GAE: turn-level GAE across turns, token-level GAE inside a turn.

    The value of turn k is the value at its first agent token. Turn-level GAE
    gives the lambda-return ``y_k = A_k + V_k = r_k + gamma (V_{k+1} + lam A_{k+1})``;
    inside the turn, token-level GAE (discount 1, lambda ``token_lam``) runs
    towards ``y_k`` as the reward of the turn's last token. With token_lam = 1
    the first token's advantage equals the turn-level advantage A_k.
    Turns of a row are assumed to occupy contiguous token spans.

    Args:
      values: [B,T] token values.
      turn_rewards: [B,K] reward after each turn.
      turn_ids: [B,T] turn index of agent tokens, -1 elsewhere.
      mask: [B,T] 1 on agent tokens.
      turn_valid: [B,K] bool.

    Returns:
      (advantages [B,T], returns [B,T]), 0 off agent tokens.
    """
    _checks.check_rank("turn_rewards", turn_rewards, 2)
    K = turn_rewards.shape[1]
    in_turn_BT = (turn_ids >= 0) & mask.astype(bool)
    prev_ids_BT = jnp.pad(turn_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    next_ids_BT = jnp.pad(turn_ids[:, 1:], ((0, 0), (0, 1)), constant_values=-1)
    first_BT = in_turn_BT & (prev_ids_BT != turn_ids)
    last_BT = in_turn_BT & (next_ids_BT != turn_ids)
    ids_BT = jnp.where(in_turn_BT, turn_ids, -1)
    turn_values_BK = segments.turn_sum(jnp.where(first_BT, values, 0.0), ids_BT, num_turns=K)
    _, lambda_returns_BK = turn_gae(turn_rewards, turn_values_BK, turn_valid, gamma=gamma, lam=lam)
    token_rewards_BT = jnp.where(last_BT, segments.turn_broadcast(lambda_returns_BK, ids_BT), 0.0)
    return gae(token_rewards_BT, values, in_turn_BT, gamma=1.0, lam=token_lam, dones=last_BT)
