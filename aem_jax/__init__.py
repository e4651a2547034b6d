"""aem_jax: multi-turn reinforcement learning for LLM agents in JAX.

Subpackages:
  objectives  pure loss / advantage functions (imports nothing else from aem_jax)
  models      Flax NNX decoders, Hugging Face loading, KV-cache sampler
  envs        environment protocol, registry and environments
  rollout     multi-turn episode collection into a TurnBatch
"""

__version__ = "0.1.0"
