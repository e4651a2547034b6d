"""ETPO (Wen et al. 2024, arXiv 2402.06700): token-level soft Bellman updates.

Networks: the policy pi (the shared loop's model), a token-level Q network
(a separate small decoder whose logits over the vocabulary are Q(c, w) for
every next token w of context c), its Polyak-averaged target Qbar, and a
frozen reference policy rho (the initial policy parameters).

Each minibatch of the on-policy batch (``learner.epochs`` passes, as the
policy-gradient loop) takes one Q step and then one policy step:

  Vsoft(c) = sum_w pi(w|c) Qbar(c,w) - beta KL(pi(.|c) || rho(.|c))
  y_j      = Vsoft(c_{j+1}) inside a response,
             r + gamma (1 - d) Vsoft(first context of the next turn) at its end
  L_Q      = Huber_delta(Q(c_j, w_j) - y_j)            on agent tokens
  Qbar    <- (1 - tau) Qbar + tau Q
  L_pi     = sum_w pi(w|c) [beta (log pi - log rho)(w|c) - sg Q(c,w)]

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

The reference policy is not checkpointed: it is the initial policy, which
the trainer rebuilds identically (same seed or same pretrained weights) on
resume.
"""
from __future__ import annotations

import functools
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aem_jax import models
from aem_jax import objectives as obj
from aem_jax import sharding
from aem_jax.trainer import algorithms
from aem_jax.trainer.archer import copy_tree, new_train_state, polyak, side_model_config, side_optimizer
from aem_jax.trainer.loop import Trainer
from aem_jax.trainer.update import TrainState, apply_gradients

# The registry entry lives in ``algorithms.ALGORITHMS`` (the single list);
# this module is its runner.
ALGORITHM = algorithms.get("etpo")

# TurnBatch fields an ETPO minibatch carries.
BATCH_FIELDS = ("tokens", "attention_mask", "loss_mask", "turn_ids", "turn_rewards", "turn_valid", "done")


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


def etpo_update_step(policy: TrainState, q: QNets, ref_params, mb, *, policy_graphdef, q_graphdef,
                     policy_optimizer, q_optimizer, beta: float, gamma: float, tau: float, delta: float,
                     agg: str):
    """One Q step (+ Polyak target step), then one policy step (pure; jit it).

    Returns (policy state, QNets, metrics).
    """
    sg = jax.lax.stop_gradient
    tokens, attn, mask = mb["tokens"], mb["attention_mask"], mb["loss_mask"]
    ref_BTV = sg(shifted_logits(policy_graphdef, ref_params, tokens, attn))
    pi_BTV = sg(shifted_logits(policy_graphdef, policy.params, tokens, attn))
    vsoft_BT = obj.etpo_soft_values(sg(shifted_logits(q_graphdef, q.target, tokens, attn)), pi_BTV, ref_BTV,
                                    beta=beta)
    y_BT = obj.etpo_token_targets(vsoft_BT, mb["turn_ids"], mask, mb["turn_rewards"], mb["turn_valid"],
                                  mb["done"], gamma=gamma)

    def q_loss_fn(trainable):
        q_BTV = shifted_logits(q_graphdef, trainable[0], tokens, attn)
        q_taken = jnp.take_along_axis(q_BTV, tokens[:, :, None], axis=-1)[..., 0]
        loss, aux = obj.etpo_q_loss(q_taken, y_BT, mask, delta=delta, agg=agg)
        return loss, {"q_loss": loss, "q_mean": aux["q_mean"], "td_abs": aux["td_abs"],
                      "target_mean": jnp.sum(y_BT * mask) / jnp.maximum(jnp.sum(mask), 1.0)}

    (q_loss, q_metrics), q_grads = jax.value_and_grad(q_loss_fn, has_aux=True)((q.state.params, q.state.extra))
    q_state, q_metrics = apply_gradients(q.state, q_grads, q_loss, q_optimizer, q_metrics)
    q = QNets(q_state, polyak(q.target, q_state.params, tau))
    q_new_BTV = sg(shifted_logits(q_graphdef, q_state.params, tokens, attn))

    def pi_loss_fn(trainable):
        logits_BTV = shifted_logits(policy_graphdef, trainable[0], tokens, attn)
        loss, aux = obj.etpo_policy_loss(logits_BTV, ref_BTV, q_new_BTV, mask, beta=beta, agg=agg)
        ent = obj.token_entropy(logits_BTV)
        return loss, {"policy_loss": loss, "kl_ref": aux["kl_ref"],
                      "token_entropy_new": jnp.sum(ent * mask) / jnp.maximum(jnp.sum(mask), 1.0)}

    (pi_loss, metrics), grads = jax.value_and_grad(pi_loss_fn, has_aux=True)((policy.params, policy.extra))
    policy, metrics = apply_gradients(policy, grads, pi_loss, policy_optimizer, metrics)
    renamed = {"grad_norm": "q_grad_norm", "skipped": "q_skipped_frac"}
    metrics.update({renamed.get(k, k): v for k, v in q_metrics.items()})
    return policy, q, metrics


def validate(config) -> None:
    """Checks the ``etpo`` fields; names the bad key, its value and what is allowed."""
    e = config.etpo
    checks = [
        ("rollout.history", config.rollout.history, config.rollout.history == "concatenated",
         "ETPO bootstraps each turn from the next turn of the same row: use 'concatenated'"),
        ("aem.enabled", config.aem.enabled, not config.aem.enabled,
         "ETPO has no advantages for AEM to rescale: set it to False"),
        ("etpo.beta", e.beta, e.beta > 0, "must be > 0"),
        ("etpo.gamma", e.gamma, 0 <= e.gamma <= 1, "must be in [0, 1]"),
        ("etpo.tau", e.tau, 0 < e.tau <= 1, "must be in (0, 1]"),
        ("etpo.huber_delta", e.huber_delta, e.huber_delta > 0, "must be > 0"),
        ("etpo.q_learning_rate", e.q_learning_rate, e.q_learning_rate > 0, "must be > 0"),
    ]
    for key, value, ok, allowed in checks:
        if not ok:
            raise ValueError(f"config.{key}={value!r} is not allowed; {allowed}")


class EtpoTrainer(Trainer):
    """The shared loop with ETPO's Q network, target Q and frozen reference policy."""

    def __init__(self, config, workdir: str):
        validate(config)
        super().__init__(config, workdir)
        e = config.etpo
        # A copy: the policy's own buffers are donated to every update.
        self.reference = copy_tree(self.state.params)
        if e.q.from_policy:  # Q(c, .) starts as the policy's logits (same architecture)
            self.q_graphdef, q_params = self.graphdef, copy_tree(self.state.params)
        else:
            mc = side_model_config(self.model.config, e.q)
            with sharding.use_mesh(self.mesh):
                q_model = sharding.create_sharded(
                    lambda: models.Decoder(mc, rngs=nnx.Rngs(config.seed + 2)), self.mesh)
            self.q_graphdef, q_params, _ = nnx.split(q_model, nnx.Param, ...)
        self.q_optimizer = side_optimizer(config, e.q_learning_rate)
        q_state = new_train_state(q_params, self.q_optimizer, self.mesh)
        self.q = QNets(q_state, copy_tree(q_state.params))
        q_shardings = jax.tree.map(lambda x: x.sharding, self.q)
        self._etpo_update = jax.jit(functools.partial(
            etpo_update_step, policy_graphdef=self.graphdef, q_graphdef=self.q_graphdef,
            policy_optimizer=self.optimizer, q_optimizer=self.q_optimizer, beta=e.beta, gamma=e.gamma,
            tau=e.tau, delta=e.huber_delta, agg=config.loss.agg),
            donate_argnums=(0, 1), out_shardings=(self.state_shardings, q_shardings, None))
        # The shared minibatch loop (``_run_epochs``) calls ``self._update(state, mb)``.
        self._update = self._policy_and_q_update

    def _policy_and_q_update(self, state: TrainState, mb) -> tuple[TrainState, dict[str, jax.Array]]:
        state, self.q, metrics = self._etpo_update(state, self.q, self.reference, mb)
        return state, metrics

    def train_step(self, step: int) -> dict[str, Any]:
        c = self.config
        t0 = time.perf_counter()
        batch, records, roll = self.collect(step)
        t_roll = time.perf_counter() - t0
        t1 = time.perf_counter()
        arrays = {k: np.asarray(getattr(batch, k)) for k in BATCH_FIELDS}
        update_metrics = self._run_epochs(arrays, step)
        jax.block_until_ready((self.state, self.q))
        t_update = time.perf_counter() - t1
        out = self.episode_metrics(batch, records, roll, t_roll=t_roll, t_update=t_update,
                                   train_passes=c.learner.epochs)
        out.update(update_metrics)
        out["nonfinite_in_a_row"] = max(int(out["nonfinite_in_a_row"]), int(self.q.state.nonfinite))
        return out

    # Checkpoints: the policy, Q and target Q with their optimiser states.

    def checkpoint_state(self) -> Any:
        return {"policy": self.state, "q": self.q.state, "q_target": self.q.target}

    def load_checkpoint(self, state: Any, host: Any) -> None:
        del host
        self.state, self.q = state["policy"], QNets(state["q"], state["q_target"])
