"""Checks a training config before anything is built: its keys, types and ranges.

``check(config)`` runs first in the trainer (and in ``python -m aem_jax.train``
before jax compiles anything). The schema is ``defaults.base()``: every config
starts from it, so a key it lacks is a typo and a key missing from the config
was deleted. Numeric ranges and choices come from one table, ``RULES``;
fields outside it are held to the type of their ``base()`` default. The
``env.kwargs`` block is checked against the registered environment's
constructor instead. Algorithm-specific rules (the ``archer`` and ``etpo``
blocks' ranges, history requirements) belong to each algorithm's record in
``aem_jax.trainer.algorithms``; ``check`` calls its ``validate`` last.

Every error is a ``ConfigError`` (a ``ValueError``) naming the key, the value
and what is allowed: ``config.optim.b2=1.5 is not allowed; must be in [0, 1)``.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import numbers
import os
import re
from typing import Any, NoReturn, Sequence

from ml_collections import ConfigDict

from aem_jax import envs
from aem_jax.envs import base as env_registry
from aem_jax.models.attention import IMPLS as ATTENTION_IMPLS
from aem_jax.models.config import DTYPES, MODEL_TYPES, REMATS
from aem_jax.models.tokenizer import SPECIAL_TOKENS
from aem_jax.objectives import aem, policy
from aem_jax.rollout.config import HISTORY_MODES, OVERLONG_ACTIONS
from aem_jax.trainer import defaults, records

ENTROPY_MASKS = ("all", "nonzero_advantage")
AGGREGATIONS = policy.AGGREGATIONS
AEM_SCOPES = aem.SCOPES
AEM_SIGNALS = aem.SIGNALS
TOKENIZERS = ("auto", "word", "bpe")
# Blocks whose keys are not fixed by base(): the environment's keyword arguments.
OPEN_BLOCKS = ("env.kwargs",)
# Blocks whose ranges are their algorithm's to check (types are still checked here).
ALGORITHM_BLOCKS = ("archer", "etpo", "sft")


class ConfigError(ValueError):
    """A config key or value that is not allowed; the message names the key."""


def fail(key: str, value: Any, allowed: str) -> NoReturn:
    """Raises the ``config.KEY=VALUE is not allowed; ALLOWED`` error."""
    raise ConfigError(f"config.{key}={value!r} is not allowed; {allowed}")


# --- the table of numeric ranges and choices ----------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
    """The values one field allows: an int or finite number in a range, or a choice."""

    kind: str                     # "int" | "number" | "choice"
    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False        # low itself excluded
    open_high: bool = False       # high itself excluded
    also: tuple = ()              # values allowed outside the range (0 = off, -1 = the rest)
    choices: tuple = ()
    text: str = ""                # how the allowed values read, when the range says too little

    def describe(self) -> str:
        if self.text:
            return self.text
        if self.kind == "choice":
            return "allowed: " + ", ".join(repr(c) for c in self.choices)
        low, high = f"{self.low:g}", f"{self.high:g}"
        if math.isinf(self.high):
            return "finite" if math.isinf(self.low) else (">" if self.open_low else ">=") + " " + low
        return f"in {'(' if self.open_low else '['}{low}, {high}{')' if self.open_high else ']'}"

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed, or None when it is."""
        if self.kind == "choice":
            return None if isinstance(value, str) and value in self.choices else self.describe()
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)  # True is an int
        right_type = number and (self.kind == "number" or isinstance(value, numbers.Integral))
        if not right_type or not math.isfinite(value):
            wanted = "must be " + ("an int" if self.kind == "int" else "a finite number")
            described = self.describe()
            return wanted if described == "finite" else f"{wanted}{':' if self.text else ''} {described}"
        if value in self.also:
            return None
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return None if above and below else f"must be {self.describe()}"


def _int(low: float = -math.inf, *, also: tuple = (), text: str = "") -> Rule:
    return Rule("int", low=low, also=also, text=text)


def _number(low: float = -math.inf, high: float = math.inf, *, open_low: bool = False,
            open_high: bool = False, also: tuple = (), text: str = "") -> Rule:
    return Rule("number", low, high, open_low, open_high, also, text=text)


def _one_of(choices: Sequence[str]) -> Rule:
    return Rule("choice", choices=tuple(choices))


_POSITIVE_INT, _COUNT = _int(1), _int(0)
# Options only the policy-gradient family's update (pg.py) implements: the
# algorithms with their own block (ALGORITHM_BLOCKS) refuse them.
PG_ONLY = {
    "learner.max_kl": "the step-rejecting KL check",
}
_POSITIVE, _NONNEGATIVE, _UNIT = _number(0, open_low=True), _number(0), _number(0, 1)
_MESH_AXIS = _int(1, also=(-1,), text="-1 (all remaining devices) or >= 1")

RULES: dict[str, Rule] = {
    "seed": _COUNT,
    "total_steps": _POSITIVE_INT,
    "env_steps_budget": _COUNT,
    "max_nonfinite_in_a_row": _POSITIVE_INT,
    "model.model_type": _one_of(sorted(MODEL_TYPES)),
    "model.dtype": _one_of(DTYPES),
    "model.param_dtype": _one_of(DTYPES),
    "model.remat": _one_of(REMATS),
    "model.attention": _one_of(ATTENTION_IMPLS),
    "model.tokenizer": _one_of(TOKENIZERS),
    **{f"model.{k}": _POSITIVE_INT for k in (
        "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")},
    # a byte-level BPE keeps every byte and the special tokens in its vocabulary
    "model.bpe_vocab_size": _int(256 + len(SPECIAL_TOKENS)),
    "model.tokenizer_corpus_tasks": _COUNT,
    **{f"rollout.{k}": _POSITIVE_INT for k in (
        "num_tasks", "group_size", "max_turns", "max_context_tokens", "max_action_tokens", "num_threads")},
    "rollout.history": _one_of(HISTORY_MODES),
    "rollout.enable_thinking": _one_of(("template", "on", "off")),
    "rollout.observation_role": _one_of(("user", "tool")),
    "rollout.overlong_actions": _one_of(OVERLONG_ACTIONS),
    "rollout.window": _COUNT,
    "rollout.seq_bucket": _int(0, text=">= 0 (0 = pad every batch to rollout.max_context_tokens)"),
    "rollout.invalid_penalty": _NONNEGATIVE,
    "rollout.temperature": _NONNEGATIVE,
    "rollout.top_k": _COUNT,
    "rollout.top_p": _number(0, 1, open_low=True),
    "rollout.step_timeout_s": _POSITIVE,
    "advantage.gamma": _UNIT,
    "advantage.gigpo_step_weight": _NONNEGATIVE,
    "aem.lam": _number(),
    "aem.min_range": _NONNEGATIVE,
    "aem.scope": _one_of(AEM_SCOPES),
    "aem.signal": _one_of(AEM_SIGNALS),
    "loss.clip_low": _number(0, 1, open_high=True),
    "loss.clip_high": _NONNEGATIVE,
    "loss.dual_clip": _number(1, open_low=True, also=(0,), text="0 (off) or a constant > 1"),
    "loss.agg": _one_of(AGGREGATIONS),
    "loss.entropy_coef": _NONNEGATIVE,
    "loss.entropy_mask": _one_of(ENTROPY_MASKS),
    "loss.kl_coef": _NONNEGATIVE,
    "loss.kl_kind": _one_of(policy.KL_KINDS),
    "loss.chunk_size": _POSITIVE_INT,
    "ppo.value_coef": _NONNEGATIVE,
    "ppo.gamma": _UNIT,
    "ppo.lam": _UNIT,
    "ppo.token_lam": _UNIT,
    "dapo.max_resample": _COUNT,
    "learner.epochs": _POSITIVE_INT,
    "learner.minibatch_size": _POSITIVE_INT,
    "learner.microbatch_size": _int(0, text=">= 0 (0 = the whole minibatch at once)"),
    "learner.max_kl": _NONNEGATIVE,
    "optim.learning_rate": _POSITIVE,
    "optim.warmup_steps": _COUNT,
    "optim.schedule": _one_of(("constant", "cosine")),
    "optim.final_lr_fraction": _number(0, 1),
    "optim.decay_steps": _COUNT,
    "optim.success_gate": _number(0, 1, open_high=True),
    "optim.b1": _number(0, 1, open_high=True),
    "optim.b2": _number(0, 1, open_high=True),
    "optim.eps": _POSITIVE,
    "optim.weight_decay": _NONNEGATIVE,
    "optim.grad_clip": _POSITIVE,
    **{f"mesh.{k}": _MESH_AXIS for k in ("data", "fsdp", "tensor")},
    "checkpoint.every": _POSITIVE_INT,
    "checkpoint.keep": _POSITIVE_INT,
    "eval.num_tasks": _COUNT,
    "eval.every": _int(0, text=">= 0 (0 = only before and after training)"),
    "eval.samples_per_task": _POSITIVE_INT,
    "records.transcripts_every": _int(0, text=">= 0 (0 = no transcripts)"),
    "export.every": _int(0, text=">= 0 (0 = only at the end)"),
    "export.dtype": _one_of(DTYPES),
}


# --- keys ----------------------------------------------------------------------

def _is_block(value: Any) -> bool:
    return isinstance(value, (ConfigDict, dict))


def paths(node, prefix: str = "", *, skip: Sequence[str] = ()) -> dict[str, Any]:
    """Dotted key -> value of every key under ``node``, blocks included (not below ``skip``)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        path = prefix + key
        out[path] = value
        if _is_block(value) and path not in skip:
            out.update(paths(value, path + ".", skip=skip))
    return out


def _suggestion(key: str, known: Sequence[str]) -> str:
    """"did you mean a.b?" for the known keys whose last name is nearest to ``key``'s
    (difflib; the same block's keys first), else the keys of ``key``'s block."""
    parent, _, leaf = key.rpartition(".")

    def score(candidate: str) -> float:
        where, _, name = candidate.rpartition(".")
        return difflib.SequenceMatcher(None, leaf, name).ratio() + 0.05 * (where == parent)

    scored = sorted(((score(k), k) for k in known), reverse=True)
    if scored and scored[0][1].rpartition(".")[0] == parent:  # a near key of the same block: only those
        scored = [(s, k) for s, k in scored if k.rpartition(".")[0] == parent]
    close = [k for s, k in scored[:3] if s >= max(0.6, scored[0][0] - 0.1)]
    if close:
        return f"did you mean {' or '.join(close)}?"
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
    return f"keys of {f'config.{parent}' if parent else 'config'}: {', '.join(siblings)}"


def unknown_key(key: str, known: Sequence[str]) -> ConfigError:
    return ConfigError(f"config.{key} is not a config key; {_suggestion(key, known)}")


def check_override_key(config, key: str) -> None:
    """Raises ConfigError unless ``key`` (``a.b.c``) names a key of ``config``.

    For ``--config.KEY=VALUE`` and ``setup.load_config`` overrides: only keys
    the config already has can be set.
    """
    known = list(paths(config))
    node, walked = config, []
    for name in key.split("."):
        if not _is_block(node):
            raise ConfigError(f"config.{key} is not a config key; config.{'.'.join(walked)} is a value, "
                              "not a block of keys")
        walked.append(name)
        if name not in node:
            raise unknown_key(".".join(walked), known)
        node = node[name]


def _compare(node, schema, prefix: str, known: Sequence[str]) -> None:
    """Raises for the first key of ``node`` not in ``schema``, or of ``schema`` not in ``node``."""
    for key in node.keys():
        path = prefix + key
        if key not in schema:
            raise unknown_key(path, known)
        value, expected = node[key], schema[key]
        if _is_block(value) != _is_block(expected):
            fail(path, value, "must be a block of keys" if _is_block(expected) else "must be a value, not a block")
        if _is_block(value) and path not in OPEN_BLOCKS:
            _compare(value, expected, path + ".", known)
    for key in schema.keys():
        if key not in node:
            raise ConfigError(f"config.{prefix}{key} is missing; config files start from "
                              "aem_jax.trainer.defaults.base(), which sets every key")


def check_keys(config) -> None:
    """Every key is one of ``defaults.base()``'s and none of them is missing."""
    schema = defaults.base()
    _compare(config, schema, "", list(paths(schema, skip=OPEN_BLOCKS)))


# --- values ----------------------------------------------------------------------

def _type_problem(value: Any, default: Any) -> str | None:
    """Why ``value`` cannot replace ``default`` (a field outside RULES), or None."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be True or False"
    if isinstance(default, str):
        return None if isinstance(value, str) else "must be a string"
    if isinstance(default, numbers.Integral):
        return _int().problem(value)
    if isinstance(default, numbers.Real):
        return _number().problem(value)
    return None


def check_values(config) -> None:
    """Each field's type, finiteness and range (``RULES``), or its ``base()`` default's type."""
    for key, default in paths(defaults.base(), skip=OPEN_BLOCKS).items():
        if _is_block(default):
            continue
        value = config
        for name in key.split("."):
            value = value[name]
        in_algorithm_block = key.split(".")[0] in ALGORITHM_BLOCKS
        rule = None if in_algorithm_block else RULES.get(key)
        problem = rule.problem(value) if rule else _type_problem(value, default)
        if problem:
            fail(key, value, problem)


def check_relations(config) -> None:
    """Rules between fields, and patterns that must compile."""
    if config.algorithm in ALGORITHM_BLOCKS:
        for key, what in PG_ONLY.items():
            section, field = key.split(".")
            if config[section][field]:
                fail(key, config[section][field], f"{what} is implemented for the policy-gradient family only, "
                     f"not algorithm={config.algorithm!r}: use 0")
    m, r = config.model, config.rollout
    if m.source == "scratch":
        if m.num_heads % m.num_kv_heads:
            fail("model.num_heads", m.num_heads, f"must be a multiple of model.num_kv_heads={m.num_kv_heads}")
        if m.head_dim % 2:
            fail("model.head_dim", m.head_dim, "must be even (RoPE rotates pairs of dimensions)")
    if r.max_action_tokens >= r.max_context_tokens:
        fail("rollout.max_action_tokens", r.max_action_tokens,
             f"must be below rollout.max_context_tokens={r.max_context_tokens} (the prompt needs room)")
    episodes = r.num_tasks * r.group_size
    mb = config.learner.minibatch_size
    if episodes % mb and r.history == "concatenated":
        fail("learner.minibatch_size", mb, f"must divide num_tasks * group_size = {episodes}")
    micro = config.learner.microbatch_size
    if micro and (micro > mb or mb % micro):
        fail("learner.microbatch_size", micro, f"must divide learner.minibatch_size={mb} "
             "(0 = no gradient accumulation)")
    if m.param_dtype == "bfloat16" and m.dtype == "float32":
        fail("model.param_dtype", m.param_dtype, "bfloat16 parameters need model.dtype='bfloat16' "
             "(float32 compute over bfloat16 storage is never what is wanted)")
    if [config.mesh[k] for k in ("data", "fsdp", "tensor")].count(-1) > 1:
        fail("mesh", dict(config.mesh), "at most one axis may be -1 (all remaining devices)")
    if r.action_pattern:
        try:
            re.compile(r.action_pattern)
        except re.error as e:
            fail("rollout.action_pattern", r.action_pattern, f"must be a regular expression ({e})")


def check_model_source(config) -> None:
    """A hub id cannot be downloaded offline: say so before the run starts anything."""
    source = config.model.source
    if source != "scratch" and not os.path.isdir(source) and os.environ.get("HF_HUB_OFFLINE"):
        fail("model.source", source, "it is not a local directory and HF_HUB_OFFLINE is set; download it "
             "elsewhere and point config.model.source at the local copy")


def check_endpoint(config) -> None:
    """``rollout.endpoint`` is "" or an http(s) URL of a server; ``rollout.reload_route`` a path."""
    from urllib.parse import urlsplit

    r = config.rollout
    if r.endpoint:
        url = urlsplit(r.endpoint)
        if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
            fail("rollout.endpoint", r.endpoint, "must be '' (the in-process sampler) or an http(s) URL of an "
                 "OpenAI-compatible server, e.g. 'http://127.0.0.1:8000'")
        try:
            url.port
        except ValueError as e:
            fail("rollout.endpoint", r.endpoint, f"must have a valid port ({e})")
    if not r.reload_route.startswith("/") or any(c.isspace() for c in r.reload_route):
        fail("rollout.reload_route", r.reload_route, "must be a path starting with '/', e.g. "
             "'/update_weights_from_disk'")


def check_env(config) -> None:
    """``env.name`` is registered and ``env.kwargs`` fit its constructor."""
    name = config.env.name
    if name not in envs.registered():
        fail("env.name", name, f"registered environments: {', '.join(envs.registered())}")
    kwargs = dict(config.env.kwargs)
    try:
        params = list(inspect.signature(env_registry.resolve(name)).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: the constructor decides
        return
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        accepted = [f"env.kwargs.{p.name}" for p in named]
        for key in kwargs:
            if f"env.kwargs.{key}" not in accepted:
                raise ConfigError(f"config.env.kwargs.{key} is not a keyword argument of environment "
                                  f"{name!r}; {_suggestion(f'env.kwargs.{key}', accepted)}")
    missing = [p.name for p in named if p.default is p.empty and p.name not in kwargs]
    if missing:
        raise ConfigError(f"config.env.kwargs.{missing[0]} is missing; environment {name!r} requires it")


def check_eval(config) -> None:
    """pass@k values, and a held-out split that exists and is not the training split."""
    e = config.eval
    n, ks = e.samples_per_task, e.pass_at
    allowed = f"must be a non-empty tuple of distinct ints k in [1, eval.samples_per_task={n}], e.g. (1,)"
    if (not isinstance(ks, (tuple, list)) or not ks or len(set(ks)) != len(ks)
            or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n for k in ks)):
        fail("eval.pass_at", ks, allowed)
    has_split, default = records.split_default(config.env.name)
    if not has_split:
        if e.split:
            fail("eval.split", e.split, f"environment {config.env.name!r} has no splits (it takes no split "
                 "keyword argument): leave it '' and held-out task seeds are used")
        return
    train_split = dict(config.env.kwargs).get("split", default)
    held_out = e.split or records.HELD_OUT_SPLIT
    if records.splits_overlap(held_out, train_split):
        fail("eval.split", e.split, f"evaluation plays {held_out!r}, which overlaps the training split "
             f"(env.kwargs.split={train_split!r}); name another split (\"\" = {records.HELD_OUT_SPLIT!r}), "
             "or disjoint slices of one split (train 'test[:450]', eval 'test[450:]')")


def check(config) -> None:
    """Raises ConfigError for the first key or value that is not allowed.

    Order: keys, then each value, then rules between values, the model source,
    the environment, the evaluation settings, and last the algorithm: its name, then its record's own
    ``validate`` (its config block, its history requirements).
    """
    check_keys(config)
    check_values(config)
    check_relations(config)
    check_model_source(config)
    check_env(config)
    check_endpoint(config)
    check_eval(config)
    # Imported here: the registry imports every algorithm module, and they (and
    # setup) import this module for ConfigError.
    from aem_jax.trainer import algorithms

    try:
        algorithm = algorithms.get(config.algorithm)
    except ValueError as e:  # its message names the key and the registered names
        raise ConfigError(str(e)) from None
    algorithm.validate(config)
