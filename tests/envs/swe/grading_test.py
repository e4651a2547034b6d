"""Grading published tasks from test logs: pytest, Django and sympy runners, and contradictions.

The logs are written here in the shape the runners print them inside the
SWE-bench eval script (``set -x`` echoes the markers; the script records the
test command's exit status after the end marker).
"""
import json

import pytest

from aem_jax.envs.swe import grading, tasks
from tests.envs.swe.records_test import R2E, SYMPY, VERIFIED

START = "+ : '>>>>> Start Test Output'\n"


def _end(status=0):
    return f"+ __aem_status={status}\n+ : '>>>>> End Test Output'\n>>>>> Test Exit Code: {status}\n"


# -- pytest (scikit-learn: swebench's parse_log_pytest_v2) ---------------------------
SPACED = "sklearn/tests/test_base.py::test_repr[est with space]"
SKLEARN = tasks.from_record({
    **VERIFIED, "repo": "scikit-learn/scikit-learn", "instance_id": "scikit-learn__scikit-learn-25747",
    "version": "1.3", "FAIL_TO_PASS": [SPACED, "sklearn/tests/test_base.py::test_clone"],
    "PASS_TO_PASS": ["sklearn/tests/test_base.py::test_get_params"],
    "test_patch": VERIFIED["test_patch"].replace("tests/auth_tests/test_validators.py",
                                                 "sklearn/tests/test_base.py")})


def _pytest_log(lines, summary, status=0, extra=""):
    return (START + "+ pytest -rA sklearn/tests/test_base.py\n"
            "============================= test session starts ==============================\n"
            "platform linux -- Python 3.9.21, pytest-7.4.4, pluggy-1.5.0\nrootdir: /testbed\n"
            "configfile: setup.cfg\ncollected 4 items\n\n"
            "sklearn/tests/test_base.py ..F.                                          [100%]\n\n"
            "==================================== PASSES ====================================\n"
            "=========================== short test summary info ============================\n"
            + "".join(line + "\n" for line in lines) + extra
            + f"========================= {summary} in 1.52s =========================\n" + _end(status))


GOOD = [f"PASSED {SPACED}", "PASSED sklearn/tests/test_base.py::test_clone",
        "PASSED sklearn/tests/test_base.py::test_get_params",
        "FAILED sklearn/tests/test_base.py::test_unrelated - AssertionError: assert 1 == 2"]


def test_pytest_resolved_with_ids_containing_spaces():
    verdict = grading.resolved(SKLEARN, _pytest_log(GOOD, "1 failed, 3 passed", status=1))
    assert verdict.resolved, verdict.reason  # a failing test outside FAIL_TO_PASS / PASS_TO_PASS is allowed
    assert verdict.tests[SPACED] == "PASSED"
    # Datasets whose ids were cut at the first space by the harness's parser match too.
    cut = tasks.from_record({**SKLEARN.to_record(), "FAIL_TO_PASS": [SPACED.split()[0]]})
    assert grading.resolved(cut, _pytest_log(GOOD, "1 failed, 3 passed", status=1)).resolved


@pytest.mark.parametrize("lines, summary, status, extra, why", [
    # the fix does not work: a required test fails
    ([GOOD[0], "FAILED sklearn/tests/test_base.py::test_clone - TypeError", *GOOD[2:]],
     "2 failed, 2 passed", 1, "", "do not pass"),
    # a FAIL_TO_PASS test missing from the report
    ([GOOD[0], *GOOD[2:]], "1 failed, 2 passed", 1, "", "MISSING"),
    # "N failed" in the summary with no FAILED line for it
    (GOOD[:3], "1 failed, 3 passed", 1, "", "summary says 1 failed"),
    # PASSED lines printed by the code under test, beyond pytest's count
    (GOOD + ["PASSED sklearn/tests/test_base.py::test_fake"], "1 failed, 3 passed", 1, "", "4 PASSED"),
    # an errored test hidden from the per-test lines
    (GOOD, "1 failed, 3 passed, 1 error", 1, "", "1 errors"),
    # a later PASSED line does not override an earlier FAILED one
    ([GOOD[0], "FAILED sklearn/tests/test_base.py::test_clone - TypeError", GOOD[2],
      "PASSED sklearn/tests/test_base.py::test_clone"], "1 failed, 3 passed", 1, "", "PASSED lines|CONFLICT"),
    # a second, fake summary printed after the real one (an atexit hook)
    (GOOD, "1 failed, 3 passed", 1, "=============== 4 passed in 0.01s ===============\n", "several"),
    # exit status 1 with nothing failing in the log
    (GOOD[:3], "3 passed", 1, "", "status 1"),
])
def test_pytest_contradictions_and_failures(lines, summary, status, extra, why):
    verdict = grading.resolved(SKLEARN, _pytest_log(lines, summary, status, extra))
    assert not verdict.resolved
    assert any(w in verdict.reason or w in verdict.tests.values() for w in why.split("|")), verdict.reason


def test_cut_off_runs_and_missing_markers_fail():
    log = _pytest_log(GOOD, "1 failed, 3 passed", 1)
    cut = "\n".join(line for line in log.splitlines() if "in 1.52s" not in line)  # os._exit: no summary
    assert "did not finish" in grading.resolved(SKLEARN, cut).reason
    assert "markers" in grading.resolved(SKLEARN, log.replace(">>>>> Start Test Output", "")).reason


# -- Django (tests/runtests.py) ------------------------------------------------------
DJANGO = tasks.from_record(VERIFIED)
F2P = json.loads(VERIFIED["FAIL_TO_PASS"])
P2P = json.loads(VERIFIED["PASS_TO_PASS"])


def _django_log(results, tail, blocks="", status=0):
    return (START + "+ ./tests/runtests.py --verbosity 2 --settings=test_sqlite --parallel 1 "
            "auth_tests.test_validators\nTesting against Django installed in '/testbed/django'\n"
            "Importing application auth_tests\nSkipping setup of unused database(s): other.\n"
            "Operations to perform:\n  Apply all migrations: admin, sites\nRunning migrations:\n"
            "  Applying admin.0001_initial... OK\n  Applying sites.0001_initial... OK\n"
            "System check identified no issues (0 silenced).\n"
            + "".join(f"{test} ... {word}\n" for test, word in results) + blocks
            + "\n----------------------------------------------------------------------\n"
            f"Ran {len(results)} tests in 0.123s\n\n{tail}\n" + _end(status))


FAIL_BLOCK = ("\n======================================================================\n"
              f"FAIL: {F2P[0]}\n----------------------------------------------------------------------\n"
              "Traceback (most recent call last):\n  File \"/testbed/tests/auth_tests/test_validators.py\", "
              "line 240, in test_ascii_validator\n    v(invalid)\nAssertionError: ValidationError not raised\n")


def test_django_runner():
    ok = [(P2P[0], "ok"), (F2P[0], "ok"), (F2P[1], "ok")]
    assert grading.resolved(DJANGO, _django_log(ok, "OK")).resolved
    failed = [(P2P[0], "ok"), (F2P[0], "FAIL"), (F2P[1], "ok")]
    verdict = grading.resolved(DJANGO, _django_log(failed, "FAILED (failures=1)", FAIL_BLOCK, 1))
    assert not verdict.resolved and verdict.tests[F2P[0]] == "FAILED"
    # "FAILED (failures=1)" while every per-test line says ok
    verdict = grading.resolved(DJANGO, _django_log(ok, "FAILED (failures=1)", status=1))
    assert not verdict.resolved and "Django's runner says" in verdict.reason
    # a fake "... ok" line for the failing test printed after the real one
    faked = failed + [(F2P[0], "ok")]
    verdict = grading.resolved(DJANGO, _django_log(faked, "FAILED (failures=1)", FAIL_BLOCK, 1))
    assert not verdict.resolved and verdict.tests[F2P[0]] == "CONFLICT"
    # a fake "OK" after the real result
    verdict = grading.resolved(DJANGO, _django_log(failed, "FAILED (failures=1)\nOK", FAIL_BLOCK, 1))
    assert not verdict.resolved


# -- sympy (bin/test -C --verbose) ---------------------------------------------------
SYMPY_TASK = tasks.from_record({**SYMPY, "test_patch": SYMPY["test_patch"].replace(
    "tests/auth_tests/test_validators.py", "sympy/core/tests/test_basic.py")})


def _sympy_log(marks, summary, failures="", status=0):
    tests = [("test__aresame", marks[0]), ("test_structure", marks[1]), ("test_immutable", marks[2])]
    body = "\n".join(f"{name} {mark}" for name, mark in tests)
    return (START + "+ PYTHONWARNINGS='ignore::UserWarning,ignore::SyntaxWarning' bin/test -C --verbose "
            "sympy/core/tests/test_basic.py\n"
            "============================= test process starts ==============================\n"
            "executable:         /opt/miniconda3/envs/testbed/bin/python  (3.9.20-final-0) [CPython]\n"
            "architecture:       64-bit\ncache:              no\nground types:       python \n"
            "numpy:              None\nrandom seed:        24078150\n"
            "hash randomization: on (PYTHONHASHSEED=3047811519)\n\nsympy/core/tests/test_basic.py[3] \n"
            f"{body}                                                  [{'FAIL' if 'F' in marks else 'OK'}]\n\n"
            + failures + f"\n================== tests finished: {summary}, in 0.06 seconds ===================\n"
            + ("DO *NOT* COMMIT!\n" if "failed" in summary else "") + _end(status))


def test_sympy_runner():
    verdict = grading.resolved(SYMPY_TASK, _sympy_log(["ok", "ok", "ok"], "3 passed"))
    assert verdict.resolved, verdict.reason
    assert verdict.tests["test_immutable"] == "PASSED"  # the file's last line ends with "[OK]"
    block = ("________________________________________________________________________________\n"
             "______________ sympy/core/tests/test_basic.py:test_immutable _______________\n"
             "Traceback (most recent call last):\nAssertionError\n")
    verdict = grading.resolved(SYMPY_TASK, _sympy_log(["ok", "ok", "F"], "2 passed, 1 failed", block, 1))
    assert not verdict.resolved and verdict.tests["test_immutable"] == "FAILED"
    # "1 failed" in the summary while every line says ok
    verdict = grading.resolved(SYMPY_TASK, _sympy_log(["ok", "ok", "ok"], "2 passed, 1 failed", block, 1))
    assert not verdict.resolved and "sympy's summary" in verdict.reason
    # the runner never finished
    log = _sympy_log(["ok", "ok", "ok"], "3 passed").replace("tests finished", "tests interrupted")
    assert "did not finish" in grading.resolved(SYMPY_TASK, log).reason


# -- eval scripts and R2E-Gym ----------------------------------------------------------

def test_eval_scripts_come_from_the_swebench_specs():
    script = grading.eval_script(DJANGO)
    assert "./tests/runtests.py --verbosity 2 --settings=test_sqlite --parallel 1 auth_tests.test_validators" in script
    assert f"git checkout {VERIFIED['base_commit']} tests/auth_tests/test_validators.py" in script
    assert "conda activate testbed" in script and "git apply" in script
    # the exit status is taken right after the test command, printed after the end marker
    lines = script.splitlines()
    end = next(i for i, line in enumerate(lines) if grading.END in line)
    assert lines[end - 1] == "__aem_status=$?" and grading.EXIT in lines[end + 1]
    assert "bin/test -C --verbose sympy/core/tests/test_basic.py" in grading.eval_script(SYMPY_TASK)
    # records carrying their own eval script (swebench >= 5 datasets) keep it
    own = tasks.from_record({**VERIFIED, "log_parser": "parse_log_django",
                             "eval_script": f"#!/bin/bash\nset -uxo pipefail\ncd /testbed\n: '{grading.START}'\n"
                                            f"./tests/runtests.py x\n: '{grading.END}'\n"})
    assert "./tests/runtests.py x\n__aem_status=$?" in grading.eval_script(own)
    with pytest.raises(ValueError, match="reward.evaluate"):
        grading.eval_script(tasks.from_record({**VERIFIED, "eval_command": "pytest -rA"}))


def test_r2e_gym_expected_status_map():
    task = tasks.from_record(R2E)
    assert "run_tests.sh" in grading.eval_script(task)
    lines = ["PASSED r2e_tests/test_1.py::TestCrop::test_crop", "PASSED r2e_tests/test_1.py::TestCrop::test_negative",
             "FAILED r2e_tests/test_1.py::TestCrop::test_known_bug - AssertionError"]

    def log(lines, summary):
        return (START + "============================= test session starts ==============================\n"
                "=========================== short test summary info ============================\n"
                + "\n".join(lines) + f"\n==================== {summary} in 0.40s ====================\n" + _end(1))

    assert grading.resolved(task, log(lines, "1 failed, 2 passed")).resolved
    flipped = [lines[0], lines[1].replace("PASSED", "FAILED") + " - E", lines[2]]
    assert not grading.resolved(task, log(flipped, "2 failed, 1 passed")).resolved
    # the expected failure must still fail (exact match), and summaries must agree
    fixed_too = lines[:2] + [lines[2].replace("FAILED", "PASSED").split(" - ")[0]]
    assert not grading.resolved(task, log(fixed_too, "3 passed")).resolved
    assert "contradicts" in grading.resolved(task, log(lines[:2], "1 failed, 2 passed")).reason


def test_swe_gym_repositories_swebench_does_not_know_run_pytest():
    """SWE-Gym's repositories (moto, pandas, ...) are absent from swebench's tables."""
    moto = tasks.from_record({
        **VERIFIED, "repo": "getmoto/moto", "instance_id": "getmoto__moto-5752", "version": "4.0",
        "image": "xingyaoww/sweb.eval.x86_64.getmoto_s_moto-5752",
        "FAIL_TO_PASS": ["tests/test_ssm/test_ssm_boto3.py::test_get_parameters_by_path"], "PASS_TO_PASS": [],
        "test_patch": VERIFIED["test_patch"].replace("tests/auth_tests/test_validators.py",
                                                     "tests/test_ssm/test_ssm_boto3.py")})
    script = grading.eval_script(moto)
    assert "pytest -rA tests/test_ssm/test_ssm_boto3.py" in script and "conda activate testbed" in script
    assert f"git checkout {VERIFIED['base_commit']} tests/test_ssm/test_ssm_boto3.py" in script
    log = (START + "============================= test session starts ==============================\n"
           "=========================== short test summary info ============================\n"
           "PASSED tests/test_ssm/test_ssm_boto3.py::test_get_parameters_by_path\n"
           "============================== 1 passed in 3.10s ===============================\n" + _end())
    assert grading.resolved(moto, log).resolved
    assert not grading.resolved(moto, log.replace("PASSED tests", "FAILED tests").replace(
        "1 passed", "1 failed")).resolved
