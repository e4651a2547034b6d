"""The loop's rollout phase: training batches (with DAPO's refill), held-out
evaluation, and the episode metrics every algorithm logs.

Multi-host: each process plays its own share of a step's tasks
(``distributed.task_share``) with its own copy of the policy, so it steps
only its own environments (sandboxes); :func:`assemble` then builds the
global batch from every process's rows with
``jax.make_array_from_process_local_data``. Sampling keys are per episode
(``fold_in(turn key, global episode index)``), so the union of the
processes' episodes is exactly what one process would have played.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aem_jax import sharding
from aem_jax.batch import TurnBatch
from aem_jax.rollout import EpisodeRecord, SamplerPolicy, collect
from aem_jax.rollout.collect import pad_id as batch_pad_id
from aem_jax.trainer import checksums, distributed, integrity, records as records_lib, rng, setup
from aem_jax.trainer.context import Algorithm, RunContext
from aem_jax.trainer.update import to_host


def sampler(ctx: RunContext, params, *, temperature: float | None = None, model=None):
    """The policy with ``params`` (or ``model``) through the sampler, at the config's sampling settings;
    with ``rollout.endpoint`` set, those weights pushed to the endpoint and an `EndpointPolicy` playing it."""
    r = ctx.config.rollout
    model = ctx.policy(params) if model is None else model
    temperature = r.temperature if temperature is None else temperature
    if r.endpoint:
        from aem_jax.rollout import remote

        return remote.for_run(ctx.config, ctx.rollout, model, ctx.tokenizer, temperature=temperature)
    return SamplerPolicy.for_rollout(model, ctx.tokenizer, ctx.rollout, temperature=temperature,
                                     top_k=r.top_k, top_p=r.top_p)


class EpisodeKeys:
    """A policy whose row for episode e samples with ``fold_in(turn key, first_episode + e)``.

    ``e`` is the episode's index in its ``collect`` call (``TurnContext.episode``)
    and ``first_episode`` that call's offset in the step, so a row's draws do
    not depend on which other episodes share its batch or its process.
    """

    def __init__(self, policy, first_episode: int = 0):
        self.policy = policy
        self.first_episode = int(first_episode)

    def generate(self, prompts, *, key, contexts=None):
        if contexts is None or len(contexts) != len(prompts):
            raise ValueError("EpisodeKeys needs one TurnContext per prompt")
        ids = jnp.asarray([self.first_episode + c.episode for c in contexts], jnp.uint32)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, ids)
        return self.policy.generate(prompts, key=keys, contexts=contexts)


def _fingerprint_int(config) -> int:
    return int(integrity.config_fingerprint(config)["sha256"][:15], 16)


def agreement_values(ctx: RunContext, step: int, params) -> dict[str, int]:
    """What every process must agree on at a step: the step, the config, the
    rollout key and the (process-local copy of the) policy parameters."""
    key_data = np.asarray(jax.random.key_data(ctx.keys.at("rollout", step))).astype(np.uint32).tobytes()
    sums = checksums.inspect_arrays(params).checksums
    return {"step": step, "config_sha256": _fingerprint_int(ctx.config),
            "rollout_key": int.from_bytes(hashlib.blake2b(key_data, digest_size=7).digest(), "little"),
            "policy_checksum": sum(sums.values()) % 2**32}


def collect_batch(ctx: RunContext, algorithm: Algorithm, params, step: int):
    """(batch, records, rollout metrics) of one training step.

    This process plays its share of the step's tasks (:func:`play_share`;
    all of them on one process); with several processes every one then
    returns the same global batch and records (:func:`assemble`).
    """
    return collect_step(ctx, algorithm, params, step)[:3]


def collect_step(ctx: RunContext, algorithm: Algorithm, params, step: int):
    """:func:`collect_batch`'s (batch, records, metrics), and this process's own
    records with their chats (the global records of several processes carry
    only numbers), for transcripts."""
    batch, records, roll = play_share(ctx, algorithm, params, step)
    local = records
    if jax.process_count() > 1:
        batch, records, roll = assemble(ctx, batch, records, roll)
    return batch, records, roll, local


def play_share(ctx: RunContext, algorithm: Algorithm, params, step: int):
    """(batch, records, metrics) of this process's share of a step's tasks, with
    the step's task and episode indices; DAPO's refill included.

    With several processes it first checks that all of them agree on the
    step, config, rollout key and policy parameters, then samples with this
    process's own copy of the parameters on its own devices.
    """
    c = ctx.config
    G = c.rollout.group_size
    share = distributed.task_share(c.rollout.num_tasks)
    multi = jax.process_count() > 1
    (local_params, rest), mesh = distributed.process_local((params, ctx.rest), ctx.mesh, dtype=c.model.dtype)
    cfg = setup.rollout_config(c, num_tasks=len(share))
    if multi:  # rows are padded once, after assembly
        cfg = dataclasses.replace(cfg, row_bucket=1)
    seeds = rng.task_seeds(c.seed, step, c.rollout.num_tasks)[share.start:share.stop]
    with sharding.use_mesh(mesh):
        if multi:
            distributed.check_agreement(agreement_values(ctx, step, local_params))
        model = nnx.merge(ctx.graphdef, local_params, rest)
        policy = EpisodeKeys(sampler(ctx, None, model=model), first_episode=share.start * G)
        batch, records, roll = collect(c.env.name, policy, ctx.tokenizer, cfg, key=ctx.keys.at("rollout", step),
                                       task_seeds=seeds, env_kwargs=dict(c.env.kwargs))
        roll = dict(roll, env_steps=sum(r.turns for r in records))
        if algorithm.dynamic_sampling:
            batch, records, roll = dynamic_sampling(ctx, policy, step, batch, records, roll, cfg=cfg, share=share)
    roll["step_timeouts"] = sum(_timed_out(r) for r in records)
    return (*renumber(batch, records, first_task=share.start, group_size=G), roll)


def renumber(batch: TurnBatch, records, *, first_task: int, group_size: int):
    """Local task and episode indices -> the step's (a process's share starts at ``first_task``)."""
    if first_task == 0:
        return batch, records
    offset = first_task * group_size
    episode_ids = np.asarray(batch.episode_ids)
    batch = batch.replace(group_ids=np.asarray(batch.group_ids) + first_task,
                          episode_ids=np.where(episode_ids >= 0, episode_ids + offset, episode_ids))
    records = [dataclasses.replace(r, episode=r.episode + offset, group=r.group + first_task) for r in records]
    return batch, records


def pad_time(batch: TurnBatch, length: int, pad_id: int) -> TurnBatch:
    """``batch`` with its [B,T] fields right-padded to T = ``length`` (padding
    carries no loss, no attention and turn id -1)."""
    T = batch.tokens.shape[1]
    if length < T:
        raise ValueError(f"cannot pad a batch of T={T} tokens to {length}")
    fill = {"tokens": pad_id, "turn_ids": -1}
    return batch.replace(**{
        f: np.pad(np.asarray(getattr(batch, f)), ((0, 0), (0, length - T)), constant_values=fill.get(f, 0))
        for f in ("tokens", "loss_mask", "turn_ids", "old_logp", "ref_logp", "old_entropy", "attention_mask")})


def _informative(records, G: int) -> np.ndarray:
    rets = np.array([r.episode_return for r in records]).reshape(-1, G)
    return rets.max(axis=1) > rets.min(axis=1)


def dynamic_sampling(ctx: RunContext, policy, step: int, batch, records, roll, *, cfg=None, share=None):
    """DAPO: replace groups whose returns are all equal with informative groups
    from extra rollouts (up to ``dapo.max_resample`` of them); what stays
    uninformative is masked out of the loss. Rows of the extra batches may
    have another T bucket: every batch is padded to the longest before rows
    are copied.

    With several processes each refills its own groups from its share
    (``share``, rollout settings ``cfg``) of each extra batch's tasks.
    """
    c, G = ctx.config, ctx.config.rollout.group_size
    cfg = ctx.rollout if cfg is None else cfg
    share = range(c.rollout.num_tasks) if share is None else share
    good = _informative(records, G)
    pool = []
    for attempt in range(c.dapo.max_resample):
        if good.all() or len(pool) >= (~good).sum():
            break
        seeds = ctx.keys.numpy("dapo_rollout", step * 1_000 + attempt).integers(0, 2**30, c.rollout.num_tasks)
        extra, extra_recs, _ = collect(c.env.name, policy, ctx.tokenizer, cfg,
                                       key=ctx.keys.at("dapo_rollout", step * 1_000 + attempt),
                                       task_seeds=[int(s) for s in seeds[share.start:share.stop]],
                                       env_kwargs=dict(c.env.kwargs))
        pool += [(extra, extra_recs, n) for n in np.flatnonzero(_informative(extra_recs, G))]
        roll["env_steps"] += sum(r.turns for r in extra_recs)
    T = max([batch.tokens.shape[1]] + [src.tokens.shape[1] for src, _, _ in pool])
    pad_id = batch_pad_id(ctx.tokenizer)
    batch = pad_time(batch, T, pad_id)
    fields = {f: np.array(getattr(batch, f)) for f in batch.__dataclass_fields__}
    records = list(records)
    for n in np.flatnonzero(~good):
        rows = slice(n * G, (n + 1) * G)
        if pool:
            src, src_recs, m = pool.pop(0)
            src = pad_time(src, T, pad_id)
            for f in fields:
                if f not in ("group_ids", "episode_ids"):
                    fields[f][rows] = np.asarray(getattr(src, f))[m * G:(m + 1) * G]
            records[rows] = src_recs[m * G:(m + 1) * G]
        else:
            fields["loss_mask"][rows] = 0.0
    roll = dict(roll, dapo_informative_frac=float(good.mean()))
    return TurnBatch(**fields), records, roll


def pad_rows(batch: TurnBatch, rows: int, pad_id: int) -> TurnBatch:
    """``batch`` with empty rows appended up to ``rows`` (as ``build_turn_batch``'s:
    no loss, no valid turn, episode id -1, attending to one pad token)."""
    B = batch.tokens.shape[0]
    if rows < B:
        raise ValueError(f"cannot pad a batch of {B} rows to {rows}")
    fill = {"tokens": pad_id, "turn_ids": -1, "episode_ids": -1}
    out = {}
    for f in batch.__dataclass_fields__:
        x = np.asarray(getattr(batch, f))
        out[f] = np.pad(x, ((0, rows - B),) + ((0, 0),) * (x.ndim - 1), constant_values=fill.get(f, 0))
    out["attention_mask"][B:, 0] = 1
    return TurnBatch(**out)


def _global_rows(local: np.ndarray) -> jax.Array:
    """The [P * n, ...] array whose rows p * n ... are process p's ``local`` rows."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    rows = NamedSharding(Mesh(np.array(devices), ("rows",)), PartitionSpec("rows"))
    shape = (jax.process_count() * local.shape[0],) + local.shape[1:]
    return jax.make_array_from_process_local_data(rows, local, shape)


def assemble(ctx: RunContext, batch: TurnBatch, records, roll):
    """(global batch, global records, metrics): every process's rows, on every process.

    The processes agree on T (the longest local bucket) and on a row count
    (the most local rows, rounded up so that P * rows fills whole
    minibatches and whole devices); each pads its rows to that, the global
    arrays come from ``jax.make_array_from_process_local_data`` (process p's
    rows are rows p * rows ... of the batch), and every process reads them
    back whole (the algorithms' updates take the global batch). Records
    come back as their numbers (return, success, turns, ...), without
    transcripts.
    """
    P, L = jax.process_count(), jax.local_device_count()
    pad_id = batch_pad_id(ctx.tokenizer)
    B, T = distributed.gather_rows(np.array(batch.tokens.shape, np.int32)).max(axis=0)
    mb = ctx.config.learner.minibatch_size
    quantum = math.lcm(L, mb // math.gcd(mb, P))
    batch = pad_rows(pad_time(batch, int(T), pad_id), -(-int(B) // quantum) * quantum, pad_id)
    glob = {f: _global_rows(np.asarray(getattr(batch, f))) for f in batch.__dataclass_fields__}
    batch = TurnBatch(**{f: to_host(x) for f, x in glob.items()})
    ints = np.array([[r.episode, r.group, r.seed, r.success, r.turns, r.invalid_actions, r.truncated, r.failed]
                     for r in records], np.int32)
    returns = np.array([r.episode_return for r in records], np.float32)
    ints, returns = distributed.gather_rows(ints), distributed.gather_rows(returns)
    records = [EpisodeRecord(episode=int(i[0]), group=int(i[1]), seed=int(i[2]), success=bool(i[3]),
                             turns=int(i[4]), invalid_actions=int(i[5]), truncated=bool(i[6]), failed=bool(i[7]),
                             turn_rewards=[float(ret)])
               for i, ret in zip(ints.reshape(-1, ints.shape[-1]), returns.reshape(-1))]
    totals = distributed.gather_rows(np.array([roll["env_steps"], roll.get("dapo_informative_frac", 0.0),
                                               roll.get("masked", 0), roll.get("step_timeouts", 0)], np.float32))
    roll = dict(roll, env_steps=float(totals[:, 0].sum()), masked=float(totals[:, 2].sum()),
                step_timeouts=float(totals[:, 3].sum()))
    if "dapo_informative_frac" in roll:
        roll["dapo_informative_frac"] = float(totals[:, 1].mean())
    return batch, records, roll


def _timed_out(record) -> bool:
    """The episode ended because an environment step ran past its time limit."""
    return bool(record.failed) and (record.error or "").startswith("StepTimeout")


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One held-out evaluation: ``metrics`` (``eval/pass@k``, ``eval/return``),
    [tasks, n] ``successes``, and this process's records (with their chats)."""

    metrics: dict[str, float]
    successes: np.ndarray
    records: list[EpisodeRecord]


def eval_settings(config) -> dict[str, Any]:
    """What identifies an evaluation besides its step (kept with it in eval.json)."""
    e = config.eval
    return {"num_tasks": e.num_tasks, "samples_per_task": e.samples_per_task,
            "split": records_lib.eval_split(config)}


def evaluate(ctx: RunContext, params, step: int) -> Evaluation:
    """Held-out evaluation of the policy ``params`` after training step ``step``.

    ``eval.num_tasks`` tasks, ``eval.samples_per_task`` sampled episodes each
    (at the rollout temperature), pass@k for each k of ``eval.pass_at``.
    Tasks: an environment with splits plays its held-out split
    (``records_lib.eval_split``: ``eval.split``, by default "test", never the
    training split); others play ``rng.eval_seeds``, disjoint from every
    training seed. Keys: the "eval" stream folded with ``step`` and each
    episode's index, so no training key is drawn and a resumed run evaluates
    exactly as an uninterrupted one. With several processes each plays its
    share of the tasks with its own copy of the policy (as training does) and
    the successes are gathered (shares differ by at most one task).
    """
    c = ctx.config
    N, G = c.eval.num_tasks, c.eval.samples_per_task
    P, p = jax.process_count(), jax.process_index()
    lo, hi = p * N // P, (p + 1) * N // P  # this process's tasks (shares differ by at most one)
    (local_params, rest), mesh = distributed.process_local((params, ctx.rest), ctx.mesh, dtype=c.model.dtype)
    env_kwargs = dict(c.env.kwargs)
    split = records_lib.eval_split(c)
    if split is not None:
        env_kwargs["split"] = split
    records: list[EpisodeRecord] = []
    if hi > lo:
        cfg = dataclasses.replace(setup.rollout_config(c, num_tasks=hi - lo, group_size=G), row_bucket=1)
        with sharding.use_mesh(mesh):
            model = nnx.merge(ctx.graphdef, local_params, rest)
            policy = EpisodeKeys(sampler(ctx, None, model=model), first_episode=lo * G)
            _, records, _ = collect(c.env.name, policy, ctx.tokenizer, cfg, key=ctx.keys.at("eval", step),
                                    task_seeds=rng.eval_seeds(N)[lo:hi], env_kwargs=env_kwargs)
        records = [dataclasses.replace(r, episode=r.episode + lo * G, group=r.group + lo) for r in records]
    # [P, rows of the largest share, (valid, success, return)]: each process's episodes, in task order
    rows = np.zeros(((N + P - 1) // P * G, 3), np.float32)
    rows[:len(records)] = [[1.0, r.success, r.episode_return] for r in records]
    table = distributed.gather_rows(rows).reshape(-1, 3)
    table = table[table[:, 0] > 0.5].reshape(N, G, 3)
    successes = table[..., 1] > 0.5
    return Evaluation(records_lib.eval_metrics(successes, table[..., 2], c.eval.pass_at), successes, records)


def episode_metrics(batch, records, roll, *, t_roll: float, t_update: float, train_passes: float) -> dict[str, Any]:
    """Metrics of a rollout batch every algorithm logs (success, return,
    entropy, throughput); ``train_passes`` is how many times the update
    read each token (for tokens/s)."""
    mask = np.asarray(batch.loss_mask)
    n_tok = max(mask.sum(), 1.0)
    out = {
        "success": np.mean([r.success for r in records]),
        "return": np.mean([r.episode_return for r in records]),
        "turns": np.mean([r.turns for r in records]),
        "invalid_action_rate": sum(r.invalid_actions for r in records) / max(sum(r.turns for r in records), 1),
        "failed_episodes": float(sum(r.failed for r in records)),
        "truncated_rate": np.mean([r.truncated for r in records]),
        "token_entropy": float((np.asarray(batch.old_entropy) * mask).sum() / n_tok),
        "rollout_tokens_per_s": float(mask.sum() / max(t_roll, 1e-9)),
        "train_tokens_per_s": float(np.asarray(batch.attention_mask).sum() * train_passes / max(t_update, 1e-9)),
        "time_rollout_s": t_roll, "time_update_s": t_update,
    }
    out.update({f"rollout_{k}": float(v) for k, v in roll.items()
                if k.startswith("time") or k == "dapo_informative_frac"})
    # episodes the environment asked to leave out of the loss (exclude_from_loss,
    # counted in the step's first rollout batch) and episodes a step timeout ended
    out["masked_episodes_frac"] = float(roll.get("masked", 0)) / max(len(records), 1)
    out["step_timeout_frac"] = float(roll.get("step_timeouts", sum(_timed_out(r) for r in records))) / max(
        len(records), 1)
    # every environment step this training step took, DAPO's extra rollouts included
    out["env_steps"] = float(roll.get("env_steps", sum(r.turns for r in records)))
    return out
