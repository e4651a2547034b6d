"""Builds what a run needs from its config: model, tokenizer, optimiser, rollout settings."""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import optax
from flax import nnx

from aem_jax import envs, models
from aem_jax.models import bpe
from aem_jax.rollout import RolloutConfig
from aem_jax.rollout.config import message_words
from aem_jax.trainer import algorithms, sharding

ENTROPY_MASKS = ("all", "nonzero_advantage")
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
AEM_SCOPES = ("group", "batch", "trajectory")
AEM_SIGNALS = ("mean_token_entropy", "surprisal_per_token")


def load_config(spec: str, overrides: tuple[str, ...] | list[str] = ()):
    """The config of a file, as ``python -m aem_jax.train --config=SPEC --config.KEY=VALUE`` builds it.

    For scripts that build a trainer without the command line. ``spec`` is
    ``path/to/config.py[:variants]``; each override is ``"a.b=value"`` and is
    converted to the type of the field it replaces (``true``/``false`` for
    booleans, any case). Unknown keys raise ``KeyError`` naming the key.
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
            raise ValueError(f"override {item!r} is not KEY=VALUE")
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        if leaf not in node:
            raise KeyError(f"config has no key {key!r}")
        old = node[leaf]
        if isinstance(old, bool):
            if text.lower() not in ("true", "false"):
                raise ValueError(f"config.{key}={text!r} is not a boolean (true or false)")
            value: Any = text.lower() == "true"
        elif old is None or isinstance(old, str):
            value = text
        else:
            value = type(old)(text)
        node[leaf] = value
    return config


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ValueError(f"config.{key}={value!r} is not allowed; {allowed}")


def validate(config) -> None:
    """Checks values before anything is built or compiled; names the bad key."""
    algorithms.get(config.algorithm)
    if config.env.name not in envs.registered():
        _fail("env.name", config.env.name, f"registered environments: {', '.join(envs.registered())}")
    checks = [
        ("total_steps", config.total_steps, config.total_steps >= 1, "must be >= 1"),
        ("loss.agg", config.loss.agg, config.loss.agg in AGGREGATIONS, f"allowed: {AGGREGATIONS}"),
        ("loss.dual_clip", config.loss.dual_clip, config.loss.dual_clip == 0 or config.loss.dual_clip > 1,
         "must be 0 (off) or a constant > 1"),
        ("loss.clip_low", config.loss.clip_low, 0 <= config.loss.clip_low < 1, "must be in [0, 1)"),
        ("loss.clip_high", config.loss.clip_high, config.loss.clip_high >= 0, "must be >= 0"),
        ("loss.entropy_mask", config.loss.entropy_mask, config.loss.entropy_mask in ENTROPY_MASKS,
         f"allowed: {ENTROPY_MASKS}"),
        ("aem.scope", config.aem.scope, config.aem.scope in AEM_SCOPES, f"allowed: {AEM_SCOPES}"),
        ("aem.signal", config.aem.signal, config.aem.signal in AEM_SIGNALS, f"allowed: {AEM_SIGNALS}"),
        ("aem.min_range", config.aem.min_range, config.aem.min_range >= 0, "must be >= 0"),
        ("optim.learning_rate", config.optim.learning_rate, config.optim.learning_rate > 0, "must be > 0"),
        ("learner.epochs", config.learner.epochs, config.learner.epochs >= 1, "must be >= 1"),
        ("rollout.temperature", config.rollout.temperature, config.rollout.temperature >= 0, "must be >= 0"),
        ("rollout.seq_bucket", config.rollout.seq_bucket,
         isinstance(config.rollout.seq_bucket, int) and config.rollout.seq_bucket >= 0,
         "must be an int >= 0 (0 = pad every batch to rollout.max_context_tokens)"),
        ("loss.kl_kind", config.loss.kl_kind, config.loss.kl_kind in ("k1", "k2", "k3", "low_var_kl"),
         "allowed: k1, k2, k3, low_var_kl"),
    ]
    for key, value, ok, allowed in checks:
        if not ok:
            _fail(key, value, allowed)
    episodes = config.rollout.num_tasks * config.rollout.group_size
    mb = config.learner.minibatch_size
    if mb < 1 or episodes % mb and config.rollout.history == "concatenated":
        _fail("learner.minibatch_size", mb, f"must be >= 1 and divide num_tasks * group_size = {episodes}")
    if config.algorithm == "ppo" and config.rollout.history != "concatenated":
        _fail("rollout.history", config.rollout.history,
              "ppo's bi-level GAE needs history='concatenated' (turn values of one row)")
    for axis in ("data", "fsdp", "tensor"):
        if axis not in config.mesh:
            _fail("mesh", dict(config.mesh), "needs the axes data, fsdp and tensor (-1 = the rest)")


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
    )


def scratch_tokenizer(config):
    """Word-level tokenizer over the environment's vocabulary when it has one,
    else a byte-level BPE trained on the first observations of a few tasks."""
    env = envs.make(config.env.name, **dict(config.env.kwargs))
    kind = config.model.tokenizer
    if kind not in ("auto", "word", "bpe"):
        _fail("model.tokenizer", kind, "allowed: auto, word, bpe")
    has_vocab = hasattr(env, "vocabulary")
    if kind == "word" or (kind == "auto" and has_vocab):
        if not has_vocab:
            _fail("model.tokenizer", kind, f"environment {config.env.name!r} has no vocabulary(); use bpe")
        return models.build_tokenizer(list(env.vocabulary()) + message_words(rollout_config(config)))
    corpus = list(env.corpus()) if hasattr(env, "corpus") else []
    for seed in range(config.model.tokenizer_corpus_tasks):
        corpus.append(env.reset(seed=2**29 + seed).text)
    close = getattr(env, "close", None)
    if close:
        close()
    return bpe.train_bpe_tokenizer(corpus, vocab_size=config.model.bpe_vocab_size)


def build_model(config, mesh):
    """(model, tokenizer), the model's parameters created already sharded on ``mesh``."""
    m = config.model
    if m.source == "scratch":
        tokenizer = scratch_tokenizer(config)
        mc = models.ModelConfig(
            vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
            num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim, tie_embeddings=m.tie_embeddings, model_type=m.model_type,
            qkv_bias=m.model_type == "qwen2", qk_norm=m.model_type == "qwen3",
            dtype=m.dtype, param_dtype=m.dtype, rope_theta=10_000.0,
            max_position_embeddings=config.rollout.max_context_tokens)
        model = sharding.create_sharded(lambda: models.Decoder(mc, rngs=nnx.Rngs(config.seed)), mesh)
        return model, tokenizer
    if not os.path.isdir(m.source) and os.environ.get("HF_HUB_OFFLINE"):
        raise ValueError(f"config.model.source={m.source!r} is not a local directory and HF_HUB_OFFLINE is set; "
                         "download it elsewhere and point config.model.source at the local copy")
    model, tokenizer = models.from_pretrained(m.source, dtype=m.dtype)
    graphdef, state = nnx.split(model)
    import jax
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    return nnx.merge(graphdef, state), tokenizer


def optimizer(config) -> optax.GradientTransformation:
    o = config.optim
    warmup = max(o.warmup_steps, 1)
    # starts at lr / warmup, not 0, so the first optimiser step is not a no-op
    schedule = optax.warmup_constant_schedule(o.learning_rate / warmup, o.learning_rate, warmup)
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay),
    )
