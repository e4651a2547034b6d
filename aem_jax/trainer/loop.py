"""The outer training loop: rollout -> advantages (+AEM) -> updates -> metrics -> checkpoint.

Phases of ``train`` in a fixed order (as big_vision's main): validate config,
distributed init, workdir check, mesh, model, optimiser state, restore, loop,
final eval and plot. Everything random derives from ``jax.random.key(seed)``
folded with the step, and task seeds from (seed, step, task index), so a run
killed at any point and resumed from its checkpoint continues exactly.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aem_jax import objectives as obj
from aem_jax import sharding
from aem_jax.rollout import SamplerPolicy, collect
from aem_jax.trainer import algorithms, checkpoint, distributed, metrics, setup
from aem_jax.trainer.advantages import AdvantageSettings, compute_advantages
from aem_jax.trainer.update import (
    LossSettings, TrainState, forward_stats, init_value_head, pg_update_step, place_state,
)

log = logging.getLogger(__name__)

BATCH_KEYS = ("tokens", "attention_mask", "loss_mask", "turn_ids", "old_logp", "ref_logp")


def task_seeds(seed: int, step: int, num_tasks: int) -> list[int]:
    """Environment seeds of the tasks of one training step (disjoint from eval)."""
    return [(seed * 1_000_003 + step * num_tasks + n) % (2**30) for n in range(num_tasks)]


def to_host(x: Any) -> np.ndarray:
    """The global value of an array as numpy, on every process.

    Multi-host: batch arrays are split over the devices of all processes and
    no process can read the others' rows; every process holds the same
    global batch (same rollouts), so gathering gives each the same value.
    """
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def eval_seeds(num_tasks: int) -> list[int]:
    return [2**30 + n for n in range(num_tasks)]


class Trainer:
    """Holds the pieces of one run; ``run()`` trains to ``config.total_steps``."""

    def __init__(self, config, workdir: str):
        setup.validate(config)
        distributed.maybe_initialize(config.distributed or None)
        self.config = config
        self.workdir = os.fspath(workdir)
        checkpoint.check_writable(self.workdir)
        self.algorithm = algorithms.get(config.algorithm)
        self.mesh = sharding.make_mesh(dict(config.mesh))
        self.rollout_config = setup.rollout_config(config)
        self.env_kwargs = dict(config.env.kwargs)
        with sharding.use_mesh(self.mesh):
            self.model, self.tokenizer = setup.build_model(config, self.mesh)
        self.graphdef, params, self.rest = nnx.split(self.model, nnx.Param, ...)
        self.optimizer = setup.optimizer(config)
        extra = init_value_head(self.model.config.hidden_size) if self.algorithm.value_head else {}
        opt_state = jax.jit(self.optimizer.init)((params, extra))
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, extra=extra,
                           opt_state=opt_state, nonfinite=jnp.zeros((), jnp.int32))
        self.state = place_state(state, self.mesh)
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        # A copy: the update donates (and so deletes) the live parameter buffers.
        self.ref_params = jax.tree.map(jnp.copy, self.state.params) if config.loss.kl_coef else None
        self._build_steps()

    # Compiled steps -------------------------------------------------------

    def _build_steps(self):
        c = self.config
        self.loss_settings = LossSettings(
            kind=self.algorithm.loss, clip_low=c.loss.clip_low, clip_high=c.loss.clip_high,
            dual_clip=c.loss.dual_clip or None, agg=c.loss.agg, entropy_coef=c.loss.entropy_coef,
            entropy_mask=c.loss.entropy_mask,
            kl_coef=c.loss.kl_coef, kl_kind=c.loss.kl_kind,
            value_coef=c.ppo.value_coef if self.algorithm.value_head else 0.0,
            chunk_size=c.loss.chunk_size, num_turns=self.rollout_config.max_turns
            if c.rollout.history == "concatenated" else 1)
        self.adv_settings = AdvantageSettings(
            estimator=self.algorithm.estimator, num_groups=c.rollout.num_tasks,
            num_episodes=c.rollout.num_tasks * c.rollout.group_size, max_turns=c.rollout.max_turns,
            normalize_std=self.algorithm.normalize_std and c.advantage.normalize_std,
            gamma=c.advantage.gamma, step_weight=c.advantage.gigpo_step_weight,
            aem_enabled=c.aem.enabled, aem_lam=c.aem.lam, aem_min_range=c.aem.min_range,
            aem_scope=c.aem.scope, aem_signal=c.aem.signal, aem_shuffle=c.aem.shuffle)
        self._update = jax.jit(functools.partial(
            pg_update_step, graphdef=self.graphdef, optimizer=self.optimizer, settings=self.loss_settings),
            donate_argnums=(0,), out_shardings=(self.state_shardings, None))
        self._forward = jax.jit(functools.partial(
            forward_stats, graphdef=self.graphdef, chunk_size=c.loss.chunk_size,
            with_values=self.algorithm.value_head))
        self._advantages = jax.jit(functools.partial(compute_advantages, settings=self.adv_settings))
        self._gae = jax.jit(functools.partial(
            obj.bilevel_gae, gamma=c.ppo.gamma, lam=c.ppo.lam, token_lam=c.ppo.token_lam))
        self._whiten = jax.jit(obj.whiten)

    # Rollouts ---------------------------------------------------------------

    def policy(self, temperature: float | None = None) -> SamplerPolicy:
        model = nnx.merge(self.graphdef, self.state.params, self.rest)
        t = self.config.rollout.temperature if temperature is None else temperature
        return SamplerPolicy.for_rollout(model, self.tokenizer, self.rollout_config, temperature=t,
                                         top_k=self.config.rollout.top_k, top_p=self.config.rollout.top_p)

    def collect(self, step: int):
        c = self.config
        key = jax.random.fold_in(jax.random.key(c.seed), step)
        batch, records, roll = collect(
            c.env.name, self.policy(), self.tokenizer, self.rollout_config, key=key,
            task_seeds=task_seeds(c.seed, step, c.rollout.num_tasks), env_kwargs=self.env_kwargs)
        roll = dict(roll, env_steps=sum(r.turns for r in records))
        if self.algorithm.dynamic_sampling:
            batch, records, roll = self._dynamic_sampling(step, batch, records, roll)
        return batch, records, roll

    def _dynamic_sampling(self, step, batch, records, roll):
        """DAPO: replace groups whose returns are all equal with informative groups
        from extra rollouts (up to ``dapo.max_resample`` of them); what stays
        uninformative is masked out of the loss."""
        c, G = self.config, self.config.rollout.group_size
        def informative(recs):
            rets = np.array([r.episode_return for r in recs]).reshape(-1, G)
            return rets.max(axis=1) > rets.min(axis=1)
        good = informative(records)
        pool = []
        for attempt in range(c.dapo.max_resample):
            if good.all() or len(pool) >= (~good).sum():
                break
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(c.seed), step), 1_000 + attempt)
            seeds = task_seeds(c.seed + 7919 * (attempt + 1), step, c.rollout.num_tasks)
            extra, extra_recs, _ = collect(c.env.name, self.policy(), self.tokenizer, self.rollout_config,
                                           key=key, task_seeds=seeds, env_kwargs=self.env_kwargs)
            pool += [(extra, extra_recs, n) for n in np.flatnonzero(informative(extra_recs))]
            roll["env_steps"] += sum(r.turns for r in extra_recs)
        fields = {f: np.array(getattr(batch, f)) for f in batch.__dataclass_fields__}
        for n in np.flatnonzero(~good):
            rows = slice(n * G, (n + 1) * G)
            if pool:
                src, src_recs, m = pool.pop(0)
                for f in fields:
                    if f not in ("group_ids", "episode_ids"):
                        fields[f][rows] = np.asarray(getattr(src, f))[m * G:(m + 1) * G]
                records[rows] = src_recs[m * G:(m + 1) * G]
            else:
                fields["loss_mask"][rows] = 0.0
        roll = dict(roll, dapo_informative_frac=float(good.mean()))
        return type(batch)(**fields), records, roll

    # One step ---------------------------------------------------------------

    def train_step(self, step: int) -> dict[str, Any]:
        c = self.config
        t0 = time.perf_counter()
        batch, records, roll = self.collect(step)
        t_roll = time.perf_counter() - t0
        t1 = time.perf_counter()
        dev = sharding.put_batch(batch, self.mesh)
        arrays = {k: getattr(dev, k) for k in BATCH_KEYS}
        token_adv = None
        if self.algorithm.value_head or self.ref_params is not None:
            stats = self._forward(self.state.params, self.state.extra, arrays)
            if self.ref_params is not None:
                ref = self._forward(self.ref_params, self.state.extra, arrays)
                arrays["ref_logp"] = ref["logp"]
            if self.algorithm.value_head:
                token_adv, returns = self._gae(stats["values"], dev.turn_rewards, dev.turn_ids,
                                               dev.loss_mask, dev.turn_valid)
                if c.ppo.whiten_advantages:
                    token_adv = self._whiten(token_adv, dev.loss_mask)
                arrays["returns"] = returns
        key = jax.random.fold_in(jax.random.key(c.seed + 1), step)
        adv_BT, adv_info, _ = self._advantages(dev, key=key, token_advantages_BT=token_adv)
        arrays["advantages"] = adv_BT
        update_metrics = self._run_epochs(arrays, step)
        jax.block_until_ready(self.state)
        t_update = time.perf_counter() - t1
        out = self.episode_metrics(batch, records, roll, t_roll=t_roll, t_update=t_update,
                                   train_passes=c.learner.epochs)
        out.update({k: float(v) for k, v in adv_info.items()})
        out.update(update_metrics)
        return out

    def episode_metrics(self, batch, records, roll, *, t_roll: float, t_update: float,
                        train_passes: int) -> dict[str, Any]:
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
        out.update({f"rollout_{k}": float(v) for k, v in roll.items() if k.startswith("time") or k == "dapo_informative_frac"})
        # every environment step this training step took, DAPO's extra rollouts included
        out["env_steps"] = float(roll.get("env_steps", sum(r.turns for r in records)))
        return out

    def _run_epochs(self, arrays, step):
        c = self.config
        B = arrays["tokens"].shape[0]
        mb = min(c.learner.minibatch_size, B)
        host = jax.tree.map(to_host, arrays)
        history = []
        for epoch in range(c.learner.epochs):
            perm = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(c.seed + 2), step * 1000 + epoch), B))
            for start in range(0, B - mb + 1, mb):
                rows = perm[start:start + mb]
                minibatch = sharding.put_batch({k: v[rows] for k, v in host.items()}, self.mesh)
                self.state, m = self._update(self.state, minibatch)
                history.append(m)
        stacked = jax.tree.map(lambda *xs: float(np.mean([np.asarray(x) for x in xs])), *history)
        stacked["nonfinite_in_a_row"] = int(self.state.nonfinite)
        stacked["skipped_updates"] = float(sum(float(m["skipped"]) for m in history))
        stacked.pop("skipped", None)
        return stacked

    def evaluate(self, num_tasks: int) -> float:
        """Success rate of the current policy (sampled) on held-out task seeds."""
        cfg = setup.rollout_config(self.config, num_tasks=num_tasks, group_size=1)
        _, records, _ = collect(self.config.env.name, self.policy(), self.tokenizer, cfg,
                                key=jax.random.key(self.config.seed + 12345), task_seeds=eval_seeds(num_tasks),
                                env_kwargs=self.env_kwargs)
        return float(np.mean([r.success for r in records]))

    # The run ----------------------------------------------------------------

    # Checkpoint hooks: algorithms with more state (critics, targets, replay
    # buffers) override these three.

    def checkpoint_state(self) -> Any:
        """Device pytree saved in checkpoints (sharded arrays)."""
        return self.state

    def checkpoint_host(self) -> Any:
        """Host numpy pytree saved in checkpoints (e.g. a replay buffer), or None."""
        return None

    def load_checkpoint(self, state: Any, host: Any) -> None:
        """Installs restored checkpoint contents."""
        del host
        self.state = state

    def restore(self, ckpt: checkpoint.Checkpointer) -> tuple[int, dict[str, Any]]:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                self.checkpoint_state())
        restored = ckpt.restore(abstract)
        if restored is None:
            return 0, {}
        self.load_checkpoint(restored.state, restored.host)
        log.info("resumed from step %d", restored.step)
        return int(restored.step), dict(restored.meta)

    def run(self) -> dict[str, Any]:
        c = self.config
        primary = distributed.is_primary()
        ckpt = checkpoint.Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                       max_to_keep=c.checkpoint.keep, save_interval_steps=c.checkpoint.every)
        with sharding.use_mesh(self.mesh):
            start, meta = self.restore(ckpt)
            writer = metrics.MetricsWriter(self.workdir, resume_step=start if start else None)
            summary: dict[str, Any] = {"start_step": start}
            # Kept in checkpoint metadata, so a resumed run still reports it.
            summary["success_before"] = meta.get("success_before")
            if c.eval.num_tasks and start == 0:
                summary["success_before"] = self.evaluate(c.eval.num_tasks)
                if primary:
                    print(f"success before training: {summary['success_before']:.2f} "
                          f"({c.eval.num_tasks} held-out tasks)", flush=True)
            prev_entropy = meta.get("token_entropy")
            bar = metrics.progress_bar(c.total_steps, initial=start, enabled=c.progress_bar or None)
            t_start = time.perf_counter()
            for step in range(start, c.total_steps):
                record = self.train_step(step)
                if prev_entropy is not None:
                    record["measured_entropy_change"] = record["token_entropy"] - prev_entropy
                prev_entropy = record["token_entropy"]
                t0 = time.perf_counter()
                ckpt.save(step + 1, self.checkpoint_state(), host=self.checkpoint_host(),
                          meta={"token_entropy": prev_entropy, "task_cursor": step + 1, "seed": c.seed,
                                "success_before": summary["success_before"]},
                          force=step + 1 == c.total_steps)
                record["time_checkpoint_s"] = time.perf_counter() - t0
                record["wall_s"] = time.perf_counter() - t_start
                writer.write(step + 1, record)
                bar.update(1)
                bar.set_postfix(metrics.bar_postfix(record, ("success", "token_entropy", "alpha_std")))
                if record["nonfinite_in_a_row"] >= c.max_nonfinite_in_a_row:
                    ckpt.close()
                    raise FloatingPointError(
                        f"{record['nonfinite_in_a_row']} updates in a row had a non-finite loss or gradient "
                        f"(limit config.max_nonfinite_in_a_row={c.max_nonfinite_in_a_row}) at step {step + 1}; "
                        f"lower config.optim.learning_rate or check the rewards")
            bar.close()
            ckpt.close()
            writer.close()
            if c.eval.num_tasks:
                summary["success_after"] = self.evaluate(c.eval.num_tasks)
                if primary:
                    print(f"success after training: {summary['success_after']:.2f} "
                          f"({c.eval.num_tasks} held-out tasks)", flush=True)
                    metrics.write_json(os.path.join(self.workdir, "eval.json"), {
                        "step": c.total_steps, "num_tasks": c.eval.num_tasks,
                        "success_before": summary["success_before"],
                        "success_after": summary["success_after"]})
            if primary:
                summary["plot"] = metrics.plot(self.workdir, os.path.join(self.workdir, "curves.png"),
                                               keys=("success", "token_entropy", "alpha_std", "predicted_entropy_drift"))
        summary["final_step"] = c.total_steps
        return summary


def trainer_class(config) -> type[Trainer]:
    """The Trainer (sub)class of the configured algorithm (its registry runner)."""
    runner = algorithms.get(config.algorithm).runner
    if runner is None:
        return Trainer
    module_name, attr = runner.split(":")
    import importlib

    return getattr(importlib.import_module(module_name), attr)


def train(config, workdir: str) -> dict[str, Any]:
    """Trains as ``config`` says, writing metrics and checkpoints to ``workdir``."""
    return trainer_class(config)(config, workdir).run()
