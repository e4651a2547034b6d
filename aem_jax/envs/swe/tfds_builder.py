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

from aem_jax.envs.swe import tasks as tasks_lib


class SweTasksConfig(tfds.core.BuilderConfig):
    """Builder config naming one JSONL file (the name is a hash of its bytes)."""

    def __init__(self, *, jsonl_path: str, **kwargs):
        with open(jsonl_path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        super().__init__(name=f"jsonl_{digest}", description=f"SWE tasks from {jsonl_path}", **kwargs)
        self.jsonl_path = jsonl_path


class SweTasks(tfds.core.GeneratorBasedBuilder):
    """SWE-bench-format task records."""

    VERSION = tfds.core.Version("1.0.0")
    # Set explicitly: TFDS would otherwise locate these with the optional
    # importlib_resources package.
    pkg_dir_path = epath.Path(os.path.dirname(os.path.abspath(__file__)))
    code_path = epath.Path(os.path.abspath(__file__))
    RELEASE_NOTES = {"1.0.0": "SWE-bench instance records as JSON text."}

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
        tasks = tasks_lib.read_jsonl(self.builder_config.jsonl_path)  # validates every record
        return [(str(t.extra.get("split", "test")), t.to_record()) for t in tasks]

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
