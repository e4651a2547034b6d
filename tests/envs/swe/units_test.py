"""Pure units: diffs, mutations, action parsing, reward judging, container commands."""
import os
import stat
import subprocess

import pytest

from aem_jax.envs.swe import container, diffs, mutations, reward, tools
from aem_jax.envs.swe.container import ContainerSandbox
from aem_jax.envs.swe.sandbox import ExecResult
from aem_jax.envs.swe.tasks import from_record

# -- diffs ------------------------------------------------------------------------


def test_file_diff_applies_with_git(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\ny = 2\n")
    patch = diffs.snapshot_diff({"a.py": "x = 1\ny = 2\n"}, {"a.py": "x = 1\ny = 3\n", "b.py": "z\n"})
    subprocess.run(["git", "apply", "-"], input=patch, text=True, cwd=tmp_path, check=True)
    assert (tmp_path / "a.py").read_text() == "x = 1\ny = 3\n"
    assert (tmp_path / "b.py").read_text() == "z\n"
    assert diffs.touched_paths(patch) == ["a.py", "b.py"]


@pytest.mark.parametrize("path", [
    "tests/test_x.py", "pkg/test_x.py", "pkg/x_test.py", "conftest.py", "sub/conftest.py",
    "pytest.ini", "tox.ini", "setup.cfg", "pyproject.toml", "sitecustomize.py", "lib/evil.pth",
    "usercustomize.py", "../outside.py",
])
def test_protected_paths(path):
    assert diffs.is_protected_path(path)


def test_unprotected_and_renamed_paths():
    assert not diffs.is_protected_path("pkg/core.py")
    rename = "diff --git a/pkg/a.py b/tests/a.py\nsimilarity index 100%\nrename from pkg/a.py\nrename to tests/a.py\n"
    assert diffs.protected_paths(rename) == ["tests/a.py"]


# -- mutations --------------------------------------------------------------------

SOURCE = "def f(a, b):\n    if a < b and b > 0:\n        a = a + 1\n    total = g(a, b)\n    return total * 2\n"


@pytest.mark.parametrize("operator, site, expected", [
    ("flip_arithmetic", 0, "a = a - 1"),
    ("flip_comparison", 0, "if a <= b and"),
    ("flip_boolean", 0, "a < b or b > 0"),
    ("change_constant", 0, "b > 1:"),
    ("negate_condition", 0, "if not (a < b and b > 0):"),
    ("remove_condition", 0, "def f(a, b):\n    a = a + 1\n"),
    ("remove_statement", 0, "def f(a, b):\n    if a < b and b > 0:\n        a = a + 1\n    return"),
    ("swap_arguments", 0, "total = g(b, a)"),
])
def test_each_mutation_operator(operator, site, expected):
    assert mutations.count_sites(SOURCE, operator) >= 1
    mutated, description = mutations.mutate(SOURCE, operator, site)
    assert expected in mutated and description
    compile(mutated, "<mutant>", "exec")


def test_mutation_site_out_of_range():
    with pytest.raises(ValueError, match="site"):
        mutations.mutate(SOURCE, "flip_boolean", 5)
    with pytest.raises(ValueError, match="operator"):
        mutations.mutate(SOURCE, "delete_everything", 0)


def test_remove_functions_keeps_the_rest():
    source = "import x\n\n\ndef test_a():\n    pass\n\n\ndef test_b():\n    pass\n"
    assert mutations.remove_functions(source, {"test_a"}) == "import x\n\n\ndef test_b():\n    pass\n"


# -- actions ----------------------------------------------------------------------


def test_parse_qwen3_and_deepswe_formats():
    qwen = ("thinking...\n<tool_call>\n<function=str_replace>\n<parameter=path>\na.py\n</parameter>\n"
            "<parameter=old_str>\n  x = 1\n</parameter>\n<parameter=new_str>\n  x = 2\n</parameter>\n"
            "</function>\n</tool_call>")
    call = tools.parse_action(qwen)
    assert call == tools.ToolCall("str_replace", {"path": "a.py", "old_str": "  x = 1", "new_str": "  x = 2"})
    assert tools.parse_action("<function=submit>\n</function>").name == "submit"
    # A stop string may cut the closing tag.
    assert tools.parse_action("<function=bash><parameter=command>ls").params == {"command": "ls"}


@pytest.mark.parametrize("text, message", [
    ("just words", "no tool call"),
    ("<function=rm_rf></function>", "unknown tool"),
    ("<function=bash></function>", "needs parameter"),
    ("<function=view><parameter=path>a</parameter><parameter=x>1</parameter></function>", "no parameter"),
    (None, "must be text"),
])
def test_unparsable_actions_explain(text, message):
    with pytest.raises(tools.ActionError, match=message):
        tools.parse_action(text)


def test_long_output_keeps_head_and_tail():
    text = "".join(f"line {i}\n" for i in range(10_000))
    cut = tools.truncate_middle(text, 200)
    assert cut.startswith("line 0\n") and cut.endswith("line 9999\n") and "omitted" in cut
    formatted = tools.format_result(ExecResult(text, 0, False), 200)
    assert formatted.endswith("[exit code: 0]") and len(formatted) < 400


# -- reward judging ---------------------------------------------------------------

TASK = from_record({
    "instance_id": "t-1", "repo": "r", "problem_statement": "p", "patch": "x", "test_patch": "",
    "FAIL_TO_PASS": ["tests/test_a.py::test_f"], "PASS_TO_PASS": ["tests/test_a.py::test_p"],
    "repo_snapshot": {"a.py": ""}})
REPORT = "PASSED tests/test_a.py::test_f\nPASSED tests/test_a.py::test_p\n2 passed in 0.01s\n"


def test_judge_needs_exit_status_and_report():
    assert reward.judge(TASK, ExecResult(REPORT, 0, False)).resolved
    # Printed fake PASSED lines with a failing run.
    assert not reward.judge(TASK, ExecResult(REPORT + "FAILED x", 1, False)).resolved
    # Exit status 0 without the tests having run (e.g. os._exit(0) at import).
    assert not reward.judge(TASK, ExecResult("", 0, False)).resolved
    assert not reward.judge(TASK, ExecResult(REPORT + "FAILED tests/test_a.py::test_x - e\n", 0, False)).resolved
    assert not reward.judge(TASK, ExecResult(REPORT, 0, True)).resolved


def test_parse_outcomes_reads_failure_messages():
    outcomes = reward.parse_pytest_outcomes("FAILED tests/t.py::test_a - assert 1 == 2\nERROR tests/t.py::test_b\n")
    assert outcomes == {"tests/t.py::test_a": "FAILED", "tests/t.py::test_b": "ERROR"}


def test_protected_diff_is_rejected_before_running():
    class NoSandbox:
        workdir = "/nowhere"

        def execute(self, command, timeout=60):
            raise AssertionError("must not run")

        put_file = execute

    patch = diffs.file_diff("conftest.py", None, "import os\n")
    evaluation = reward.evaluate(TASK, patch, NoSandbox())
    assert not evaluation.resolved and "conftest.py" in evaluation.reason


# -- container backend ------------------------------------------------------------


def test_container_commands(monkeypatch):
    # The CLI options default to $AEM_JAX_CONTAINER_CLI_OPTIONS (container_test's podman
    # fixture sets it for the session): pinned here, then checked explicitly.
    monkeypatch.delenv(container.CLI_OPTIONS_ENV, raising=False)
    box = ContainerSandbox("swebench/sweb.eval.x86_64.django:latest", cli="podman", cpu_seconds=30,
                           memory_bytes=1 << 30, max_processes=100, env={"A": "1"})
    run = box.run_argv()
    assert run[:3] == ["podman", "run", "-d"] and run[-2:] == ["swebench/sweb.eval.x86_64.django:latest", "infinity"]
    for flag in (["--network", "none"], ["--cap-drop", "ALL"], ["--pids-limit", "100"],
                 ["--memory", str(1 << 30)], ["--ulimit", "cpu=30:30"], ["--workdir", "/testbed"]):
        assert any(run[i:i + 2] == flag for i in range(len(run))), flag
    exec_argv = box.exec_argv("pytest -rA", 9.5)
    assert exec_argv == ["podman", "exec", "-w", "/testbed", "-e", "A=1", box.name, "timeout", "-s",
                         "KILL", "10", "sh", "-c", "pytest -rA"]
    assert box.remove_argv() == ["podman", "rm", "-f", "-t", "0", box.name]  # no 10 s stop wait
    monkeypatch.setenv(container.CLI_OPTIONS_ENV, "--runtime=runc --cgroup-manager=cgroupfs")
    with_options = ContainerSandbox("img", cli="podman")
    for argv in (with_options.run_argv(), with_options.exec_argv("true", 5), with_options.remove_argv()):
        assert argv[:3] == ["podman", "--runtime=runc", "--cgroup-manager=cgroupfs"], argv
    assert ContainerSandbox("img", cli="podman", cli_options=[]).run_argv()[:2] == ["podman", "run"]
    with pytest.raises(ValueError, match="cli"):
        ContainerSandbox("img", cli="lxc")


def test_container_execute_through_a_fake_cli(tmp_path, monkeypatch):
    # A stand-in CLI: `run` succeeds, `exec` runs the trailing `timeout ... sh -c COMMAND` locally.
    fake = tmp_path / "docker"
    fake.write_text('#!/bin/sh\ncase "$1" in\n  run) echo cid;;\n  rm) exit 0;;\n'
                    '  exec) while [ "$1" != timeout ]; do shift; done; exec "$@";;\nesac\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv(container.CLI_OPTIONS_ENV, raising=False)  # the fake reads the subcommand first
    box = ContainerSandbox("img", cli="docker")
    assert box.execute("echo hi; exit 4", timeout=5) == ExecResult("hi\n", 4, False)
    slow = box.execute("sleep 20", timeout=1)
    assert slow.timed_out
    box.close()
