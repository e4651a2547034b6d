"""Episodes -> `TurnBatch` (numpy, host side) in either history mode."""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from aem_jax.batch import TurnBatch


def anchor_id(text: str) -> int:
    """Stable 31-bit hash of an anchor text (blake2b; Python's hash() is salted)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@dataclasses.dataclass
class Turn:
    """One agent turn of an episode.

    Attributes:
      action_ids: tokens the policy generated (end-of-turn token included
        when it stopped by itself).
      logprobs, entropies: per action token.
      env_ids: context tokens between this action and the next one (None
        after the last turn).
      user_ids: the next observation as a stand-alone user message with the
        assistant header (windowed prompts that start at it; None after the
        last turn).
      reward: reward after the turn (penalties included).
      terminal: the episode ended here by the environment's verdict.
      anchor: anchor text of the state before the turn.
    """

    action_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    env_ids: list[int] | None
    reward: float
    terminal: bool
    anchor: str
    user_ids: list[int] | None = None


def prompt_for_turn(ep, k: int, window: int | None) -> list[int]:
    """Token ids of the prompt of turn `k` of episode `ep`.

    ``window=None`` (concatenated): the whole chat so far. Otherwise the task,
    the last `window` (observation, action) pairs and the new observation:

      task, obs_{k-h}, a_{k-h}, ..., obs_{k-1}, a_{k-1}, obs_k

    (``ep`` has ``prompt_ids`` = task + assistant header, ``task_ids`` = the
    task message alone, and ``turns``.)
    """
    first = 0 if window is None else k - window
    if first <= 0:
        ids = list(ep.prompt_ids)
        first = 0
    else:  # the observation that opens the window follows the task message
        ids = list(ep.task_ids) + list(ep.turns[first - 1].user_ids or [])
    for turn in ep.turns[first:k]:
        ids += turn.action_ids + (turn.env_ids or [])
    return ids


@dataclasses.dataclass
class _Row:
    tokens: list[int] = dataclasses.field(default_factory=list)
    agent: list[bool] = dataclasses.field(default_factory=list)
    turn: list[int] = dataclasses.field(default_factory=list)
    logp: list[float] = dataclasses.field(default_factory=list)
    ent: list[float] = dataclasses.field(default_factory=list)

    def add(self, ids, *, turn=-1, logp=None, ent=None):
        self.tokens += ids
        self.agent += [turn >= 0] * len(ids)
        self.turn += [turn] * len(ids)
        self.logp += list(logp) if logp is not None else [0.0] * len(ids)
        self.ent += list(ent) if ent is not None else [0.0] * len(ids)


def _episode_rows(ep, *, windowed, window, learn):
    """[(row, first_turn, turns_in_row)] for one episode."""
    turns = ep.turns
    if not windowed:
        row = _Row()
        row.add(ep.prompt_ids)
        for k, turn in enumerate(turns):
            row.add(turn.action_ids, turn=k if learn else -1, logp=turn.logprobs,
                    ent=turn.entropies)
            if k + 1 < len(turns):
                row.add(turn.env_ids or [])
        return [(row, 0, turns)]
    rows = []
    for k, turn in enumerate(turns):
        row = _Row()
        row.add(prompt_for_turn(ep, k, window))
        row.add(turn.action_ids, turn=0 if learn else -1, logp=turn.logprobs, ent=turn.entropies)
        rows.append((row, k, [turn]))
    return rows


def build_turn_batch(episodes, *, num_turns: int, windowed: bool, window: int,
                     seq_len: int | None, seq_bucket: int, row_bucket: int,
                     pad_id: int) -> TurnBatch:
    """Packs episodes into a right-padded `TurnBatch` of numpy arrays.

    Args:
      episodes: objects with ``prompt_ids``, ``task_ids``, ``turns`` (list of
        `Turn`), ``index``, ``group`` and ``failed`` attributes.
      num_turns: K in concatenated mode (1 in windowed mode).
      windowed: one row per turn instead of one per episode.
      window: h, for windowed mode.
      seq_len: T, or None for the next multiple of `seq_bucket`.
      row_bucket: pad B with empty rows to a multiple of this.
      pad_id: token id of padding.

    Failed episodes (the environment raised or hung) keep their tokens but
    carry no learning signal: loss_mask 0 and turn_valid False.
    """
    K = 1 if windowed else num_turns
    rows = []
    for ep in episodes:
        for row, first, turns in _episode_rows(ep, windowed=windowed, window=window,
                                               learn=not ep.failed):
            rows.append((row, first, turns, ep))
    longest = max([len(r.tokens) for r, *_ in rows] + [1])
    if seq_len is None:
        T = -(-longest // seq_bucket) * seq_bucket
    elif longest > seq_len:
        raise ValueError(f"seq_len={seq_len} is shorter than the longest row ({longest} tokens)")
    else:
        T = seq_len
    B = max(1, -(-len(rows) // row_bucket) * row_bucket)
    tokens = np.full((B, T), pad_id, np.int32)
    loss_mask = np.zeros((B, T), np.float32)
    turn_ids = np.full((B, T), -1, np.int32)
    old_logp = np.zeros((B, T), np.float32)
    old_entropy = np.zeros((B, T), np.float32)
    attention = np.zeros((B, T), np.int32)
    attention[:, 0] = 1  # empty rows still attend to one token (no all-masked softmax)
    rewards = np.zeros((B, K), np.float32)
    valid = np.zeros((B, K), bool)
    anchors = np.zeros((B, K), np.int32)
    done = np.zeros((B, K), bool)
    group_ids = np.zeros((B,), np.int32)
    episode_ids = np.full((B,), -1, np.int32)
    turn_offset = np.zeros((B,), np.int32)
    for b, (row, first, turns, ep) in enumerate(rows):
        n = len(row.tokens)
        tokens[b, :n] = row.tokens
        loss_mask[b, :n] = row.agent
        turn_ids[b, :n] = row.turn
        old_logp[b, :n] = np.where(row.agent, row.logp, 0.0)
        old_entropy[b, :n] = np.where(row.agent, row.ent, 0.0)
        attention[b, :n] = 1
        for k, turn in enumerate(turns):
            rewards[b, k] = turn.reward
            valid[b, k] = not ep.failed
            anchors[b, k] = anchor_id(turn.anchor)
            done[b, k] = turn.terminal
        group_ids[b], episode_ids[b], turn_offset[b] = ep.group, ep.index, first
    return TurnBatch(
        tokens=tokens, loss_mask=loss_mask, turn_ids=turn_ids, old_logp=old_logp,
        ref_logp=np.zeros((B, T), np.float32), old_entropy=old_entropy, turn_rewards=rewards,
        turn_valid=valid, anchor_ids=anchors, group_ids=group_ids, episode_ids=episode_ids,
        turn_offset=turn_offset, attention_mask=attention, done=done)
