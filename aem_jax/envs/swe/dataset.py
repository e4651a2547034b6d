"""SWE task sets through a tensorflow-datasets builder (works without tensorflow).

``tfds_builder.SweTasks`` turns a task source - the project's local task set,
or published records as they are (SWE-bench, SWE-bench Verified, SWE-Gym,
R2E-Gym) in a JSONL / JSON / Parquet file or a directory written by
``datasets``' ``save_to_disk`` - into a TFDS dataset stored as
``array_record`` shards, read back through ``tfds``' random-access data
sources, which need no tensorflow install.  Each example holds the instance
id, the repository name, the split and the whole normalised record as JSON
text; ``load_tasks`` validates records into ``Task`` objects.

Splits come from the ``split`` field of the records (or the split names of a
``DatasetDict``).  A source whose records have no split (SWE-bench files are
one set each) is one unsplit set: any split name asks for all of it, and TFDS
slices apply to it ("train[:10]" = its first 10 records).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os

from aem_jax.envs.swe import tasks as tasks_lib

LOCAL_TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "local_tasks.jsonl")


def default_data_dir() -> str:
    """Where prepared datasets are cached ($AEM_JAX_CACHE or ~/.cache/aem_jax)."""
    root = os.environ.get("AEM_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "aem_jax")
    return os.path.join(root, "tensorflow_datasets")


@contextlib.contextmanager
def _file_lock(path: str):
    # Several processes (pytest-xdist workers, rollout workers) may prepare
    # the same dataset at once; TFDS itself does not lock.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tfds_builder_module():
    try:
        from aem_jax.envs.swe import tfds_builder
    except ImportError as e:
        raise ImportError(f"SWE task sets load through tensorflow-datasets ({e}); install the SWE extra: "
                          "pip install 'aem_jax[swe]'") from e
    return tfds_builder


def _source_path(source: str) -> str:
    path = LOCAL_TASKS if source == "local" else os.path.abspath(os.fspath(source))
    if not os.path.exists(path):
        raise FileNotFoundError(f"task source must be 'local', an existing .jsonl / .json / .parquet "
                                f"file or a `datasets` save_to_disk directory, got {source!r}")
    return path


def builder(source: str = "local", *, data_dir: str | None = None):
    """A prepared ``tfds_builder.SweTasks`` builder for ``source`` ("local" or a path)."""
    tb = _tfds_builder_module()
    path = _source_path(source)
    data_dir = data_dir or default_data_dir()
    swe = tb.SweTasks(config=tb.SweTasksConfig(source_path=path), data_dir=data_dir,
                      file_format="array_record")
    with _file_lock(os.path.join(data_dir, "swe_tasks", f"{swe.builder_config.name}.lock")):
        swe.download_and_prepare()
    return swe


@functools.lru_cache(maxsize=16)
def _load_cached(path: str, mtime: float, split: str, data_dir: str | None) -> tuple[tasks_lib.Task, ...]:
    del mtime  # part of the cache key only
    swe = builder(path, data_dir=data_dir)
    available = sorted(swe.info.splits)
    parts = available if split == "all" else split.split("+")
    if available == [_tfds_builder_module().UNSPLIT]:
        # An unsplit source: every split name means the whole set (slices kept).
        parts = list(dict.fromkeys(available[0] + part[len(part.split("[")[0]):] for part in parts))
    for part in parts:
        if part.split("[")[0] not in available:
            raise ValueError(f"split must be 'all' or a '+'-joined subset of {available} "
                             f"(TFDS slices allowed) in task set {path}, got {split!r}")
    tasks = []
    for part in parts:
        source = swe.as_data_source(split=part)
        tasks += [tasks_lib.from_record(json.loads(_text(source[i]["record"])), f"{part}[{i}]")
                  for i in range(len(source))]
    return tuple(tasks)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_tasks(source: str = "local", *, split: str = "train", data_dir: str | None = None
               ) -> list[tasks_lib.Task]:
    """Loads tasks through TFDS.

    ``source`` is "local", a .jsonl / .json / .parquet file, or a directory
    written by ``datasets``' ``save_to_disk`` (see module docstring).
    ``split`` is a split of the source ("train", "test"), "all", or TFDS split
    syntax ("train+test", "train[:10]"); for an unsplit source every name
    selects the whole set.
    """
    path = _source_path(source)
    return list(_load_cached(path, os.path.getmtime(path), split, data_dir))
