"""Builds what a run needs from its config: model, tokenizer, optimiser, rollout settings."""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import optax
from flax import nnx

from aem_jax import envs, models, sharding
from aem_jax.models import bpe
from aem_jax.rollout import RolloutConfig
from aem_jax.rollout.config import message_words
from aem_jax.trainer.validate import ConfigError, check_override_key, fail


def load_config(spec: str, overrides: tuple[str, ...] | list[str] = ()):
    """The config of a file, as ``python -m aem_jax.train --config=SPEC --config.KEY=VALUE`` builds it.

    For scripts that build a trainer without the command line. ``spec`` is
    ``path/to/config.py[:variants]``; each override is ``"a.b=value"`` and is
    converted to the type of the field it replaces (``true``/``false`` for
    booleans, any case). An unknown key or a value of the wrong type raises
    ``ConfigError`` naming the key (and the nearest known keys), as
    the command line does; the values themselves are checked by the trainer.
    """
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("aem_jax_config", path)
    if module_spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(variant or None)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        check_override_key(config, key)
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        old = node[leaf]
        if isinstance(old, bool):
            if text.lower() not in ("true", "false"):
                raise ConfigError(f"config.{key}={text!r} is not a boolean (true or false)")
            value: Any = text.lower() == "true"
        elif old is None or isinstance(old, str):
            value = text
        else:
            try:
                value = type(old)(text)
            except (TypeError, ValueError):
                raise ConfigError(f"config.{key}={text!r} is not allowed; must be of type "
                                  f"{type(old).__name__}, like {old!r}") from None
        node[leaf] = value
    return config


# rollout.enable_thinking -> the chat template's enable_thinking (None: leave the template's default)
THINKING = {"template": None, "on": True, "off": False}


def rollout_config(config, *, num_tasks: int | None = None, group_size: int | None = None) -> RolloutConfig:
    r = config.rollout
    return RolloutConfig(
        num_tasks=num_tasks or r.num_tasks, group_size=group_size or r.group_size,
        max_turns=r.max_turns, history=r.history, window=r.window,
        max_context_tokens=r.max_context_tokens, max_action_tokens=r.max_action_tokens,
        overlong_actions=r.overlong_actions, invalid_penalty=r.invalid_penalty, step_timeout_s=r.step_timeout_s,
        num_threads=r.num_threads, seq_len=None if r.seq_bucket else r.max_context_tokens,
        seq_bucket=r.seq_bucket or 64, system_prompt=r.system_prompt or None,
        action_pattern=r.action_pattern or None, row_bucket=config.learner.minibatch_size,
        enable_thinking=THINKING[r.enable_thinking], observation_role=r.observation_role,
        engine=r.engine,
    )


def scratch_tokenizer(config):
    """Word-level tokenizer over the environment's vocabulary when it has one,
    else a byte-level BPE trained on the first observations of a few tasks."""
    env = envs.make(config.env.name, **dict(config.env.kwargs))
    kind = config.model.tokenizer
    if kind not in ("auto", "word", "bpe"):
        fail("model.tokenizer", kind, "allowed: auto, word, bpe")
    has_vocab = hasattr(env, "vocabulary")
    if kind == "word" or (kind == "auto" and has_vocab):
        if not has_vocab:
            fail("model.tokenizer", kind, f"environment {config.env.name!r} has no vocabulary(); use bpe")
        return models.build_tokenizer(list(env.vocabulary()) + message_words(rollout_config(config)))
    corpus = list(env.corpus()) if hasattr(env, "corpus") else []
    for seed in range(config.model.tokenizer_corpus_tasks):
        corpus.append(env.reset(seed=2**29 + seed).text)
    close = getattr(env, "close", None)
    if close:
        close()
    return bpe.train_bpe_tokenizer(corpus, vocab_size=config.model.bpe_vocab_size)


def build_model(config, mesh, *, init_seed: int = 0):
    """(model, tokenizer), the model's parameters created already sharded on ``mesh``
    (a scratch model's from ``init_seed``, the run's "init" stream).

    Parameters are stored in ``model.param_dtype`` and the model computes in
    ``model.dtype``: float32 master weights under bfloat16 compute keep the
    small updates that bfloat16 storage would round away. A Hugging Face
    checkpoint is read straight into its shardings (each process reads only
    the slices its devices hold).
    """
    m = config.model
    if m.source == "scratch":
        tokenizer = scratch_tokenizer(config)
        mc = models.ModelConfig(
            vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
            num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim, tie_embeddings=m.tie_embeddings, model_type=m.model_type,
            qkv_bias=m.model_type == "qwen2", qk_norm=m.model_type == "qwen3",
            dtype=m.dtype, param_dtype=m.param_dtype, rope_theta=10_000.0,
            max_position_embeddings=config.rollout.max_context_tokens,
            remat=m.remat, attention=m.attention)
        model = sharding.create_sharded(lambda: models.Decoder(mc, rngs=nnx.Rngs(init_seed)), mesh)
        return model, tokenizer
    return models.from_pretrained(m.source, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh,
                                  remat=m.remat, attention=m.attention)


def updates_per_step(config) -> int:
    """Policy optimiser steps in one training step of the nominal rollout batch.

    ``epochs * ceil(num_tasks * group_size / minibatch_size)``: exact for
    concatenated histories (one row per episode); with windowed histories
    (one row per turn) or DAPO's refill the real count varies per step.
    ArCHer's actor takes ``archer.actor_steps`` steps per iteration instead.
    """
    if config.get("algorithm") == "archer":
        return config.archer.actor_steps
    rows = config.rollout.num_tasks * config.rollout.group_size
    return config.learner.epochs * -(-rows // config.learner.minibatch_size)


def learning_rate(o, total_updates: int | None = None) -> optax.Schedule:
    """Linear warm-up from lr / warmup to lr, then constant or cosine decay.

    Cosine (Loshchilov & Hutter, 2017):
      lr_t = lr * (f + (1 - f) * (1 + cos(pi * (t - w) / (D - w))) / 2),  w <= t <= D
    with f = ``final_lr_fraction`` and D = ``decay_steps`` (or ``total_updates``).
    """
    warmup = max(o.warmup_steps, 1)
    start = o.learning_rate / warmup  # not 0, so the first optimiser step is not a no-op
    if o.schedule == "constant":
        return optax.warmup_constant_schedule(start, o.learning_rate, warmup)
    if o.schedule != "cosine":
        raise ValueError(f"optim.schedule={o.schedule!r}; allowed: 'constant', 'cosine'")
    horizon = o.decay_steps or total_updates
    if not horizon:
        raise ValueError("optim.schedule='cosine' needs optim.decay_steps > 0 "
                         "(or a config with total_steps to derive it from)")
    return optax.warmup_cosine_decay_schedule(
        init_value=start, peak_value=o.learning_rate, warmup_steps=warmup,
        decay_steps=max(horizon, warmup + 1), end_value=o.learning_rate * o.final_lr_fraction)


def success_gate(o, success: float) -> float:
    """The learning-rate factor of a step whose rollouts succeeded at rate ``success``.

      g(s) = clip((1 - s) / (1 - gate), final_lr_fraction, 1),   gate = ``optim.success_gate``

    The full rate while at most a share ``gate`` of the episodes succeeds,
    then falling linearly with the share that still fails, down to
    ``final_lr_fraction`` of it. A run keeps its full rate for as long as
    it takes to learn (a fixed decay starves seeds that learn late), takes
    small steps once nearly every group succeeds (when a full-size step on
    the few remaining advantages can knock a learnt policy off course), and
    gets its full rate back if success falls. 1 when the gate is off (0).
    """
    if not o.success_gate:
        return 1.0
    return min(max((1.0 - success) / (1.0 - o.success_gate), o.final_lr_fraction), 1.0)


def optimizer(config) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with `learning_rate`'s schedule over the run."""
    o = config.optim
    total = None
    if hasattr(config, "total_steps"):
        # ArCHer's first actor_warmup iterations train only the critic.
        iterations = config.total_steps - (config.archer.actor_warmup if config.get("algorithm") == "archer" else 0)
        total = max(iterations, 1) * updates_per_step(config)
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(learning_rate(o, total), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay),
    )
