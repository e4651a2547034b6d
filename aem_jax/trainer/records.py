"""What a run leaves besides checkpoints and metrics: held-out evaluation
results (which tasks, pass@k, ``eval.json``), episode transcripts and
Hugging Face exports.

Layout of the workdir (local or an object store, through :mod:`paths`)::

  eval.json                      every evaluation so far (``history``) and the latest
  transcripts/step_000010.jsonl  the episodes of training step 10, one JSON line each
  transcripts/eval_000010.jsonl  the episodes of the evaluation after step 10
  export/step_000100/            the policy after step 100 as a Hugging Face directory
  export/final/                  the policy at the end of training

Every file is written so that a reader never sees half of it: JSON and JSONL
through :func:`paths.write_atomic`; an export directory is written under a
temporary name and renamed into place on a local disk, and on an object store
uploaded with ``config.json`` last (a directory without it does not load).
With several processes, transcripts are per process (``.process_K`` before
``.jsonl``: each process keeps the text of only its own episodes) and
``eval.json`` and exports are written by process 0 only.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from aem_jax.envs import base as env_registry
from aem_jax.trainer import paths

EVAL_JSON = "eval.json"
TRANSCRIPTS_DIR = "transcripts"
EXPORT_DIR = "export"
FINAL_EXPORT = "final"


# --- pass@k ----------------------------------------------------------------------

def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``num_correct`` successes in ``num_samples``
    samples of one task (Chen et al. 2021, "Evaluating Large Language Models
    Trained on Code", eq. 1)::

        pass@k = 1 - C(n - c, k) / C(n, k)

    the probability that k samples drawn without replacement from the n
    include a success. Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``
    (the same ratio, without the huge binomials); 1 when ``n - c < k``.
    """
    n, c = int(num_samples), int(num_correct)
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def eval_metrics(successes: np.ndarray, returns: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """``eval/pass@k`` for each k and k = 1 (mean over tasks of :func:`pass_at_k`) and the mean return.

    Args:
      successes: [num_tasks, n] booleans, one row per held-out task.
      returns: [num_tasks, n] episode returns.
      ks: the k values (each in [1, n]).
    """
    successes = np.asarray(successes, bool)
    if successes.ndim != 2 or successes.shape != np.shape(returns):
        raise ValueError(f"successes {successes.shape} and returns {np.shape(returns)} must both be [tasks, n]")
    n = successes.shape[1]
    counts = successes.sum(axis=1)
    out = {f"eval/pass@{k}": float(np.mean([pass_at_k(n, c, k) for c in counts])) for k in sorted({1, *ks})}
    out["eval/return"] = float(np.mean(returns))
    return out


# --- held-out tasks ----------------------------------------------------------------

# The split an environment with a ``split`` keyword argument is evaluated on when
# config.eval.split is "".
HELD_OUT_SPLIT = "test"


def split_default(name: str) -> tuple[bool, Any]:
    """(whether environment ``name`` takes a ``split`` keyword argument, its default)."""
    try:
        params = inspect.signature(env_registry.resolve(name)).parameters
    except (TypeError, ValueError):
        return False, None
    split = params.get("split")
    return split is not None, None if split is None or split.default is split.empty else split.default


def eval_split(config) -> str | None:
    """The split held-out evaluation plays: ``eval.split`` (or ``HELD_OUT_SPLIT``) for an
    environment with a ``split`` keyword argument, None for one without (it is
    evaluated on task seeds disjoint from training's, ``rng.eval_seeds``)."""
    has_split, _ = split_default(config.env.name)
    return (config.eval.split or HELD_OUT_SPLIT) if has_split else None


def splits_overlap(a: Any, b: Any) -> bool:
    """Whether split expressions ``a`` and ``b`` ("train", "train+test", "test[:50]",
    "all") surely share tasks: equal, "all", or one names a whole split the other
    uses. Two slices of one split are taken as disjoint (the user's ranges)."""
    if not isinstance(a, str) or not isinstance(b, str):
        return a == b
    if a == b or "all" in (a, b):
        return True
    parts = lambda text: [(p.split("[")[0].strip(), "[" in p) for p in text.split("+")]  # noqa: E731
    return any(x == y and not (sliced_x and sliced_y) for x, sliced_x in parts(a) for y, sliced_y in parts(b))


# --- eval.json --------------------------------------------------------------------

class EvalLog:
    """``workdir/eval.json``: every evaluation of the run, and the latest at the top level.

    The file reads ``{"step", "num_tasks", "samples_per_task", "split",
    "eval/pass@k"..., "success_before", "success_after", "history": [...]}``
    where ``history`` holds one entry per evaluation (its step, settings and
    metrics); ``success_before`` / ``success_after`` are pass@1 at step 0 and at
    ``total_steps`` (None until done). Resuming from step k keeps the entries
    with step <= k (those after k were made after the checkpoint and are made
    again), as :class:`metrics.MetricsWriter` does with its lines.
    """

    def __init__(self, workdir, *, resume_step: int, total_steps: int, enabled: bool):
        self.path = paths.workdir_path(workdir) / EVAL_JSON
        self.total_steps = total_steps
        self.enabled = enabled
        self.history: list[dict[str, Any]] = []
        if enabled and resume_step > 0 and self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                saved = {}
            self.history = [h for h in saved.get("history", []) if h.get("step", math.inf) <= resume_step]

    def find(self, step: int, settings: Mapping[str, Any]) -> dict[str, Any] | None:
        """The entry of an evaluation at ``step`` made with ``settings``, if any."""
        for entry in self.history:
            if entry["step"] == step and all(entry.get(k) == v for k, v in settings.items()):
                return entry
        return None

    def add(self, step: int, settings: Mapping[str, Any], values: Mapping[str, float]) -> dict[str, Any]:
        """Records an evaluation (replacing any entry at ``step`` or later) and rewrites the file."""
        entry = {"step": int(step), **settings, **{k: float(v) for k, v in values.items()}}
        self.history = [h for h in self.history if h["step"] < step] + [entry]
        if self.enabled:
            paths.write_atomic(self.path, json.dumps(self.summary(), indent=1) + "\n")
        return entry

    def pass_at_1(self, step: int) -> float | None:
        entry = next((h for h in self.history if h["step"] == step), None)
        return None if entry is None else entry.get("eval/pass@1")

    def summary(self) -> dict[str, Any]:
        latest = self.history[-1]
        return {**latest, "success_before": self.pass_at_1(0),
                "success_after": self.pass_at_1(self.total_steps), "history": self.history}


# --- transcripts ------------------------------------------------------------------

def episode_line(record, *, step: int, kind: str) -> dict[str, Any]:
    """One episode as a transcript line.

    ``prompt``: the messages before the first action (system prompt, task);
    ``turns``: per turn the action as the policy wrote it (decoded), the
    observation that answered it (absent when the environment failed) and the
    turn's reward (penalties included).
    """
    messages = list(record.transcript)
    first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))
    turns, rest = [], messages[first:]
    i = 0
    while i < len(rest):
        turn = {"action": rest[i]["content"]}
        if i + 1 < len(rest) and rest[i + 1].get("role") != "assistant":
            turn["observation"] = rest[i + 1]["content"]
            i += 1
        i += 1
        turns.append(turn)
    for turn, reward in zip(turns, record.turn_rewards):
        turn["reward"] = float(reward)
    return {"step": int(step), "kind": kind, "episode": record.episode, "group": record.group,
            "seed": record.seed, "prompt": messages[:first], "turns": turns,
            "return": record.episode_return, "success": bool(record.success),
            "invalid_actions": record.invalid_actions, "truncated": bool(record.truncated),
            "failed": bool(record.failed), "error": record.error}


def transcript_path(workdir, name: str) -> epath.Path:
    """``workdir/transcripts/NAME.jsonl`` (``NAME.process_K.jsonl`` with several processes)."""
    suffix = f".process_{jax.process_index()}" if jax.process_count() > 1 else ""
    return paths.workdir_path(workdir) / TRANSCRIPTS_DIR / f"{name}{suffix}.jsonl"


def write_transcripts(workdir, name: str, records, *, step: int, kind: str) -> epath.Path:
    """Writes ``records`` (``EpisodeRecord``s with their chats) as JSONL, atomically."""
    path = transcript_path(workdir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.write_atomic(path, "".join(json.dumps(episode_line(r, step=step, kind=kind)) + "\n" for r in records))
    return path


def step_name(prefix: str, step: int) -> str:
    return f"{prefix}_{int(step):06d}"


# --- Hugging Face export -------------------------------------------------------------

_EXPORT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def cast_params(params, dtype: str):
    """``params`` with every floating array in ``dtype`` (same shardings)."""
    if dtype not in _EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}; allowed: {', '.join(_EXPORT_DTYPES)}")
    target = _EXPORT_DTYPES[dtype]
    return jax.tree.map(lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def _clean_leftovers(export_dir: epath.Path) -> None:
    """Removes the temporary directories of exports that were killed (local disks)."""
    if not export_dir.exists():
        return
    for child in export_dir.iterdir():
        if child.name.startswith(".") and child.name.endswith((".tmp", ".old")):
            shutil.rmtree(os.fspath(child), ignore_errors=True)


def _publish_local(tmp: str, target: epath.Path) -> None:
    """Renames ``tmp`` to ``target`` (replacing an older export of the same name)."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.{uuid.uuid4().hex}.old"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _publish_remote(tmp: str, target: epath.Path) -> None:
    """Uploads the files of ``tmp`` into ``target``, ``config.json`` last."""
    target.mkdir(parents=True, exist_ok=True)
    names = sorted(os.listdir(tmp), key=lambda n: (n == "config.json", n))
    for name in names:
        with open(os.path.join(tmp, name), "rb") as src, (target / name).open("wb") as dst:
            shutil.copyfileobj(src, dst, length=16 * 1024 * 1024)


def export_policy(model, tokenizer, workdir, name: str, *, dtype: str = "float32",
                  source: str | None = None) -> epath.Path:
    """Writes ``model`` (its parameters already in the export dtype) and ``tokenizer``
    to ``workdir/export/NAME`` as a Hugging Face directory; returns its path.

    ``models.save_pretrained`` writes config.json, the safetensors shards and
    the tokenizer files (with the chat template); ``config.json`` then gets
    ``dtype`` as its ``torch_dtype``, and a local ``source`` checkpoint's
    ``generation_config.json`` (sampling defaults) is copied along. Every
    process must call this (sharded parameters are gathered collectively);
    process 0 writes.
    """
    from aem_jax import models  # deferred: importing the trainer must not need the HF stack

    export_dir = paths.workdir_path(workdir) / EXPORT_DIR
    target = export_dir / name
    primary = jax.process_index() == 0
    local = paths.is_local(export_dir)
    tmp = os.devnull  # other processes' path: save_pretrained writes nothing there
    if primary:
        export_dir.mkdir(parents=True, exist_ok=True)
        if local:
            _clean_leftovers(export_dir)
            tmp = os.fspath(export_dir / f".{name}.{uuid.uuid4().hex}.tmp")
        else:
            tmp = tempfile.mkdtemp(prefix="aem_jax_export_")
    try:
        models.save_pretrained(model, tokenizer, tmp)
        if not primary:
            return target
        config_path = os.path.join(tmp, "config.json")
        with open(config_path) as f:
            hf_config = json.load(f)
        hf_config["torch_dtype"] = hf_config["dtype"] = dtype
        with open(config_path, "w") as f:
            json.dump(hf_config, f, indent=2)
        generation = os.path.join(source or "", "generation_config.json")
        if source and os.path.isfile(generation):
            shutil.copy(generation, tmp)
        if local:
            _publish_local(tmp, target)
        else:
            _publish_remote(tmp, target)
    finally:
        if primary and os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which steps evaluate, write transcripts and export (steps count from 1;
    step ``total_steps`` is the end of training)."""

    total_steps: int
    eval_tasks: int
    eval_every: int
    transcripts_every: int
    export_enabled: bool
    export_every: int

    @classmethod
    def of(cls, config) -> Schedule:
        return cls(config.total_steps, config.eval.num_tasks, config.eval.every,
                   config.records.transcripts_every, config.export.enabled, config.export.every)

    def evaluates(self, step: int) -> bool:
        """Held-out evaluation after ``step`` (0: before training)."""
        if not self.eval_tasks:
            return False
        return step in (0, self.total_steps) or bool(self.eval_every and step % self.eval_every == 0)

    def transcribes(self, step: int) -> bool:
        return bool(self.transcripts_every and step % self.transcripts_every == 0)

    def exports(self, step: int) -> str | None:
        """The export name after ``step``, or None: ``final`` at the end,
        ``step_000100`` every ``export.every`` steps before it."""
        if not self.export_enabled:
            return None
        if step == self.total_steps:
            return FINAL_EXPORT
        return step_name("step", step) if self.export_every and step % self.export_every == 0 else None
