"""Side networks and target networks shared by ArCHer and ETPO.

A side network (ArCHer's critic trunk, ETPO's Q network) has the policy's
architecture family and vocabulary with its own sizes, and the policy's
optimiser settings with its own learning rate. Target networks follow their
online network by Polyak averaging.
"""
from __future__ import annotations

import types

import jax
import ml_collections

from aem_jax import models
from aem_jax.trainer import setup


def side_model_config(policy_config: models.ModelConfig, fields) -> models.ModelConfig:
    """The policy's architecture family and vocabulary with the sizes in ``fields``."""
    return policy_config.replace(
        hidden_size=fields.hidden_size, intermediate_size=fields.intermediate_size,
        num_layers=fields.num_layers, num_heads=fields.num_heads, num_kv_heads=fields.num_kv_heads,
        head_dim=fields.head_dim, tie_embeddings=True, rope_scaling=None)


def side_optimizer(config, learning_rate: float):
    """``config.optim``'s optimiser (warm-up, clipping, AdamW) with another learning rate.

    The schedule after warm-up is constant: critic and Q networks take a
    different number of steps per iteration than the policy, and a value
    estimate should keep tracking the moving policy to the end.
    """
    optim = ml_collections.ConfigDict(config.optim.to_dict())
    optim.learning_rate = learning_rate
    optim.schedule = "constant"
    return setup.optimizer(types.SimpleNamespace(optim=optim))


def polyak(target, online, tau: float):
    """``(1 - tau) * target + tau * online`` leaf by leaf (target-network update)."""
    return jax.tree.map(lambda t, o: ((1.0 - tau) * t + tau * o).astype(t.dtype), target, online)
