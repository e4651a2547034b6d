"""Optimiser steps shared by every algorithm, and the policy-gradient loss.

``pg_update_step`` is a module-level pure function of (state, minibatch) that
tests can call directly; ``pg.init`` jits it once with donated state.
Log-probs and entropies come from hidden states through the chunked
objective, so no [B,T,V] logits are materialised. Minibatches are
``TurnBatch`` rows (plus the advantages and returns computed for them),
selected by :func:`minibatches`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from aem_jax import models, sharding
from aem_jax import objectives as obj
from aem_jax.batch import TurnBatch


@flax.struct.dataclass
class TrainState:
    """Everything one optimiser updates, as one pytree.

    Attributes:
      step: number of optimiser steps taken.
      params: the network's trainable nnx.State.
      extra: extra trainable arrays (e.g. PPO's value head); {} if none.
      opt_state: optax state over (params, extra).
      nonfinite: consecutive skipped (non-finite) updates.
    """

    step: jax.Array
    params: Any
    extra: Any
    opt_state: Any
    nonfinite: jax.Array


@flax.struct.dataclass
class PGBatch:
    """A policy-gradient minibatch: rollout rows and what was computed for them."""

    batch: TurnBatch
    advantages: jax.Array      # [B,T] per-token advantages
    returns: jax.Array         # [B,T] value targets (PPO; zeros otherwise)


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """Static loss settings (hashable, closed over by the jitted step).

    The fields after ``kind`` carry the names of ``config.loss``'s keys, so
    :meth:`from_config` copies that block whole.
    """

    kind: str = "ppo"              # "ppo" (token clip) | "gspo" (sequence clip)
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float = 0.0         # 0 = off
    agg: str = "token-mean"
    entropy_coef: float = 0.0
    entropy_mask: str = "all"      # "all" | "nonzero_advantage": tokens the entropy bonus covers
    kl_coef: float = 0.0
    kl_kind: str = "low_var_kl"
    chunk_size: int = 1024
    value_coef: float = 0.0        # > 0 trains the value head (PPO)
    num_turns: int = 1

    @classmethod
    def from_config(cls, config, **extra) -> "LossSettings":
        return cls(**config.loss.to_dict(), **extra)


def new_train_state(params, optimizer: optax.GradientTransformation, mesh, extra=None) -> TrainState:
    """A TrainState over ``params`` (+ ``extra``) placed on ``mesh`` (so its update compiles once)."""
    extra = {} if extra is None else extra
    opt_state = jax.jit(optimizer.init)((params, extra))
    return place_state(TrainState(step=jnp.zeros((), jnp.int32), params=params, extra=extra,
                                  opt_state=opt_state, nonfinite=jnp.zeros((), jnp.int32)), mesh)


def place_state(state, mesh):
    """Gives every leaf a mesh sharding: its own if the rules split it, else replicated.

    Jitted updates return their outputs with these same shardings, so they
    compile once however many steps run.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: jax.device_put(x, x.sharding if isinstance(x.sharding, NamedSharding) else replicated),
        state)


def shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def copy_tree(tree):
    """A copy with fresh buffers (safe to keep while the original is donated)."""
    return jax.tree.map(jnp.copy, tree)


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


def token_values(extra, hidden_BTD):
    """V(s_t) for every token t: the value head on the hidden state *before* t.

    The hidden state at t has already read token t, so a head there would
    estimate Q(s, a_t) and, once fitted, leave GAE advantages averaging zero
    given the action. Reading position t-1 (the state the token was sampled
    in) gives the baseline V(s). Position 0 gets 0 (never an agent token).
    """
    v_BT = jnp.einsum("btd,d->bt", hidden_BTD[:, :-1].astype(jnp.float32), extra["value_w"]) + extra["value_b"]
    return jnp.pad(v_BT, ((0, 0), (1, 0)))


def init_value_head(hidden_size: int) -> dict[str, jax.Array]:
    return {"value_w": jnp.zeros((hidden_size,), jnp.float32), "value_b": jnp.zeros((), jnp.float32)}


def masked_mean(x_BT, mask_BT):
    return jnp.sum(x_BT * mask_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)


def pg_loss(trainable, graphdef, mb: PGBatch, settings: LossSettings):
    """Policy-gradient loss (+ entropy bonus, KL to reference, value loss)."""
    params, extra = trainable
    b = mb.batch
    logp, ent, hidden = shifted_logp_entropy(graphdef, params, b.tokens, b.attention_mask,
                                             chunk_size=settings.chunk_size)
    mask = b.loss_mask
    if settings.kind == "gspo":
        loss, aux = obj.gspo_policy_loss(
            logp, b.old_logp, mb.advantages, mask, b.turn_ids, num_turns=settings.num_turns,
            clip_low=settings.clip_low, clip_high=settings.clip_high)
    else:
        loss, aux = obj.ppo_policy_loss(
            logp, b.old_logp, mb.advantages, mask, clip_low=settings.clip_low,
            clip_high=settings.clip_high, dual_clip=settings.dual_clip or None, agg=settings.agg)
    metrics = {"policy_loss": loss, "clip_frac": aux["clip_frac"], "ratio_mean": aux["ratio_mean"],
               "approx_kl": aux.get("approx_kl", jnp.zeros(())), "token_entropy_new": masked_mean(ent, mask)}
    total = loss
    if settings.entropy_coef:
        # "nonzero_advantage": no bonus where the advantage is 0 (a group whose
        # rollouts all got the same return), so once every group succeeds the
        # bonus is not the only gradient left (docs/results.md: this alone did
        # not stop the default job's late-training dips).
        ent_mask = mask if settings.entropy_mask == "all" else mask * (mb.advantages != 0)
        bonus, _ = obj.entropy_bonus(ent, ent_mask, coef=settings.entropy_coef, agg=settings.agg)
        total = total + bonus
    if settings.kl_coef:
        kl = obj.kl_penalty(logp, b.ref_logp, kind=settings.kl_kind)
        kl_loss, _, _ = obj.aggregate(kl, mask, agg=settings.agg)
        total = total + settings.kl_coef * kl_loss
        metrics["kl_ref"] = kl_loss
    if settings.value_coef:
        values = token_values(extra, hidden)
        v_loss, _, _ = obj.aggregate(0.5 * (values - mb.returns) ** 2, mask, agg="token-mean")
        total = total + settings.value_coef * v_loss
        metrics["value_loss"] = v_loss
    metrics["loss"] = total
    return total, metrics


def _select(ok, new, old):
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def all_finite(tree) -> jax.Array:
    """True when every floating leaf of ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def apply_gradients(state: TrainState, grads, loss, optimizer: optax.GradientTransformation, metrics):
    """One optimiser step; skipped (and counted) when the loss, the gradient or
    the updated parameters are not finite, so non-finite values never reach
    the parameters or a checkpoint."""
    grad_norm = optax.tree.norm(grads)
    trainable = (state.params, state.extra)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    new_params, new_extra = optax.apply_updates(trainable, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite((new_params, new_extra))
    new_state = TrainState(
        step=state.step + ok.astype(jnp.int32),
        params=_select(ok, new_params, state.params),
        extra=_select(ok, new_extra, state.extra),
        opt_state=_select(ok, opt_state, state.opt_state),
        nonfinite=jnp.where(ok, 0, state.nonfinite + 1),
    )
    return new_state, dict(metrics, grad_norm=grad_norm, skipped=(~ok).astype(jnp.float32))


def pg_update_step(state: TrainState, mb: PGBatch, *, graphdef, optimizer, settings: LossSettings):
    """Loss, gradient and optimiser step on one minibatch (pure; jit it)."""
    grad_fn = jax.value_and_grad(pg_loss, has_aux=True)
    (loss, metrics), grads = grad_fn((state.params, state.extra), graphdef, mb, settings)
    return apply_gradients(state, grads, loss, optimizer, metrics)


def forward_stats(params, extra, batch: TurnBatch, *, graphdef, chunk_size: int, with_values: bool):
    """Current-policy log-probs / entropies (and values) of a batch, no gradient."""
    logp, ent, hidden = shifted_logp_entropy(graphdef, params, batch.tokens, batch.attention_mask,
                                             chunk_size=chunk_size)
    out = {"logp": logp, "entropy": ent}
    if with_values:
        out["values"] = token_values(extra, hidden)
    return out


# Minibatches --------------------------------------------------------------


def to_host(x: Any) -> np.ndarray:
    """The global value of an array as numpy, on every process.

    Multi-host: batch arrays are split over the devices of all processes and
    no process can read the others' rows; every process holds the same
    global batch, so gathering gives each the same value.
    """
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def minibatches(tree, mesh, rng: np.random.Generator, *, size: int, epochs: int) -> Iterator[Any]:
    """``epochs`` shuffled passes over the rows of ``tree`` (a pytree of [B, ...]
    arrays, e.g. a PGBatch), ``size`` rows at a time, placed on ``mesh``.

    A remainder of fewer than ``size`` rows is left out of each pass (a new
    shape would recompile the step); the permutation changes every epoch.
    """
    host = jax.tree.map(to_host, tree)
    B = jax.tree.leaves(host)[0].shape[0]
    size = min(size, B)
    for _ in range(epochs):
        perm = rng.permutation(B)
        for start in range(0, B - size + 1, size):
            rows = perm[start:start + size]
            yield sharding.put_batch(jax.tree.map(lambda v: v[rows], host), mesh)


def mean_metrics(history: list[dict[str, jax.Array]], *, prefix: str = "") -> dict[str, float]:
    """Means over a phase's steps; the optimiser's own keys get ``prefix``;
    ``skipped`` becomes a count."""
    if not history:
        return {}
    out = {k: float(np.mean([np.asarray(m[k]) for m in history])) for k in history[0]}
    out["skipped"] *= len(history)
    for k in ("grad_norm", "skipped"):
        out[prefix + k] = out.pop(k)
    return out


def run_steps(step_fn: Callable, state, batches, **kwargs):
    """Applies a jitted ``step_fn(state, mb, **kwargs) -> (state, metrics)`` to each minibatch."""
    history = []
    for mb in batches:
        state, m = step_fn(state, mb, **kwargs)
        history.append(m)
    return state, history
