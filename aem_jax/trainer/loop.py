"""The training loop: one phased ``train()`` that never changes per algorithm.

Phases, in a fixed order (as big_vision's main): validate the config (the
generic checks, then the algorithm's), distributed init, workdir check and
lock, random streams, mesh, model, the algorithm's state, restore (refusing a
changed config), then per step: rollouts -> ``algorithm.update`` -> metrics
-> checkpoint; at the end, held-out evaluation and the plot. Every key comes
from ``rng.Streams(seed)`` folded with the step and task seeds from (seed,
step, task index), so a run killed at any point and resumed from its
checkpoint continues exactly.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import jax
from flax import nnx

from aem_jax import sharding
from aem_jax.trainer import (
    algorithms, checkpoint, distributed, integrity, metrics, paths, rng, rollouts, setup, validate,
)
from aem_jax.trainer.context import Algorithm, RunContext

log = logging.getLogger(__name__)

PLOT_KEYS = ("success", "token_entropy", "alpha_std", "predicted_entropy_drift")


def check_config(config) -> Algorithm:
    """Every config check (the algorithm's own included), before anything is built; returns the algorithm."""
    validate.check(config)
    return algorithms.get(config.algorithm)


def build_context(config, mesh) -> RunContext:
    """Model, tokenizer, optimiser and rollout settings of a run (phase "build")."""
    keys = rng.Streams(config.seed)
    with sharding.use_mesh(mesh):
        model, tokenizer = setup.build_model(config, mesh, init_seed=keys.int_seed("init"))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return RunContext(config=config, mesh=mesh, graphdef=graphdef, rest=rest, init_params=params,
                      model_config=model.config, tokenizer=tokenizer, optimizer=setup.optimizer(config),
                      rollout=setup.rollout_config(config), keys=keys)


def restore(ctx: RunContext, algorithm: Algorithm, state, ckpt: checkpoint.Checkpointer, workdir):
    """(start step, checkpoint metadata, state): the newest checkpoint that
    restores, after checking it was written with this config."""
    device, _ = algorithm.checkpoint_tree(state)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), device)
    restored = ckpt.restore(abstract)
    if restored is None:
        return 0, {}, state
    integrity.check_resume(restored.meta.get("config"), ctx.config, restored_step=restored.step,
                           workdir=str(workdir))
    log.info("resumed from step %d", restored.step)
    return int(restored.step), dict(restored.meta), algorithm.restore(ctx, state, restored.state, restored.host)


def train_step(ctx: RunContext, algorithm: Algorithm, state, step: int):
    """One iteration: rollouts, then the algorithm's update; returns (state, metrics)."""
    t0 = time.perf_counter()
    batch, records, roll = rollouts.collect_batch(ctx, algorithm, algorithm.policy_params(state), step)
    t_roll = time.perf_counter() - t0
    t1 = time.perf_counter()
    state, update_metrics = algorithm.update(ctx, state, batch, step)
    jax.block_until_ready(algorithm.checkpoint_tree(state)[0])
    t_update = time.perf_counter() - t1
    record = rollouts.episode_metrics(batch, records, roll, t_roll=t_roll, t_update=t_update,
                                      train_passes=update_metrics.pop("train_passes"))
    record.update(update_metrics)
    return state, record


def _evaluate(ctx, algorithm, state, primary: bool, when: str) -> float:
    n = ctx.config.eval.num_tasks
    success = rollouts.evaluate(ctx, algorithm.policy_params(state), n)
    if primary:
        print(f"success {when} training: {success:.2f} ({n} held-out tasks)", flush=True)
    return success


def train(config, workdir: str) -> dict[str, Any]:
    """Trains as ``config`` says, writing metrics and checkpoints to ``workdir``."""
    algorithm = check_config(config)
    distributed.maybe_initialize(config.distributed or None)
    workdir = paths.workdir_path(workdir)
    checkpoint.check_writable(workdir)
    with integrity.WorkdirLock(workdir):
        return _run(config, workdir, algorithm)


def _run(config, workdir, algorithm: Algorithm) -> dict[str, Any]:
    c = config
    primary = distributed.is_primary()
    mesh = sharding.make_mesh(dict(c.mesh))
    ctx = build_context(c, mesh)
    fingerprint = integrity.config_fingerprint(c)
    with sharding.use_mesh(mesh):
        state = algorithm.init(ctx)
        ckpt = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=c.checkpoint.keep,
                                       save_interval_steps=c.checkpoint.every)
        try:
            start, meta, state = restore(ctx, algorithm, state, ckpt, workdir)
            summary: dict[str, Any] = {"start_step": start, "success_before": meta.get("success_before")}
            if c.eval.num_tasks and start == 0:
                summary["success_before"] = _evaluate(ctx, algorithm, state, primary, "before")
            state = _loop(ctx, algorithm, state, ckpt, workdir, start, meta, summary, fingerprint)
        finally:
            ckpt.close()
        if c.eval.num_tasks:
            summary["success_after"] = _evaluate(ctx, algorithm, state, primary, "after")
            if primary:
                metrics.write_json(workdir / "eval.json", {
                    "step": c.total_steps, "num_tasks": c.eval.num_tasks,
                    "success_before": summary["success_before"], "success_after": summary["success_after"]})
        if primary:
            summary["plot"] = metrics.plot(workdir, workdir / "curves.png", keys=PLOT_KEYS)
    summary["final_step"] = c.total_steps
    return summary


def _loop(ctx, algorithm, state, ckpt, workdir, start, meta, summary, fingerprint):
    c = ctx.config
    writer = metrics.MetricsWriter(workdir, resume_step=start if start else None)
    prev_entropy = meta.get("token_entropy")
    bar = metrics.progress_bar(c.total_steps, initial=start, enabled=c.progress_bar or None)
    t_start = time.perf_counter()
    for step in range(start, c.total_steps):
        state, record = train_step(ctx, algorithm, state, step)
        if prev_entropy is not None:
            record["measured_entropy_change"] = record["token_entropy"] - prev_entropy
        prev_entropy = record["token_entropy"]
        t0 = time.perf_counter()
        device, host = algorithm.checkpoint_tree(state)
        ckpt.save(step + 1, device, host=host, force=step + 1 == c.total_steps,
                  meta={"token_entropy": prev_entropy, "task_cursor": step + 1, "seed": c.seed,
                        "success_before": summary["success_before"], "config": fingerprint})
        record["time_checkpoint_s"] = time.perf_counter() - t0
        record["wall_s"] = time.perf_counter() - t_start
        writer.write(step + 1, record)
        bar.update(1)
        bar.set_postfix(metrics.bar_postfix(record, ("success", "token_entropy", "alpha_std")))
        if record["nonfinite_in_a_row"] >= c.max_nonfinite_in_a_row:
            raise FloatingPointError(
                f"{record['nonfinite_in_a_row']} updates in a row had a non-finite loss, gradient or "
                f"parameters (limit config.max_nonfinite_in_a_row={c.max_nonfinite_in_a_row}) at step "
                f"{step + 1}; lower config.optim.learning_rate or check the rewards")
    bar.close()
    writer.close()
    return state
