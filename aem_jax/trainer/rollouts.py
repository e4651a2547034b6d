"""The loop's rollout phase: training batches (with DAPO's refill), held-out
evaluation, and the episode metrics every algorithm logs."""
from __future__ import annotations

from typing import Any

import numpy as np

from aem_jax.batch import TurnBatch
from aem_jax.rollout import SamplerPolicy, collect
from aem_jax.rollout.collect import pad_id as batch_pad_id
from aem_jax.trainer import rng, setup
from aem_jax.trainer.context import Algorithm, RunContext


def sampler(ctx: RunContext, params, *, temperature: float | None = None) -> SamplerPolicy:
    r = ctx.config.rollout
    return SamplerPolicy.for_rollout(ctx.policy(params), ctx.tokenizer, ctx.rollout,
                                     temperature=r.temperature if temperature is None else temperature,
                                     top_k=r.top_k, top_p=r.top_p)


def collect_batch(ctx: RunContext, algorithm: Algorithm, params, step: int):
    """(batch, records, rollout metrics) of one training step."""
    c = ctx.config
    policy = sampler(ctx, params)
    batch, records, roll = collect(
        c.env.name, policy, ctx.tokenizer, ctx.rollout, key=ctx.keys.at("rollout", step),
        task_seeds=rng.task_seeds(c.seed, step, c.rollout.num_tasks), env_kwargs=dict(c.env.kwargs))
    roll = dict(roll, env_steps=sum(r.turns for r in records))
    if algorithm.dynamic_sampling:
        batch, records, roll = dynamic_sampling(ctx, policy, step, batch, records, roll)
    return batch, records, roll


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


def dynamic_sampling(ctx: RunContext, policy, step: int, batch, records, roll):
    """DAPO: replace groups whose returns are all equal with informative groups
    from extra rollouts (up to ``dapo.max_resample`` of them); what stays
    uninformative is masked out of the loss. Rows of the extra batches may
    have another T bucket: every batch is padded to the longest before rows
    are copied."""
    c, G = ctx.config, ctx.config.rollout.group_size
    good = _informative(records, G)
    pool = []
    for attempt in range(c.dapo.max_resample):
        if good.all() or len(pool) >= (~good).sum():
            break
        seeds = ctx.keys.numpy("dapo_rollout", step * 1_000 + attempt).integers(0, 2**30, c.rollout.num_tasks)
        extra, extra_recs, _ = collect(c.env.name, policy, ctx.tokenizer, ctx.rollout,
                                       key=ctx.keys.at("dapo_rollout", step * 1_000 + attempt),
                                       task_seeds=[int(s) for s in seeds], env_kwargs=dict(c.env.kwargs))
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


def evaluate(ctx: RunContext, params, num_tasks: int) -> float:
    """Success rate of the policy (sampled) on held-out task seeds."""
    cfg = setup.rollout_config(ctx.config, num_tasks=num_tasks, group_size=1)
    _, records, _ = collect(ctx.config.env.name, sampler(ctx, params), ctx.tokenizer, cfg,
                            key=ctx.keys.key("eval"), task_seeds=rng.eval_seeds(num_tasks),
                            env_kwargs=dict(ctx.config.env.kwargs))
    return float(np.mean([r.success for r in records]))


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
    # every environment step this training step took, DAPO's extra rollouts included
    out["env_steps"] = float(roll.get("env_steps", sum(r.turns for r in records)))
    return out
