"""Published records as they are: SWE-bench / Verified / SWE-Gym and R2E-Gym, from JSONL, Parquet and datasets."""
import datetime
import json

import pytest

from aem_jax.envs.swe import dataset, records, tasks

TEST_PATCH = """diff --git a/tests/auth_tests/test_validators.py b/tests/auth_tests/test_validators.py
--- a/tests/auth_tests/test_validators.py
+++ b/tests/auth_tests/test_validators.py
@@ -237 +237 @@ def test_unicode_validator(self):
-        invalid_usernames = ["o'connell", "عبد ال"]
+        invalid_usernames = ["o'connell", "عبد ال", "trailingnewline\\u000A"]
"""
PATCH = """diff --git a/django/contrib/auth/validators.py b/django/contrib/auth/validators.py
--- a/django/contrib/auth/validators.py
+++ b/django/contrib/auth/validators.py
@@ -7,3 +7,3 @@
 @deconstructible
 class ASCIIUsernameValidator(validators.RegexValidator):
-    regex = r'^[\\w.@+-]+$'
+    regex = r'^[\\w.@+-]+\\Z'
"""
# A SWE-bench Verified record as the published files have it (JSON-encoded test lists).
VERIFIED = {
    "repo": "django/django", "instance_id": "django__django-11099",
    "base_commit": "d26b2424437dabeeca94d7900b37d2df4410da0c", "patch": PATCH,
    "test_patch": TEST_PATCH,
    "problem_statement": "UsernameValidator allows trailing newline in usernames",
    "hints_text": "", "created_at": "2019-03-20T03:46:18Z", "version": "3.0",
    "FAIL_TO_PASS": json.dumps(["test_ascii_validator (auth_tests.test_validators.UsernameValidatorsTests)",
                                "test_unicode_validator (auth_tests.test_validators.UsernameValidatorsTests)"]),
    "PASS_TO_PASS": json.dumps(["test_help_text (auth_tests.test_validators.MinimumLengthValidatorTest)"]),
    "environment_setup_commit": "419a78300f7cd27611196e1e464d50fd0385ff27",
}
SYMPY = {**VERIFIED, "repo": "sympy/sympy", "instance_id": "sympy__sympy-20590", "version": "1.7",
         "FAIL_TO_PASS": '["test_immutable"]', "PASS_TO_PASS": '["test__aresame", "test_structure"]'}
# An R2E-Gym record (fields as in R2E-Gym-Lite; the long ones shortened).
R2E = {
    "repo_name": "pillow", "docker_image": "namanjain12/pillow_final:3f6fa4b0c7a6e1c2",
    "commit_hash": "3f6fa4b0c7a6e1c2", "problem_statement": "[ISSUE]\nImage.crop ignores box\n[/ISSUE]",
    "expected_output_json": json.dumps({"TestCrop.test_crop": "PASSED", "TestCrop.test_negative": "PASSED",
                                        "TestCrop.test_known_bug": "FAILED"}),
    "parsed_commit_content": "{}", "execution_result_content": "{}", "modified_files": ["src/PIL/Image.py"],
    "relevant_files": [], "num_non_test_files": 1, "num_non_test_func_methods": 1, "num_non_test_lines": 3,
    "prompt": "", "modified_entity_summaries": [],
}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_image_names_follow_the_swebench_harness():
    assert (records.swebench_image("django__django-11099")
            == "swebench/sweb.eval.x86_64.django_1776_django-11099:latest")
    assert (records.swebench_image("SWE-Gym__Repo-7", namespace="xingyaoww")
            == "xingyaoww/sweb.eval.x86_64.swe-gym_1776_repo-7:latest")


def test_verified_record_loads_as_it_is(tmp_path):
    as_lists = {**SYMPY, "FAIL_TO_PASS": ["test_immutable"], "PASS_TO_PASS": ["test__aresame"]}
    path = _write_jsonl(tmp_path / "verified.jsonl", [VERIFIED, as_lists])
    loaded = dataset.load_tasks(path, split="test", data_dir=str(tmp_path / "tfds"))
    django = loaded[0]
    assert django.image == "swebench/sweb.eval.x86_64.django_1776_django-11099:latest"
    assert django.grading == "swebench" and django.workdir == "/testbed"
    assert django.shell_init == records.SWEBENCH_SHELL_INIT
    assert django.FAIL_TO_PASS == tuple(json.loads(VERIFIED["FAIL_TO_PASS"]))
    assert django.extra["version"] == "3.0" and django.extra["environment_setup_commit"]
    assert django.repo_snapshot is None and loaded[1].FAIL_TO_PASS == ("test_immutable",)
    assert tasks.from_record(django.to_record()) == django  # round trip
    # The record's own image wins (SWE-Gym images live under another namespace).
    own = tasks.from_record({**VERIFIED, "image": "xingyaoww/sweb.eval.x86_64.django_s_django-11099"})
    assert own.image == "xingyaoww/sweb.eval.x86_64.django_s_django-11099"


def test_parquet_and_datasets_directories_load_the_same_tasks(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [VERIFIED, SYMPY]
    expected = records.read_tasks(_write_jsonl(tmp_path / "v.jsonl", rows))
    stamped = [{**r, "created_at": datetime.datetime(2019, 3, 20, 3, 46, 18)} for r in rows]
    pq.write_table(pa.Table.from_pylist(stamped), tmp_path / "v.parquet")
    from_parquet = dataset.load_tasks(str(tmp_path / "v.parquet"), split="all", data_dir=str(tmp_path / "t"))
    assert [t.instance_id for t in from_parquet] == [t.instance_id for t in expected]
    assert from_parquet[0].extra["created_at"] == "2019-03-20T03:46:18"
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    assert dataset.load_tasks(str(tmp_path / "disk"), split="train", data_dir=str(tmp_path / "t")) == expected
    # A DatasetDict's split names become the records' splits.
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                          "test": datasets.Dataset.from_list(rows[1:])}).save_to_disk(str(tmp_path / "dd"))
    train = dataset.load_tasks(str(tmp_path / "dd"), split="train", data_dir=str(tmp_path / "t"))
    assert [t.instance_id for t in train] == ["django__django-11099"] and train[0].extra["split"] == "train"


@pytest.mark.parametrize("field", ["test_patch", "base_commit", "FAIL_TO_PASS", "version"])
def test_a_missing_field_is_named_with_the_instance(tmp_path, field):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{k: v for k, v in VERIFIED.items() if k != field}])
    with pytest.raises(tasks.TaskFormatError, match=field) as err:
        records.read_tasks(path)
    assert "django__django-11099" in str(err.value) and "bad.jsonl:1" in str(err.value)


def test_unknown_repository_version_is_refused_before_training():
    with pytest.raises(tasks.TaskFormatError, match="version '9.9'"):
        tasks.from_record({**VERIFIED, "version": "9.9"})
    # ... unless the record says how to run its tests.
    task = tasks.from_record({**VERIFIED, "version": "9.9", "eval_command": "pytest -rA"})
    assert task.grading == "pytest" and task.test_command == "pytest -rA"
    assert task.image == records.swebench_image(VERIFIED["instance_id"])


def test_r2e_gym_record_maps_onto_a_task():
    task = tasks.from_record(R2E)
    assert task.instance_id == "pillow__3f6fa4b0c7a6e1c2" and task.repo == "pillow"
    assert task.image == R2E["docker_image"] and task.grading == "r2e"
    assert task.problem_statement == "Image.crop ignores box"
    assert task.FAIL_TO_PASS == ("TestCrop.test_crop", "TestCrop.test_negative")
    assert task.env["PATH"].startswith("/testbed/.venv/bin") and task.workdir == "/testbed"
    assert "run_tests.sh" in task.eval_command and task.patch == ""
    assert tasks.from_record(task.to_record()) == task
    with pytest.raises(tasks.TaskFormatError, match="docker_image"):
        tasks.from_record({k: v for k, v in R2E.items() if k != "docker_image"})
    with pytest.raises(tasks.TaskFormatError, match="expected_output_json"):
        tasks.from_record({**R2E, "expected_output_json": "{}"})


def test_splits_must_be_given_for_all_records_or_none(tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [{**VERIFIED, "split": "train"}, SYMPY])
    with pytest.raises(tasks.TaskFormatError, match="sympy__sympy-20590.*no 'split'"):
        dataset.load_tasks(path, split="train", data_dir=str(tmp_path / "tfds"))


def test_unknown_source_kind_is_refused(tmp_path):
    (tmp_path / "tasks.csv").write_text("x\n")
    with pytest.raises(ValueError, match="jsonl"):
        records.read_records(tmp_path / "tasks.csv")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="save_to_disk"):
        records.read_records(tmp_path / "plain")
