"""Multi-turn rollouts: policies play environments into a `TurnBatch`.

    batch, records, metrics = collect("treasure", policy, tokenizer,
                                      RolloutConfig(num_tasks=8, group_size=4),
                                      key=jax.random.key(0), task_seeds=range(8))
"""
from aem_jax.rollout.batching import anchor_id, build_turn_batch
from aem_jax.rollout.chat import ChatFormat
from aem_jax.rollout.collect import EnvGroup, collect
from aem_jax.rollout.config import HISTORY_MODES, EpisodeRecord, RolloutConfig, message_words
from aem_jax.rollout.policy import Generation, Policy, SamplerPolicy, ScriptedPolicy, TurnContext
from aem_jax.rollout.pool import Outcome, StepPool, StepTimeout

__all__ = [
    "HISTORY_MODES", "ChatFormat", "EnvGroup", "EpisodeRecord", "Generation", "Outcome",
    "Policy", "RolloutConfig", "SamplerPolicy", "ScriptedPolicy", "StepPool", "StepTimeout",
    "TurnContext", "anchor_id", "build_turn_batch", "collect", "message_words",
]
