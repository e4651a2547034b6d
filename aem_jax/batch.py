"""``TurnBatch``: the one batch layout every objective and the trainer see.

Dimension letters (used as suffixes throughout the project):
  B sequences, T tokens, V vocabulary, K turns, G rollouts per task group,
  D hidden size.

Two history modes produce a TurnBatch:
  concatenated  one row per episode holding all of its turns; ``turn_ids`` run
                0..n-1 over the agent tokens and ``turn_offset`` is 0;
  windowed      one row per turn (task + last h observation/action pairs + new
                observation); ``turn_ids`` are 0 on the agent tokens, K == 1,
                ``episode_ids`` link the rows of one episode and
                ``turn_offset`` is the row's turn index inside its episode.
"""
from __future__ import annotations

import flax.struct
import jax


@flax.struct.dataclass(frozen=True)
class TurnBatch:
    """B sequences of T tokens with at most K agent turns each.

    Attributes:
      tokens: [B,T] int32 prompt, agent and environment tokens.
      loss_mask: [B,T] float32, 1 on agent-generated tokens only.
      turn_ids: [B,T] int32 turn index of each agent token, -1 elsewhere.
      old_logp: [B,T] float32 behaviour-policy log-prob of each token.
      ref_logp: [B,T] float32 reference-policy log-prob (0 when unused).
      old_entropy: [B,T] float32 behaviour-policy token entropy (AEM signal).
      turn_rewards: [B,K] float32 reward received after each turn.
      turn_valid: [B,K] bool, the turn exists.
      anchor_ids: [B,K] int32 hash of the observation before each turn.
      group_ids: [B] int32 task group in [0, num_groups).
      episode_ids: [B] int32 episode each row belongs to.
      turn_offset: [B] int32 index of the row's first turn inside its episode
        (0 in concatenated mode).
      attention_mask: [B,T] int32, 1 on real tokens, 0 on padding.
      done: [B,K] bool, the episode ended (terminal, not truncated) after the turn.
    """

    tokens: jax.Array
    loss_mask: jax.Array
    turn_ids: jax.Array
    old_logp: jax.Array
    ref_logp: jax.Array
    old_entropy: jax.Array
    turn_rewards: jax.Array
    turn_valid: jax.Array
    anchor_ids: jax.Array
    group_ids: jax.Array
    episode_ids: jax.Array
    turn_offset: jax.Array
    attention_mask: jax.Array
    done: jax.Array

    @property
    def num_turns(self) -> int:
        """K, the static number of turn slots per row."""
        return self.turn_rewards.shape[1]
