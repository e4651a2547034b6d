"""Checkpoints with orbax: device state, host state and JSON metadata per step.

One step directory holds up to three items:

* ``state``: a pytree of (possibly sharded) jax arrays: model, optimizer,
  critics and target networks. Restored straight into the shardings of an
  abstract target (``sharding.abstract_state``), so no host ever holds the
  full parameters. Typed PRNG keys (``jax.random.key``) are stored as their
  key data and re-wrapped on restore.
* ``host``: an optional pytree of numpy arrays (e.g. a replay buffer) whose
  shapes need not be known before restoring.
* ``meta``: a JSON dict: step, task/data cursor, RNG stream position, config.

Atomicity: on a local disk orbax writes ``<step>.orbax-checkpoint-tmp`` and
renames it to ``<step>`` only after every item committed (on GCS, which has no
rename, a ``commit_success`` marker is written last), so a crash or a full
disk never leaves a directory that looks like a finished step. If a save fails, this
module deletes the temporary directory and raises :class:`CheckpointError`
naming the step. A step that no longer restores (deleted or corrupted files)
is reported by step, moved aside to ``corrupt_<step>`` and the previous step
is used instead.

Integrity: the metadata of every step holds a checksum of each array
(:func:`checksums.inspect_arrays`), compared after restoring, so corruption
that still decodes (a flipped bit in compressed data) is caught like a file
that no longer reads. Steps written before checksums existed restore
unchecked. A state holding NaN or inf is never saved: it would become the
step a crashed run resumes from.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from aem_jax.trainer import checkpoint_trees as trees
from aem_jax.trainer import checksums, paths

log = logging.getLogger(__name__)

_TMP_MARK = ".orbax-checkpoint-tmp"
_CHECKSUM_KEY = "_checksums"  # meta entry: {"state": {path: int}, "host": {path: int}}


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or no checkpoint could be restored."""


class LayoutMismatchError(CheckpointError):
    """A step's arrays are not the arrays this run holds (other names or shapes).

    Not corruption: the step was written by another version of aem_jax or
    for another model or algorithm, so it is reported at once and never
    moved aside.
    """


def _show_paths(paths_: list[str], limit: int = 6) -> str:
    shown = ", ".join(paths_[:limit])
    return shown + (f" (and {len(paths_) - limit} more)" if len(paths_) > limit else "")


def layout_difference(saved: Mapping[str, tuple], wanted: Mapping[str, tuple]) -> str | None:
    """A short description of how two {array path: shape} layouts differ, or None."""
    only_saved = sorted(set(saved) - set(wanted))
    only_wanted = sorted(set(wanted) - set(saved))
    reshaped = sorted(k for k in set(saved) & set(wanted) if tuple(saved[k]) != tuple(wanted[k]))
    parts = []
    if only_saved:
        parts.append(f"{len(only_saved)} arrays only in the checkpoint: {_show_paths(only_saved)}")
    if only_wanted:
        parts.append(f"{len(only_wanted)} arrays only in this run: {_show_paths(only_wanted)}")
    if reshaped:
        parts.append(f"{len(reshaped)} arrays with another shape: " + _show_paths(
            [f"{k} {tuple(saved[k])} on disk vs {tuple(wanted[k])}" for k in reshaped], 3))
    return "; ".join(parts) or None


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _layout(tree: Any) -> dict[str, tuple]:
    """{"a/b/0": shape}: paths spelled the same whether a level is a dict,
    a list or a named tuple (orbax's metadata tree may use another kind)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(e) for e in path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


class Restored(NamedTuple):
    """What :meth:`Checkpointer.restore` returns."""

    step: int
    state: Any
    meta: dict[str, Any]
    host: Any | None


def check_writable(directory: str | os.PathLike, *, min_free_bytes: int = 0) -> epath.Path:
    """Creates ``directory`` if needed and proves it is writable.

    Writes and deletes a small probe file (this is what catches read-only
    mounts, permission errors and a disk that is already full), and for local
    paths checks that at least ``min_free_bytes`` are free.

    Raises:
      CheckpointError: naming the path and the reason.
    """
    path = paths.workdir_path(directory)
    probe = path / f".write_probe_{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"directory {os.fspath(path)!r} is not writable: {e}") from e
    if paths.is_local(path) and min_free_bytes > 0:
        free = shutil.disk_usage(os.fspath(path)).free
        if free < min_free_bytes:
            raise CheckpointError(
                f"directory {os.fspath(path)!r} has {free} bytes free, fewer than the "
                f"{min_free_bytes} required (min_free_bytes)"
            )
    return path


def _verify_checksums(step: int, saved: Mapping[str, Any] | None, state: Any, host: Any | None) -> None:
    """Raises CheckpointError if a restored array differs from the one saved
    (steps written before checksums existed have none and pass)."""
    if not saved:
        return
    actual = checksums.inspect_arrays(state).checksums
    if set(saved.get("state", {})) - set(actual):
        log.warning("step %d: leaves %s were saved but not restored, so not verified", step,
                    sorted(set(saved["state"]) - set(actual)))
    wrong = checksums.checksum_mismatches(saved.get("state", {}), actual)
    if host is not None and "host" in saved:
        wrong += checksums.checksum_mismatches(saved["host"], checksums.inspect_arrays(host).checksums)
    if wrong:
        raise CheckpointError(
            f"checkpoint step {step} restored arrays that differ from the saved ones (corrupted data): "
            + ", ".join(wrong)
        )


def _sync(name: str) -> None:
    """Barrier across processes (no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Checkpointer:
    """Keeps the last ``max_to_keep`` checkpoints of a run in ``directory``.

    Saves are asynchronous (the train loop goes on while arrays are written);
    a failure is raised, naming its step, from the next :meth:`save`,
    :meth:`wait` or :meth:`close`. All processes of a multi-host run must
    call every method (orbax coordinates them); paths may be ``gs://``.

    Args:
      directory: where step directories go (created if missing).
      max_to_keep: how many recent steps to keep (>= 2 so that a corrupted
        latest step has a fallback).
      save_interval_steps: :meth:`save` is a no-op on steps not divisible by
        it (unless ``force=True``).
      async_save: write in a background thread.
      min_free_bytes: fail at start if fewer bytes are free (local paths).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
        min_free_bytes: int = 0,
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep} must be >= 1")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps={save_interval_steps} must be >= 1")
        self.directory = check_writable(directory, min_free_bytes=min_free_bytes)
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.save_interval_steps = save_interval_steps
        self._pending_step: int | None = None
        self._threads_before_save: set[threading.Thread] = set(threading.enumerate())
        self._manager = self._new_manager()

    def _new_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory, options=self._options, item_names=("state", "host", "meta")
        )

    # Saving ---------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        *,
        meta: Mapping[str, Any] | None = None,
        host: Any | None = None,
        force: bool = False,
    ) -> bool:
        """Starts saving ``state`` (+ ``host`` numpy pytree, ``meta`` JSON) as ``step``.

        Returns whether a save was started (False off the save interval).
        Raises :class:`CheckpointError` if this or the previous pending save
        failed (for example ``ENOSPC``), or if a floating leaf of ``state``
        holds NaN or inf (then nothing is written); no partial step
        directory remains.
        """
        # The interval rule is ours: orbax would also save the first step seen.
        if not force and step % self.save_interval_steps:
            # Off-interval steps never block on a save in flight, but report
            # one that has already finished with an error (single process
            # only: processes may disagree on "finished", and wait() syncs).
            if (
                self._pending_step is not None
                and jax.process_count() == 1
                and not self._manager.is_saving_in_progress()
            ):
                self.wait()
            return False
        self.wait()
        report = checksums.inspect_arrays(state)
        if report.nonfinite:
            raise CheckpointError(
                f"refusing to save checkpoint step {step}: state leaf {report.nonfinite[0]} holds NaN or inf "
                f"({len(report.nonfinite)} such leaves); only finite states are saved, nothing was written "
                f"(latest good step: {self.latest_step()})"
            )
        self._check_space(step, state, host)
        record = {"step": int(step), **dict(meta or {})}
        record[_CHECKSUM_KEY] = {"state": report.checksums}
        items = {"state": ocp.args.StandardSave(trees.keys_to_data(state))}
        if host is not None:
            host, record[trees.EMPTY_KEY] = trees.encode_host(host)
            record[_CHECKSUM_KEY]["host"] = checksums.inspect_arrays(host).checksums
            items["host"] = ocp.args.StandardSave(host)
        items["meta"] = ocp.args.JsonSave(record)
        self._pending_step = int(step)
        self._threads_before_save = set(threading.enumerate())
        try:
            saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # orbax raises whatever the file system raised
            self._fail(e)
        if not saved:
            self._pending_step = None
        return saved

    def _check_space(self, step: int, state: Any, host: Any | None) -> None:
        if not paths.is_local(self.directory):
            return
        needed = trees.process_bytes(state) + (trees.process_bytes(host) if host is not None else 0)
        free = shutil.disk_usage(os.fspath(self.directory)).free
        if free < needed:
            raise CheckpointError(
                f"checkpoint for step {step} needs about {needed} bytes but only {free} are free "
                f"in {os.fspath(self.directory)!r}; nothing was written"
            )

    def wait(self) -> None:
        """Blocks until the pending save is committed; raises if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._fail(e)
        self._pending_step = None

    def _fail(self, error: Exception) -> None:
        """Removes the failed step's temporary files, resets orbax, re-raises."""
        step = self._pending_step
        self._pending_step = None
        try:  # stops orbax's writer threads before their directory goes
            self._manager.close()
        except Exception as e:  # the manager is already broken; keep the first error
            log.debug("ignoring error while closing a failed CheckpointManager: %s", e)
        self._join_writer_threads()
        self._remove_tmp(step)
        self._manager = self._new_manager()
        reason = "disk full" if isinstance(error, OSError) and error.errno == errno.ENOSPC else "error"
        raise CheckpointError(
            f"saving checkpoint step {step} to {os.fspath(self.directory)!r} failed ({reason}): {error}; "
            "the partial checkpoint was removed"
        ) from error

    def _join_writer_threads(self, timeout_s: float = 10.0) -> None:
        """Waits for threads the failed save started: after a failure orbax
        stops waiting for its helpers, which may still create directories."""
        deadline = time.monotonic() + timeout_s
        for thread in threading.enumerate():
            if (
                thread not in self._threads_before_save
                and type(thread).__module__.startswith("orbax")
                and thread is not threading.current_thread()
            ):
                try:  # orbax's threads re-raise their own failure from join()
                    thread.join(max(0.0, deadline - time.monotonic()))
                except Exception as e:
                    log.debug("checkpoint writer thread %s failed: %s", thread.name, e)

    def _remove_tmp(self, step: int | None) -> None:
        """Deletes ``<step>.orbax-checkpoint-tmp*`` (all steps' when step is None)."""
        quiet_checks = 0
        for attempt in range(20):
            if jax.process_index() != 0 or not self.directory.exists() or quiet_checks == 2:
                break
            leftovers = [
                child
                for child in self.directory.iterdir()
                if _TMP_MARK in child.name and (step is None or child.name.split(".")[0] == str(step))
            ]
            # Done once two looks in a row, a moment apart, find nothing.
            quiet_checks = 0 if leftovers else quiet_checks + 1
            for child in leftovers:
                if paths.is_local(child):
                    shutil.rmtree(os.fspath(child), ignore_errors=True)
                else:
                    child.rmtree()
            time.sleep(0.05 * min(attempt + 1, 4))
        _sync(f"checkpoint_remove_tmp_{step}")

    # Restoring ------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Finished steps on disk, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest finished step, or None."""
        return self._manager.latest_step()

    def restore(self, abstract_state: Any, *, step: int | None = None,
                check_meta: Any = None) -> Restored | None:
        """Restores the newest step that reads back (or exactly ``step``).

        Args:
          abstract_state: pytree of ``jax.ShapeDtypeStruct`` with shardings
            (``sharding.abstract_state``) or of arrays with the same structure
            as the saved state; arrays are restored into those shardings.
          step: a specific step; then a failure raises instead of falling back.
          check_meta: optional ``fn(meta, step)`` called with a step's JSON
            metadata before its arrays are read (e.g. the config fingerprint
            check); what it raises propagates.

        A step whose array names or shapes differ from ``abstract_state``
        raises :class:`LayoutMismatchError` at once with a short list of the
        differences: that is another version or configuration, not
        corruption, so nothing is moved aside.

        Returns:
          ``Restored(step, state, meta, host)`` or None when there is no
          checkpoint. Steps that fail to restore are reported with a warning
          naming them and moved aside to ``corrupt_<step>``.
        """
        self.wait()
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        failed: list[int] = []
        errors: list[str] = []
        for candidate in steps:
            # Outside the try: a config or layout mismatch is not corruption.
            if check_meta is not None:
                meta = self._read_meta(candidate)
                if meta is not None:
                    check_meta(meta, candidate)
            self._check_layout(candidate, abstract_state)
            try:
                result = self._restore_step(candidate, abstract_state)
            except Exception as e:  # corrupted files surface as many error types
                message = f"checkpoint step {candidate} in {os.fspath(self.directory)!r} failed to restore: {e!r}"
                if step is not None:
                    raise CheckpointError(message) from e
                warnings.warn(message + "; trying the previous step", RuntimeWarning, stacklevel=2)
                log.error(message)
                failed.append(candidate)
                errors.append(message)
                continue
            # Only once an older step restored is a newer failure proven to be
            # corruption rather than a wrong target; then move it out of the
            # way so that the resumed run can save that step number again.
            for bad in failed:
                self._set_aside(bad)
            return result
        if errors:
            raise CheckpointError("no checkpoint could be restored (nothing was moved):\n" + "\n".join(errors))
        return None

    def _read_meta(self, step: int) -> dict[str, Any] | None:
        """The step's JSON metadata alone, or None when it does not read."""
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception:  # unreadable: the full restore reports it as corruption
            return None
        return dict(restored["meta"]) if restored["meta"] is not None else None

    def _check_layout(self, step: int, abstract_state: Any) -> None:
        """Raises LayoutMismatchError when the saved array names/shapes differ."""
        try:
            saved = self._manager.item_metadata(step)["state"]
        except Exception:  # unreadable metadata: the full restore reports it as corruption
            return
        tree = getattr(saved, "tree", saved)
        if tree is None:
            return
        wanted = _layout(trees.abstract_keys_to_data(abstract_state))
        difference = layout_difference(_layout(tree), wanted)
        if difference:
            raise LayoutMismatchError(
                f"checkpoint step {step} in {os.fspath(self.directory)!r} holds other arrays than this run "
                f"({difference}). It was written by another version of aem_jax or for another model or "
                "algorithm; nothing was moved. Resume with the code and config that wrote it, or start "
                "from a new workdir (use model.source to start from exported weights).")

    def _restore_step(self, step: int, abstract_state: Any) -> Restored:
        target = trees.abstract_keys_to_data(abstract_state)
        target = jax.tree.map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(
                np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)
            ),
            target,
        )
        items = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
        has_host = (self.directory / str(step) / "host").exists()
        if has_host:
            items["host"] = ocp.args.StandardRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        meta = dict(restored["meta"])
        if meta.get("step") != step:
            raise CheckpointError(f"metadata of step {step} says step {meta.get('step')!r}")
        _verify_checksums(step, meta.pop(_CHECKSUM_KEY, None), restored["state"],
                          restored["host"] if has_host else None)
        state = trees.data_to_keys(restored["state"], abstract_state)
        host = trees.decode_host(restored["host"], meta.pop(trees.EMPTY_KEY, {})) if has_host else None
        return Restored(step, state, meta, host)

    def _set_aside(self, step: int) -> None:
        """Renames a broken step so orbax no longer lists it (kept for inspection)."""
        log.warning("moving corrupted checkpoint step %d aside to corrupt_%d", step, step)
        if jax.process_index() == 0:
            source = self.directory / str(step)
            target = self.directory / f"corrupt_{step}"
            if target.exists():
                target.rmtree()
            if source.exists():
                source.rename(target)
        _sync(f"checkpoint_set_aside_{step}")
        self._manager.reload()

    def close(self) -> None:
        """Waits for the pending save (raising its error, if any) and closes."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
