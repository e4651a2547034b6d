"""The policy update: log-probs from the model, the loss, one optimiser step.

``pg_update_step`` is a module-level pure function of (state, minibatch) that
tests can call directly; the loop jits it once with donated state. Log-probs
and entropies come from hidden states through the chunked objective, so no
[B,T,V] logits are ever materialised.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from aem_jax import models
from aem_jax import objectives as obj


@flax.struct.dataclass
class TrainState:
    """Everything the optimiser updates, as one pytree.

    Attributes:
      step: number of optimiser steps taken.
      params: the policy's trainable nnx.State.
      extra: extra trainable arrays (e.g. PPO's value head); {} if none.
      opt_state: optax state over (params, extra).
      nonfinite: consecutive skipped (non-finite) updates.
    """

    step: jax.Array
    params: Any
    extra: Any
    opt_state: Any
    nonfinite: jax.Array


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """Static loss settings (hashable, closed over by the jitted step)."""

    kind: str = "ppo"              # "ppo" (token clip) | "gspo" (sequence clip)
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    agg: str = "token-mean"
    entropy_coef: float = 0.0
    entropy_mask: str = "all"      # "all" | "nonzero_advantage": tokens the entropy bonus covers
    kl_coef: float = 0.0
    kl_kind: str = "low_var_kl"
    value_coef: float = 0.0        # > 0 trains the value head (PPO)
    chunk_size: int = 1024
    num_turns: int = 1


def shifted_logp_entropy(graphdef, params, tokens_BT, attention_mask_BT, *, chunk_size: int):
    """Log-prob and entropy of each token given its prefix, aligned to the token.

    ``logp[:, t] = log pi(tokens[t] | tokens[<t])``; position 0 gets 0. Also
    returns the hidden states [B,T,D] (for value heads).
    """
    model = nnx.merge(graphdef, params)
    hidden_BTD = models.hidden_states(model, tokens_BT, attention_mask_BT)
    logp, ent = obj.logprobs_and_entropy_from_hidden(
        hidden_BTD[:, :-1], models.unembedding(model), tokens_BT[:, 1:], chunk_size=chunk_size)
    pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)))  # noqa: E731
    return pad(logp), pad(ent), hidden_BTD


def value_head(extra, hidden_BTD):
    """Scalar value per position from the policy trunk's hidden states."""
    return jnp.einsum("btd,d->bt", hidden_BTD.astype(jnp.float32), extra["value_w"]) + extra["value_b"]


def init_value_head(hidden_size: int) -> dict[str, jax.Array]:
    return {"value_w": jnp.zeros((hidden_size,), jnp.float32), "value_b": jnp.zeros((), jnp.float32)}


def pg_loss(trainable, graphdef, mb, settings: LossSettings):
    """Policy-gradient loss (+ entropy bonus, KL to reference, value loss)."""
    params, extra = trainable
    logp, ent, hidden = shifted_logp_entropy(
        graphdef, params, mb["tokens"], mb["attention_mask"], chunk_size=settings.chunk_size)
    mask = mb["loss_mask"]
    if settings.kind == "gspo":
        loss, aux = obj.gspo_policy_loss(
            logp, mb["old_logp"], mb["advantages"], mask, mb["turn_ids"], num_turns=settings.num_turns,
            clip_low=settings.clip_low, clip_high=settings.clip_high)
    else:
        loss, aux = obj.ppo_policy_loss(
            logp, mb["old_logp"], mb["advantages"], mask, clip_low=settings.clip_low,
            clip_high=settings.clip_high, dual_clip=settings.dual_clip, agg=settings.agg)
    metrics = {"policy_loss": loss, "clip_frac": aux["clip_frac"], "ratio_mean": aux["ratio_mean"],
               "approx_kl": aux.get("approx_kl", jnp.zeros(())),
               "token_entropy_new": jnp.sum(ent * mask) / jnp.maximum(jnp.sum(mask), 1.0)}
    total = loss
    if settings.entropy_coef:
        # "nonzero_advantage": no bonus where the advantage is 0 (a group whose
        # rollouts all got the same return), so once every group succeeds the
        # bonus is not the only gradient left (docs/results.md: this alone did
        # not stop the default job's late-training dips).
        ent_mask = mask if settings.entropy_mask == "all" else mask * (mb["advantages"] != 0)
        bonus, _ = obj.entropy_bonus(ent, ent_mask, coef=settings.entropy_coef, agg=settings.agg)
        total = total + bonus
    if settings.kl_coef:
        kl = obj.kl_penalty(logp, mb["ref_logp"], kind=settings.kl_kind)
        kl_loss, _, _ = obj.aggregate(kl, mask, agg=settings.agg)
        total = total + settings.kl_coef * kl_loss
        metrics["kl_ref"] = kl_loss
    if settings.value_coef:
        values = value_head(extra, hidden)
        v_loss, _, _ = obj.aggregate(0.5 * (values - mb["returns"]) ** 2, mask, agg="token-mean")
        total = total + settings.value_coef * v_loss
        metrics["value_loss"] = v_loss
    metrics["loss"] = total
    return total, metrics


def place_state(state, mesh):
    """Gives every leaf a mesh sharding: its own if the rules split it, else replicated.

    The jitted update returns its outputs with these same shardings, so it
    compiles once however many steps run.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: jax.device_put(x, x.sharding if isinstance(x.sharding, NamedSharding) else replicated),
        state)


def _select(ok, new, old):
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def apply_gradients(state: TrainState, grads, loss, optimizer: optax.GradientTransformation, metrics):
    """One optimiser step; a non-finite loss or gradient skips it (counted)."""
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    trainable = (state.params, state.extra)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    new_params, new_extra = optax.apply_updates(trainable, updates)
    new_state = TrainState(
        step=state.step + ok.astype(jnp.int32),
        params=_select(ok, new_params, state.params),
        extra=_select(ok, new_extra, state.extra),
        opt_state=_select(ok, opt_state, state.opt_state),
        nonfinite=jnp.where(ok, 0, state.nonfinite + 1),
    )
    return new_state, dict(metrics, grad_norm=grad_norm, skipped=(~ok).astype(jnp.float32))


def pg_update_step(state: TrainState, mb, *, graphdef, optimizer, settings: LossSettings):
    """Loss, gradient and optimiser step on one minibatch (pure; jit it)."""
    grad_fn = jax.value_and_grad(pg_loss, has_aux=True)
    (loss, metrics), grads = grad_fn((state.params, state.extra), graphdef, mb, settings)
    return apply_gradients(state, grads, loss, optimizer, metrics)


def forward_stats(params, extra, mb, *, graphdef, chunk_size: int, with_values: bool):
    """Current-policy log-probs / entropies (and values) of a batch, no gradient."""
    logp, ent, hidden = shifted_logp_entropy(
        graphdef, params, mb["tokens"], mb["attention_mask"], chunk_size=chunk_size)
    out = {"logp": logp, "entropy": ent}
    if with_values:
        out["values"] = value_head(extra, hidden)
    return out
