"""Published SWE task records as they are: SWE-bench, Verified, SWE-Gym and R2E-Gym.

``normalize(record)`` brings a published record to the project's task format
(``tasks.from_record`` calls it first); ``read_records(path)`` reads a JSONL
file, a JSON list, a Parquet file or a ``datasets`` directory written by
``save_to_disk`` (a ``Dataset`` or a ``DatasetDict`` of splits).

SWE-bench, SWE-bench Verified and SWE-Gym records (Jimenez et al. 2024; Pan
et al. 2024) have ``instance_id``, ``repo``, ``base_commit``, ``patch``,
``test_patch``, ``problem_statement``, ``FAIL_TO_PASS``, ``PASS_TO_PASS``
(JSON strings or lists), ``version``, ``environment_setup_commit``,
``hints_text`` and ``created_at``.  One without ``image`` runs in the image
the SWE-bench harness names after its id (``swebench_image``), at
``/testbed`` with the ``testbed`` conda environment activated, and is graded
by the ``swebench`` package's test command and log parser for its
repository and version (``grading="swebench"``).  A record's own ``image``,
``workdir``, ``user``, ``env``, ``shell_init`` or ``grading`` wins.

R2E-Gym records (Jain et al. 2025) have ``repo_name``, ``docker_image``,
``commit_hash``, ``problem_statement`` (the issue inside ``[ISSUE]`` tags),
``expected_output_json`` (test -> status after the fix), and the commit and
execution data.  They become tasks graded against that status map
(``grading="r2e"``): ``FAIL_TO_PASS`` lists the tests expected to pass, the
image's hidden tests (``/r2e_tests``) run through its ``run_tests.sh``, and
``patch`` is empty (the fix is a commit inside the image).  The instance id
is ``<repo_name>__<commit_hash>``.
"""
from __future__ import annotations

import datetime
import json
import os
import re
from typing import Any, Mapping

from aem_jax.envs.swe import tasks as tasks_lib
from aem_jax.envs.swe.tasks import TaskFormatError

SWEBENCH_WORKDIR = "/testbed"
SWEBENCH_SHELL_INIT = "source /opt/miniconda3/bin/activate && conda activate testbed"
# Published SWE-bench fields every record must have (hints_text, created_at,
# environment_setup_commit are kept when present but not needed to run).
SWEBENCH_REQUIRED = ("instance_id", "repo", "base_commit", "problem_statement", "patch",
                     "test_patch", "FAIL_TO_PASS", "PASS_TO_PASS")
R2E_REQUIRED = ("repo_name", "docker_image", "commit_hash", "problem_statement",
                "expected_output_json")
# R2E-Gym images keep the repository's virtualenv in /testbed/.venv.
R2E_PATH = ("/testbed/.venv/bin:/root/.venv/bin:/root/.local/bin:/usr/local/sbin:"
            "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
# The image's hidden tests sit in /r2e_tests (or /root/r2e_tests once R2E-Gym's
# set-up moved them) and its run_tests.sh runs `pytest -rA r2e_tests` (or the
# repository's unittest runner) from /testbed.
R2E_EVAL_COMMAND = (
    "for d in /r2e_tests /root/r2e_tests; do [ -d $d ] && ln -sfn $d r2e_tests && break; done; "
    "s=; for c in /testbed/run_tests.sh /root/run_tests.sh /run_tests.sh; do "
    "[ -f $c ] && s=$c && break; done; "
    "if [ -n \"$s\" ]; then bash $s; else echo 'no run_tests.sh in the image' >&2; false; fi")
_ISSUE = re.compile(r"\[ISSUE\](.*)\[/ISSUE\]", re.DOTALL)


def swebench_image(instance_id: str, *, namespace: str = "swebench", arch: str = "x86_64",
                   tag: str = "latest") -> str:
    """The instance image name the ``swebench`` harness derives from an instance id.

    E.g. ``django__django-11099`` -> ``swebench/sweb.eval.x86_64.django_1776_django-11099:latest``
    (lower case; registries reject "__", which becomes "_1776_").  The name is
    computed by the installed ``swebench`` package, not re-implemented here.
    """
    try:
        from swebench.harness.test_spec.test_spec import TestSpec  # swebench 2.x - 4.x
    except ImportError:
        TestSpec = None
    if TestSpec is not None:
        spec = TestSpec(instance_id=instance_id, repo="", version="", repo_script_list=[],
                        eval_script_list=[], env_script_list=[], arch=arch, FAIL_TO_PASS=[],
                        PASS_TO_PASS=[], language="py", docker_specs={}, namespace=namespace,
                        instance_image_tag=tag)
        return spec.instance_image_key
    try:
        from swebench.image_builder.image_spec import ImageSpec  # swebench >= 5
    except ImportError as err:
        raise ImportError(f"naming SWE-bench images needs the swebench package ({err}); "
                          "install the SWE extra: pip install 'aem_jax[swe]'") from err
    return ImageSpec(instance_id=instance_id, dockerfile="-", namespace=namespace, tag=tag,
                     arch={"x86_64": "amd64"}.get(arch, arch)).name


def is_r2e(record: Mapping[str, Any]) -> bool:
    """Whether ``record`` is in the R2E-Gym format (``repo_name`` instead of ``repo``)."""
    return "repo_name" in record and "repo" not in record


def _jsonable(value: Any) -> Any:
    # Parquet and `datasets` give timestamps and numpy values; records are stored as JSON.
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return _jsonable(value.tolist())
    return value


def _missing(record: Mapping[str, Any], required: tuple[str, ...], where: str, kind: str) -> None:
    for name in required:
        if record.get(name) is None:
            raise TaskFormatError(f"{where}: {kind} record misses required field {name!r}")


def _from_r2e(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    _missing(record, R2E_REQUIRED, where, "R2E-Gym")
    where = f"{where} ({record['repo_name']}__{record['commit_hash']})"
    expected = record["expected_output_json"]
    try:
        expected = json.loads(expected) if isinstance(expected, str) else expected
    except json.JSONDecodeError as err:
        raise TaskFormatError(f"{where}: field 'expected_output_json' is not JSON: {err}") from None
    if not isinstance(expected, Mapping) or not expected:
        raise TaskFormatError(f"{where}: field 'expected_output_json' must be a non-empty "
                              f"object test -> status, got {expected!r:.200}")
    statement = record["problem_statement"]
    match = _ISSUE.search(statement) if isinstance(statement, str) else None
    out = {k: v for k, v in record.items() if k not in ("repo_name", "docker_image")}
    out.update({
        "instance_id": record.get("instance_id") or f"{record['repo_name']}__{record['commit_hash']}",
        "repo": record["repo_name"], "image": record.get("image") or record["docker_image"],
        "problem_statement": match.group(1).strip() if match else statement,
        "patch": record.get("patch", ""), "test_patch": record.get("test_patch", ""),
        "FAIL_TO_PASS": sorted(k for k, v in expected.items() if v == "PASSED"),
        "PASS_TO_PASS": [], "grading": record.get("grading") or "r2e",
        "workdir": record.get("workdir") or SWEBENCH_WORKDIR,
        "env": record.get("env") or {"PATH": R2E_PATH},
        "eval_command": record.get("eval_command") or R2E_EVAL_COMMAND,
        "repo_name": record["repo_name"], "docker_image": record["docker_image"],
    })
    return out


def normalize(record: Mapping[str, Any], where: str = "task record") -> dict[str, Any]:
    """A published record in the project's task format (records already in it pass through).

    Raises ``TaskFormatError`` naming the missing field and the instance id.
    """
    record = _jsonable(record)
    if is_r2e(record):
        return _from_r2e(record, where)
    if record.get("repo_snapshot") is not None or record.get("grading") == "pytest":
        return record  # the project's own tasks, or a container task that says so
    out = dict(record)
    # A container task: graded like local tasks when it brings its own pytest command.
    out["grading"] = record.get("grading") or ("pytest" if record.get("eval_command") else "swebench")
    if out["grading"] == "swebench":
        _missing(record, SWEBENCH_REQUIRED, where, "SWE-bench")
        from aem_jax.envs.swe import grading  # imports swebench only for these records

        grading.check_swebench_record(out, where)
    if out["grading"] == "swebench" or not record.get("image"):
        # SWE-bench images: the repository at /testbed in the `testbed` conda environment.
        if not record.get("image"):
            _missing(record, ("instance_id",), where, "SWE-bench")
            out["image"] = swebench_image(record["instance_id"])
        out.setdefault("workdir", SWEBENCH_WORKDIR)
        out.setdefault("shell_init", SWEBENCH_SHELL_INIT)
    return out


# -- reading files -------------------------------------------------------------

def _read_jsonl(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise TaskFormatError(f"{path}:{line_no}: not valid JSON: {err}") from None
    return records


def _read_datasets_dir(path: str) -> list[tuple[str | None, dict]]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"reading a `datasets` directory needs the datasets package ({err}); "
                          "install the SWE extra: pip install 'aem_jax[swe]'") from err
    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        return [(split, dict(row)) for split, part in loaded.items() for row in part]
    return [(None, dict(row)) for row in loaded]


def read_records(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """(where, record) pairs from a JSONL / JSON / Parquet file or a ``save_to_disk`` directory.

    A ``DatasetDict``'s split name is set as the ``split`` of records without one.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, n))
                   for n in ("dataset_info.json", "dataset_dict.json", "state.json")):
            raise ValueError(f"directory {path!r} is not a `datasets` directory written by "
                             "save_to_disk (no dataset_info.json / dataset_dict.json)")
        rows = []
        for split, row in _read_datasets_dir(path):
            if split is not None and row.get("split") is None:
                row["split"] = split
            rows.append(row)
        return [(f"{path}[{i}]", r) for i, r in enumerate(rows)]
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError(f"reading Parquet needs pyarrow ({err}); install the SWE extra: "
                              "pip install 'aem_jax[swe]'") from err
        return [(f"{path}[{i}]", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        if not isinstance(rows, list):
            raise TaskFormatError(f"{path}: a .json task file must hold a list of records")
        return [(f"{path}[{i}]", r) for i, r in enumerate(rows)]
    if path.endswith(".jsonl"):
        return [(f"{path}:{i}", r) for i, r in enumerate(_read_jsonl(path), 1)]
    raise ValueError(f"task source must be a .jsonl, .json or .parquet file or a directory "
                     f"written by datasets' save_to_disk, got {path!r}")


def read_tasks(path: str | os.PathLike) -> list[tasks_lib.Task]:
    """Validated tasks from any source ``read_records`` reads (instance ids must be unique)."""
    tasks = [tasks_lib.from_record(record, where) for where, record in read_records(path)]
    tasks_lib._check_unique(tasks)
    return tasks
