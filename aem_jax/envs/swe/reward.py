"""The SWE reward: apply only the agent's diff to a fresh repository, run the tests.

``evaluate(task, diff, sandbox)`` follows the SWE-bench harness (Jimenez et
al., 2024): in a fresh sandbox holding the original repository, apply the
agent's diff, then the task's hidden ``test_patch``, then run FAIL_TO_PASS and
PASS_TO_PASS.  The task is resolved iff

  * the diff touches no protected path (tests, conftest.py, pytest
    configuration, sitecustomize / usercustomize, .pth files), and applies;
  * the test command exits with status 0, and
  * its ``-rA`` report lists every required test as PASSED and none as
    FAILED or ERROR.

Both checks are needed: output the agent's code prints cannot fake a zero exit
status of a failing run, and an early ``os._exit(0)`` does not produce the
report lines of tests that never ran.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
from typing import Protocol

from aem_jax.envs.swe import diffs
from aem_jax.envs.swe.sandbox import ExecResult
from aem_jax.envs.swe.tasks import Task

_OUTCOME = re.compile(r"^(PASSED|FAILED|ERROR|XPASS|XFAIL|SKIPPED) (\S+?)(?: - .*)?$")
AGENT_DIFF_FILE = ".aem_agent.diff"
TEST_PATCH_FILE = ".aem_test.patch"


class Sandbox(Protocol):
    """What the reward needs from a sandbox (local or container)."""

    workdir: str

    def execute(self, command: str, timeout: float = 60.0) -> ExecResult:
        ...

    def put_file(self, relative_path: str, text: str) -> None:
        ...


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The outcome of evaluating one diff."""

    resolved: bool
    reason: str  # one line for logs and the final observation
    tests: dict[str, str] = dataclasses.field(default_factory=dict)  # test id -> outcome
    returncode: int | None = None
    output: str = ""


def parse_pytest_outcomes(output: str) -> dict[str, str]:
    """Test id -> last reported outcome, from pytest ``-rA`` summary lines."""
    outcomes: dict[str, str] = {}
    for line in output.splitlines():
        match = _OUTCOME.match(line.rstrip())
        if match:
            outcomes[match.group(2)] = match.group(1)
    return outcomes


def _apply(sandbox: Sandbox, name: str, patch: str, what: str, timeout: float) -> str | None:
    """Applies ``patch`` inside the sandbox; returns an error line or None."""
    if not patch.strip():
        return None
    sandbox.put_file(name, patch)
    quoted = shlex.quote(name)
    result = sandbox.execute(
        f"git apply --whitespace=nowarn {quoted} 2>&1 || patch -p1 --forward --batch < {quoted} 2>&1;"
        f" status=$?; rm -f {quoted}; exit $status", timeout=timeout)
    if result.returncode != 0 or result.timed_out:
        return f"{what} does not apply: {result.output.strip()[-500:]}"
    return None


def test_command(task: Task) -> str:
    """The shell command running the task's FAIL_TO_PASS and PASS_TO_PASS tests."""
    ids = sorted(set(task.FAIL_TO_PASS) | set(task.PASS_TO_PASS))
    return f"{task.test_command} " + " ".join(shlex.quote(i) for i in ids)


def judge(task: Task, result: ExecResult) -> Evaluation:
    """Decides resolution from the test run's exit status and its parsed report."""
    tests = parse_pytest_outcomes(result.output)
    required = [*task.FAIL_TO_PASS, *task.PASS_TO_PASS]
    not_passed = [t for t in required if tests.get(t) != "PASSED"]
    bad = sorted(t for t, outcome in tests.items() if outcome in ("FAILED", "ERROR"))
    if result.timed_out:
        reason = "the tests timed out"
    elif result.returncode != 0:
        reason = f"the test command exited with status {result.returncode}"
    elif not_passed or bad:
        reason = f"tests not reported as passed: {sorted(set(not_passed) | set(bad))[:10]}"
    else:
        return Evaluation(True, f"resolved: all {len(required)} tests pass", tests,
                          result.returncode, result.output)
    if not_passed:
        reason += f" ({len(not_passed)} of {len(required)} required tests not passed)"
    return Evaluation(False, reason, tests, result.returncode, result.output)


def evaluate(task: Task, diff: str, sandbox: Sandbox, *, timeout: float = 300.0) -> Evaluation:
    """Evaluates the agent's ``diff`` in ``sandbox``, which must hold the original repo."""
    protected = diffs.protected_paths(diff)
    if protected:
        return Evaluation(False, f"rejected: the diff modifies protected files {protected} "
                                 "(tests, test configuration or start-up hooks)")
    if not diff.strip():
        return Evaluation(False, "no changes were submitted")
    for name, patch, what in ((AGENT_DIFF_FILE, diff, "the submitted diff"),
                              (TEST_PATCH_FILE, task.test_patch, "the hidden test patch")):
        error = _apply(sandbox, name, patch, what, timeout)
        if error:
            return Evaluation(False, error)
    return judge(task, sandbox.execute(test_command(task), timeout=timeout))
