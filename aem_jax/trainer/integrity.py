"""Run integrity: config fingerprints, one trainer per workdir, array checksums.

Three ways a run gets silently corrupted, and the guard against each:

* Resuming with a different config mixes two experiments in one curve.
  :func:`config_fingerprint` is stored with every checkpoint and
  :func:`check_resume` refuses a resume whose config differs, except in the
  keys listed in :data:`RESUMABLE_KEYS`.
* Two trainers on one workdir overwrite each other's checkpoints and logs.
  :class:`WorkdirLock` holds ``<workdir>/LOCK`` for the life of a run.
* Bit rot or a torn copy of a checkpoint restores as wrong numbers without an
  error. :func:`checksums.inspect_arrays` computes a checksum of every array (saved in
  the checkpoint metadata and compared on restore) and finds non-finite
  leaves, which must never be saved.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from aem_jax.trainer import paths

log = logging.getLogger(__name__)


class ConfigMismatchError(ValueError):
    """A run resumes from a checkpoint written with a different config."""


class WorkdirLockedError(RuntimeError):
    """Another trainer holds the workdir."""


# Config --------------------------------------------------------------------

# Keys whose change cannot alter the numbers a resumed run computes, so a run
# may resume with them changed; a key also covers its sub-keys. total_steps may
# grow (or shrink) but never below the step the run resumes from; a run resumed
# with an env_steps_budget it has already reached ends at the step it resumes from.
RESUMABLE_KEYS: tuple[str, ...] = (
    "total_steps",
    "env_steps_budget",
    "progress_bar",
    "checkpoint.keep",
    "checkpoint.every",
    "eval",       # held-out evaluation: its own random stream, never the training tasks
    "records",    # transcripts written
    "export",     # Hugging Face exports written
    "rollout.num_threads",
    "distributed",
    "max_nonfinite_in_a_row",
    "rollout.step_timeout_s",
)

# Keys added to the config after runs were checkpointed without them, each with
# the value that computes what those runs computed: a run saved before the key
# existed resumes when the key holds that value (any other value is a change).
ADDED_KEYS: dict[str, Any] = {
    "etpo.q_steps": 1,          # one Q step per minibatch
    "etpo.policy_warmup": 0,    # a policy step from the first iteration
}


def _json_value(value: Any) -> Any:
    """A config leaf as a JSON value that is the same in every run."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.generic, np.ndarray)) and np.size(value) == 1:
        return np.asarray(value).item()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if hasattr(value, "__module__") and hasattr(value, "__qualname__"):
        # Functions and classes: their repr holds a memory address.
        return f"{value.__module__}.{value.__qualname__}"
    return str(value)


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
        items = sorted((str(k), v) for k, v in value.items())
        if not items and prefix:
            out[prefix] = {}
        for key, child in items:
            _flatten(child, f"{prefix}.{key}" if prefix else key, out)
    else:
        out[prefix] = _json_value(value)


def config_fingerprint(config: Any) -> dict[str, Any]:
    """``{"sha256": hex, "config": {dotted key: JSON value}}`` of a config.

    ``config`` is an ``ml_collections.ConfigDict`` (or a nested mapping);
    nested dicts, including ``env.kwargs``, become dotted keys. The result
    is JSON-normalized (tuples are lists), so it equals its own JSON round
    trip and can be compared with the copy stored in a checkpoint.
    """
    flat: dict[str, Any] = {}
    _flatten(config, "", flat)
    flat = json.loads(json.dumps(flat))
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return {"sha256": digest, "config": flat}


def _is_resumable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS)


def _same(a: Any, b: Any) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return a == b or (a != a and b != b)  # 1 == 1.0; NaN == NaN
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


_ABSENT = object()


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, sort_keys=True)


def check_resume(
    saved: Mapping[str, Any] | None, config: Any, *, restored_step: int, workdir: str | None = None
) -> None:
    """Refuses to resume from ``restored_step`` with a config that changed.

    Args:
      saved: :func:`config_fingerprint` of the config the checkpoint was
        written with (its ``"config"`` dict alone also works); None for
        checkpoints written before fingerprints existed (logged, not checked).
      config: the config of the run that resumes.
      restored_step: step of the checkpoint; ``total_steps`` must not be below it.
      workdir: named in the error message.

    Raises:
      ConfigMismatchError: naming every changed key with its old and new
        value, sorted by key. Keys in :data:`RESUMABLE_KEYS` may change; a
        key of :data:`ADDED_KEYS` absent from the checkpoint passes at its
        listed value.
    """
    where = workdir if workdir is not None else "the run"
    if saved is None:
        log.warning("checkpoint step %d of %s stores no config fingerprint; the config is not checked",
                    restored_step, where)
        return
    old = saved["config"] if "sha256" in saved and "config" in saved else dict(saved)
    new = config_fingerprint(config)["config"]
    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if key == "total_steps" and isinstance(after, int) and after < restored_step:
            changes.append(f"total_steps {_show(before)} -> {after} (below the restored step {restored_step})")
        elif before is _ABSENT and key in ADDED_KEYS and _same(after, ADDED_KEYS[key]):
            continue  # a key added since the checkpoint, at the value the run had without it
        elif not _is_resumable(key) and (before is _ABSENT or after is _ABSENT or not _same(before, after)):
            changes.append(f"{key} {_show(before)} -> {_show(after)}")
    if changes:
        raise ConfigMismatchError(
            f"resuming {where} from step {restored_step} with a changed config: {', '.join(changes)}; "
            f"use a new --workdir, or set them back (keys that may change on resume: "
            f"{', '.join(RESUMABLE_KEYS)})"
        )


# Workdir lock --------------------------------------------------------------

LOCK_NAME = "LOCK"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class WorkdirLock:
    """One trainer per workdir: holds ``<workdir>/LOCK`` (JSON: host, pid, start).

    Local disks: created with ``O_CREAT | O_EXCL``, so of two trainers
    starting at once exactly one wins. A lock left by a dead process of this
    host (its pid no longer runs) is taken over with a warning; a lock of
    another host never is (this host cannot tell whether that one still
    runs). Object stores have no exclusive create: the check, write and
    read-back there are best effort.

    Only process 0 of a multi-process run takes the lock (``enabled=None``);
    the other processes' calls do nothing.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None):
        self.workdir = os.fspath(workdir)
        self.path = paths.workdir_path(workdir) / LOCK_NAME
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._record: dict[str, Any] | None = None

    @property
    def held(self) -> bool:
        return self._record is not None

    def _new_record(self) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.timezone.utc)
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": now.isoformat(timespec="seconds"),
                "token": uuid.uuid4().hex}

    def _read(self) -> tuple[bool, dict[str, Any] | None]:
        """(exists, holder record or None when unreadable)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return False, None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            return True, None
        return True, holder if isinstance(holder, dict) else None

    def _is_stale(self, holder: dict[str, Any] | None) -> bool:
        if holder is None or holder.get("host") != socket.gethostname():
            return False
        pid = holder.get("pid")
        return isinstance(pid, int) and pid > 0 and not _pid_alive(pid)

    def _locked(self, holder: dict[str, Any] | None) -> WorkdirLockedError:
        if holder is None:
            who = "an unknown trainer (the LOCK file is unreadable)"
        else:
            who = f"host {holder.get('host')!r}, pid {holder.get('pid')}, started {holder.get('started')}"
        return WorkdirLockedError(
            f"workdir {self.workdir!r} is in use by another trainer: {who}. Stop that trainer or use "
            f"another --workdir; if it is no longer running, delete {os.fspath(self.path)} (a lock "
            "of another host is never taken over automatically)"
        )

    def _take_over(self, holder: dict[str, Any]) -> None:
        log.warning("taking over the stale lock %s of pid %s (no longer running on this host, started %s)",
                    os.fspath(self.path), holder.get("pid"), holder.get("started"))
        # Re-read first: another starter may have replaced the stale lock already.
        if self._read() == (True, holder):
            self.path.unlink(missing_ok=True)

    def acquire(self) -> WorkdirLock:
        """Takes the lock; raises :class:`WorkdirLockedError` naming the holder."""
        if not self.enabled or self._record is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = self._new_record()
        if paths.is_local(self.path):
            self._acquire_local(record)
        else:
            self._acquire_remote(record)
        self._record = record
        return self

    def _acquire_local(self, record: dict[str, Any]) -> None:
        for attempt in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                _, holder = self._read()
                if attempt == 0 and self._is_stale(holder):
                    self._take_over(holder)
                    continue
                raise self._locked(holder) from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(record))
                f.flush()
                os.fsync(f.fileno())
            return

    def _acquire_remote(self, record: dict[str, Any]) -> None:
        exists, holder = self._read()
        if exists:
            if not self._is_stale(holder):
                raise self._locked(holder)
            self._take_over(holder)
        self.path.write_text(json.dumps(record))
        # Last writer wins on an object store: read back to see who that was.
        _, now = self._read()
        if now is None or now.get("token") != record["token"]:
            raise self._locked(now)

    def release(self) -> None:
        """Deletes the LOCK file if it is still ours (no-op when not held)."""
        if self._record is None:
            return
        record, self._record = self._record, None
        _, holder = self._read()
        if holder is not None and holder.get("token") == record["token"]:
            self.path.unlink(missing_ok=True)
        else:
            log.warning("%s is no longer ours (now %s); leaving it", os.fspath(self.path), holder)

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
