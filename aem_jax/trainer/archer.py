"""ArCHer (Zhou et al. 2024, arXiv 2402.19446): utterance critic + token actor.

One iteration (``update``):
1. collect an on-policy batch of whole episodes (concatenated history) and
   append its rows to a FIFO replay buffer of episodes (host numpy);
2. ``archer.critic_steps`` critic updates, each on replayed episodes (Q loss)
   and rows of the latest on-policy batch (V loss), then a Polyak step
   ``theta_bar <- (1 - tau) theta_bar + tau theta`` of the target critic:
     L_Q = sum_k mean (Q_k(s,a) - r - gamma (1 - d) Vbar_k(s'))^2   (replay)
     L_V = sum_k mean (V_k(s) - Qbar_k(s, a~pi(.|s)))^2             (on-policy)
   The on-policy batch was sampled by the current actor, so its actions ARE
   fresh samples a ~ pi(.|s) for the V target (no extra generation);
3. after ``archer.actor_warmup`` iterations, ``archer.actor_steps`` actor
   updates with the token-level policy-gradient loss (minus
   ``loss.entropy_coef`` times the mean token entropy) on the on-policy
   batch's utterance advantages ``A = min(Q_1,Q_2)(s,a) - min(V_1,V_2)(s)``
   (online critic), rescaled by AEM's alpha when ``aem.enabled`` (through
   ``compute_advantages``, as for the policy-gradient family). The loss is
   the paper's REINFORCE with ``archer.actor_clip`` = 0, else PPO's clipped
   surrogate against the behaviour log-probs the sampler recorded
   (``batch.old_logp``): the actor's several steps on one batch then stay in
   a trust region around the policy that sampled it. Without it, on the
   chain MDP (tests/trainer/chain_mdp_test.py) one iteration's unclipped
   steps often throw a near-deterministic policy back to near-uniform
   (Adam scales a converged policy's tiny gradients up to full-size steps).

The critic (``critic.py``) is a separate small decoder trunk
(``archer.critic``) with four MLP heads; the replay buffer (``replay.py``)
holds episodes right-padded to ``rollout.max_context_tokens``, so batches of
any T bucket can be replayed together.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aem_jax import objectives as obj
from aem_jax import sharding
from aem_jax.batch import TurnBatch
from aem_jax.trainer.advantages import AdvantageSettings, compute_advantages
from aem_jax.trainer.context import Algorithm, RunContext
from aem_jax.trainer.setup import success_gate
from aem_jax.trainer.validate import fail
from aem_jax.trainer.critic import UtteranceCritic, critic_update_step, critic_values
from aem_jax.trainer.replay import ReplayBuffer, rows_of
from aem_jax.trainer.targets import side_model_config, side_optimizer
from aem_jax.trainer.update import (
    TrainState, apply_gradients, copy_tree, masked_mean, mean_metrics, new_train_state, shardings_of,
    shifted_logp_entropy, to_host,
)


@flax.struct.dataclass
class ActorBatch:
    """An actor minibatch: on-policy rows and the critic's utterance advantages [B,K]."""

    batch: TurnBatch
    advantages: jax.Array


def actor_update_step(state: TrainState, mb: ActorBatch, scale: jax.Array | float = 1.0, *, graphdef, optimizer,
                      chunk_size: int, num_turns: int, entropy_coef: float, clip: float = 0.0):
    """One actor step on ``objectives.archer_actor_loss`` minus the entropy bonus (pure; jit it).

    ``clip`` > 0 takes the clipped surrogate against the batch's behaviour
    log-probs (``batch.old_logp``, the sampler's); 0 is the paper's REINFORCE.
    """
    b = mb.batch

    def loss_fn(trainable):
        logp, ent, _ = shifted_logp_entropy(graphdef, trainable[0], b.tokens, b.attention_mask,
                                            chunk_size=chunk_size)
        loss, aux = obj.archer_actor_loss(logp, mb.advantages, b.turn_ids, b.loss_mask, num_turns=num_turns,
                                          old_logp=b.old_logp, clip=clip if clip > 0 else None)
        mask = b.loss_mask
        bonus, bonus_aux = obj.entropy_bonus(ent, mask, coef=entropy_coef)
        metrics = {"actor_loss": loss, "actor_advantage_mean": aux["advantage_mean"],
                   "entropy_bonus": bonus, "token_entropy_new": masked_mean(ent, mask)}
        metrics.update({f"actor_{k}": aux[k] for k in ("clip_frac", "ratio_mean", "approx_kl") if k in aux})
        return loss + bonus, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)((state.params, state.extra))
    return apply_gradients(state, grads, loss, optimizer, metrics, scale)


def actor_advantages(critic_params, batch, key, *, graphdef, settings, center: bool = False):
    """Utterance advantages [B,K] of an on-policy batch (AEM-modulated when on).

    ``A = min(Q_1,Q_2) - min(V_1,V_2)`` from the online critic enters
    ``compute_advantages`` as token advantages, so AEM's alpha and its
    diagnostics come from the same code as for the policy-gradient family.

    ``center``: subtract the batch mean of A over its valid utterances first,
    ``A - mean(A)``. A constant baseline leaves the on-policy gradient's
    expectation unchanged (``E[grad log pi] = 0``) but removes the offset a
    lagging critic puts between its Q and V heads, which otherwise gives
    almost every utterance of a batch the same sign (on the dungeon from a
    warm start the share of positive advantages swung between 0.06 and
    0.95 from one iteration to the next) and so sharpens or flattens the
    whole policy instead of assigning credit.
    """
    K = batch.turn_rewards.shape[1]
    mb = {"tokens": batch.tokens, "attention_mask": batch.attention_mask, "loss_mask": batch.loss_mask,
          "turn_ids": batch.turn_ids, "turn_valid": batch.turn_valid}
    vals = critic_values(graphdef, critic_params, mb, num_turns=K)
    adv_BK = jnp.where(vals["valid"], obj.archer_advantages(vals["q1"], vals["q2"], vals["v1"], vals["v2"]), 0.0)
    raw_mean = jnp.sum(adv_BK) / jnp.maximum(jnp.sum(vals["valid"]), 1)
    if center:
        adv_BK = jnp.where(vals["valid"], adv_BK - raw_mean, 0.0)
    ids = jnp.where(batch.loss_mask > 0, batch.turn_ids, -1)
    _, info, arrays = compute_advantages(batch, settings, key, token_advantages_BT=obj.turn_broadcast(adv_BK, ids))
    out_BK = obj.from_episode_layout(arrays["adv_EK"], batch.episode_ids, batch.turn_offset, num_turns=K)
    info = dict(info, archer_advantage_mean=raw_mean)  # before centering: the critic's offset
    return jnp.where(vals["valid"], out_BK, 0.0), info


@dataclasses.dataclass(frozen=True)
class Steps:
    critic: Callable
    actor: Callable
    advantages: Callable


@dataclasses.dataclass(frozen=True)
class State:
    """Policy, critic, target critic (device) and the replay buffer (host).

    Memory: the critic and its target are two extra networks of the
    ``archer.critic`` sizes (of the policy's size with ``from_policy``), plus
    the critic's optimiser state; the replay buffer lives in host memory,
    about ``buffer_episodes * T * 10`` bytes.
    """

    policy: TrainState
    critic: TrainState
    target: Any
    buffer: ReplayBuffer
    steps: Steps
    critic_graphdef: Any


def init(ctx: RunContext) -> State:
    c, a, K = ctx.config, ctx.config.archer, ctx.rollout.max_turns
    policy = new_train_state(copy_tree(ctx.init_params), ctx.optimizer, ctx.mesh)
    with sharding.use_mesh(ctx.mesh):
        # from_policy: the trunk is a copy of the (pretrained) policy
        mc = ctx.model_config if a.critic.from_policy else side_model_config(ctx.model_config, a.critic)
        seed = ctx.keys.int_seed("critic_init")
        critic = sharding.create_sharded(
            lambda: UtteranceCritic(mc, head_width=a.critic.head_width, rngs=nnx.Rngs(seed)), ctx.mesh)
        if a.critic.from_policy:
            nnx.update(critic.trunk, copy_tree(ctx.init_params))
    critic_graphdef, critic_params, _ = nnx.split(critic, nnx.Param, ...)
    critic_optimizer = side_optimizer(c, a.critic_learning_rate)
    critic_state = new_train_state(critic_params, critic_optimizer, ctx.mesh)
    target = copy_tree(critic_state.params)
    adv_settings = AdvantageSettings.from_config(c, estimator="none")
    steps = Steps(
        critic=jax.jit(functools.partial(critic_update_step, graphdef=critic_graphdef, optimizer=critic_optimizer,
                                         num_turns=K, gamma=a.gamma, tau=a.tau),
                       donate_argnums=(0, 1), out_shardings=(shardings_of(critic_state), shardings_of(target), None)),
        actor=jax.jit(functools.partial(actor_update_step, graphdef=ctx.graphdef, optimizer=ctx.optimizer,
                                        chunk_size=c.loss.chunk_size, num_turns=K, entropy_coef=c.loss.entropy_coef,
                                        clip=a.actor_clip),
                      donate_argnums=(0,), out_shardings=(shardings_of(policy), None)),
        advantages=jax.jit(functools.partial(actor_advantages, graphdef=critic_graphdef, settings=adv_settings,
                                             center=bool(a.center_advantages))),
    )
    return State(policy=policy, critic=critic_state, target=target,
                 buffer=ReplayBuffer(a.buffer_episodes, seq_len=c.rollout.max_context_tokens),
                 steps=steps, critic_graphdef=critic_graphdef)


def update(ctx: RunContext, state: State, batch, step: int, success: float = 0.0):
    a = ctx.config.archer
    state.buffer.add(batch)
    critic, target, critic_metrics = _critic_phase(ctx, state, batch, step)
    state = dataclasses.replace(state, critic=critic, target=target)
    metrics = dict(critic_metrics)
    rows_read = 2 * a.critic_steps * a.critic_minibatch_size
    if step >= a.actor_warmup:
        policy, actor_metrics = _actor_phase(ctx, state, batch, step, success_gate(ctx.config.optim, success))
        state = dataclasses.replace(state, policy=policy)
        metrics.update(actor_metrics)
        rows_read += a.actor_steps * min(ctx.config.learner.minibatch_size, batch.tokens.shape[0])
    metrics.update({"buffer_size": float(state.buffer.size), "actor_updated": float(step >= a.actor_warmup),
                    "train_passes": rows_read / batch.tokens.shape[0],
                    "nonfinite_in_a_row": int(max(int(state.policy.nonfinite), int(state.critic.nonfinite)))})
    return state, metrics


def _critic_phase(ctx: RunContext, state: State, batch, step: int):
    """``critic_steps`` critic updates: Q on replayed episodes, V on the fresh batch."""
    a = ctx.config.archer
    rng = ctx.keys.numpy("critic_replay", step)
    fresh_rows = rows_of(batch, state.buffer.seq_len)
    B, n = fresh_rows["tokens"].shape[0], a.critic_minibatch_size
    critic, target, history = state.critic, state.target, []
    for _ in range(a.critic_steps):
        replay = sharding.put_batch(state.buffer.sample(rng, n), ctx.mesh)
        rows = rng.choice(B, n, replace=B < n)
        fresh = sharding.put_batch({k: v[rows] for k, v in fresh_rows.items()}, ctx.mesh)
        critic, target, m = state.steps.critic(critic, target, replay, fresh)
        history.append(m)
    return critic, target, mean_metrics(history, prefix="critic_")


def _actor_phase(ctx: RunContext, state: State, batch, step: int, scale: float):
    """``actor_steps`` REINFORCE steps on the critic's (AEM-scaled) advantages, each
    scaled by ``scale`` (the success gate's factor of the step)."""
    c, a = ctx.config, ctx.config.archer
    dev = sharding.put_batch(batch, ctx.mesh)
    adv_BK, info = state.steps.advantages(state.critic.params, dev, ctx.keys.at("advantage", step))
    host = jax.tree.map(to_host, ActorBatch(batch=dev, advantages=adv_BK))
    B = host.advantages.shape[0]
    mb = min(c.learner.minibatch_size, B)
    rng = ctx.keys.numpy("actor_shuffle", step)
    policy, history = state.policy, []
    for _ in range(a.actor_steps):
        rows = rng.permutation(B)[:mb]
        policy, m = state.steps.actor(policy, sharding.put_batch(jax.tree.map(lambda v: v[rows], host), ctx.mesh),
                                      jnp.float32(scale))
        history.append(m)
    out = mean_metrics(history, prefix="actor_")
    out["lr_scale"] = scale
    out.update({k: float(v) for k, v in info.items()})
    return policy, out


def checkpoint_tree(state: State):
    """Policy, critic and target critic on device; the replay buffer on the host."""
    return {"policy": state.policy, "critic": state.critic, "target": state.target}, \
        {"replay": state.buffer.state_dict()}


def restore(ctx: RunContext, state: State, device: Any, host: Any) -> State:
    del ctx
    if host is not None:
        state.buffer.load_state_dict(host["replay"])
    return dataclasses.replace(state, policy=device["policy"], critic=device["critic"], target=device["target"])


def validate(config) -> None:
    """Checks the ``archer`` fields; names the bad key, its value and what is allowed."""
    a = config.archer
    checks = [("rollout.history", config.rollout.history, config.rollout.history == "concatenated",
               "ArCHer replays whole episodes: use 'concatenated'"),
              ("learner.microbatch_size", config.learner.microbatch_size, config.learner.microbatch_size == 0,
               "ArCHer's actor step does not accumulate gradients over micro-batches: use 0 (or a "
               "policy-gradient algorithm)"),
              ("archer.tau", a.tau, 0 < a.tau <= 1, "must be in (0, 1]"),
              ("archer.gamma", a.gamma, 0 <= a.gamma <= 1, "must be in [0, 1]"),
              ("archer.actor_warmup", a.actor_warmup, a.actor_warmup >= 0, "must be >= 0"),
              ("archer.actor_clip", a.actor_clip, 0 <= a.actor_clip < 1,
               "must be in [0, 1) (0: the paper's unclipped REINFORCE actor)"),
              ("archer.critic_learning_rate", a.critic_learning_rate,
               np.isfinite(a.critic_learning_rate) and a.critic_learning_rate > 0, "must be finite and > 0")]
    checks += [(f"archer.{k}", a[k], a[k] >= 1, "must be >= 1")
               for k in ("critic_steps", "actor_steps", "buffer_episodes", "critic_minibatch_size")]
    checks += [(f"archer.critic.{k}", a.critic[k], a.critic[k] >= 1, "must be >= 1")
               for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                         "head_dim", "head_width")]
    for key, value, ok, allowed in checks:
        if not ok:
            fail(key, value, allowed)


ALGORITHM = Algorithm(
    name="archer", paper="2402.19446", init=init, update=update, checkpoint_tree=checkpoint_tree,
    restore=restore, policy_params=lambda state: state.policy.params, validate=validate)
