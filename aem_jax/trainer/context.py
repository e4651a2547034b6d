"""The two records every algorithm sees: what a run built (``RunContext``) and
what an algorithm is (``Algorithm``, a record of plain functions).

An algorithm module (``pg``, ``archer``, ``etpo``) provides

  init(ctx) -> state                     networks, optimiser states, jitted steps
  update(ctx, state, batch, step, success=) -> (state, metrics)   one training iteration
                                                     (success: the share of the batch's episodes won)
  checkpoint_tree(state) -> (device pytree, host pytree or None)
  restore(ctx, state, device, host) -> state
  policy_params(state) -> the policy's parameters (for rollouts and eval)
  validate(config) -> None               its own config block, before anything is built

and the loop (``loop.train``) calls them in a fixed order; nothing is
subclassed or imported by string. ``state`` is an algorithm's own frozen
record; the jitted step functions it needs are built once in ``init`` and
kept in it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import optax
from flax import nnx
from jax.sharding import Mesh

from aem_jax.rollout import RolloutConfig
from aem_jax.trainer.rng import Streams


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What the loop built for a run, before any algorithm state.

    Attributes:
      config: the validated ml_collections config.
      mesh: the device mesh.
      graphdef, rest: the policy's nnx graph definition and non-parameter
        state (``nnx.split(model, nnx.Param, ...)``); parameters live in the
        algorithm state.
      init_params: the policy's initial parameters (sharded on ``mesh``).
      model_config: the policy's ``models.ModelConfig``.
      tokenizer: the policy's tokenizer.
      optimizer: the policy optimiser.
      rollout: the rollout settings.
      keys: the run's named random streams.
    """

    config: Any
    mesh: Mesh
    graphdef: Any
    rest: Any
    init_params: Any
    model_config: Any
    tokenizer: Any
    optimizer: optax.GradientTransformation
    rollout: RolloutConfig
    keys: Streams

    def policy(self, params) -> nnx.Module:
        """The policy model with ``params``."""
        return nnx.merge(self.graphdef, params, self.rest)


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """A training algorithm: its name, paper and functions (see the module docstring).

    ``dynamic_sampling`` (DAPO) asks the loop's rollout phase to refill task
    groups whose rollouts all got the same return.
    """

    name: str
    paper: str
    init: Callable[[RunContext], Any]
    update: Callable[[RunContext, Any, Any, int], tuple[Any, dict[str, float]]]
    checkpoint_tree: Callable[[Any], tuple[Any, Any]]
    restore: Callable[[RunContext, Any, Any, Any], Any]
    policy_params: Callable[[Any], Any]
    validate: Callable[[Any], None]
    dynamic_sampling: bool = False
