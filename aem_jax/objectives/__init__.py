"""Pure loss and advantage functions for multi-turn RL of LLM agents.

Arrays in, arrays out: nothing here imports models, environments or configs,
and nothing is jitted (the caller jits its whole step). Dimension letters:
B sequences, T tokens, V vocabulary, K turns, G rollouts per group, D hidden.
"""
from aem_jax.objectives.advantages import (
    bilevel_gae, discounted_returns, gae, gigpo_advantages, grpo_advantages, rloo_advantages,
    turn_gae, whiten,
)
from aem_jax.objectives.aem import (
    aem_coefficients, empg_advantages, entropy_drift, entropy_drift_by_sign, entropy_signal,
    relative_surprisal, response_entropy, response_surprisal,
)
from aem_jax.objectives.archer import (
    archer_actor_loss, archer_advantages, archer_baseline_loss, archer_critic_loss,
)
from aem_jax.objectives.etpo import etpo_policy_loss, etpo_q_loss, etpo_soft_values, etpo_token_targets
from aem_jax.objectives.logprobs import logprobs_and_entropy_from_hidden, token_entropy, token_logprobs
from aem_jax.objectives.policy import (
    aggregate, entropy_bonus, gspo_policy_loss, kl_penalty, loss_denominator, ppo_policy_loss,
)
from aem_jax.objectives.segments import (
    from_episode_layout, group_mean, group_min_max, group_std, to_episode_layout, turn_broadcast,
    turn_count, turn_mean, turn_sum,
)

__all__ = [
    "aem_coefficients",
    "aggregate",
    "archer_actor_loss",
    "archer_advantages",
    "archer_baseline_loss",
    "archer_critic_loss",
    "bilevel_gae",
    "discounted_returns",
    "empg_advantages",
    "entropy_bonus",
    "entropy_drift",
    "entropy_drift_by_sign",
    "entropy_signal",
    "etpo_policy_loss",
    "etpo_q_loss",
    "etpo_soft_values",
    "etpo_token_targets",
    "from_episode_layout",
    "gae",
    "gigpo_advantages",
    "group_mean",
    "group_min_max",
    "group_std",
    "grpo_advantages",
    "gspo_policy_loss",
    "kl_penalty",
    "logprobs_and_entropy_from_hidden",
    "loss_denominator",
    "ppo_policy_loss",
    "relative_surprisal",
    "response_entropy",
    "response_surprisal",
    "rloo_advantages",
    "to_episode_layout",
    "token_entropy",
    "token_logprobs",
    "turn_broadcast",
    "turn_count",
    "turn_gae",
    "turn_mean",
    "turn_sum",
    "whiten",
]
