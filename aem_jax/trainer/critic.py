"""ArCHer's utterance-level critic: double Q and V heads on a decoder trunk.

V_k(s) reads the hidden state just before a turn's first agent token
(everything the agent saw), Q_k(s,a) the one at the turn's last agent token
(the trunk is causal). Turn k's next state s' is the state before turn k+1; a
turn with no next turn is terminal (d = 1): the environment ended the
episode, or it was truncated and nothing follows it.

  L_Q = sum_k mean (Q_k(s,a) - r - gamma (1 - d) Vbar_k(s'))^2   (replayed episodes)
  L_V = sum_k mean (V_k(s) - Qbar_k(s, a~pi(.|s)))^2             (the fresh on-policy batch)

(Zhou et al. 2024, arXiv 2402.19446.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from aem_jax import models
from aem_jax import objectives as obj
from aem_jax.trainer.targets import polyak
from aem_jax.trainer.update import TrainState, apply_gradients


class _Head(nnx.Module):
    """Scalar MLP head on hidden states; the output layer starts at zero (Q = V = 0)."""

    def __init__(self, hidden_size: int, width: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(hidden_size, width, rngs=rngs)
        self.out = nnx.Linear(width, 1, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.gelu(self.hidden(x.astype(jnp.float32))))[..., 0]


class UtteranceCritic(nnx.Module):
    """Decoder trunk with double Q and V heads (ArCHer's Q_1, Q_2, V_1, V_2)."""

    def __init__(self, config: models.ModelConfig, *, head_width: int, rngs: nnx.Rngs):
        self.trunk = models.Decoder(config, rngs=rngs)
        d = config.hidden_size
        self.q1, self.q2 = _Head(d, head_width, rngs=rngs), _Head(d, head_width, rngs=rngs)
        self.v1, self.v2 = _Head(d, head_width, rngs=rngs), _Head(d, head_width, rngs=rngs)


def turn_positions(turn_ids_BT, loss_mask_BT, *, num_turns: int):
    """(first, last, present) [B,K]: first / last agent-token index of each turn
    and whether the turn has any agent token."""
    ids_BT = jnp.where(loss_mask_BT > 0, turn_ids_BT, -1)
    T = ids_BT.shape[1]
    in_turn_BTK = ids_BT[:, :, None] == jnp.arange(num_turns)[None, None, :]
    t = jnp.arange(T)[None, :, None]
    first_BK = jnp.min(jnp.where(in_turn_BTK, t, T), axis=1)
    last_BK = jnp.max(jnp.where(in_turn_BTK, t, -1), axis=1)
    return first_BK, last_BK, last_BK >= 0


def critic_values(graphdef, params, mb, *, num_turns: int) -> dict[str, jax.Array]:
    """Q_k(s_j, a_j), V_k(s_j) of every turn j of every row, [B,K] each.

    V reads position ``first - 1`` (the last token of the state), Q position
    ``last`` (the last token of the utterance). ``valid`` marks turns that
    exist and have agent tokens after a non-empty state.
    """
    critic = nnx.merge(graphdef, params)
    hidden_BTD = models.hidden_states(critic.trunk, mb["tokens"], mb["attention_mask"])
    first_BK, last_BK, present_BK = turn_positions(mb["turn_ids"], mb["loss_mask"], num_turns=num_turns)
    T = hidden_BTD.shape[1]
    gather = lambda pos_BK: jnp.take_along_axis(  # noqa: E731
        hidden_BTD, jnp.clip(pos_BK, 0, T - 1)[:, :, None], axis=1)
    h_state, h_action = gather(first_BK - 1), gather(last_BK)
    valid_BK = mb["turn_valid"].astype(bool) & present_BK & (first_BK >= 1)
    return {"q1": critic.q1(h_action), "q2": critic.q2(h_action),
            "v1": critic.v1(h_state), "v2": critic.v2(h_state), "valid": valid_BK}


def _next_state(x_BK):
    """Value of turn k+1 in slot k (0 after the last slot)."""
    return jnp.pad(x_BK[:, 1:], ((0, 0), (0, 1)))


def critic_loss(params, target_params, replay, fresh, *, graphdef, num_turns: int, gamma: float):
    """ArCHer's ``L_Q`` on replayed episodes plus ``L_V`` on the fresh batch.

    Both sources go through one forward pass of each network (rows stacked).
    ``objectives.archer_critic_loss`` is then called once per source: with the
    V terms zeroed for the replay rows (Q loss only) and the Q terms zeroed
    for the fresh rows (V loss only: zero Q against a zero, terminal target).
    """
    n = replay["tokens"].shape[0]
    both = {k: jnp.concatenate([replay[k], fresh[k]]) for k in replay}
    vals = critic_values(graphdef, params, both, num_turns=num_turns)
    tgt = jax.lax.stop_gradient(critic_values(graphdef, target_params, both, num_turns=num_turns))
    flat_r = lambda x: x[:n].reshape(-1)  # noqa: E731
    flat_f = lambda x: x[n:].reshape(-1)  # noqa: E731
    valid = vals["valid"]
    terminal = both["done"].astype(bool) | ~_next_state(valid.astype(jnp.int32)).astype(bool)
    zeros = jnp.zeros(flat_r(valid).shape, jnp.float32)
    q_loss, q_aux = obj.archer_critic_loss(
        flat_r(vals["q1"]), flat_r(vals["q2"]), zeros, zeros, flat_r(_next_state(tgt["v1"])),
        flat_r(_next_state(tgt["v2"])), zeros, zeros, flat_r(both["turn_rewards"]), flat_r(terminal),
        gamma=gamma, weights=flat_r(valid))
    zeros = jnp.zeros(flat_f(valid).shape, jnp.float32)
    v_loss, v_aux = obj.archer_critic_loss(
        zeros, zeros, flat_f(vals["v1"]), flat_f(vals["v2"]), zeros, zeros, flat_f(tgt["q1"]),
        flat_f(tgt["q2"]), zeros, jnp.ones_like(zeros), gamma=gamma, weights=flat_f(valid))
    metrics = {"q_loss": q_loss, "v_loss": v_loss, "q_mean": q_aux["q_mean"], "v_mean": v_aux["v_mean"]}
    return q_loss + v_loss, metrics


def critic_update_step(state: TrainState, target_params, replay, fresh, *, graphdef, optimizer,
                       num_turns: int, gamma: float, tau: float):
    """One critic optimiser step, then the Polyak step of the target (pure; jit it)."""
    grad_fn = jax.value_and_grad(
        lambda trainable: critic_loss(trainable[0], target_params, replay, fresh, graphdef=graphdef,
                                      num_turns=num_turns, gamma=gamma), has_aux=True)
    (loss, metrics), grads = grad_fn((state.params, state.extra))
    state, metrics = apply_gradients(state, grads, loss, optimizer, metrics)
    return state, polyak(target_params, state.params, tau), metrics
