"""The training loop: one phased ``train()`` that never changes per algorithm.

Phases, in a fixed order (as big_vision's main): validate the config (the
generic checks, then the algorithm's), distributed init, workdir check and
lock, random streams, mesh, model, the algorithm's state, restore (refusing a
changed config), held-out evaluation before training, then per step:
rollouts -> ``algorithm.update`` -> transcripts, held-out evaluation and
Hugging Face export where due (``records.Schedule``) -> checkpoint ->
metrics; at the end the plot. Every key comes from ``rng.Streams(seed)``
folded with the step (evaluation from its own "eval" stream) and task seeds
from (seed, step, task index), so a run killed at any point and resumed from
its checkpoint continues exactly, evaluations included.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from aem_jax import sharding
from aem_jax.trainer import (
    algorithms, checkpoint, distributed, integrity, metrics, paths, records, rng, rollouts, setup, validate,
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
    # The config check runs on each step's metadata before its arrays are
    # read, so a changed config is reported by key rather than by array.
    restored = ckpt.restore(abstract, check_meta=lambda meta, step: integrity.check_resume(
        meta.get("config"), ctx.config, restored_step=step, workdir=str(workdir)))
    if restored is None:
        return 0, {}, state
    log.info("resumed from step %d", restored.step)
    return int(restored.step), dict(restored.meta), algorithm.restore(ctx, state, restored.state, restored.host)


def train_step(ctx: RunContext, algorithm: Algorithm, state, step: int):
    """One iteration: rollouts, then the algorithm's update; returns (state,
    metrics, this process's episode records)."""
    t0 = time.perf_counter()
    batch, records, roll, local = rollouts.collect_step(ctx, algorithm, algorithm.policy_params(state), step)
    t_roll = time.perf_counter() - t0
    t1 = time.perf_counter()
    success = float(np.mean([r.success for r in records])) if records else 0.0
    state, update_metrics = algorithm.update(ctx, state, batch, step, success=success)
    jax.block_until_ready(algorithm.checkpoint_tree(state)[0])
    t_update = time.perf_counter() - t1
    record = rollouts.episode_metrics(batch, records, roll, t_roll=t_roll, t_update=t_update,
                                      train_passes=update_metrics.pop("train_passes"))
    record.update(update_metrics)
    return state, record, local


class Outputs:
    """What a run writes besides checkpoints and metrics lines: held-out
    evaluations (``eval.json``), transcripts and exports, at the steps of
    ``records.Schedule``. Each is made after its step's update and before its
    checkpoint, so a run resumed from that checkpoint neither repeats nor
    skips one."""

    def __init__(self, ctx: RunContext, algorithm: Algorithm, workdir, start: int):
        c = ctx.config
        self.ctx, self.algorithm, self.workdir = ctx, algorithm, workdir
        self.schedule = records.Schedule.of(c)
        self.primary = distributed.is_primary()
        self.settings = rollouts.eval_settings(c)
        self.evals = records.EvalLog(workdir, resume_step=start, total_steps=c.total_steps, enabled=self.primary)

    @property
    def end(self) -> int:
        """The step training ends after: ``total_steps``, or where ``end_at`` put it."""
        return self.schedule.total_steps

    def end_at(self, step: int) -> None:
        """Training ends after ``step`` (before ``total_steps``: the environment-step budget is
        reached): its evaluation, export and ``success_after`` are the final ones."""
        self.schedule = dataclasses.replace(self.schedule, total_steps=step)
        self.evals.total_steps = step

    def evaluate(self, state, step: int) -> dict[str, float]:
        """Held-out evaluation after ``step``: its metrics (also in eval.json)."""
        c = self.ctx.config
        t0 = time.perf_counter()
        result = rollouts.evaluate(self.ctx, self.algorithm.policy_params(state), step)
        if c.records.eval_transcripts:
            records.write_transcripts(self.workdir, records.step_name("eval", step), result.records, step=step,
                                      kind="eval")
        self.evals.add(step, self.settings, result.metrics)
        if self.primary and step in (0, self.end):
            when = "before" if step == 0 else "after"
            print(f"success {when} training: {result.metrics['eval/pass@1']:.2f} ({c.eval.num_tasks} held-out "
                  f"tasks x {c.eval.samples_per_task})", flush=True)
        return dict(result.metrics, time_eval_s=time.perf_counter() - t0)

    def export(self, state, name: str) -> float:
        """Writes the policy to workdir/export/NAME; returns the seconds it took."""
        c = self.ctx.config
        t0 = time.perf_counter()
        params = records.cast_params(self.algorithm.policy_params(state), c.export.dtype)
        source = c.model.source if os.path.isdir(c.model.source) else None
        records.export_policy(self.ctx.policy(params), self.ctx.tokenizer, self.workdir, name,
                              dtype=c.export.dtype, source=source)
        return time.perf_counter() - t0

    def after_step(self, state, step: int, record: dict[str, Any], episodes) -> None:
        """Transcripts, evaluation and export due after training step ``step`` (into ``record``)."""
        s = self.schedule
        if s.transcribes(step):
            records.write_transcripts(self.workdir, records.step_name("step", step), episodes, step=step,
                                      kind="train")
        if s.evaluates(step):
            record.update(self.evaluate(state, step))
        name = s.exports(step)
        if name is not None:
            record["time_export_s"] = self.export(state, name)

    def finish(self, state, start: int) -> None:
        """A run resumed at its end (no step left to train) makes the final
        evaluation and export it lacks: e.g. a finished run resumed with a
        new ``eval.num_tasks`` only evaluates."""
        s = self.schedule
        if start < self.end:
            return
        if s.evaluates(self.end) and _on_primary(self.evals.find(self.end, self.settings) is None):
            self.evaluate(state, self.end)
        final = paths.workdir_path(self.workdir) / records.EXPORT_DIR / records.FINAL_EXPORT
        if s.export_enabled and _on_primary(not (final / "config.json").exists()):
            self.export(state, records.FINAL_EXPORT)


def _on_primary(flag: bool) -> bool:
    """Process 0's ``flag``, on every process (for decisions that read the workdir)."""
    return bool(distributed.gather_rows(np.array([int(flag)], np.int32))[0, 0])


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
            outputs = Outputs(ctx, algorithm, workdir, start)
            meta["env_steps_total"] = env_steps_so_far(meta, workdir, start)
            if start and budget_reached(c, meta["env_steps_total"]):
                outputs.end_at(start)
            summary: dict[str, Any] = {"start_step": start, "success_before": meta.get("success_before")}
            if start == 0 and outputs.schedule.evaluates(0):
                summary["success_before"] = outputs.evaluate(state, 0)["eval/pass@1"]
            state = _loop(ctx, algorithm, state, ckpt, workdir, start, meta, summary, fingerprint, outputs)
            outputs.finish(state, start)
        finally:
            ckpt.close()
        if c.eval.num_tasks:
            summary["success_after"] = outputs.evals.pass_at_1(outputs.end)
        if primary:
            summary["plot"] = metrics.plot(workdir, workdir / "curves.png", keys=PLOT_KEYS)
    summary["final_step"] = outputs.end
    return summary


def budget_reached(config, env_steps_total: float) -> bool:
    return bool(config.env_steps_budget) and env_steps_total >= config.env_steps_budget


def env_steps_so_far(meta: dict, workdir, start: int) -> float:
    """Environment steps of the first ``start`` training steps: the checkpoint's count, or (checkpoints
    written before it was kept) the sum over the run's metrics lines up to ``start``."""
    if "env_steps_total" in meta or not start:
        return float(meta.get("env_steps_total", 0.0))
    path = paths.workdir_path(workdir) / metrics.JSONL_NAME
    rows = metrics.read_jsonl(path) if path.exists() else []
    return float(sum(r.get("env_steps", 0.0) for r in rows if r.get("step", math.inf) <= start))


def _loop(ctx, algorithm, state, ckpt, workdir, start, meta, summary, fingerprint, outputs: Outputs):
    c = ctx.config
    writer = metrics.MetricsWriter(workdir, resume_step=start if start else None)
    prev_entropy = meta.get("token_entropy")
    env_total = meta["env_steps_total"]
    bar = metrics.progress_bar(c.total_steps, initial=start, enabled=c.progress_bar or None)
    t_start = time.perf_counter()
    for step in range(start, outputs.end):
        state, record, episodes = train_step(ctx, algorithm, state, step)
        if prev_entropy is not None:
            record["measured_entropy_change"] = record["token_entropy"] - prev_entropy
        prev_entropy = record["token_entropy"]
        env_total += float(record["env_steps"])
        record["env_steps_total"] = env_total
        last = step + 1 == c.total_steps or budget_reached(c, env_total)
        if last:
            outputs.end_at(step + 1)
        outputs.after_step(state, step + 1, record, episodes)
        t0 = time.perf_counter()
        device, host = algorithm.checkpoint_tree(state)
        ckpt.save(step + 1, device, host=host, force=last,
                  meta={"token_entropy": prev_entropy, "task_cursor": step + 1, "seed": c.seed,
                        "success_before": summary["success_before"], "config": fingerprint,
                        "env_steps_total": env_total})
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
        if last:
            break
    bar.close()
    writer.close()
    return state
