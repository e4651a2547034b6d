"""Task records: validation, JSONL round trip, TFDS loading, the shipped local set."""
import json
import subprocess
import collections

import pytest

from aem_jax.envs.swe import dataset, diffs, tasks

RECORD = {
    "instance_id": "owner__proj-1", "repo": "owner/proj", "base_commit": "abc123",
    "problem_statement": "adding is wrong", "patch": "diff --git a/m.py b/m.py\n",
    "test_patch": "", "FAIL_TO_PASS": '["tests/test_m.py::test_add"]', "PASS_TO_PASS": "[]",
    "repo_snapshot": {"m.py": "x = 1\n"}, "version": "1.0",
}


def test_record_round_trip_keeps_extra_fields():
    task = tasks.from_record(RECORD)
    assert task.FAIL_TO_PASS == ("tests/test_m.py::test_add",) and task.PASS_TO_PASS == ()
    assert task.extra == {"version": "1.0"}
    again = tasks.from_record(task.to_record())
    assert again == task


@pytest.mark.parametrize("change, field", [
    ({"instance_id": None}, "instance_id"),
    ({"problem_statement": ""}, "problem_statement"),
    ({"FAIL_TO_PASS": "not json"}, "FAIL_TO_PASS"),
    ({"FAIL_TO_PASS": []}, "FAIL_TO_PASS"),
    ({"PASS_TO_PASS": [1]}, "PASS_TO_PASS"),
    ({"repo_snapshot": {"../evil.py": ""}}, "repo_snapshot"),
    # Without a snapshot the record is a published SWE-bench one: it needs a version.
    ({"repo_snapshot": None, "version": None}, "version"),
    ({"repo_snapshot": None, "base_commit": None}, "base_commit"),
    ({"grading": "exact"}, "grading"),
    ({"env": {"PATH": 1}}, "env"),
    ({"image": 5}, "image"),
])
def test_malformed_records_name_the_field(change, field):
    record = {k: v for k, v in {**RECORD, **change}.items() if v is not None}
    with pytest.raises(tasks.TaskFormatError, match=field) as err:
        tasks.from_record(record, 7)
    assert field == "instance_id" or "owner__proj-1" in str(err.value)  # the instance is named


def test_missing_field_is_named():
    record = dict(RECORD)
    del record["test_patch"]
    with pytest.raises(tasks.TaskFormatError, match="test_patch"):
        tasks.from_record(record)


def test_container_record_needs_no_snapshot():
    record = {k: v for k, v in RECORD.items() if k != "repo_snapshot"}
    task = tasks.from_record({**record, "image": "swebench/sweb.eval.x86_64.proj:latest",
                              "eval_command": "pytest -rA"})
    assert task.repo_snapshot is None and task.test_command == "pytest -rA"


def test_jsonl_loads_through_tfds(tmp_path):
    path = tmp_path / "swe.jsonl"
    lines = [json.dumps({**RECORD, "instance_id": f"owner__proj-{i}"}) for i in range(3)]
    path.write_text("\n".join(lines) + "\n\n")
    loaded = dataset.load_tasks(str(path), split="test", data_dir=str(tmp_path / "tfds"))
    assert [t.instance_id for t in loaded] == ["owner__proj-0", "owner__proj-1", "owner__proj-2"]
    assert loaded == tasks.read_jsonl(path)
    # Records without a split are one set: any split name selects it, slices apply.
    assert dataset.load_tasks(str(path), split="train", data_dir=str(tmp_path / "tfds")) == loaded
    assert dataset.load_tasks(str(path), split="train[1:]", data_dir=str(tmp_path / "tfds")) == loaded[1:]
    split_path = tmp_path / "split.jsonl"
    split_path.write_text("".join(json.dumps({**RECORD, "instance_id": f"i{i}", "split": s}) + "\n"
                                  for i, s in enumerate(["train", "test", "train"])))
    train = dataset.load_tasks(str(split_path), split="train", data_dir=str(tmp_path / "tfds"))
    assert [t.instance_id for t in train] == ["i0", "i2"]
    with pytest.raises(ValueError, match="split"):
        dataset.load_tasks(str(split_path), split="dev", data_dir=str(tmp_path / "tfds"))


def test_bad_jsonl_line_is_located(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORD) + "\n{oops\n")
    with pytest.raises(tasks.TaskFormatError, match="bad.jsonl:2"):
        tasks.read_jsonl(path)


def test_local_task_set_meets_the_spec(tmp_path):
    local = tasks.read_jsonl(dataset.LOCAL_TASKS)
    assert len(local) >= 100
    by_repo = collections.Counter(t.repo for t in local)
    assert len(by_repo) >= 5
    operators = {t.extra["mutation"]["operator"] for t in local}
    assert len(operators) >= 5
    for task in local:
        assert task.FAIL_TO_PASS and task.PASS_TO_PASS
        assert not set(task.FAIL_TO_PASS) & set(task.PASS_TO_PASS)
        assert not diffs.protected_paths(task.patch)
        assert all(diffs.is_test_path(p) for p in diffs.touched_paths(task.test_patch))
        # The hidden tests are really hidden from the agent's snapshot.
        for test_id in task.FAIL_TO_PASS:
            path, _, name = test_id.partition("::")
            assert f"def {name}(" not in task.repo_snapshot[path]
    splits = dataset.load_tasks("local", split="all", data_dir=str(tmp_path))
    assert len(splits) == len(local)
    train = dataset.load_tasks("local", split="train", data_dir=str(tmp_path))
    assert 0 < len(train) < len(local)


def test_gold_and_test_patches_restore_the_original_repo(tmp_path):
    """For every local task: snapshot + patch + test_patch == the unmutated repository."""
    from aem_jax.envs.swe import generate

    originals = {name: generate.load_repo(name) for name in generate.REPOS}
    for index, task in enumerate(tasks.read_jsonl(dataset.LOCAL_TASKS)):
        work = tmp_path / str(index)
        tasks.materialize(task.repo_snapshot, work)
        for patch in (task.patch, task.test_patch):
            subprocess.run(["git", "apply", "-"], input=patch, text=True, cwd=work, check=True)
        original = originals[task.repo.split("/")[-1]]
        for path, text in original.items():
            assert (work / path).read_text() == text, (task.instance_id, path)
