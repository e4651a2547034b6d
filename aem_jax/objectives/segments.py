"""Per-turn reductions and group statistics with segment sums.

Turn reductions map token arrays [B,T] to turn arrays [B,K] through
``turn_ids`` (the turn index of each agent token, -1 elsewhere); tokens with
id -1 contribute nothing. Group statistics reduce over rows (or turn entries)
that share an integer group id in [0, num_groups); empty groups yield 0, never
NaN.

``to_episode_layout`` / ``from_episode_layout`` move per-turn arrays between
a windowed batch (one row per turn, K == 1) and the episode layout [E, K] used
by the concatenated mode, so every turn-level estimator gives the same answer
in both history modes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from aem_jax.objectives import _checks


def _check_turn_args(x, turn_ids, num_turns):
    _checks.check_rank("x", x, 2)
    _checks.check_rank("turn_ids", turn_ids, 2)
    _checks.check_integer("turn_ids", turn_ids)
    _checks.check_same_shape(x=x, turn_ids=turn_ids)
    _checks.check_positive_int("num_turns", num_turns)
    _checks.check_ids_below("turn_ids", turn_ids, num_turns, "num_turns", allow_negative=True)


def turn_sum(x, turn_ids, *, num_turns: int):
    """Sum of ``x`` over the tokens of each turn.

    ``out[b, k] = sum_t x[b, t] * [turn_ids[b, t] == k]``

    Args:
      x: [B,T] values per token.
      turn_ids: [B,T] int turn index per token, -1 for tokens in no turn.
      num_turns: K, static number of turn slots (> max turn id).

    Returns:
      [B,K] float32 per-turn sums (0 for empty turns).
    """
    _check_turn_args(x, turn_ids, num_turns)
    B = x.shape[0]
    ids_BT = jnp.where(turn_ids >= 0, turn_ids + num_turns * jnp.arange(B)[:, None], B * num_turns)
    sums = jax.ops.segment_sum(
        x.astype(jnp.float32).reshape(-1), ids_BT.reshape(-1), num_segments=B * num_turns + 1
    )
    return sums[:-1].reshape(B, num_turns)


def turn_count(turn_ids, *, num_turns: int):
    """Number of tokens in each turn, [B,K] float32."""
    return turn_sum(jnp.ones(turn_ids.shape, jnp.float32), turn_ids, num_turns=num_turns)


def turn_mean(x, turn_ids, *, num_turns: int):
    """Mean of ``x`` over the tokens of each turn; 0 for empty turns. [B,K]."""
    total_BK = turn_sum(x, turn_ids, num_turns=num_turns)
    count_BK = turn_count(turn_ids, num_turns=num_turns)
    return jnp.where(count_BK > 0, total_BK / jnp.maximum(count_BK, 1.0), 0.0)


def turn_broadcast(x_BK, turn_ids):
    """Broadcasts per-turn values to the tokens of each turn; 0 off turns.

    ``out[b, t] = x_BK[b, turn_ids[b, t]]`` if ``turn_ids[b, t] >= 0`` else 0.
    """
    _checks.check_rank("x_BK", x_BK, 2)
    _checks.check_rank("turn_ids", turn_ids, 2)
    _checks.check_integer("turn_ids", turn_ids)
    if x_BK.shape[0] != turn_ids.shape[0]:
        raise ValueError(f"x_BK {x_BK.shape} and turn_ids {turn_ids.shape} must share B")
    _checks.check_ids_below("turn_ids", turn_ids, x_BK.shape[1], "K of x_BK", allow_negative=True)
    gathered = jnp.take_along_axis(x_BK, jnp.clip(turn_ids, 0, x_BK.shape[1] - 1), axis=1)
    return jnp.where(turn_ids >= 0, gathered, jnp.zeros((), x_BK.dtype))


def _check_group_args(x, group_ids, valid, num_groups):
    _checks.check_integer("group_ids", group_ids)
    _checks.check_positive_int("num_groups", num_groups)
    _checks.check_same_shape(x=x, group_ids=group_ids, valid=valid)
    _checks.check_ids_below("group_ids", group_ids, num_groups, "num_groups", allow_negative=False)


def group_mean(x, group_ids, valid, *, num_groups: int):
    """Per-entry mean of ``x`` over the valid entries of its group.

    Works on any shape; ``group_ids`` and ``valid`` share the shape of ``x``.
    Returns (mean broadcast back to entries, count broadcast back to entries).
    """
    _check_group_args(x, group_ids, valid, num_groups)
    w = valid.astype(jnp.float32).reshape(-1)
    ids = group_ids.reshape(-1)
    total_G = jax.ops.segment_sum(x.astype(jnp.float32).reshape(-1) * w, ids, num_segments=num_groups)
    count_G = jax.ops.segment_sum(w, ids, num_segments=num_groups)
    mean_G = jnp.where(count_G > 0, total_G / jnp.maximum(count_G, 1.0), 0.0)
    return mean_G[group_ids], count_G[group_ids]


def group_std(x, group_ids, valid, *, num_groups: int, ddof: int = 1):
    """Per-entry standard deviation of ``x`` over its group's valid entries.

    ``ddof=1`` gives the unbiased sample std; groups with at most ``ddof``
    valid entries give 0.
    """
    mean, count = group_mean(x, group_ids, valid, num_groups=num_groups)
    sq = jnp.where(valid, (x.astype(jnp.float32) - mean) ** 2, 0.0)
    sq_sum, _ = group_mean(sq, group_ids, valid, num_groups=num_groups)
    sq_sum = sq_sum * count
    var = jnp.where(count > ddof, sq_sum / jnp.maximum(count - ddof, 1.0), 0.0)
    return jnp.sqrt(var)


def group_min_max(x, group_ids, valid, *, num_groups: int):
    """Per-entry (min, max) of ``x`` over its group's valid entries (0 if none)."""
    _check_group_args(x, group_ids, valid, num_groups)
    xf = x.astype(jnp.float32).reshape(-1)
    v = valid.reshape(-1)
    ids = group_ids.reshape(-1)
    lo_G = jax.ops.segment_min(jnp.where(v, xf, jnp.inf), ids, num_segments=num_groups)
    hi_G = jax.ops.segment_max(jnp.where(v, xf, -jnp.inf), ids, num_segments=num_groups)
    lo_G = jnp.where(jnp.isfinite(lo_G), lo_G, 0.0)
    hi_G = jnp.where(jnp.isfinite(hi_G), hi_G, 0.0)
    return lo_G[group_ids], hi_G[group_ids]


def to_episode_layout(x_BK, episode_ids, turn_offset, *, num_episodes: int, max_turns: int, valid=None):
    """Scatters per-turn values of a (possibly windowed) batch into [E, max_turns].

    Row ``b``'s turn ``k`` lands at ``[episode_ids[b], turn_offset[b] + k]``.
    In concatenated mode (``episode_ids = arange(B)``, ``turn_offset = 0``)
    this is the identity up to padding of K to ``max_turns``. Entries where
    the optional [B,K] ``valid`` is False are dropped (padding rows of a
    windowed batch must not overwrite real turns); empty slots hold 0.
    """
    _checks.check_rank("x_BK", x_BK, 2)
    _checks.check_positive_int("num_episodes", num_episodes)
    _checks.check_positive_int("max_turns", max_turns)
    _checks.check_integer("episode_ids", episode_ids)
    _checks.check_ids_below("episode_ids", episode_ids, num_episodes, "num_episodes", allow_negative=False)
    B, K = x_BK.shape
    slots_BK = turn_offset[:, None] + jnp.arange(K)[None, :]
    _checks.check_ids_below("turn_offset + k", slots_BK, max_turns, "max_turns", allow_negative=False)
    flat_BK = episode_ids[:, None] * max_turns + slots_BK
    if valid is not None:
        flat_BK = jnp.where(valid, flat_BK, num_episodes * max_turns)
    out = jnp.zeros((num_episodes * max_turns,), x_BK.dtype)
    out = out.at[flat_BK.reshape(-1)].set(x_BK.reshape(-1), mode="drop")
    return out.reshape(num_episodes, max_turns)


def from_episode_layout(x_EK, episode_ids, turn_offset, *, num_turns: int):
    """Gathers [E, max_turns] values back to a batch's [B, num_turns] turns."""
    _checks.check_rank("x_EK", x_EK, 2)
    _checks.check_positive_int("num_turns", num_turns)
    slots_BK = turn_offset[:, None] + jnp.arange(num_turns)[None, :]
    safe_BK = jnp.clip(slots_BK, 0, x_EK.shape[1] - 1)
    gathered = x_EK[episode_ids[:, None], safe_BK]
    return jnp.where(slots_BK < x_EK.shape[1], gathered, jnp.zeros((), x_EK.dtype))
