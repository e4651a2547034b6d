"""The policy-gradient family: GRPO, Dr.GRPO, DAPO, GSPO, RLOO, GiGPO and PPO.

They share one update and differ in the advantage estimator, the clipping
unit and a few flags (``Variant``). One iteration (``update``):
1. (PPO, or a KL penalty) a forward pass of the current policy over the
   batch: values for bi-level GAE, and the reference log-probs;
2. advantages per token (``advantages.compute_advantages``: the estimator,
   then AEM's alpha when ``aem.enabled``);
3. ``learner.epochs`` shuffled passes of ``pg_update_step`` over minibatches
   of ``learner.minibatch_size`` rows; with ``learner.microbatch_size`` each
   minibatch's gradient is accumulated over micro-batches of that many rows
   (one optimiser step, the same update, a micro-batch's activations);
4. with ``learner.max_kl > 0``, a trust-region check of the whole step: the
   k3 estimate of KL(old || new) on the step's own batch after its last
   minibatch (``post_update_kl``); above ``max_kl`` the step is rejected and
   the policy and optimiser state before it are kept (``rejected_updates``).

With ``optim.success_gate`` every optimiser step of an iteration is scaled
by ``setup.success_gate`` of the iteration's rollout success (``lr_scale``;
ArCHer's actor, ETPO's policy and SFT steps are scaled the same way).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from aem_jax import objectives as obj
from aem_jax import sharding
from aem_jax.batch import TurnBatch
from aem_jax.trainer.advantages import AdvantageSettings, compute_advantages
from aem_jax.trainer.context import Algorithm, RunContext
from aem_jax.trainer.setup import success_gate
from aem_jax.trainer.validate import fail
from aem_jax.trainer.update import (
    LossSettings, PGBatch, TrainState, copy_tree, forward_stats, init_value_head, mean_metrics,
    minibatches, new_train_state, pg_update_step, run_steps, shardings_of, shifted_logp_entropy,
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """What distinguishes one member of the family.

    Attributes:
      estimator: advantage estimator: "grpo" | "rloo" | "gigpo" | "gae".
      loss: "ppo" (token-level clip) or "gspo" (sequence-level clip).
      normalize_std: GRPO std division (False gives Dr.GRPO).
      value_head: trains a value head on the policy trunk (PPO).
    """

    estimator: str = "grpo"
    loss: str = "ppo"
    normalize_std: bool = True
    value_head: bool = False


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted functions of a run, built once by ``init``."""

    update: Callable
    forward: Callable
    advantages: Callable
    gae: Callable
    whiten: Callable
    post_kl: Callable


@dataclasses.dataclass(frozen=True)
class State:
    train: TrainState            # policy (+ value head) and its optimiser
    ref_params: Any              # frozen reference policy (KL penalty) or None
    steps: Steps


def num_loss_turns(config) -> int:
    return config.rollout.max_turns if config.rollout.history == "concatenated" else 1


def init(ctx: RunContext, variant: Variant) -> State:
    c = ctx.config
    extra = init_value_head(ctx.model_config.hidden_size) if variant.value_head else {}
    train = new_train_state(copy_tree(ctx.init_params), ctx.optimizer, ctx.mesh, extra)
    settings = LossSettings.from_config(
        c, kind=variant.loss, value_coef=c.ppo.value_coef if variant.value_head else 0.0,
        num_turns=num_loss_turns(c))
    adv_settings = AdvantageSettings.from_config(c, estimator=variant.estimator,
                                                 normalize_std=variant.normalize_std)
    steps = Steps(
        update=jax.jit(functools.partial(pg_update_step, graphdef=ctx.graphdef, optimizer=ctx.optimizer,
                                         settings=settings),
                       donate_argnums=(0,), out_shardings=(shardings_of(train), None)),
        forward=jax.jit(functools.partial(forward_stats, graphdef=ctx.graphdef, chunk_size=c.loss.chunk_size,
                                          with_values=variant.value_head)),
        advantages=jax.jit(functools.partial(compute_advantages, settings=adv_settings)),
        gae=jax.jit(functools.partial(obj.bilevel_gae, gamma=c.ppo.gamma, lam=c.ppo.lam,
                                      token_lam=c.ppo.token_lam)),
        whiten=jax.jit(obj.whiten),
        post_kl=jax.jit(functools.partial(step_kl, graphdef=ctx.graphdef, chunk_size=c.loss.chunk_size)),
    )
    # A copy: the update donates (and so deletes) the live parameter buffers.
    ref = copy_tree(train.params) if c.loss.kl_coef else None
    return State(train=train, ref_params=ref, steps=steps)


def update(ctx: RunContext, state: State, batch: TurnBatch, step: int, *, variant: Variant,
           success: float = 0.0):
    c, steps = ctx.config, state.steps
    dev = sharding.put_batch(batch, ctx.mesh)
    token_adv = None
    returns = jnp.zeros(dev.tokens.shape, jnp.float32)
    if variant.value_head or state.ref_params is not None:
        if state.ref_params is not None:
            ref = steps.forward(state.ref_params, state.train.extra, dev)
            dev = dev.replace(ref_logp=ref["logp"])
        if variant.value_head:
            values = steps.forward(state.train.params, state.train.extra, dev)["values"]
            token_adv, returns = steps.gae(values, dev.turn_rewards, dev.turn_ids, dev.loss_mask, dev.turn_valid)
            if c.ppo.whiten_advantages:
                token_adv = steps.whiten(token_adv, dev.loss_mask)
    adv_BT, adv_info, _ = steps.advantages(dev, key=ctx.keys.at("advantage", step), token_advantages_BT=token_adv)
    batches = minibatches(PGBatch(batch=dev, advantages=adv_BT, returns=returns), ctx.mesh,
                          ctx.keys.numpy("shuffle", step), size=c.learner.minibatch_size, epochs=c.learner.epochs)
    # A copy: the update donates (and so deletes) the buffers it is given.
    before = copy_tree(state.train) if c.learner.max_kl > 0 else None
    scale = success_gate(c.optim, success)
    train, history = run_steps(steps.update, state.train, batches, scale=jnp.float32(scale))
    metrics = mean_metrics(history)
    metrics["lr_scale"] = scale
    if before is not None:
        kl = float(steps.post_kl(train.params, dev))
        metrics["post_update_kl"] = kl
        metrics["rejected_updates"] = float(not kl <= c.learner.max_kl)  # NaN rejects too
        if metrics["rejected_updates"]:
            train = before
    metrics["skipped_updates"] = metrics.pop("skipped")
    metrics.update({k: float(v) for k, v in adv_info.items()})
    metrics["nonfinite_in_a_row"] = int(train.nonfinite)
    metrics["train_passes"] = float(c.learner.epochs)
    return dataclasses.replace(state, train=train), metrics


def step_kl(params, batch: TurnBatch, *, graphdef, chunk_size: int) -> jax.Array:
    """How far a step moved the policy on its own batch.

    ``KL(old || new) ~ sum_t m_t [(r_t - 1) - log r_t] / sum_t m_t`` with
    ``r_t = pi_new(y_t) / pi_old(y_t)`` over the batch's action tokens (the k3
    estimator on old-policy samples, the same quantity as the loss's
    ``approx_kl``, measured once after the step's last minibatch, where
    ``approx_kl`` averages the values seen before each minibatch).
    """
    logp, _, _ = shifted_logp_entropy(graphdef, params, batch.tokens, batch.attention_mask,
                                      chunk_size=chunk_size)
    # KL(old || new) on old samples is kl_penalty's k3 with the old policy as "pi"
    k3 = obj.kl_penalty(batch.old_logp, logp, kind="k3")
    m = batch.loss_mask
    return jnp.sum(k3 * m) / jnp.maximum(jnp.sum(m), 1.0)


def checkpoint_tree(state: State):
    return state.train, None


def restore(ctx: RunContext, state: State, device: Any, host: Any) -> State:
    del ctx, host
    return dataclasses.replace(state, train=device)


def validate(config, variant: Variant) -> None:
    if variant.value_head and config.rollout.history != "concatenated":
        fail("rollout.history", config.rollout.history,
             "ppo's bi-level GAE needs 'concatenated' (the turn values of one row)")


def algorithm(name: str, *, paper: str, dynamic_sampling: bool = False, **variant_fields) -> Algorithm:
    """The registry record of one member of the family."""
    variant = Variant(**variant_fields)
    return Algorithm(
        name=name, paper=paper, dynamic_sampling=dynamic_sampling,
        init=functools.partial(init, variant=variant),
        update=functools.partial(update, variant=variant),
        checkpoint_tree=checkpoint_tree, restore=restore,
        policy_params=lambda state: state.train.params,
        validate=functools.partial(validate, variant=variant),
    )
