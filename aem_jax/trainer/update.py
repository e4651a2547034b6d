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
    microbatch_size: int = 0       # rows per gradient-accumulation micro-batch (0 = the whole minibatch)

    @classmethod
    def from_config(cls, config, **extra) -> "LossSettings":
        """``config.loss`` whole, ``learner.microbatch_size``, then ``extra``."""
        extra.setdefault("microbatch_size", config.learner.get("microbatch_size", 0))
        return cls(**config.loss.to_dict(), **extra)


def opt_state_shardings(optimizer: optax.GradientTransformation, trainable, mesh):
    """Shardings of ``optimizer.init(trainable)``: per-parameter leaves (Adam's
    moments) as their parameter, the rest (step counts) replicated.

    ``jax.jit(optimizer.init)`` alone replicates the moments on every device
    (its outputs depend on no input value, so nothing carries the parameters'
    shardings over): for Qwen3-32B that is 262 GB per chip instead of
    262 GB / fsdp.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree.map(
        lambda x: x.sharding if isinstance(getattr(x, "sharding", None), NamedSharding) else replicated,
        trainable)
    abstract = jax.eval_shape(optimizer.init, trainable)
    return optax.tree_map_params(optimizer, lambda _, s: s, abstract, shardings,
                                 transform_non_params=lambda _: replicated)


def new_train_state(params, optimizer: optax.GradientTransformation, mesh, extra=None) -> TrainState:
    """A TrainState over ``params`` (+ ``extra``) placed on ``mesh`` (so its update compiles once)."""
    extra = {} if extra is None else extra
    trainable = (params, extra)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_state_shardings(optimizer, trainable, mesh))(trainable)
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


def loss_denominators(mb: PGBatch, settings: LossSettings) -> dict[str, jax.Array]:
    """The denominators of every term of :func:`pg_loss` over the rows of ``mb``.

    Computed once over a whole minibatch and passed to the loss of each of
    its micro-batches, so that the micro-batch losses (and gradients) add up
    to the minibatch's exactly (``objectives.policy``'s module docstring):

      policy   ``loss_denominator(mask, agg)`` (token-mean: agent tokens;
               seq-mean-*: rows with an agent token; -sum-norm: those x T),
               or for GSPO the number of responses
      entropy  the same over the tokens the bonus covers (``entropy_mask``)
      tokens   agent tokens (the value loss, and the token-mean diagnostics)
      responses  responses (GSPO's diagnostics)
    """
    b = mb.batch
    mask = b.loss_mask
    ids = jnp.where(mask > 0, b.turn_ids, -1)
    responses = jnp.sum((obj.turn_count(ids, num_turns=settings.num_turns) > 0).astype(jnp.float32))
    agg = obj.loss_denominator(mask, agg=settings.agg)
    return {
        "policy": responses if settings.kind == "gspo" else agg,
        "agg": agg,
        "entropy": obj.loss_denominator(_entropy_mask(mb, settings), agg=settings.agg),
        "tokens": jnp.sum(mask.astype(jnp.float32)),
        "responses": responses,
    }


def _entropy_mask(mb: PGBatch, settings: LossSettings):
    # "nonzero_advantage": no bonus where the advantage is 0 (a group whose
    # rollouts all got the same return), so once every group succeeds the
    # bonus is not the only gradient left (docs/results.md: this alone did
    # not stop the default job's late-training dips).
    mask = mb.batch.loss_mask
    return mask if settings.entropy_mask == "all" else mask * (mb.advantages != 0)


def _share(count, total):
    """count / total (0 when total is 0): the weight of a micro-batch's mean in the minibatch's mean."""
    return count / jnp.maximum(total, 1.0)


def pg_loss(trainable, graphdef, mb: PGBatch, settings: LossSettings, denominators=None):
    """Policy-gradient loss (+ entropy bonus, KL to reference, value loss).

    ``denominators`` (:func:`loss_denominators` of the minibatch ``mb`` is a
    micro-batch of) normalise every term by the whole minibatch's counts, and
    the diagnostics (clip fraction, ratio, approximate KL, entropy) come out
    weighted by this micro-batch's share of its tokens (responses for GSPO),
    so summing the micro-batches' losses, gradients and metrics gives the
    minibatch's. ``None``: ``mb`` is the whole minibatch.
    """
    params, extra = trainable
    b = mb.batch
    den = loss_denominators(mb, settings) if denominators is None else denominators
    logp, ent, hidden = shifted_logp_entropy(graphdef, params, b.tokens, b.attention_mask,
                                             chunk_size=settings.chunk_size)
    mask = b.loss_mask
    tokens = jnp.sum(mask.astype(jnp.float32))
    token_share = _share(tokens, den["tokens"])
    if settings.kind == "gspo":
        loss, aux = obj.gspo_policy_loss(
            logp, b.old_logp, mb.advantages, mask, b.turn_ids, num_turns=settings.num_turns,
            clip_low=settings.clip_low, clip_high=settings.clip_high, denominator=den["policy"])
        ids = jnp.where(mask > 0, b.turn_ids, -1)
        responses = jnp.sum((obj.turn_count(ids, num_turns=settings.num_turns) > 0).astype(jnp.float32))
        ratio_share = _share(responses, den["responses"])
    else:
        loss, aux = obj.ppo_policy_loss(
            logp, b.old_logp, mb.advantages, mask, clip_low=settings.clip_low,
            clip_high=settings.clip_high, dual_clip=settings.dual_clip or None, agg=settings.agg,
            denominator=den["policy"])
        ratio_share = token_share
    metrics = {"policy_loss": loss, "clip_frac": aux["clip_frac"] * ratio_share,
               "ratio_mean": aux["ratio_mean"] * ratio_share,
               "approx_kl": aux.get("approx_kl", jnp.zeros(())) * token_share,
               "token_entropy_new": masked_mean(ent, mask) * token_share}
    total = loss
    if settings.entropy_coef:
        bonus, _ = obj.entropy_bonus(ent, _entropy_mask(mb, settings), coef=settings.entropy_coef,
                                     agg=settings.agg, denominator=den["entropy"])
        total = total + bonus
    if settings.kl_coef:
        kl = obj.kl_penalty(logp, b.ref_logp, kind=settings.kl_kind)
        kl_loss, _, _ = obj.aggregate(kl, mask, agg=settings.agg, denominator=den["agg"])
        total = total + settings.kl_coef * kl_loss
        metrics["kl_ref"] = kl_loss
    if settings.value_coef:
        values = token_values(extra, hidden)
        v_loss, _, _ = obj.aggregate(0.5 * (values - mb.returns) ** 2, mask, agg="token-mean",
                                     denominator=den["tokens"])
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


def apply_gradients(state: TrainState, grads, loss, optimizer: optax.GradientTransformation, metrics,
                    scale: jax.Array | float = 1.0):
    """One optimiser step; skipped (and counted) when the loss, the gradient or
    the updated parameters are not finite, so non-finite values never reach
    the parameters or a checkpoint. ``scale`` multiplies the optimiser's
    update (a learning-rate factor decided at run time, e.g. the success gate)."""
    grad_norm = optax.tree.norm(grads)
    trainable = (state.params, state.extra)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    updates = jax.tree.map(lambda u: u * jnp.asarray(scale, u.dtype), updates)
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


def pg_update_step(state: TrainState, mb: PGBatch, scale: jax.Array | float = 1.0, *, graphdef, optimizer,
                   settings: LossSettings):
    """Loss, gradient and optimiser step on one minibatch (pure; jit it);
    ``scale`` multiplies the optimiser's update (``apply_gradients``).

    With ``settings.microbatch_size`` = m < B the gradient is accumulated over
    B / m micro-batches (:func:`accumulate_gradients`), so the activations of
    only m rows are live at a time; the update is the same as the whole
    minibatch's (up to float rounding).
    """
    trainable = (state.params, state.extra)
    B = mb.advantages.shape[0]
    m = settings.microbatch_size
    if m and m < B:
        loss, metrics, grads = accumulate_gradients(trainable, graphdef, mb, settings)
    else:
        grad_fn = jax.value_and_grad(pg_loss, has_aux=True)
        (loss, metrics), grads = grad_fn(trainable, graphdef, mb, settings)
    return apply_gradients(state, grads, loss, optimizer, metrics, scale)


def split_microbatches(tree, num: int):
    """[B, ...] leaves -> [num, B / num, ...]; micro-batch j holds rows j, j + num, j + 2 num, ...

    Strided, not contiguous: with B split over the devices of the batch axes
    in contiguous blocks (and B / num divisible by their count), the reshape
    [B] -> [B / num, num] keeps every device's rows on it, so each
    micro-batch is spread over all devices and splitting moves no data.
    """
    def one(x):
        B = x.shape[0]
        if B % num:
            raise ValueError(f"cannot split {B} rows into {num} equal micro-batches")
        y = jnp.swapaxes(x.reshape(B // num, num, *x.shape[1:]), 0, 1)
        return sharding.constrain(y, (None, "batch") + (None,) * (x.ndim - 1))

    return jax.tree.map(one, tree)


def accumulate_gradients(trainable, graphdef, mb: PGBatch, settings: LossSettings):
    """(loss, metrics, gradient) of the minibatch ``mb``, summed over its micro-batches.

    Every micro-batch's loss is divided by the whole minibatch's
    denominators (:func:`loss_denominators`), so

      L = sum_j L_j,   grad L = sum_j grad L_j

    exactly, for every aggregation (token-mean, seq-mean-token-sum,
    seq-mean-token-mean, seq-mean-token-sum-norm, GSPO's per response) and
    the value loss, however unevenly the agent tokens fall. A
    ``jax.lax.scan`` over the micro-batches keeps one micro-batch's
    activations alive at a time (the gradient accumulator has the
    parameters' shape and sharding).
    """
    B, m = mb.advantages.shape[0], settings.microbatch_size
    if B % m:
        raise ValueError(f"learner.microbatch_size={m} does not divide the minibatch's {B} rows")
    den = loss_denominators(mb, settings)
    micro = split_microbatches(mb, B // m)
    grad_fn = jax.value_and_grad(pg_loss, has_aux=True)

    def loss_and_grads(one):
        (_, metrics), grads = grad_fn(trainable, graphdef, one, settings, den)
        return metrics, jax.tree.map(lambda g: g.astype(jnp.float32), grads)

    def body(carry, one):
        return jax.tree.map(jnp.add, carry, loss_and_grads(one)), None

    # float32 accumulators (exact sums even for bfloat16 parameters), the
    # gradient's shapes: zeros from the abstract value of one micro-batch.
    shapes = jax.eval_shape(loss_and_grads, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (metrics, grads), _ = jax.lax.scan(body, zeros, micro)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
    return metrics["loss"], metrics, grads


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
