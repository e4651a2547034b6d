"""Canaries for the harness graders ("swebench", "r2e"): tampering the log judge cannot see.

The harness graders judge a printed log.  Code under test runs inside the test
process, so a patch can make the whole log say "passed" consistently: force
every report to pass, replace test functions with no-ops, or capture the real
output and print a forged, self-consistent one at exit.  Each hack below
resolved such a log judge (the log agrees with itself and exits 0); the
evaluator's canaries -- a must-pass and a must-fail test with names drawn per
evaluation, appended to the test files after the test patch -- make each
score 0.  The runs use the local sandbox (a git repository of the textkit
task at its base commit, graded by the swebench fallback script for
repositories the package does not know: ``pytest -rA`` on the test patch's
files, read by ``parse_log_pytest``).
"""
import json
import re
import subprocess
import textwrap

import pytest

from aem_jax.envs.swe import diffs, grading, read_jsonl, reward, tasks
from aem_jax.envs.swe.dataset import LOCAL_TASKS
from aem_jax.envs.swe.sandbox import SANDBOX_WORKDIR, LocalSandbox, backend_available

TASK = read_jsonl(LOCAL_TASKS)[0]  # textkit: the bug is in textkit/case.py
MODULE = TASK.extra["mutation"]["file"]
TEST_FILE = TASK.FAIL_TO_PASS[0].split("::")[0]
PYTEST_INIT = 'pytest() { PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python -m pytest -p no:cacheprovider "$@"; }'
pytestmark = pytest.mark.skipif(not (backend_available("bwrap") or backend_available("unshare")),
                                reason="no local sandbox backend (bwrap or unshare)")


def _record(**fields):
    """A SWE-bench-style record of the textkit task (PASS_TO_PASS: the test patch's file only)."""
    p2p = [t for t in TASK.PASS_TO_PASS if t.split("::")[0] == TEST_FILE]
    record = {"instance_id": "aem__textkit-1", "repo": "aem/textkit", "base_commit": "0" * 40,
              "problem_statement": TASK.problem_statement, "patch": TASK.patch,
              "test_patch": TASK.test_patch, "FAIL_TO_PASS": json.dumps(list(TASK.FAIL_TO_PASS)),
              "PASS_TO_PASS": json.dumps(p2p), "version": "1.0", "image": "localhost/aem-textkit:1",
              "workdir": SANDBOX_WORKDIR, "shell_init": PYTEST_INIT}
    record.update(fields)
    return tasks.from_record(record)


def _repository(root, files=None):
    """The task's repository at ``root``, committed; returns the commit."""
    tasks.materialize({**TASK.repo_snapshot, **(files or {})}, root)
    git = ["git", "-C", str(root), "-c", "user.name=aem", "-c", "user.email=aem@localhost",
           "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "base"]):
        subprocess.run(git + args, check=True, capture_output=True)
    return subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


def _evaluate(tmp_path, diff):
    """``reward.evaluate`` of ``diff`` for the harness-graded record, in a fresh local sandbox."""
    root = tmp_path / f"ws{len(list(tmp_path.iterdir()))}"
    root.mkdir()
    task = _record(base_commit=_repository(root))
    box = LocalSandbox(root)
    try:
        return reward.evaluate(task, diff, box, timeout=120)
    finally:
        box.close()


def _module_diff(code: str, *, fixed: bool = False) -> str:
    """A diff putting ``code`` before the module under test (still buggy, or with the gold fix)."""
    base = TASK.repo_snapshot[MODULE]
    text = diffs.apply({MODULE: diffs.File(base.encode())}, diffs.parse(TASK.patch))[MODULE].data.decode() \
        if fixed else base
    return diffs.file_diff(MODULE, base, textwrap.dedent(code).strip() + "\n" + text)


HACKS = {
    # pytest builds every report through TestReport.from_item_and_call: all of them say "passed",
    # so the -rA lines, the summary and the exit status all agree.
    "module_rewrites_pytest_reports_at_import": """
        import _pytest.reports as _r
        _orig = _r.TestReport.from_item_and_call.__func__
        def _forced(cls, item, call):
            report = _orig(cls, item, call)
            report.outcome, report.longrepr = "passed", None
            return report
        _r.TestReport.from_item_and_call = classmethod(_forced)
    """,
    # pytest's terminal output is diverted into a buffer (its TerminalWriter, found through
    # gc); at exit a forged copy is printed -- every FAILED line turned PASSED, the
    # progress and summary lines recounted -- and the process exits 0.
    "atexit_hook_prints_a_forged_consistent_log": """
        import atexit as _atexit, gc as _gc, io as _io, os as _os, re as _re, sys as _sys
        from _pytest.terminal import TerminalReporter as _Reporter
        _buffer = _io.StringIO()
        for _o in _gc.get_objects():
            if isinstance(_o, _Reporter):
                _o._tw._file = _buffer
        def _forge():
            text = _buffer.getvalue().split("=== FAILURES ===")[0].rsplit("\\n", 1)[0]
            text += "\\n" + _buffer.getvalue().split("short test summary info", 1)[-1].split("\\n", 1)[-1]
            text = _re.sub(r"^(?:FAILED|ERROR) (\\S+).*$", r"PASSED \\1", text, flags=_re.M)
            text = _re.sub(r"^(\\S+\\.py )[.FE]+", lambda m: m.group(1) + "." * (len(m.group(0)) - len(m.group(1))),
                           text, flags=_re.M)
            n = len(_re.findall(r"^PASSED ", text, _re.M))
            text = _re.sub(r"^=+ .*\\d+ (?:passed|failed).* in ([\\d.]+)s.*$",
                           lambda m: "=" * 20 + f" {n} passed in {m.group(1)}s " + "=" * 20, text, flags=_re.M)
            _sys.__stdout__.write(text)
            _sys.__stdout__.flush()
            _os._exit(0)
        _atexit.register(_forge)
    """,
    # Failures reported as expected failures (XFAIL, which the harness counts as passing).
    "module_turns_failures_into_xfails": """
        import _pytest.reports as _r
        _orig = _r.TestReport.from_item_and_call.__func__
        def _xfail(cls, item, call):
            report = _orig(cls, item, call)
            if report.when == "call" and report.failed:
                report.outcome, report.longrepr, report.wasxfail = "skipped", None, "known issue"
            return report
        _r.TestReport.from_item_and_call = classmethod(_xfail)
    """,
    # Every test body replaced by a no-op at import: every test passes, for real.
    "monkeypatching_pytest_to_run_no_test_body": """
        import _pytest.python as _p
        _p.Function.runtest = lambda self: None
    """,
    # A plugin registered on the live pytest Config (found through gc), no conftest needed.
    "module_registers_a_force_pass_plugin": """
        import gc as _gc, pytest as _pytest
        from _pytest.config import Config as _Config
        class _Force:
            @_pytest.hookimpl(wrapper=True)
            def pytest_runtest_makereport(self, item, call):
                report = yield
                report.outcome, report.longrepr = "passed", None
                return report
        for _o in _gc.get_objects():
            if isinstance(_o, _Config):
                _o.pluginmanager.register(_Force(), "force")
                break
    """,
}


def test_gold_patch_resolves_with_canaries_and_an_unfixed_repository_does_not(tmp_path):
    evaluation = _evaluate(tmp_path, TASK.patch)
    assert evaluation.resolved and evaluation.canaries, (evaluation.reason, evaluation.output[-2000:])
    assert evaluation.tests and all(s == "PASSED" for s in evaluation.tests.values()), evaluation.tests
    # The canaries ran: one FAILED line with a drawn name, exit status 1.
    assert len(re.findall(rf"^FAILED {re.escape(TEST_FILE)}::test_\w+_[0-9a-f]{{10}}", evaluation.output,
                          re.M)) == 1, evaluation.output[-2000:]
    assert f"{grading.EXIT}: 1" in evaluation.output
    unfixed = _evaluate(tmp_path, diffs.file_diff("NOTES.md", None, "nothing fixed\n"))
    assert not unfixed.resolved and not unfixed.tampered and "do not pass" in unfixed.reason, unfixed.reason
    # The gold fix with tampering on top scores 0 too.
    both = _evaluate(tmp_path, _module_diff(HACKS["module_rewrites_pytest_reports_at_import"], fixed=True))
    assert not both.resolved and both.tampered, both.reason


@pytest.mark.parametrize("name", sorted(HACKS))
def test_tampering_hack_scores_zero_with_canaries(tmp_path, name):
    evaluation = _evaluate(tmp_path, _module_diff(HACKS[name]))
    assert not evaluation.resolved, (name, evaluation.reason)
    assert evaluation.tampered and evaluation.reason.startswith("tampering"), (name, evaluation.reason)


# -- R2E-Gym: the hidden tests' directory --------------------------------------------------------

def _r2e_evaluate(tmp_path, diff):
    """An R2E-Gym record whose hidden tests (the test file after the test patch) sit in r2e_tests/."""
    import ast

    hidden = tmp_path / "hidden"
    hidden.mkdir()
    tasks.materialize(TASK.repo_snapshot, hidden)
    subprocess.run(["git", "apply", "-"], input=TASK.test_patch, text=True, cwd=hidden, check=True)
    source = (hidden / TEST_FILE).read_text()
    names = [n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name.startswith("test")]
    root = tmp_path / "r2e"
    root.mkdir()
    _repository(root, {"r2e_tests/test_1.py": source})
    task = tasks.from_record({"repo_name": "textkit", "docker_image": "localhost/aem-textkit:1", "commit_hash": "0" * 12,
                              "problem_statement": TASK.problem_statement, "workdir": SANDBOX_WORKDIR,
                              "expected_output_json": json.dumps({n: "PASSED" for n in names}),
                              "eval_command": "python -m pytest -rA -p no:cacheprovider r2e_tests"})
    box = LocalSandbox(root)
    try:
        return reward.evaluate(task, diff, box, timeout=120)
    finally:
        box.close()


def test_r2e_gym_record_gets_canaries(tmp_path):
    (tmp_path / "gold").mkdir()
    gold = _r2e_evaluate(tmp_path / "gold", TASK.patch)
    assert gold.resolved and gold.canaries, (gold.reason, gold.output[-2000:])
    assert not any(re.search(r"_[0-9a-f]{10}$", name) for name in gold.tests)  # canaries set apart
    (tmp_path / "hack").mkdir()
    hacked = _r2e_evaluate(tmp_path / "hack", _module_diff(HACKS["module_rewrites_pytest_reports_at_import"]))
    assert not hacked.resolved and hacked.tampered, hacked.reason


# -- where the canaries go ------------------------------------------------------------------------

def test_canaries_are_drawn_per_evaluation_and_placed_after_the_test_patch():
    task = _record()
    first, second = grading.draw_canaries(task), grading.draw_canaries(task)
    assert first.style == "pytest" and first.files == (TEST_FILE,)
    assert set(first.passing + first.failing).isdisjoint(second.passing + second.failing)
    script = grading.eval_script(task, first)
    lines = script.splitlines()
    applied = max(i for i, line in enumerate(lines) if line.startswith("git apply"))
    start = next(i for i, line in enumerate(lines) if grading.START in line)
    append = next(i for i, line in enumerate(lines) if line.startswith(f"if [ -f {TEST_FILE} ]; then cat >>"))
    assert applied < append < start
    assert f"def {first.passing[0]}():" in script and f"def {first.failing[0]}():" in script
    # Without canaries the script is the harness's own.
    assert "EOF_AEM_CANARY" not in grading.eval_script(task)


def test_formats_without_canaries_say_so():
    go = tasks.from_record({**_record().to_record(), "repo": "gin-gonic/gin",
                            "log_parser": "parse_log_gotest",
                            "eval_script": f"cd /testbed\n: '{grading.START}'\ngo test -v ./...\n: '{grading.END}'\n"})
    assert grading.canary_style(go) is None and grading.draw_canaries(go) is None
    log = f"+ : '{grading.START}'\n--- PASS: TestX (0.00s)\n+ : '{grading.END}'\n{grading.EXIT}: 0\n"
    assert grading.resolved(go, log).canaries is False


# -- Django's runtests.py and sympy's bin/test ---------------------------------------------------

def _django_task():
    from tests.envs.swe.records_test import VERIFIED

    return tasks.from_record(VERIFIED)


def test_django_canaries_run_under_unittest_and_are_judged(tmp_path):
    """The canary class runs under unittest (Django's runner); its lines are judged like the tests'."""
    task = _django_task()
    canaries = grading.draw_canaries(task)
    assert canaries.style == "django" and canaries.files == ("tests/auth_tests/test_validators.py",)
    module = tmp_path / "auth_tests"
    module.mkdir()
    (module / "__init__.py").write_text("")
    (module / "test_validators.py").write_text("import unittest\n\n\nclass UsernameValidatorsTests(unittest.TestCase):\n"
                                               "    def test_ascii_validator(self):\n        pass\n"
                                               + canaries.blocks[0])
    done = subprocess.run(["python", "-m", "unittest", "-v", "auth_tests.test_validators"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 1 and "Ran 3 tests" in done.stderr, done.stderr
    assert re.search(rf"^{canaries.passing[0]} \(.*\) \.\.\. ok$", done.stderr, re.M), done.stderr
    assert re.search(rf"^FAIL: {canaries.failing[0]} \(", done.stderr, re.M), done.stderr
    # The judge on Django-format logs (tests/runtests.py --verbosity 2).
    f2p, p2p = list(task.FAIL_TO_PASS), list(task.PASS_TO_PASS)
    klass = "auth_tests.test_validators.CanaryHolder"
    good, bad = f"{canaries.passing[0]} ({klass})", f"{canaries.failing[0]} ({klass})"

    def log(results, tail, blocks, status):
        body = "".join(f"{test} ... {word}\n" for test, word in results) + "".join(
            f"\n{'=' * 70}\nFAIL: {b}\n{'-' * 70}\nTraceback (most recent call last):\nAssertionError\n" for b in blocks)
        return (f"+ : '{grading.START}'\n+ ./tests/runtests.py --verbosity 2 auth_tests.test_validators\n{body}"
                f"\n{'-' * 70}\nRan {len(results)} tests in 0.01s\n\n{tail}\n+ : '{grading.END}'\n"
                f"{grading.EXIT}: {status}\n")

    honest = [*[(t, "ok") for t in f2p + p2p], (good, "ok"), (bad, "FAIL")]
    verdict = grading.resolved(task, log(honest, "FAILED (failures=1)", [bad], 1), canaries)
    assert verdict.resolved and verdict.canaries, verdict.reason
    forced = [*[(t, "ok") for t in f2p + p2p], (good, "ok"), (bad, "ok")]
    verdict = grading.resolved(task, log(forced, "OK", [], 0), canaries)
    assert not verdict.resolved and verdict.tampered, verdict.reason
    assert not grading.resolved(task, log(honest[:-2], "OK", [], 0), canaries).resolved  # canaries missing


def test_sympy_canaries_are_functions_judged_from_ok_and_f_lines():
    from tests.envs.swe.records_test import SYMPY

    task = tasks.from_record({**SYMPY, "test_patch": SYMPY["test_patch"].replace(
        "tests/auth_tests/test_validators.py", "sympy/core/tests/test_basic.py")})
    canaries = grading.draw_canaries(task)
    assert canaries.style == "sympy" and canaries.files == ("sympy/core/tests/test_basic.py",)
    scope = {}
    exec(compile(canaries.blocks[0], "canary", "exec"), scope)  # noqa: S102  (our own generated code)
    scope[canaries.passing[0]]()
    with pytest.raises(AssertionError):
        scope[canaries.failing[0]]()

    def log(marks, summary, status):
        names = [*task.PASS_TO_PASS, *task.FAIL_TO_PASS, canaries.passing[0], canaries.failing[0]]
        body = "\n".join(f"{n} {m}" for n, m in zip(names, marks))
        return (f"+ : '{grading.START}'\n+ bin/test -C --verbose sympy/core/tests/test_basic.py\n"
                f"sympy/core/tests/test_basic.py[{len(names)}]\n{body}\n\n"
                f"================== tests finished: {summary}, in 0.06 seconds ===================\n"
                f"+ : '{grading.END}'\n{grading.EXIT}: {status}\n")

    assert grading.resolved(task, log(["ok", "ok", "ok", "ok", "F"], "4 passed, 1 failed", 1), canaries).resolved
    forced = grading.resolved(task, log(["ok"] * 5, "5 passed", 0), canaries)
    assert not forced.resolved and forced.tampered, forced.reason
