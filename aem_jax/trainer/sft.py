"""Supervised warm start (``algorithm="sft"``): behaviour cloning on expert transcripts.

Each training step the environment's scripted expert plays the step's tasks
(the task seeds the loop's rollout used) through the same rollout machinery
as the policy (``rollout.collect`` with a ``ScriptedPolicy``), so its
transcripts are tokenized exactly as the chat format renders the policy's
own, and the batch's ``loss_mask`` marks the assistant tokens. The policy
then minimises the mean negative log-likelihood of those tokens,

  L(theta) = - sum_{b,t} m_bt log pi_theta(x_bt | x_b,<t) / sum_{b,t} m_bt,

(m = loss_mask: the expert's action tokens and its end-of-turn token), in
``learner.epochs`` shuffled passes of AdamW steps over minibatches of
``learner.minibatch_size`` rows (``learner.microbatch_size`` accumulates
with the minibatch's denominator, so the gradient is the same).

Experts (duck-typed, first match): ``env.optimal_action()`` (the built-in
games); the SWE environment's gold patch applied through its tools
(``envs.swe.scripted.gold_actions``); TextWorld's walkthrough from the
current state (``info["policy_commands"]``, with
``env.kwargs.policy_commands=True``; with numbered commands the expert
answers with the command's number, as the policy acts).

Strength: ``total_steps`` (how long it imitates) and ``sft.noise``, the share
of demonstration actions replaced by a uniformly random valid action
(``env.valid_actions()``, or TextWorld's admissible commands). The episode
goes on from the noisy action, so demonstrations also show how the expert
recovers. Cloning a noisy expert gives a weaker, higher-entropy policy: an
imitator that copies the mixture exactly picks the expert's action with
probability 1 - noise + noise / |valid actions| per turn.

The loop's rollout batch (the policy's own play on the step's tasks) is not
trained on: it is the record of how far imitation has got (``success`` and
``token_entropy`` per step in metrics.jsonl). After the last step the update
evaluates the sampled policy on ``eval.num_tasks`` held-out tasks and logs
``heldout_success`` and the mean (and spread) of each response's mean token
entropy, ``heldout_response_entropy``: the two numbers that say what kind of
starting policy the run made. The policy itself leaves as the loop's
Hugging Face export (``export.enabled``, ``configs/sft.py``: WORKDIR/export/final),
which every RL config loads with ``--config.model.source=DIR``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from aem_jax.batch import TurnBatch
from aem_jax.envs import base as env_registry
from aem_jax.rollout import ChatFormat, ScriptedPolicy, TurnContext, collect
from aem_jax.trainer import distributed, rng, rollouts, setup
from aem_jax.trainer.context import Algorithm, RunContext
# Like the policy-gradient methods, SFT checkpoints only its TrainState (state.train).
from aem_jax.trainer.pg import checkpoint_tree, restore
from aem_jax.trainer.update import (
    TrainState, apply_gradients, copy_tree, mean_metrics, minibatches, new_train_state, shardings_of,
    shifted_logp_entropy, split_microbatches,
)
from aem_jax.trainer.validate import fail


# --- experts -----------------------------------------------------------------

def _numbered(env: Any, info: dict, command: str) -> str:
    """``command``, or its number when the environment lists numbered commands (as the policy acts)."""
    listed = info.get("admissible_commands") or []
    if getattr(env, "numbered_commands", False) and command in listed:
        return str(listed.index(command) + 1)
    return command


def expert_action(context: TurnContext) -> str:
    """The scripted expert's action in ``context`` (see the module docstring for the order)."""
    env, info = context.env, context.info
    if hasattr(env, "optimal_action"):
        return env.optimal_action()
    task = getattr(env, "task", None)
    if task is not None and hasattr(task, "patch"):
        from aem_jax.envs.swe import scripted  # only SWE runs need it

        gold = scripted.gold_actions(task)
        return gold[min(context.turn, len(gold) - 1)]
    commands = info.get("policy_commands")
    if commands:
        return _numbered(env, info, commands[0])
    raise ValueError(f"{type(env).__name__} has no scripted expert at turn {context.turn}: no "
                     "optimal_action(), no SWE task, and no policy_commands in info")


def random_action(context: TurnContext, generator: np.random.Generator) -> str:
    """A uniformly random valid action: ``env.valid_actions()`` or the admissible commands in ``info``."""
    env, info = context.env, context.info
    if hasattr(env, "valid_actions"):
        actions = list(env.valid_actions())
    else:
        actions = [_numbered(env, info, c) for c in info.get("admissible_commands") or []]
    if not actions:
        raise ValueError(f"{type(env).__name__} lists no valid actions at turn {context.turn} "
                         "(no valid_actions(), no admissible_commands in info); use sft.noise=0")
    return actions[int(generator.integers(len(actions)))]


class NoisyExpert:
    """``act(context)`` for a ``ScriptedPolicy``: the expert, or with probability
    ``noise`` a random valid action.

    The draw of episode e at turn k comes from ``default_rng([root, first_episode
    + e, k])``, so it depends on neither the other episodes of the batch nor the
    process that plays it. Counts ``actions`` and ``noisy`` (host-side, for metrics).
    """

    def __init__(self, noise: float, root: int, first_episode: int = 0):
        self.noise, self.root, self.first_episode = float(noise), int(root), int(first_episode)
        self.actions = self.noisy = 0

    def __call__(self, context: TurnContext) -> str:
        self.actions += 1
        if self.noise > 0:
            generator = np.random.default_rng([self.root, self.first_episode + context.episode, context.turn])
            if generator.random() < self.noise:
                self.noisy += 1
                return random_action(context, generator)
        return expert_action(context)


def demonstrations(ctx: RunContext, step: int):
    """(batch, records, metrics): the expert's episodes on the tasks of training step ``step``.

    Each process plays its share of the tasks (all of them on one process)
    and the global batch is assembled as the loop assembles rollouts.
    """
    c = ctx.config
    G = c.rollout.group_size
    share = distributed.task_share(c.rollout.num_tasks)
    multi = jax.process_count() > 1
    cfg = setup.rollout_config(c, num_tasks=len(share))
    if multi:  # rows are padded once, after assembly
        cfg = dataclasses.replace(cfg, row_bucket=1)
    root = int(ctx.keys.numpy("demonstration", step).integers(2**62))
    expert = NoisyExpert(c.sft.noise, root, first_episode=share.start * G)
    chat = ChatFormat(ctx.tokenizer, cfg.system_prompt, enable_thinking=cfg.enable_thinking)
    policy = ScriptedPolicy(expert, ctx.tokenizer, chat.end_of_turn_id)
    seeds = rng.task_seeds(c.seed, step, c.rollout.num_tasks)[share.start:share.stop]
    batch, records, roll = collect(c.env.name, policy, ctx.tokenizer, cfg, key=ctx.keys.at("demonstration", step),
                                   task_seeds=seeds, env_kwargs=dict(c.env.kwargs))
    batch, records = rollouts.renumber(batch, records, first_task=share.start, group_size=G)
    roll = dict(roll, env_steps=sum(r.turns for r in records))
    counts = np.array([expert.actions, expert.noisy], np.float64)
    if multi:
        batch, records, roll = rollouts.assemble(ctx, batch, records, roll)
        counts = distributed.gather_rows(counts[None].astype(np.float32)).reshape(-1, 2).sum(axis=0)
    turns = max(sum(r.turns for r in records), 1)
    metrics = {"demo_success": float(np.mean([r.success for r in records])),
               "demo_noisy_share": float(counts[1] / max(counts[0], 1)),
               "demo_invalid_action_rate": sum(r.invalid_actions for r in records) / turns,
               "demo_tokens": float(np.asarray(batch.loss_mask).sum()),
               "demo_env_steps": float(roll["env_steps"])}
    return batch, records, metrics


# --- the loss and the update step ------------------------------------------

def sft_loss(trainable, graphdef, batch: TurnBatch, *, chunk_size: int, denominator=None):
    """(L, metrics): the mean negative log-likelihood of the ``loss_mask`` tokens.

      L = - sum_{b,t} m_bt log pi(x_bt | x_b,<t) / N,   N = max(sum_{b,t} m_bt, 1)

    with log-probs from ``objectives.logprobs_and_entropy_from_hidden`` (chunked,
    no [B,T,V] logits). ``denominator``: N of the whole minibatch when
    ``batch`` is one of its micro-batches, so micro-batch losses and
    gradients add up to the minibatch's. Also returns the policy's mean
    entropy on those positions (with the same weights).
    """
    params, _ = trainable
    logp_BT, ent_BT, _ = shifted_logp_entropy(graphdef, params, batch.tokens, batch.attention_mask,
                                              chunk_size=chunk_size)
    mask_BT = batch.loss_mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask_BT), 1.0) if denominator is None else denominator
    loss = -jnp.sum(logp_BT * mask_BT) / n
    return loss, {"loss": loss, "demo_token_entropy": jnp.sum(ent_BT * mask_BT) / n}


def sft_update_step(state: TrainState, batch: TurnBatch, scale: jax.Array | float = 1.0, *, graphdef, optimizer,
                    chunk_size: int, microbatch_size: int = 0):
    """Loss, gradient and one optimiser step on a minibatch (pure; jit it).

    With ``microbatch_size`` = m < B the gradient is summed over B / m
    micro-batches (a ``lax.scan``, one micro-batch's activations at a time),
    each divided by the whole minibatch's token count: the same update.
    """
    trainable = (state.params, state.extra)
    B = batch.tokens.shape[0]
    grad_fn = jax.value_and_grad(sft_loss, has_aux=True)
    if not microbatch_size or microbatch_size >= B:
        (loss, metrics), grads = grad_fn(trainable, graphdef, batch, chunk_size=chunk_size)
        return apply_gradients(state, grads, loss, optimizer, metrics, scale)
    if B % microbatch_size:
        raise ValueError(f"learner.microbatch_size={microbatch_size} does not divide the minibatch's {B} rows")
    n = jnp.maximum(jnp.sum(batch.loss_mask.astype(jnp.float32)), 1.0)

    def loss_and_grads(one):
        (_, metrics), grads = grad_fn(trainable, graphdef, one, chunk_size=chunk_size, denominator=n)
        return metrics, jax.tree.map(lambda g: g.astype(jnp.float32), grads)

    micro = split_microbatches(batch, B // microbatch_size)
    shapes = jax.eval_shape(loss_and_grads, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (metrics, grads), _ = jax.lax.scan(lambda carry, one: (jax.tree.map(jnp.add, carry, loss_and_grads(one)), None),
                                       zeros, micro)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
    return apply_gradients(state, grads, metrics["loss"], optimizer, metrics, scale)


# --- the algorithm record -----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class State:
    train: TrainState     # the policy and its optimiser
    step_fn: Callable     # the jitted sft_update_step


def init(ctx: RunContext) -> State:
    c = ctx.config
    train = new_train_state(copy_tree(ctx.init_params), ctx.optimizer, ctx.mesh)
    step_fn = jax.jit(functools.partial(sft_update_step, graphdef=ctx.graphdef, optimizer=ctx.optimizer,
                                        chunk_size=c.loss.chunk_size,
                                        microbatch_size=c.learner.microbatch_size),
                      donate_argnums=(0,), out_shardings=(shardings_of(train), None))
    return State(train=train, step_fn=step_fn)


def update(ctx: RunContext, state: State, batch: TurnBatch, step: int, success: float = 0.0):
    """Clones the expert on step ``step``'s tasks; ``batch`` (the policy's own rollouts) is not used.

    After the last step (``total_steps``) also the held-out evaluation with
    response entropies (:func:`evaluate`).
    """
    del batch
    c = ctx.config
    demos, _, demo_metrics = demonstrations(ctx, step)
    # the success gate reads the policy's own rollouts of the step (``success``), not the expert's
    scale = jnp.float32(setup.success_gate(c.optim, success))
    train = state.train
    history = []
    for mb in minibatches(demos, ctx.mesh, ctx.keys.numpy("shuffle", step), size=c.learner.minibatch_size,
                          epochs=c.learner.epochs):
        train, m = state.step_fn(train, mb, scale)
        history.append(m)
    metrics = mean_metrics(history)
    metrics["skipped_updates"] = metrics.pop("skipped", 0.0)
    metrics["lr_scale"] = float(scale)
    metrics.update(demo_metrics)
    metrics["nonfinite_in_a_row"] = int(train.nonfinite)
    metrics["train_passes"] = float(c.learner.epochs)
    if step + 1 == c.total_steps and c.eval.num_tasks:
        metrics.update(evaluate(ctx, train.params, c.eval.num_tasks, step + 1))
    return dataclasses.replace(state, train=train), metrics


# --- the end of a run: evaluation and the Hugging Face directory ----------------

def response_entropies(batch: TurnBatch) -> np.ndarray:
    """The mean token entropy of every response (agent turn) in ``batch``: 1/|r| sum_{t in r} H_t."""
    mask = np.asarray(batch.loss_mask) > 0
    ids = np.where(mask, np.asarray(batch.turn_ids), -1)
    entropy = np.asarray(batch.old_entropy, np.float64)
    out = []
    for row in range(ids.shape[0]):
        for turn in np.unique(ids[row][ids[row] >= 0]):
            out.append(entropy[row][ids[row] == turn].mean())
    return np.asarray(out, np.float64)


def evaluate(ctx: RunContext, params, num_tasks: int, step: int) -> dict[str, float]:
    """Held-out success and response entropy of the policy, sampled at the rollout settings.

    ``num_tasks`` held-out task seeds (``rng.eval_seeds``, disjoint from
    training), one episode each, keys from the "eval" stream at ``step``
    (no training stream is drawn). The entropies are those the sampler
    recorded for each sampled token; a response's entropy is their mean.
    """
    c = ctx.config
    cfg = setup.rollout_config(c, num_tasks=num_tasks, group_size=1)
    batch, records, _ = collect(c.env.name, rollouts.sampler(ctx, params), ctx.tokenizer, cfg,
                                key=ctx.keys.at("eval", step), task_seeds=rng.eval_seeds(num_tasks),
                                env_kwargs=dict(c.env.kwargs))
    ent = response_entropies(batch)
    return {"heldout_success": float(np.mean([r.success for r in records])),
            "heldout_response_entropy": float(ent.mean()) if ent.size else 0.0,
            "heldout_response_entropy_std": float(ent.std()) if ent.size else 0.0,
            "heldout_turns": float(np.mean([r.turns for r in records]))}


# --- config checks --------------------------------------------------------------

def validate(config) -> None:
    """The ``sft`` block, and that the environment has an expert (and random valid actions for noise)."""
    s, name = config.sft, config.env.name
    kwargs = dict(config.env.kwargs)
    if not 0.0 <= s.noise <= 1.0:
        fail("sft.noise", s.noise, "must be in [0, 1] (the share of demonstration actions made random)")
    env_cls = env_registry.resolve(name)
    if hasattr(env_cls, "optimal_action"):
        pass
    elif name == "textworld":
        if not kwargs.get("policy_commands"):
            fail("env.kwargs.policy_commands", kwargs.get("policy_commands", False),
                 "the TextWorld expert plays the game's walkthrough: set it to True")
    elif name != "swe":
        fail("env.name", name, "algorithm='sft' needs a scripted expert: an environment with optimal_action(), "
             "'textworld' (walkthrough) or 'swe' (gold patch)")
    if s.noise > 0 and not hasattr(env_cls, "valid_actions") and not (
            name == "textworld" and kwargs.get("admissible_commands")):
        fail("sft.noise", s.noise, f"environment {name!r} lists no valid actions to draw noise from "
             "(no valid_actions(); TextWorld needs env.kwargs.admissible_commands=True): use 0")


ALGORITHM = Algorithm(
    name="sft", paper="behaviour cloning", init=init, update=update, checkpoint_tree=checkpoint_tree,
    restore=restore, policy_params=lambda state: state.train.params, validate=validate)
