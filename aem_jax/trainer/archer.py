"""ArCHer (Zhou et al. 2024, arXiv 2402.19446): utterance critic + token actor.

One iteration (``ArcherTrainer.train_step``):
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
   updates with the token-level REINFORCE loss on the on-policy batch's
   utterance advantages ``A = min(Q_1,Q_2)(s,a) - min(V_1,V_2)(s)`` (online
   critic), rescaled by AEM's alpha when ``aem.enabled`` (through
   ``compute_advantages``, as for the policy-gradient family).

The critic is a separate small decoder trunk (``archer.critic``) with four MLP
heads: V_k(s) reads the hidden state just before a turn's first agent token
(everything the agent saw), Q_k(s,a) the one at the turn's last agent token
(the trunk is causal). Turn k's next state s' is the state before turn k+1; a
turn with no next turn is terminal (d = 1): the environment ended the episode,
or it was truncated and nothing follows it.
"""
from __future__ import annotations

import functools
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from aem_jax import models
from aem_jax import objectives as obj
from aem_jax.trainer import algorithms, setup, sharding
from aem_jax.trainer.advantages import compute_advantages
from aem_jax.trainer.loop import Trainer
from aem_jax.trainer.update import TrainState, apply_gradients, place_state, shifted_logp_entropy

# The registry entry lives in ``algorithms.ALGORITHMS`` (the single list);
# this module is its runner.
ALGORITHM = algorithms.get("archer")

# TurnBatch fields the replay buffer keeps, in compact storage dtypes.
REPLAY_FIELDS: dict[str, Any] = {
    "tokens": np.int32, "attention_mask": np.int8, "loss_mask": np.int8, "turn_ids": np.int32,
    "turn_rewards": np.float32, "turn_valid": np.bool_, "done": np.bool_,
}


# Side networks shared with ETPO ---------------------------------------------


def side_model_config(policy_config: models.ModelConfig, fields) -> models.ModelConfig:
    """The policy's architecture family and vocabulary with the sizes in ``fields``."""
    return policy_config.replace(
        hidden_size=fields.hidden_size, intermediate_size=fields.intermediate_size,
        num_layers=fields.num_layers, num_heads=fields.num_heads, num_kv_heads=fields.num_kv_heads,
        head_dim=fields.head_dim, tie_embeddings=True, rope_scaling=None)


def side_optimizer(config, learning_rate: float):
    """``config.optim``'s optimiser (warm-up, clipping, AdamW) with another learning rate."""
    optim = ml_collections.ConfigDict(config.optim.to_dict())
    optim.learning_rate = learning_rate
    return setup.optimizer(types.SimpleNamespace(optim=optim))


def new_train_state(params, optimizer, mesh) -> TrainState:
    """A TrainState over ``params`` placed on ``mesh`` (so its update compiles once)."""
    opt_state = jax.jit(optimizer.init)((params, {}))
    return place_state(TrainState(step=jnp.zeros((), jnp.int32), params=params, extra={}, opt_state=opt_state,
                                  nonfinite=jnp.zeros((), jnp.int32)), mesh)


def polyak(target, online, tau: float):
    """``(1 - tau) * target + tau * online`` leaf by leaf (target-network update)."""
    return jax.tree.map(lambda t, o: ((1.0 - tau) * t + tau * o).astype(t.dtype), target, online)


def copy_tree(tree):
    """A copy with fresh buffers (safe to keep while the original is donated)."""
    return jax.tree.map(jnp.copy, tree)


# The critic -------------------------------------------------------------------


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


def actor_update_step(state: TrainState, mb, *, graphdef, optimizer, chunk_size: int, num_turns: int):
    """One actor step on ``objectives.archer_actor_loss`` (pure; jit it)."""

    def loss_fn(trainable):
        logp, ent, _ = shifted_logp_entropy(graphdef, trainable[0], mb["tokens"], mb["attention_mask"],
                                            chunk_size=chunk_size)
        loss, aux = obj.archer_actor_loss(logp, mb["advantages"], mb["turn_ids"], mb["loss_mask"],
                                          num_turns=num_turns)
        mask = mb["loss_mask"]
        return loss, {"actor_loss": loss, "actor_advantage_mean": aux["advantage_mean"],
                      "token_entropy_new": jnp.sum(ent * mask) / jnp.maximum(jnp.sum(mask), 1.0)}

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)((state.params, state.extra))
    return apply_gradients(state, grads, loss, optimizer, metrics)


def actor_advantages(critic_params, batch, key, *, graphdef, settings):
    """Utterance advantages [B,K] of an on-policy batch (AEM-modulated when on).

    ``A = min(Q_1,Q_2) - min(V_1,V_2)`` from the online critic enters
    ``compute_advantages`` as token advantages, so AEM's alpha and its
    diagnostics come from the same code as for the policy-gradient family.
    """
    K = batch.turn_rewards.shape[1]
    mb = {"tokens": batch.tokens, "attention_mask": batch.attention_mask, "loss_mask": batch.loss_mask,
          "turn_ids": batch.turn_ids, "turn_valid": batch.turn_valid}
    vals = critic_values(graphdef, critic_params, mb, num_turns=K)
    adv_BK = jnp.where(vals["valid"], obj.archer_advantages(vals["q1"], vals["q2"], vals["v1"], vals["v2"]), 0.0)
    ids = jnp.where(batch.loss_mask > 0, batch.turn_ids, -1)
    _, info, arrays = compute_advantages(batch, settings, key, token_advantages_BT=obj.turn_broadcast(adv_BK, ids))
    out_BK = obj.from_episode_layout(arrays["adv_EK"], batch.episode_ids, batch.turn_offset, num_turns=K)
    info = dict(info, archer_advantage_mean=jnp.sum(adv_BK) / jnp.maximum(jnp.sum(vals["valid"]), 1))
    return jnp.where(vals["valid"], out_BK, 0.0), info


# Replay buffer ----------------------------------------------------------------


class ReplayBuffer:
    """FIFO buffer of whole episodes: rows of concatenated TurnBatches, host numpy.

    Every process holds the same buffer (rollouts are global), so sampling
    with the same seed picks the same rows everywhere.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity={capacity}; the replay buffer needs capacity >= 1 episode")
        self.capacity = capacity
        self.arrays: dict[str, np.ndarray] | None = None
        self.size = 0
        self.cursor = 0  # next slot to write

    def add(self, batch) -> None:
        """Appends the rows of ``batch`` (a TurnBatch), dropping the oldest when full."""
        rows = {k: np.asarray(getattr(batch, k)).astype(dt) for k, dt in REPLAY_FIELDS.items()}
        n = rows["tokens"].shape[0]
        if self.arrays is None:
            self.arrays = {k: np.zeros((self.capacity,) + v.shape[1:], v.dtype) for k, v in rows.items()}
        for k, v in rows.items():
            if v.shape[1:] != self.arrays[k].shape[1:]:
                raise ValueError(f"batch field {k!r} has row shape {v.shape[1:]}; the buffer holds "
                                 f"{self.arrays[k].shape[1:]} (T and K must stay fixed during a run)")
        keep = min(n, self.capacity)
        slots = (self.cursor + np.arange(keep)) % self.capacity
        for k, v in rows.items():
            self.arrays[k][slots] = v[n - keep:]
        self.cursor = int((self.cursor + keep) % self.capacity)
        self.size = min(self.size + keep, self.capacity)

    def sample(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """``n`` rows drawn uniformly with replacement (a fixed shape for jit)."""
        if not self.size:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = rng.integers(0, self.size, n)
        return {k: v[idx] for k, v in self.arrays.items()}

    def state_dict(self) -> dict[str, Any]:
        """The stored episodes, oldest first (what a checkpoint saves)."""
        if self.arrays is None:
            return {"arrays": {}}
        order = (self.cursor + np.arange(self.size)) % self.capacity if self.size == self.capacity \
            else np.arange(self.size)
        return {"arrays": {k: v[order] for k, v in self.arrays.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        arrays = state.get("arrays") or {}
        size = len(next(iter(arrays.values()))) if arrays else 0
        if size > self.capacity:
            raise ValueError(f"checkpointed replay buffer holds {size} episodes; config.archer.buffer_episodes="
                             f"{self.capacity} is smaller: raise it to at least {size}")
        self.arrays, self.size, self.cursor = None, size, size % self.capacity
        if size:
            self.arrays = {k: np.zeros((self.capacity,) + np.shape(v)[1:], REPLAY_FIELDS[k])
                           for k, v in arrays.items()}
            for k, v in arrays.items():
                self.arrays[k][:size] = v


# The trainer -------------------------------------------------------------------


def validate(config) -> None:
    """Checks the ``archer`` fields; names the bad key, its value and what is allowed."""
    a = config.archer
    checks = [("rollout.history", config.rollout.history, config.rollout.history == "concatenated",
               "ArCHer replays whole episodes: use 'concatenated'"),
              ("rollout.seq_bucket", config.rollout.seq_bucket, config.rollout.seq_bucket == 0,
               "ArCHer's replay buffer stores fixed-length rows: use 0"),
              ("archer.tau", a.tau, 0 < a.tau <= 1, "must be in (0, 1]"),
              ("archer.gamma", a.gamma, 0 <= a.gamma <= 1, "must be in [0, 1]"),
              ("archer.actor_warmup", a.actor_warmup, a.actor_warmup >= 0, "must be >= 0"),
              ("archer.critic_learning_rate", a.critic_learning_rate, a.critic_learning_rate > 0, "must be > 0")]
    checks += [(f"archer.{k}", a[k], a[k] >= 1, "must be >= 1")
               for k in ("critic_steps", "actor_steps", "buffer_episodes", "critic_minibatch_size")]
    for key, value, ok, allowed in checks:
        if not ok:
            raise ValueError(f"config.{key}={value!r} is not allowed; {allowed}")


class ArcherTrainer(Trainer):
    """The shared loop with ArCHer's critic, target critic, replay buffer and actor.

    Memory: the critic and its target are two extra networks of the
    ``archer.critic`` sizes (of the policy's size with ``from_policy``), plus
    the critic's optimiser state; the replay buffer lives in host memory,
    about ``buffer_episodes * T * 10`` bytes.
    """

    def __init__(self, config, workdir: str):
        validate(config)
        super().__init__(config, workdir)
        a = config.archer
        with sharding.use_mesh(self.mesh):
            # from_policy: the trunk is a copy of the (pretrained) policy
            mc = self.model.config if a.critic.from_policy else side_model_config(self.model.config, a.critic)
            critic = sharding.create_sharded(
                lambda: UtteranceCritic(mc, head_width=a.critic.head_width, rngs=nnx.Rngs(config.seed + 1)),
                self.mesh)
            if a.critic.from_policy:
                nnx.update(critic.trunk, copy_tree(self.state.params))
        self.critic_graphdef, critic_params, _ = nnx.split(critic, nnx.Param, ...)
        self.critic_optimizer = side_optimizer(config, a.critic_learning_rate)
        self.critic_state = new_train_state(critic_params, self.critic_optimizer, self.mesh)
        self.target_params = copy_tree(self.critic_state.params)
        self.buffer = ReplayBuffer(a.buffer_episodes)
        self._build_archer_steps()

    def _build_archer_steps(self):
        c, a, K = self.config, self.config.archer, self.rollout_config.max_turns
        critic_shardings = jax.tree.map(lambda x: x.sharding, self.critic_state)
        target_shardings = jax.tree.map(lambda x: x.sharding, self.target_params)
        self._critic_update = jax.jit(functools.partial(
            critic_update_step, graphdef=self.critic_graphdef, optimizer=self.critic_optimizer,
            num_turns=K, gamma=a.gamma, tau=a.tau),
            donate_argnums=(0, 1), out_shardings=(critic_shardings, target_shardings, None))
        self._actor_update = jax.jit(functools.partial(
            actor_update_step, graphdef=self.graphdef, optimizer=self.optimizer,
            chunk_size=c.loss.chunk_size, num_turns=K),
            donate_argnums=(0,), out_shardings=(self.state_shardings, None))
        self._actor_advantages = jax.jit(functools.partial(
            actor_advantages, graphdef=self.critic_graphdef, settings=self.adv_settings))

    def train_step(self, step: int) -> dict[str, Any]:
        a = self.config.archer
        t0 = time.perf_counter()
        batch, records, roll = self.collect(step)
        self.buffer.add(batch)
        t_roll = time.perf_counter() - t0
        t1 = time.perf_counter()
        critic_metrics = self._critic_phase(batch, step)
        t_critic = time.perf_counter() - t1
        actor_metrics: dict[str, float] = {}
        if step >= a.actor_warmup:
            actor_metrics = self._actor_phase(batch, step)
        jax.block_until_ready((self.state, self.critic_state))
        t_update = time.perf_counter() - t1
        # Rows read by the updates, in units of the batch (for train_tokens_per_s).
        rows = 2 * a.critic_steps * a.critic_minibatch_size
        if actor_metrics:
            rows += a.actor_steps * min(self.config.learner.minibatch_size, batch.tokens.shape[0])
        out = self.episode_metrics(batch, records, roll, t_roll=t_roll, t_update=t_update,
                                   train_passes=rows / batch.tokens.shape[0])
        out.update(critic_metrics)
        out.update(actor_metrics)
        out.update({"buffer_size": float(self.buffer.size), "actor_updated": float(bool(actor_metrics)),
                    "time_critic_s": t_critic, "time_actor_s": t_update - t_critic,
                    "nonfinite_in_a_row": int(max(int(self.state.nonfinite), int(self.critic_state.nonfinite)))})
        return out

    def _critic_phase(self, batch, step: int) -> dict[str, float]:
        """``critic_steps`` critic updates: Q on replayed episodes, V on the fresh batch."""
        c, a = self.config, self.config.archer
        rng = np.random.default_rng([c.seed, step, 1])
        fresh_rows = {k: np.asarray(getattr(batch, k)).astype(dt) for k, dt in REPLAY_FIELDS.items()}
        B, n = fresh_rows["tokens"].shape[0], a.critic_minibatch_size
        history = []
        for _ in range(a.critic_steps):
            replay = sharding.put_batch(self.buffer.sample(rng, n), self.mesh)
            rows = rng.choice(B, n, replace=B < n)
            fresh = sharding.put_batch({k: v[rows] for k, v in fresh_rows.items()}, self.mesh)
            self.critic_state, self.target_params, m = self._critic_update(
                self.critic_state, self.target_params, replay, fresh)
            history.append(m)
        return _mean_metrics(history, prefix="critic_")

    def _actor_phase(self, batch, step: int) -> dict[str, float]:
        """``actor_steps`` REINFORCE steps on the critic's (AEM-scaled) advantages."""
        c, a = self.config, self.config.archer
        dev = sharding.put_batch(batch, self.mesh)
        key = jax.random.fold_in(jax.random.key(c.seed + 1), step)
        adv_BK, info = self._actor_advantages(self.critic_state.params, dev, key)
        host = {k: np.asarray(getattr(batch, k)) for k in ("tokens", "attention_mask", "loss_mask", "turn_ids")}
        host["advantages"] = np.asarray(adv_BK)
        B = host["tokens"].shape[0]
        mb = min(c.learner.minibatch_size, B)
        rng = np.random.default_rng([c.seed, step, 2])
        history = []
        for _ in range(a.actor_steps):
            rows = rng.permutation(B)[:mb]
            self.state, m = self._actor_update(self.state, sharding.put_batch(
                {k: v[rows] for k, v in host.items()}, self.mesh))
            history.append(m)
        out = _mean_metrics(history, prefix="actor_")
        out.update({k: float(v) for k, v in info.items()})
        return out

    # Checkpoints: policy, critic and target critic on device; the buffer on the host.

    def checkpoint_state(self) -> Any:
        return {"policy": self.state, "critic": self.critic_state, "target": self.target_params}

    def checkpoint_host(self) -> Any:
        return {"replay": self.buffer.state_dict()}

    def load_checkpoint(self, state: Any, host: Any) -> None:
        self.state, self.critic_state, self.target_params = state["policy"], state["critic"], state["target"]
        if host is not None:
            self.buffer.load_state_dict(host["replay"])


def _mean_metrics(history: list[dict[str, jax.Array]], *, prefix: str) -> dict[str, float]:
    """Means over the steps of a phase; the optimiser's own keys get ``prefix``."""
    if not history:
        return {}
    out = {k: float(np.mean([np.asarray(m[k]) for m in history])) for k in history[0]}
    for k in ("grad_norm", "skipped"):
        out[prefix + k] = out.pop(k)
    out[prefix + "skipped"] *= len(history)  # a count, not a mean
    return out
