"""The TFDS builder behind ``dataset.load_tasks`` (imported only when SWE tasks load).

Kept apart from ``dataset`` so that importing the SWE environment, or
anything that registers it, does not import tensorflow-datasets.
"""
from __future__ import annotations

import hashlib
import json
import os

import tensorflow_datasets as tfds
from etils import epath

from aem_jax.envs.swe import records as records_lib


UNSPLIT = "unsplit"  # the one TFDS split of a task file whose records name no split


def _digest(path: str) -> str:
    """Hash of a file's bytes, or of every file (name and bytes) under a directory."""
    digest = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                digest.update(os.path.relpath(full, path).encode() + b"\0")
                with open(full, "rb") as f:
                    digest.update(hashlib.sha256(f.read()).digest())
    else:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


class SweTasksConfig(tfds.core.BuilderConfig):
    """Builder config naming one task source (the name is a hash of its bytes).

    The source is a JSONL / JSON / Parquet file or a ``datasets`` directory
    (``records.read_records``).
    """

    def __init__(self, *, source_path: str, **kwargs):
        kind = ("hfdisk" if os.path.isdir(source_path)
                else os.path.splitext(source_path)[1].lstrip(".") or "file")
        super().__init__(name=f"{kind}_{_digest(source_path)}",
                         description=f"SWE tasks from {source_path}", **kwargs)
        self.source_path = source_path


class SweTasks(tfds.core.GeneratorBasedBuilder):
    """SWE-bench-format task records."""

    VERSION = tfds.core.Version("1.1.0")
    # Set explicitly: TFDS would otherwise locate these with the optional
    # importlib_resources package.
    pkg_dir_path = epath.Path(os.path.dirname(os.path.abspath(__file__)))
    code_path = epath.Path(os.path.abspath(__file__))
    RELEASE_NOTES = {"1.0.0": "SWE-bench instance records as JSON text.",
                     "1.1.0": "Published records (SWE-bench, R2E-Gym) normalised; unsplit files."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="SWE tasks in the SWE-bench instance format.",
            features=tfds.features.FeaturesDict({
                "instance_id": tfds.features.Text(),
                "repo": tfds.features.Text(),
                "split": tfds.features.Text(),
                "record": tfds.features.Text(),
            }),
            disable_shuffling=True,  # keep file order: task indices are stable
        )

    def _records(self) -> list[tuple[str, dict]]:
        """(split, record) pairs; records without a split form the one split UNSPLIT."""
        tasks = records_lib.read_tasks(self.builder_config.source_path)  # validates every record
        with_split = [t for t in tasks if t.extra.get("split") is not None]
        if with_split and len(with_split) != len(tasks):
            lacking = next(t for t in tasks if t.extra.get("split") is None)
            raise records_lib.TaskFormatError(
                f"{self.builder_config.source_path}: record {lacking.instance_id!r} has no 'split' "
                f"field but others have one (e.g. {with_split[0].instance_id!r}); give all or none")
        return [(str(t.extra.get("split", UNSPLIT)), t.to_record()) for t in tasks]

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        records = self._records()
        splits = sorted({split for split, _ in records})
        return {split: self._generate_examples(records, split) for split in splits}

    def _generate_examples(self, records, split):
        for index, (record_split, record) in enumerate(records):
            if record_split == split:
                yield index, {
                    "instance_id": record["instance_id"],
                    "repo": record["repo"],
                    "split": split,
                    "record": json.dumps(record, sort_keys=True),
                }
