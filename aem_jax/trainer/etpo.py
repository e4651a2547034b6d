"""ETPO (Wen et al. 2024, arXiv 2402.06700): token-level soft Bellman updates.

Networks: the policy pi (the shared loop's model), a token-level Q network
(a separate small decoder whose logits over the vocabulary are Q(c, w) for
every next token w of context c), its Polyak-averaged target Qbar, and a
frozen reference policy rho (the initial policy parameters).

Each minibatch of the on-policy batch (``learner.epochs`` passes, as the
policy-gradient loop) takes ``etpo.q_steps`` Q steps (1 by default) and then
one policy step (none in the first ``etpo.policy_warmup`` iterations, which
train only Q, as ArCHer's critic-only warm-up):

  Vsoft(c) = sum_w pi(w|c) Qbar(c,w) - beta KL(pi(.|c) || rho(.|c))
  y_j      = Vsoft(c_{j+1}) inside a response,
             r + gamma (1 - d) Vsoft(first context of the next turn) at its end
  L_Q      = Huber_delta(Q(c_j, w_j) - y_j)            on agent tokens
  Qbar    <- (1 - tau) Qbar + tau Q
  L_pi     = sum_w pi(w|c) [beta (log pi - log rho)(w|c) - sg Q(c,w)] - entropy_coef H(pi(.|c))

using ``objectives.etpo_soft_values``, ``etpo_token_targets``,
``etpo_q_loss`` and ``etpo_policy_loss``; the policy step reads the Q network
just updated. No discount inside a response; ``etpo.gamma`` between turns.

Memory caveat: unlike the policy-gradient update (chunked log-probs, no
[B,T,V] tensor), ETPO needs full [B,T,V] float32 logits of the policy, the
reference, Q, the target Q and the updated Q for every minibatch, about
6 * B * T * V * 4 bytes plus gradients. That is small for the word-level
vocabularies of the CPU configs (V ~ 100) but about 20 GB per copy for
B=8, T=4096 and a 150k-token LLM vocabulary: use small minibatches (and
short contexts) with large vocabularies.

With ``aem.enabled`` each response's policy-loss tokens are weighted by its
AEM coefficient alpha (group mean 1). ETPO has no advantage to rescale, but in
the policy-gradient family rescaling a response's advantage by alpha scales
that response's gradient by alpha, and the weight does the same here (this
project's extension; under ``loss.agg="seq-mean-token-mean"`` the weights of
a one-turn row would cancel, so that combination is rejected).

The reference policy is not checkpointed: it is the initial policy, which
the trainer rebuilds identically (same seed or same pretrained weights) on
resume.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from aem_jax import models
from aem_jax import objectives as obj
from aem_jax import sharding
from aem_jax.batch import TurnBatch
from aem_jax.trainer.advantages import AdvantageSettings, compute_advantages
from aem_jax.trainer.context import Algorithm, RunContext
from aem_jax.trainer.setup import success_gate
from aem_jax.trainer.validate import fail
from aem_jax.trainer.targets import polyak, side_model_config, side_optimizer
from aem_jax.trainer.update import (
    TrainState, apply_gradients, copy_tree, masked_mean, mean_metrics, minibatches, new_train_state,
    run_steps, shardings_of,
)


def shifted_logits(graphdef, params, tokens_BT, attention_mask_BT):
    """Float32 logits [B,T,V] aligned to the predicted token.

    ``out[:, t]`` scores every candidate for token t given ``tokens[<t]`` (the
    context c_t); position 0 has no context and gets 0 (it is never an agent
    token).
    """
    logits_BTV = models.logits(nnx.merge(graphdef, params), tokens_BT, attention_mask_BT)
    return jnp.pad(logits_BTV[:, :-1].astype(jnp.float32), ((0, 0), (1, 0), (0, 0)))


@flax.struct.dataclass
class QNets:
    """The Q network's TrainState and its target parameters (one pytree)."""

    state: TrainState
    target: Any


@flax.struct.dataclass
class EtpoBatch:
    """An ETPO minibatch: rollout rows and the policy-loss weight of each token (AEM's alpha, or 1)."""

    batch: TurnBatch
    weights: jax.Array


def etpo_update_step(policy: TrainState, q: QNets, ref_params, mb: EtpoBatch, scale: jax.Array | float = 1.0, *,
                     policy_graphdef, q_graphdef,
                     policy_optimizer, q_optimizer, beta: float, gamma: float, tau: float, delta: float,
                     agg: str, entropy_coef: float, residual: bool = False, q_steps: int = 1,
                     policy_step: bool = True):
    """``q_steps`` Q steps (each + a Polyak target step), then one policy step (pure; jit it).

    With ``residual`` (``etpo.q.residual``, Q network copied from the policy)
    Q is the Q network's logits minus the reference policy's,
    ``Q(c, w) = f_theta(c)_w - f_ref(c)_w``: the policy's features with an
    output that starts at exactly 0, so the first policy steps see no Q noise
    and only the KL term (zero at pi = rho) until Q has learnt from rewards.

    ``q_steps`` > 1 (``etpo.q_steps``) repeats the Q step on the same
    minibatch, each from the target the previous one left: the reward moves
    back through more tokens per policy step (the soft Bellman backup advances
    about one token per target refresh), at the cost of one Q forward and
    backward pass per extra step. The metrics are the last Q step's.

    Returns (policy state, QNets, metrics).
    """
    sg = jax.lax.stop_gradient
    b = mb.batch
    tokens, attn, mask = b.tokens, b.attention_mask, b.loss_mask
    ref_BTV = sg(shifted_logits(policy_graphdef, ref_params, tokens, attn))
    pi_BTV = sg(shifted_logits(policy_graphdef, policy.params, tokens, attn))
    offset_BTV = ref_BTV if residual else 0.0

    def q_values(params):
        return shifted_logits(q_graphdef, params, tokens, attn) - offset_BTV

    def q_step(q: QNets, _):
        # Targets from the current target network: each of the q_steps Q steps bootstraps from the
        # target its previous Polyak step left (one more hop of the soft Bellman backup per step).
        vsoft_BT = obj.etpo_soft_values(sg(q_values(q.target)), pi_BTV, ref_BTV, beta=beta)
        y_BT = obj.etpo_token_targets(vsoft_BT, b.turn_ids, mask, b.turn_rewards, b.turn_valid, b.done,
                                      gamma=gamma)

        def q_loss_fn(trainable):
            q_BTV = q_values(trainable[0])
            q_taken = jnp.take_along_axis(q_BTV, tokens[:, :, None], axis=-1)[..., 0]
            loss, aux = obj.etpo_q_loss(q_taken, y_BT, mask, delta=delta, agg=agg)
            return loss, {"q_loss": loss, "q_mean": aux["q_mean"], "td_abs": aux["td_abs"],
                          "target_mean": masked_mean(y_BT, mask)}

        (q_loss, q_metrics), q_grads = jax.value_and_grad(q_loss_fn, has_aux=True)((q.state.params, q.state.extra))
        q_state, q_metrics = apply_gradients(q.state, q_grads, q_loss, q_optimizer, q_metrics)
        return QNets(q_state, polyak(q.target, q_state.params, tau)), q_metrics

    if q_steps == 1:
        q, q_metrics = q_step(q, None)
    else:  # the metrics of the last Q step
        q, q_history = jax.lax.scan(q_step, q, None, length=q_steps)
        q_metrics = jax.tree.map(lambda v: v[-1], q_history)
    if not policy_step:  # etpo.policy_warmup: the Q network learns, the policy stays where it is
        return policy, q, q_metrics
    renamed = {"grad_norm": "q_grad_norm", "skipped": "q_skipped"}
    q_metrics = {renamed.get(k, k): v for k, v in q_metrics.items()}
    q_new_BTV = sg(q_values(q.state.params))

    def pi_loss_fn(trainable):
        logits_BTV = shifted_logits(policy_graphdef, trainable[0], tokens, attn)
        loss, aux = obj.etpo_policy_loss(logits_BTV, ref_BTV, q_new_BTV, mask * mb.weights, beta=beta, agg=agg,
                                         denominator=obj.loss_denominator(mask, agg=agg))
        ent = obj.token_entropy(logits_BTV)
        bonus, _ = obj.entropy_bonus(ent, mask, coef=entropy_coef, agg=agg)
        return loss + bonus, {"policy_loss": loss, "kl_ref": aux["kl_ref"], "entropy_bonus": bonus,
                              "token_entropy_new": masked_mean(ent, mask)}

    (pi_loss, metrics), grads = jax.value_and_grad(pi_loss_fn, has_aux=True)((policy.params, policy.extra))
    policy, metrics = apply_gradients(policy, grads, pi_loss, policy_optimizer, metrics, scale)
    metrics.update(q_metrics)
    return policy, q, metrics


def alpha_weights(batch: TurnBatch, key, *, settings: AdvantageSettings):
    """Per-token policy-loss weights: each response's AEM alpha (1 with AEM off)."""
    if not settings.aem_enabled:
        return jnp.ones(batch.tokens.shape, jnp.float32), {}
    _, info, arrays = compute_advantages(batch, settings, key)
    K = batch.turn_rewards.shape[1]
    alpha_BK = obj.from_episode_layout(arrays["alpha_EK"], batch.episode_ids, batch.turn_offset, num_turns=K)
    ids = jnp.where(batch.loss_mask > 0, batch.turn_ids, -1)
    weights = jnp.where(ids >= 0, obj.turn_broadcast(alpha_BK, ids), 1.0)
    keep = ("alpha_mean", "alpha_min", "alpha_max", "alpha_std", "response_entropy")
    return weights, {k: info[k] for k in keep}


@dataclasses.dataclass(frozen=True)
class State:
    policy: TrainState
    q: QNets
    reference: Any               # the initial policy parameters (rebuilt identically on resume)
    update_step: Callable
    alpha: Callable
    q_only_step: Callable | None = None  # the Q steps alone (etpo.policy_warmup's iterations)


def init(ctx: RunContext) -> State:
    c, e = ctx.config, ctx.config.etpo
    policy = new_train_state(copy_tree(ctx.init_params), ctx.optimizer, ctx.mesh)
    # A copy: the policy's own buffers are donated to every update.
    reference = copy_tree(ctx.init_params)
    if e.q.from_policy:  # Q(c, .) starts as the policy's logits (same architecture)
        q_graphdef, q_params = ctx.graphdef, copy_tree(ctx.init_params)
    else:
        mc = side_model_config(ctx.model_config, e.q)
        seed = ctx.keys.int_seed("q_init")
        with sharding.use_mesh(ctx.mesh):
            q_model = sharding.create_sharded(lambda: models.Decoder(mc, rngs=nnx.Rngs(seed)), ctx.mesh)
        q_graphdef, q_params, _ = nnx.split(q_model, nnx.Param, ...)
    q_optimizer = side_optimizer(c, e.q_learning_rate)
    q_state = new_train_state(q_params, q_optimizer, ctx.mesh)
    q = QNets(q_state, copy_tree(q_state.params))
    def jitted(policy_step: bool):
        return jax.jit(functools.partial(
            etpo_update_step, policy_graphdef=ctx.graphdef, q_graphdef=q_graphdef, policy_optimizer=ctx.optimizer,
            q_optimizer=q_optimizer, beta=e.beta, gamma=e.gamma, tau=e.tau, delta=e.huber_delta,
            agg=c.loss.agg, entropy_coef=c.loss.entropy_coef, residual=e.q.residual, q_steps=e.q_steps,
            policy_step=policy_step),
            donate_argnums=(0, 1), out_shardings=(shardings_of(policy), shardings_of(q), None))

    step = jitted(True)
    q_only = jitted(False) if e.policy_warmup else None
    alpha = jax.jit(functools.partial(alpha_weights, settings=AdvantageSettings.from_config(c, estimator="none")))
    return State(policy=policy, q=q, reference=reference, update_step=step, alpha=alpha, q_only_step=q_only)


def update(ctx: RunContext, state: State, batch: TurnBatch, step: int, success: float = 0.0):
    c = ctx.config
    dev = sharding.put_batch(batch, ctx.mesh)
    weights, alpha_info = state.alpha(dev, ctx.keys.at("advantage", step))
    batches = minibatches(EtpoBatch(batch=dev, weights=weights), ctx.mesh, ctx.keys.numpy("shuffle", step),
                          size=c.learner.minibatch_size, epochs=c.learner.epochs)

    scale = jnp.float32(success_gate(c.optim, success))  # the policy's steps (Q learns at its own rate)
    policy_updated = step >= c.etpo.policy_warmup
    update_step = state.update_step if policy_updated else state.q_only_step

    def one(carry, mb):
        policy, q = carry
        policy, q, m = update_step(policy, q, state.reference, mb, scale)
        return (policy, q), m

    (policy, q), history = run_steps(one, (state.policy, state.q), batches)
    if policy_updated:
        metrics = mean_metrics(history)
        metrics["skipped_updates"] = metrics.pop("skipped")
        metrics["q_skipped_updates"] = metrics.pop("q_skipped") * len(history)  # a count, as skipped_updates
    else:  # the Q steps' own metrics (grad_norm, skipped) under q_ names
        metrics = mean_metrics(history, prefix="q_")
        metrics["q_skipped_updates"] = metrics.pop("q_skipped")
    metrics["lr_scale"] = float(scale)
    metrics["policy_updated"] = float(policy_updated)
    metrics.update({k: float(v) for k, v in alpha_info.items()})
    metrics["nonfinite_in_a_row"] = int(max(int(policy.nonfinite), int(q.state.nonfinite)))
    metrics["train_passes"] = float(c.learner.epochs)
    return dataclasses.replace(state, policy=policy, q=q), metrics


def checkpoint_tree(state: State):
    """The policy, Q and target Q with their optimiser states."""
    return {"policy": state.policy, "q": state.q.state, "q_target": state.q.target}, None


def restore(ctx: RunContext, state: State, device: Any, host: Any) -> State:
    del ctx, host
    return dataclasses.replace(state, policy=device["policy"], q=QNets(device["q"], device["q_target"]))


def validate(config) -> None:
    """Checks the ``etpo`` fields; names the bad key, its value and what is allowed."""
    e = config.etpo
    finite_pos = lambda v: bool(jnp.isfinite(v)) and v > 0  # noqa: E731
    checks = [
        ("rollout.history", config.rollout.history, config.rollout.history == "concatenated",
         "ETPO bootstraps each turn from the next turn of the same row: use 'concatenated'"),
        ("loss.agg", config.loss.agg, not (config.aem.enabled and config.loss.agg == "seq-mean-token-mean"),
         "with aem.enabled, ETPO weights tokens by alpha, which seq-mean-token-mean cancels: use another "
         "aggregation or aem.enabled=False"),
        ("learner.microbatch_size", config.learner.microbatch_size, config.learner.microbatch_size == 0,
         "ETPO's Q and policy steps do not accumulate gradients over micro-batches: use 0 (or a "
         "policy-gradient algorithm)"),
        ("etpo.q.residual", e.q.residual, not e.q.residual or e.q.from_policy,
         "a residual Q subtracts the reference policy's logits from a copy of the policy: set "
         "etpo.q.from_policy=True too"),
        ("etpo.beta", e.beta, finite_pos(e.beta), "must be finite and > 0"),
        ("etpo.gamma", e.gamma, 0 <= e.gamma <= 1, "must be in [0, 1]"),
        ("etpo.tau", e.tau, 0 < e.tau <= 1, "must be in (0, 1]"),
        ("etpo.huber_delta", e.huber_delta, finite_pos(e.huber_delta), "must be finite and > 0"),
        ("etpo.q_learning_rate", e.q_learning_rate, finite_pos(e.q_learning_rate), "must be finite and > 0"),
        ("etpo.policy_warmup", e.policy_warmup, isinstance(e.policy_warmup, int) and e.policy_warmup >= 0,
         "must be an integer >= 0"),
        ("etpo.q_steps", e.q_steps, isinstance(e.q_steps, int) and e.q_steps >= 1, "must be an integer >= 1"),
    ]
    checks += [(f"etpo.q.{k}", e.q[k], e.q[k] >= 1, "must be >= 1")
               for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")]
    for key, value, ok, allowed in checks:
        if not ok:
            fail(key, value, allowed)


ALGORITHM = Algorithm(
    name="etpo", paper="2402.06700", init=init, update=update, checkpoint_tree=checkpoint_tree,
    restore=restore, policy_params=lambda state: state.policy.params, validate=validate)
