"""Training metrics: JSONL + TensorBoard event files, a progress bar, plots.

Every step the trainer calls :meth:`MetricsWriter.write` with a dict of
scalars. It appends one JSON line ``{"step": s, ...}`` to
``workdir/metrics.jsonl`` (flushed, so a killed run loses nothing already
written) and one TensorBoard scalar per key to event files under
``workdir/tb/`` (written with the ``tensorboard`` package alone; TensorFlow is
not needed). :func:`plot` draws curves from the JSONL for ``docs/``.

Resuming: ``MetricsWriter(workdir, resume_step=k)`` drops JSON lines with
step > k (they were logged after the checkpoint the run resumes from and will
be logged again), so the file of a resumed run equals that of an
uninterrupted run. TensorBoard gets a ``SessionLog.START`` event at step k+1
(step 1 for a fresh run), which makes its readers discard the orphaned events
after k (or an earlier run's events in a reused workdir).

Object-store workdirs (``gs://...``) cannot be appended to: the files are
written to a local staging directory and copied to the workdir every
``sync_interval_s`` seconds and on :meth:`MetricsWriter.close`. Only process 0
writes (by default). Every workdir path goes through :mod:`paths` (etils
``epath``), so ``read_jsonl``, ``write_json`` and ``plot`` take local paths and
object-store URIs alike; the staging directory and TensorBoard's event files
are always local.
"""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from aem_jax.trainer import paths

JSONL_NAME = "metrics.jsonl"
TB_DIR = "tb"


def _to_python(value: Any) -> Any:
    """numpy / jax scalars -> Python numbers; strings and bools pass through."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric value {value!r} has shape {array.shape}; only scalars are allowed")
    return array.item()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file (local or object store); a torn
    last line (killed writer) is skipped."""
    records = []
    with paths.workdir_path(path).open("r") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as JSON to ``path`` (local or object store) so that a
    killed writer never leaves a half-written file (:func:`paths.write_atomic`)."""
    paths.write_atomic(path, json.dumps(obj, indent=1) + "\n")


def _truncate_jsonl(path: str, resume_step: int | None) -> None:
    """Keeps records with step <= resume_step (none when None), atomically."""
    if not paths.workdir_path(path).exists():
        return
    kept = [] if resume_step is None else [r for r in read_jsonl(path) if r.get("step", -1) <= resume_step]
    paths.write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def _wait_for_later_timestamp(logdir: str) -> None:
    """Waits until a new event file's name sorts after every existing one.

    TensorBoard reads a run's event files in name order, and the name starts
    with the creation time in whole seconds followed by a process-wide counter
    compared as text ("10" < "9"). A writer created in the same second as an
    earlier one (a resume straight after a crash, in tests) could therefore be
    read first, and its ``SessionLog.START`` would not purge the orphaned
    steps. Waiting for the next second (at most one) keeps the order right.
    """
    stamps = []
    for name in os.listdir(logdir) if os.path.isdir(logdir) else ():
        match = re.match(r"events\.out\.tfevents\.(\d+)\.", name)
        if match:
            stamps.append(int(match.group(1)))
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


class _EventWriter:
    """Scalars to a TensorBoard event file with the ``tensorboard`` package only."""

    def __init__(self, logdir: str, resume_step: int | None):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event_pb2 = event_pb2
        _wait_for_later_timestamp(logdir)
        self._writer = EventFileWriter(logdir, flush_secs=30)
        # A START event purges, in TensorBoard's reader, every earlier event at
        # or after its step: the orphaned steps of a crashed attempt, or a
        # whole earlier run when a fresh run reuses the workdir.
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        first_step = (resume_step or 0) + 1
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=first_step, session_log=start))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        from tensorboard.compat.proto import summary_pb2

        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()]
        )
        self._writer.add_event(self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsWriter:
    """Appends per-step scalars to ``workdir/metrics.jsonl`` and ``workdir/tb/``.

    Args:
      workdir: run directory (created if missing).
      resume_step: step of the checkpoint the run resumes from; records after
        it are dropped. ``None`` means a fresh run: an old file is emptied.
      enabled: write at all; ``None`` (default) means only on process 0, so
        that one host of a multi-host run writes.
      tensorboard: also write TensorBoard event files.
      staging_dir: write here and copy to ``workdir`` on :meth:`sync`; chosen
        automatically (a temporary directory) for ``gs://`` style workdirs.
      sync_interval_s: with staging, seconds between automatic syncs.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        resume_step: int | None = None,
        enabled: bool | None = None,
        tensorboard: bool = True,
        staging_dir: str | os.PathLike | None = None,
        sync_interval_s: float = 60.0,
    ):
        self.workdir = os.fspath(workdir)
        if enabled is None:
            import jax  # deferred: plotting and reading logs need no JAX

            enabled = jax.process_index() == 0
        self.enabled = enabled
        self.sync_interval_s = sync_interval_s
        self._file = None
        self._events = None
        # Object stores (gs://) cannot append: files are written in a local
        # staging directory and copied to the workdir on every sync.
        remote = not paths.is_local(self.workdir)
        if staging_dir is None and remote and enabled:
            staging_dir = tempfile.mkdtemp(prefix="aem_jax_metrics_")
        self._staging = os.fspath(staging_dir) if staging_dir is not None else None
        self._local = self._staging or self.workdir
        self.path = os.path.join(self._local, JSONL_NAME)
        self._last_sync = time.monotonic()
        if not enabled:
            return
        try:
            paths.workdir_path(self._local).mkdir(parents=True, exist_ok=True)
            if self._staging is not None:
                self._download_jsonl()
            _truncate_jsonl(self.path, resume_step)
            self._file = paths.workdir_path(self.path).open("a")
            if self._staging is not None:
                self.sync()  # proves the workdir is writable now, not at the first sync
        except OSError as e:
            raise OSError(e.errno, f"cannot write metrics to workdir {self.workdir!r}: {e.strerror or e}") from e
        if tensorboard:
            self._events = _EventWriter(os.path.join(self._local, TB_DIR), resume_step)

    def _download_jsonl(self) -> None:
        remote = paths.workdir_path(self.workdir) / JSONL_NAME
        if remote.exists():
            paths.write_atomic(self.path, remote.read_bytes())

    def sync(self) -> None:
        """Copies staged files to the workdir (no-op without staging)."""
        if self._staging is None or not self.enabled:
            return
        target = paths.workdir_path(self.workdir)
        target.mkdir(parents=True, exist_ok=True)
        for root, _, files in os.walk(self._staging):
            relative = os.path.relpath(root, self._staging)
            folder = target if relative == "." else target / relative
            folder.mkdir(parents=True, exist_ok=True)
            for name in files:
                if not name.endswith(".tmp"):
                    (folder / name).write_bytes(pathlib.Path(root, name).read_bytes())
        self._last_sync = time.monotonic()

    def write(self, step: int, scalars: Mapping[str, Any]) -> dict[str, Any]:
        """Logs ``scalars`` for ``step``; returns the record as written."""
        record = {"step": int(step)}
        record.update({str(k): _to_python(v) for k, v in scalars.items()})
        if not self.enabled:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._events is not None:
            numeric = {
                k: v
                for k, v in record.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            self._events.scalars(int(step), numeric)
        if self._staging is not None and time.monotonic() - self._last_sync >= self.sync_interval_s:
            self.flush()
        return record

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._events is not None:
            self._events.flush()
        self.sync()

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None
        if self._events is not None:
            self._events.close()
            self._events = None
        self.sync()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _NoBar:
    """Stands in for tqdm when the bar is off; accepts the same calls."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress_bar(
    total: int,
    *,
    initial: int = 0,
    desc: str = "train",
    enabled: bool | None = None,
    stream: Any = None,
) -> Any:
    """A tqdm bar over steps, or a silent stand-in.

    ``enabled=None`` shows the bar only when ``stream`` (default stdout) is a
    terminal, so logs of batch jobs and tests stay clean.
    """
    stream = stream if stream is not None else sys.stdout
    if enabled is None:
        enabled = bool(getattr(stream, "isatty", lambda: False)())
    if not enabled:
        bar = _NoBar()
        bar.n = initial
        return bar
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, file=stream, dynamic_ncols=True)


def bar_postfix(record: Mapping[str, Any], keys: Iterable[str]) -> dict[str, str]:
    """Short ``{key: value}`` strings of the chosen metrics for ``set_postfix``."""
    out = {}
    for key in keys:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = f"{value:.4g}"
    return out


def plot(
    workdir: str | os.PathLike,
    out_png: str | os.PathLike,
    *,
    keys: Sequence[str] = ("success", "token_entropy"),
    smooth: int = 1,
    title: str | None = None,
) -> str:
    """Draws one panel per metric key (value against step) from the JSONL.

    Args:
      workdir: run directory holding ``metrics.jsonl``, or the ``.jsonl`` file
        itself; local or ``gs://``.
      out_png: image path to write.
      keys: metrics to draw; keys absent from every record are skipped.
      smooth: trailing moving-average window (1 = raw values).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.fspath(workdir)
    if not path.endswith(".jsonl"):
        path = path.rstrip("/") + "/" + JSONL_NAME
    records = read_jsonl(path)
    present = [k for k in keys if any(k in r for r in records)]
    if not present:
        raise ValueError(f"none of the keys {list(keys)} occur in {path!r}")
    if smooth < 1:
        raise ValueError(f"smooth={smooth} must be >= 1")
    fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.2), squeeze=False)
    for ax, key in zip(axes[0], present):
        _draw_panel(ax, records, key, smooth)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = os.fspath(out_png)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    paths.workdir_path(out_png).parent.mkdir(parents=True, exist_ok=True)
    paths.write_atomic(out_png, image.getvalue())
    return out_png


def _draw_panel(ax: Any, records: Sequence[Mapping[str, Any]], key: str, smooth: int) -> None:
    """One metric against step, with a trailing moving average of ``smooth``."""
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    steps = np.array([p[0] for p in pairs], dtype=float)
    values = np.array([p[1] for p in pairs], dtype=float)
    if smooth > 1 and len(values) >= smooth:
        values = np.convolve(values, np.ones(smooth) / smooth, mode="valid")
        steps = steps[smooth - 1 :]
    ax.plot(steps, values)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    finite = values[np.isfinite(values)]
    if len(finite):
        ax.set_title(f"{key} (last {finite[-1]:.3g})")


def summarize(records: Sequence[Mapping[str, Any]], key: str, *, last: int = 10) -> float:
    """Mean of ``key`` over the last ``last`` records that have it (NaN if none)."""
    values = [float(r[key]) for r in records if isinstance(r.get(key), (int, float))][-last:]
    return float(np.mean(values)) if values else math.nan
