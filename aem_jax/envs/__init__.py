"""Environments: the ``Env`` protocol, a registry, and the built-in games.

``aem_jax.envs.make(name, **kwargs)`` creates a registered environment.
"""
from aem_jax.envs.base import Env, Observation, Step, make, register, registered

register("treasure", "aem_jax.envs.treasure:TreasureHunt")
register("textworld", "aem_jax.envs.textworld_env:TextWorldEnv")
register("swe", "aem_jax.envs.swe:SWEEnv")
register("chain", "aem_jax.envs.chain:TwoStepChain")
register("dungeon", "aem_jax.envs.dungeon:Dungeon")

__all__ = ["Env", "Observation", "Step", "make", "register", "registered"]
