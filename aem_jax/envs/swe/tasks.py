"""SWE tasks in the SWE-bench instance format.

A record has the SWE-bench fields (Jimenez et al., 2024, "SWE-bench: Can
Language Models Resolve Real-World GitHub Issues?"):

  instance_id, repo, base_commit, problem_statement, patch, test_patch,
  FAIL_TO_PASS, PASS_TO_PASS

plus, for tasks that run without a git server or container,
``repo_snapshot`` ({relative path: file text} of the repository at the base
commit) and, for container runs, ``image`` and ``eval_command``.  A record
needs either ``repo_snapshot`` (local sandbox) or ``image`` (container).
FAIL_TO_PASS / PASS_TO_PASS may be lists or JSON-encoded lists, as in the
SWE-bench files on disk.  Unknown fields (hints_text, version, ...) are kept
in ``extra``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import posixpath
from typing import Any, Iterable, Mapping

# The default test command of local tasks; test ids are appended.
DEFAULT_EVAL_COMMAND = "python -m pytest -rA -q -p no:cacheprovider --tb=short"
_REQUIRED_TEXT = ("instance_id", "repo", "problem_statement", "patch", "test_patch")
_OPTIONAL_TEXT = ("base_commit", "image", "eval_command")


class TaskFormatError(ValueError):
    """A task record is malformed; the message names the record and the field."""


@dataclasses.dataclass(frozen=True)
class Task:
    """One SWE task (see module docstring for the fields)."""

    instance_id: str
    repo: str
    problem_statement: str
    patch: str
    test_patch: str
    FAIL_TO_PASS: tuple[str, ...]
    PASS_TO_PASS: tuple[str, ...]
    base_commit: str = ""
    repo_snapshot: Mapping[str, str] | None = None
    image: str = ""
    eval_command: str = ""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def test_command(self) -> str:
        """The command that runs the tests of this task (ids are appended)."""
        return self.eval_command or DEFAULT_EVAL_COMMAND

    def to_record(self) -> dict[str, Any]:
        """The JSON-serialisable SWE-bench record (inverse of ``from_record``)."""
        record: dict[str, Any] = {name: getattr(self, name) for name in _REQUIRED_TEXT}
        record["FAIL_TO_PASS"] = list(self.FAIL_TO_PASS)
        record["PASS_TO_PASS"] = list(self.PASS_TO_PASS)
        for name in _OPTIONAL_TEXT:
            if getattr(self, name):
                record[name] = getattr(self, name)
        if self.repo_snapshot is not None:
            record["repo_snapshot"] = dict(sorted(self.repo_snapshot.items()))
        record.update(self.extra)
        return record


def _where(record: Mapping[str, Any], index: int | str) -> str:
    instance = record.get("instance_id") if isinstance(record, Mapping) else None
    return f"task record {index}" + (f" ({instance!r})" if isinstance(instance, str) else "")


def _test_list(value: Any, field: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise TaskFormatError(f"{where}: field {field!r} is a string but not a JSON list: {err}") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise TaskFormatError(f"{where}: field {field!r} must be a list of non-empty test ids, "
                              f"got {value!r:.200}")
    return tuple(value)


def _snapshot(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not value:
        raise TaskFormatError(f"{where}: field 'repo_snapshot' must be a non-empty mapping "
                              f"path -> text, got {type(value).__name__}")
    for path, text in value.items():
        norm = posixpath.normpath(path) if isinstance(path, str) else ""
        if (not norm or norm != path or path.startswith("/") or norm.startswith("..")
                or not isinstance(text, str)):
            raise TaskFormatError(f"{where}: field 'repo_snapshot' has a bad entry {path!r}: paths "
                                  "must be normalised relative paths inside the repository, "
                                  "values file text")
    return dict(value)


def from_record(record: Mapping[str, Any], index: int | str = 0) -> Task:
    """Validates a SWE-bench record and returns a ``Task``.

    Raises ``TaskFormatError`` naming the record and the bad field.
    """
    where = _where(record, index)
    if not isinstance(record, Mapping):
        raise TaskFormatError(f"{where}: must be a JSON object, got {type(record).__name__}")
    values: dict[str, Any] = {}
    for name in _REQUIRED_TEXT:
        if name not in record:
            raise TaskFormatError(f"{where}: missing required field {name!r}")
        if not isinstance(record[name], str) or (name != "test_patch" and not record[name].strip()):
            raise TaskFormatError(f"{where}: field {name!r} must be a non-empty string, "
                                  f"got {record[name]!r:.100}")
        values[name] = record[name]
    for name in _OPTIONAL_TEXT:
        value = record.get(name) or ""
        if not isinstance(value, str):
            raise TaskFormatError(f"{where}: field {name!r} must be a string, got {value!r:.100}")
        values[name] = value
    for name in ("FAIL_TO_PASS", "PASS_TO_PASS"):
        if name not in record:
            raise TaskFormatError(f"{where}: missing required field {name!r}")
        values[name] = _test_list(record[name], name, where)
    if not values["FAIL_TO_PASS"]:
        raise TaskFormatError(f"{where}: field 'FAIL_TO_PASS' must list at least one test")
    snapshot = record.get("repo_snapshot")
    values["repo_snapshot"] = None if snapshot is None else _snapshot(snapshot, where)
    if snapshot is None and not values["image"]:
        raise TaskFormatError(f"{where}: needs field 'repo_snapshot' (local sandbox) or 'image' "
                              "(container sandbox); neither is given")
    known = {*_REQUIRED_TEXT, *_OPTIONAL_TEXT, "FAIL_TO_PASS", "PASS_TO_PASS", "repo_snapshot"}
    values["extra"] = {k: v for k, v in record.items() if k not in known}
    return Task(**values)


def read_jsonl(path: str | os.PathLike) -> list[Task]:
    """Reads SWE-bench records, one JSON object a line (blank lines skipped)."""
    tasks = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskFormatError(f"{os.fspath(path)}:{line_no}: not valid JSON: {err}") from None
            tasks.append(from_record(record, f"{os.fspath(path)}:{line_no}"))
    _check_unique(tasks)
    return tasks


def write_jsonl(tasks: Iterable[Task], path: str | os.PathLike) -> None:
    """Writes tasks as sorted-key JSON lines (byte-identical for identical tasks)."""
    with open(path, "w", encoding="utf-8") as f:
        for task in tasks:
            f.write(json.dumps(task.to_record(), sort_keys=True, ensure_ascii=False) + "\n")


def _check_unique(tasks: list[Task]) -> None:
    seen: set[str] = set()
    for task in tasks:
        if task.instance_id in seen:
            raise TaskFormatError(f"duplicate instance_id {task.instance_id!r}")
        seen.add(task.instance_id)


def materialize(snapshot: Mapping[str, str], directory: str | os.PathLike) -> None:
    """Writes a repository snapshot's files under ``directory``."""
    for path, text in snapshot.items():
        target = os.path.join(directory, *path.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w", encoding="utf-8") as f:
            f.write(text)
