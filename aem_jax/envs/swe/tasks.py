"""SWE tasks in the SWE-bench instance format.

A record has the SWE-bench fields (Jimenez et al., 2024, "SWE-bench: Can
Language Models Resolve Real-World GitHub Issues?"):

  instance_id, repo, base_commit, problem_statement, patch, test_patch,
  FAIL_TO_PASS, PASS_TO_PASS

plus, for tasks that run without a git server or container,
``repo_snapshot`` ({relative path: file text} of the repository at the base
commit) and, for container runs, ``image`` and ``eval_command``.
FAIL_TO_PASS / PASS_TO_PASS may be lists or JSON-encoded lists, as in the
SWE-bench files on disk.  Unknown fields (hints_text, version, ...) are kept
in ``extra``.

Published records are taken as they are (``records.normalize``, called first
by ``from_record``): a SWE-bench / SWE-bench Verified / SWE-Gym record without
``image`` gets the image name the SWE-bench harness derives from its
``instance_id``; an R2E-Gym record (``repo_name``, ``docker_image``,
``expected_output_json``, ...) is mapped onto these fields.  Container tasks
also carry how their image is used: ``workdir``, ``user``, ``env`` (e.g.
PATH) and ``shell_init`` (run before every command, e.g. the conda
activation of SWE-bench images), and ``grading`` says how the test log is
judged: "pytest" (the project's own tasks), "swebench" (the per-repository
test command and log parser of the ``swebench`` package) or "r2e" (the
R2E-Gym expected test-status map); see ``grading.py``.
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
_OPTIONAL_TEXT = ("base_commit", "image", "eval_command", "workdir", "user", "shell_init")
GRADINGS = ("pytest", "swebench", "r2e")


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
    grading: str = "pytest"  # one of GRADINGS
    workdir: str = ""  # the repository inside the image ("" = the sandbox's default)
    user: str = ""  # user running the agent's commands in the container ("" = image default)
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)  # e.g. {"PATH": ...}
    shell_init: str = ""  # shell lines run before every command (conda activation)

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
        if self.grading != "pytest":
            record["grading"] = self.grading
        if self.env:
            record["env"] = dict(sorted(self.env.items()))
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


def _env(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in value.items()):
        raise TaskFormatError(f"{where}: field 'env' must map variable names to strings, "
                              f"got {value!r:.200}")
    return dict(value)


def from_record(record: Mapping[str, Any], index: int | str = 0) -> Task:
    """Validates a task record and returns a ``Task``.

    Published records (SWE-bench, SWE-bench Verified, SWE-Gym, R2E-Gym) are
    first brought to this format by ``records.normalize``.  Raises
    ``TaskFormatError`` naming the record and the bad field.
    """
    from aem_jax.envs.swe import records  # records imports this module

    where = _where(record, index)
    if not isinstance(record, Mapping):
        raise TaskFormatError(f"{where}: must be a JSON object, got {type(record).__name__}")
    record = records.normalize(record, where)
    values: dict[str, Any] = {}
    for name in _REQUIRED_TEXT:
        if name not in record:
            raise TaskFormatError(f"{where}: missing required field {name!r}")
        # R2E-Gym records carry no gold diff (the fix is a commit in the image).
        empty_ok = name == "test_patch" or (name == "patch" and record.get("grading") == "r2e")
        if not isinstance(record[name], str) or (not empty_ok and not record[name].strip()):
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
    values["grading"] = record.get("grading") or "pytest"
    if values["grading"] not in GRADINGS:
        raise TaskFormatError(f"{where}: field 'grading' must be one of {GRADINGS}, "
                              f"got {values['grading']!r}")
    values["env"] = _env(record.get("env") or {}, where)
    known = {*_REQUIRED_TEXT, *_OPTIONAL_TEXT, "FAIL_TO_PASS", "PASS_TO_PASS", "repo_snapshot",
             "grading", "env"}
    values["extra"] = {k: v for k, v in record.items() if k not in known}
    return Task(**values)


def read_jsonl(path: str | os.PathLike) -> list[Task]:
    """Reads task records, one JSON object a line (blank lines skipped).

    ``records.read_tasks`` also reads Parquet files and ``datasets`` directories.
    """
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
