"""Tests for aem_jax.trainer.metrics: JSONL, TensorBoard, resume, plots, bar."""

import glob
import io
import json
import os
import uuid

import fsspec
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath as epath_gpath
from etils.epath import register as epath_register
from tensorboard.backend.event_processing import event_accumulator

from aem_jax.trainer import metrics, paths


class _MemoryBackend(epath_backend._FileSystemSpecBackend):
    """etils' fsspec backend, pointed at fsspec's in-memory file system."""

    def fs(self, path):
        del path
        return fsspec.filesystem("memory")


@pytest.fixture
def memory_workdir(monkeypatch):
    """A ``memory://`` workdir: an object store (no rename, no append, no
    ``open()``) reached only through etils epath, as ``gs://`` is.

    etils only knows gs/s3/az/hf, so the scheme is registered here, for the
    test only, the way etils registers those.
    """
    monkeypatch.setattr(epath_gpath, "_URI_PREFIXES", epath_gpath._URI_PREFIXES + ("memory://",))
    monkeypatch.setattr(epath_gpath, "_URI_SCHEMES", epath_gpath._URI_SCHEMES | {"memory"})
    monkeypatch.setattr(epath_gpath, "_is_tf_installed", lambda: False)
    monkeypatch.setitem(epath_gpath._URI_MAP_ROOT, "memory://", "/memory/")
    monkeypatch.setitem(epath_gpath._PREFIX_TO_BACKEND, "memory", _MemoryBackend())
    monkeypatch.setitem(epath_register._URI_PREFIXES_TO_CLS, "memory://", epath_gpath.PosixGPath)
    bucket = f"bucket-{uuid.uuid4().hex[:8]}"
    yield f"memory://{bucket}/run"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{bucket}"):
        fs.rm(f"/{bucket}", recursive=True)


def _log(workdir, steps, *, resume_step=None):
    with metrics.MetricsWriter(workdir, resume_step=resume_step) as writer:
        for step in steps:
            writer.write(step, {"loss": jnp.float32(1.0 / step), "success": np.float64(step % 2), "phase": "train"})


def _tb_scalars(workdir, tag):
    acc = event_accumulator.EventAccumulator(os.path.join(workdir, metrics.TB_DIR))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_jsonl_one_flushed_line_per_step_and_tensorboard_readable(tmp_path):
    writer = metrics.MetricsWriter(tmp_path)
    record = writer.write(1, {"loss": jnp.asarray(0.5), "success": 1, "phase": "train"})
    assert record == {"step": 1, "loss": 0.5, "success": 1, "phase": "train"}
    # Flushed before close: a killed run keeps what it logged.
    assert metrics.read_jsonl(tmp_path / "metrics.jsonl") == [record]
    writer.write(2, {"loss": 0.25, "success": 0})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert _tb_scalars(tmp_path, "loss") == [(1, 0.5), (2, 0.25)]
    assert [s for s, _ in _tb_scalars(tmp_path, "success")] == [1, 2]


def test_non_scalar_metric_is_rejected(tmp_path):
    with metrics.MetricsWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(ValueError, match=r"shape \(2,\)"):
            writer.write(1, {"loss": np.ones(2)})


def test_resume_drops_lines_after_checkpoint_and_equals_uninterrupted(tmp_path):
    _log(tmp_path / "straight", range(1, 7))
    # Interrupted after step 5, last checkpoint at step 3, resumed to step 6.
    _log(tmp_path / "resumed", range(1, 6))
    _log(tmp_path / "resumed", range(4, 7), resume_step=3)
    straight = (tmp_path / "straight" / "metrics.jsonl").read_text()
    assert (tmp_path / "resumed" / "metrics.jsonl").read_text() == straight
    # TensorBoard readers discard the orphaned steps 4..5 of the first attempt.
    assert _tb_scalars(tmp_path / "resumed", "loss") == _tb_scalars(tmp_path / "straight", "loss")
    # A fresh run (no checkpoint) in an old workdir starts an empty log.
    _log(tmp_path / "resumed", [1])
    assert [r["step"] for r in metrics.read_jsonl(tmp_path / "resumed" / "metrics.jsonl")] == [1]
    assert _tb_scalars(tmp_path / "resumed", "loss") == [(1, 1.0)]


def test_staged_writer_mirrors_files_for_object_store_workdirs(tmp_path):
    """The gs:// code path, with a local directory standing in for the bucket."""
    bucket = tmp_path / "bucket" / "run"
    with metrics.MetricsWriter(bucket, staging_dir=tmp_path / "stage1", sync_interval_s=0.0) as writer:
        writer.write(1, {"loss": 1.0})
        assert metrics.read_jsonl(bucket / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]
        writer.write(2, {"loss": 0.5})
        writer.write(3, {"loss": 0.25})
    assert glob.glob(str(bucket / "tb" / "events.out.tfevents.*"))
    # A resumed run on another machine downloads the log and drops step 3.
    with metrics.MetricsWriter(bucket, staging_dir=tmp_path / "stage2", resume_step=2) as writer:
        writer.write(3, {"loss": 0.3})
    assert [r["loss"] for r in metrics.read_jsonl(bucket / "metrics.jsonl")] == [1.0, 0.5, 0.3]


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert metrics.read_jsonl(path) == [{"step": 1, "loss": 2.0}]


def test_disabled_writer_writes_nothing(tmp_path):
    writer = metrics.MetricsWriter(tmp_path / "w", enabled=False)
    assert writer.write(3, {"loss": 1.0}) == {"step": 3, "loss": 1.0}
    writer.close()
    assert not (tmp_path / "w").exists()


def test_unwritable_workdir_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot write metrics to workdir .*file/run"):
        metrics.MetricsWriter(blocker / "run")


def test_plot_writes_png_of_success_and_entropy(tmp_path):
    with metrics.MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in range(1, 21):
            writer.write(step, {"success": step / 20, "token_entropy": 2.0 - step / 20})
    out = metrics.plot(tmp_path, tmp_path / "plots" / "curves.png", smooth=3)
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="none of the keys"):
        metrics.plot(tmp_path, tmp_path / "x.png", keys=("missing",))
    assert metrics.summarize(metrics.read_jsonl(tmp_path / "metrics.jsonl"), "success", last=2) == pytest.approx(0.975)


def test_progress_bar_silent_off_terminal_and_drawn_when_enabled():
    quiet = io.StringIO()
    bar = metrics.progress_bar(10, initial=2, stream=quiet)
    bar.update(3)
    bar.set_postfix(metrics.bar_postfix({"loss": 0.123456, "phase": "x"}, ["loss", "phase"]))
    bar.close()
    assert quiet.getvalue() == "" and bar.n == 5
    shown = io.StringIO()
    bar = metrics.progress_bar(10, stream=shown, enabled=True)
    bar.update(4)
    bar.set_postfix(metrics.bar_postfix({"loss": 0.123456}, ["loss"]))
    bar.close()
    assert "4/10" in shown.getvalue() and "loss=0.1235" in shown.getvalue()


def test_paths_decide_local_or_object_store_in_one_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.is_local("runs/x") and paths.is_local(tmp_path) and not paths.is_local("gs://b/run")
    # Relative local paths become absolute (orbax needs them so); URIs stay URIs.
    assert os.fspath(paths.workdir_path("runs/x")) == str(tmp_path / "runs" / "x")
    assert os.fspath(paths.workdir_path("gs://b/run") / "eval.json") == "gs://b/run/eval.json"


def test_write_json_replaces_atomically_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "eval.json"
    metrics.write_json(target, {"success_after": 0.5})
    assert json.loads(target.read_text()) == {"success_after": 0.5}

    def crash(src, dst):
        raise OSError("killed between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        metrics.write_json(target, {"success_after": 0.75})
    # The old content survives whole, and no temporary file is left behind.
    assert json.loads(target.read_text()) == {"success_after": 0.5}
    assert os.listdir(tmp_path) == ["eval.json"]


def test_write_json_read_jsonl_and_writer_on_an_object_store(memory_workdir):
    """Every workdir file works on a path that plain open() cannot reach."""
    workdir = memory_workdir
    assert not paths.is_local(workdir)
    metrics.write_json(f"{workdir}/eval.json", {"success_after": 0.5})
    metrics.write_json(f"{workdir}/eval.json", {"success_after": 0.75})
    assert json.loads(epath.Path(f"{workdir}/eval.json").read_text()) == {"success_after": 0.75}
    with metrics.MetricsWriter(workdir, sync_interval_s=0.0) as writer:
        for step in (1, 2, 3):
            writer.write(step, {"loss": 1.0 / step})
        # Synced on every write (interval 0), readable while the run goes on.
        assert [r["step"] for r in metrics.read_jsonl(f"{workdir}/metrics.jsonl")] == [1, 2, 3]
    assert any(p.name.startswith("events.out.tfevents.") for p in epath.Path(f"{workdir}/tb").iterdir())
    # A resumed run on another machine downloads the log and drops step 3.
    with metrics.MetricsWriter(workdir, resume_step=2, tensorboard=False) as writer:
        writer.write(3, {"loss": 0.3})
    assert [r["loss"] for r in metrics.read_jsonl(f"{workdir}/metrics.jsonl")] == [1.0, 0.5, 0.3]
    out = metrics.plot(workdir, f"{workdir}/curves.png", keys=("loss",))
    assert epath.Path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in epath.Path(workdir).iterdir()) == [
        "curves.png", "eval.json", "metrics.jsonl", "tb"]
