"""The SWE pieces joined: the agent's persistent shell in both backends, grader selection
by ``task.grading``, and a published-style SWE-bench record graded by its harness --
through a podman container (the image of ``container_test``) and on a host stand-in.
"""
import json
import os
import re
import subprocess
import tempfile
import time

import pytest

from aem_jax.envs.swe import SWEEnv, diffs, read_jsonl, reward, scripted, tasks
from aem_jax.envs.swe.dataset import LOCAL_TASKS
from aem_jax.envs.swe.sandbox import ExecResult, LocalSandbox, backend_available
from tests.envs.swe.container_test import image  # noqa: F401  (the podman image fixture)

TASK = read_jsonl(LOCAL_TASKS)[0]  # textkit: the bug is in textkit/case.py
MODULE = TASK.extra["mutation"]["file"]
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not backend_available(b), reason=f"{b} unavailable"))
            for b in ("bwrap", "unshare")]
# SWE-bench images run `pytest`; the test image has only `python -m pytest`.
PYTEST_INIT = 'pytest() { python -m pytest "$@"; }'


def _sandbox_processes(uid):
    """Host pids running as ``uid`` (the sandbox's own uid, root only), zombies left out."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if os.stat(f"/proc/{pid}").st_uid == uid and state != "Z":
                found.append(int(pid))
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue  # the process ended between listing /proc and reading it
    return found


# -- the persistent shell of the local sandbox ---------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_local_shell_keeps_cd_and_exports_and_survives_hangs(backend, tmp_path):
    (tmp_path / "pkg").mkdir()
    box = LocalSandbox(tmp_path, backend=backend, max_processes=64)
    try:
        assert box.shell("cd pkg && export STEP=1 && LOCAL=2; alias ll='ls -l'", 20).returncode == 0
        result = box.shell("pwd; echo $STEP $LOCAL; id -u; type ll | head -1", 20)
        assert result.output.splitlines() == [f"{box.workdir}/pkg", "1 2", str(box.uid),
                                              "ll is aliased to `ls -l'"], result.output
        hung = box.shell("export STEP=2; sleep 300; echo never", 2)
        assert hung.timed_out and hung.returncode == 137 and "never" not in hung.output
        spin = box.shell("cd /; while :; do :; done", 2)  # a loop of builtins in the shell itself
        assert spin.timed_out
        # The session resumes as of the last command that finished.
        assert box.shell("pwd; echo $STEP", 20).output.split() == [f"{box.workdir}/pkg", "1"]
        assert box.shell("exit 4", 20).returncode == 4
        assert box.shell("echo $STEP > made_here; pwd", 20).output.strip() == f"{box.workdir}/pkg"
        assert (tmp_path / "pkg" / "made_here").read_text() == "1\n"  # the workspace, read from the host
        # The sandbox's view is the same as execute's: no host paths, no package data.
        hidden = box.shell(f"ls /root /home {os.path.dirname(reward.__file__)} 2>&1 | head -3", 20)
        assert "No such file" in hidden.output, hidden.output
        # The environment's own commands do not see the agent's shell state.
        assert box.execute("pwd; echo ${STEP:-unset}", 20).output.split() == [box.workdir, "unset"]
        box.shell("sleep 1000 & echo started", 20)
        box.close_shell()  # ends the shell's sandbox and every process in it
        if box.is_root:  # SIGKILL is delivered at once, the exits finish shortly after
            deadline = time.monotonic() + 10
            while _sandbox_processes(box.uid) and time.monotonic() < deadline:
                time.sleep(0.1)
            left = _sandbox_processes(box.uid)
            assert left == [], [open(f"/proc/{p}/cmdline").read() for p in left]
        assert box.shell("pwd", 20).output.strip() == box.workdir  # a new session
    finally:
        box.close()


def test_env_bash_tool_is_the_persistent_shell():
    env = SWEEnv(tasks=[TASK], max_turns=20, command_timeout_s=20)
    try:
        env.reset(seed=0)
        package = os.path.dirname(MODULE)
        env.step(scripted.call("bash", command=f"cd {package} && export FIX_DIR=$PWD"))
        step = env.step(scripted.call("bash", command="pwd; echo $FIX_DIR; ls"))
        assert step.observation.splitlines()[:2] == [f"/tmp/workspace/{package}"] * 2, step.observation
        assert os.path.basename(MODULE) in step.observation
        env.command_timeout_s = 1
        step = env.step(scripted.call("bash", command="sleep 60"))
        assert not step.done and "timed out" in step.observation
        env.command_timeout_s = 20
        step = env.step(scripted.call("bash", command="pwd"))
        assert step.observation.startswith(f"/tmp/workspace/{package}")
        # The file tools still start from the repository root; the fix through them resolves.
        for action in scripted.gold_actions(env.task):
            step = env.step(action)
        assert step.done and step.reward == 1.0, step.observation
    finally:
        env.close()


# -- grader selection ---------------------------------------------------------------------------

def _published(record_extra=None, **fields):
    """A SWE-bench-style record of the textkit task (FAIL_TO_PASS as a JSON string, a version).

    As in SWE-bench, PASS_TO_PASS holds tests of the files the test patch touches (the
    harness runs only those).
    """
    files = diffs.touched_paths(TASK.test_patch)
    p2p = [t for t in TASK.PASS_TO_PASS if t.split("::")[0] in files]
    record = {"instance_id": "aem__textkit-1", "repo": "aem/textkit", "base_commit": "0" * 40,
              "problem_statement": TASK.problem_statement, "patch": TASK.patch,
              "test_patch": TASK.test_patch, "FAIL_TO_PASS": json.dumps(list(TASK.FAIL_TO_PASS)),
              "PASS_TO_PASS": json.dumps(p2p), "version": "1.0",
              "environment_setup_commit": "0" * 40, "image": "localhost/aem-textkit:1",
              "shell_init": PYTEST_INIT, **(record_extra or {})}
    record.update(fields)
    return tasks.from_record(record)


class _Refusing:
    """A sandbox that fails the test if anything runs in it."""

    workdir = "/testbed"

    def execute(self, command, timeout=60.0):
        raise AssertionError(f"the evaluator ran {command[:80]!r} for a diff it must reject")


def test_grader_is_chosen_by_task_grading_and_the_diff_rules_hold_for_all():
    swebench = _published()
    assert swebench.grading == "swebench" and reward.grader_name(swebench) == "swebench"
    assert reward.grader_name(TASK) == "pytest"
    r2e = tasks.from_record({"repo_name": "textkit", "docker_image": "img", "commit_hash": "0" * 12,
                             "problem_statement": "x", "expected_output_json": '{"test_a": "PASSED"}'})
    assert reward.grader_name(r2e) == "r2e"
    assert reward._GRADERS["swebench"] is reward._GRADERS["r2e"] is reward.run_harness
    test_file = TASK.FAIL_TO_PASS[0].split("::")[0]
    edit_test = diffs.file_diff(test_file, "", "def test_x():\n    pass\n")
    for task in (swebench, r2e):
        for diff, why in ((edit_test, "protected"), ("--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-a\n+b\n",
                                                       "not a valid git diff"),
                          (diffs.file_diff("conftest.py", "", "import os\n"), "protected")):
            evaluation = reward.evaluate(task, diff, _Refusing())
            assert not evaluation.resolved and why in evaluation.reason, evaluation.reason


class _HostStandIn:
    """``execute`` on this machine, in a git repository at ``workdir`` (trusted test input only)."""

    def __init__(self, workdir):
        self.workdir = workdir

    def execute(self, command, timeout=60.0):
        try:
            done = subprocess.run(["bash", "-c", command], cwd=self.workdir, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout,
                                  env={**os.environ, "HOME": self.workdir,
                                       "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
        except subprocess.TimeoutExpired as err:
            return ExecResult(str(err.stdout or ""), 137, True)
        return ExecResult(done.stdout, done.returncode, False)


def _repository(root):
    tasks.materialize(TASK.repo_snapshot, root)
    git = ["git", "-C", root, "-c", "user.name=aem", "-c", "user.email=aem@localhost",
           "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "base"]):
        subprocess.run(git + args, check=True, capture_output=True)
    return subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


# Where pytest shows the forged lines decides which check fails them: the log contradicting
# itself, or the real FAILED line (a later PASSED never overrides it).
FORGED = r"contradicts itself|\(FAILED\)|\(CONFLICT\)"


def _forging(module_text):
    """The module under test printing PASSED lines for every required test at import."""
    ids = [*TASK.FAIL_TO_PASS, *TASK.PASS_TO_PASS]
    fake = "".join(f"PASSED {t}\n" for t in ids)
    return f"import sys\nsys.__stdout__.write({fake!r})\n" + module_text


def test_swebench_record_graded_by_its_harness_on_a_host_stand_in():
    """The harness path without a container: swebench's eval script for the record, its log parser."""
    with tempfile.TemporaryDirectory() as root:
        head = _repository(root)
        task = _published(base_commit=head, workdir=root)
        module = TASK.repo_snapshot[MODULE]
        cases = [(TASK.patch, True, "resolved"), (diffs.snapshot_diff({}, {"NOTES.md": "nothing\n"}), False,
                                                  "do not pass"),
                 (diffs.file_diff(MODULE, module, _forging(module)), False, FORGED)]
        for diff, expect, why in cases:
            subprocess.run(["git", "-C", root, "checkout", "-q", "-f", head], check=True)
            subprocess.run(["git", "-C", root, "clean", "-q", "-fdx"], check=True)
            evaluation = reward.evaluate(task, diff, _HostStandIn(root))
            assert evaluation.resolved is expect, (evaluation.reason, evaluation.output[-3000:])
            assert re.search(why, evaluation.reason), evaluation.reason


# -- through a podman container ------------------------------------------------------------------

@pytest.mark.slow  # about 40 s: three container starts and two harness runs
def test_swebench_record_end_to_end_in_a_container(image):  # noqa: F811
    from aem_jax.envs.swe import container

    probe = container.ContainerSandbox(image.image, cli="podman")
    try:
        head = probe.execute("git rev-parse HEAD", timeout=60).output.strip()
    finally:
        probe.close()
    task = _published(base_commit=head, image=image.image)
    assert task.workdir == "/testbed" and task.grading == "swebench"
    with pytest.raises(RuntimeError, match="aem-missing-image"):
        SWEEnv(tasks=[task, _published(instance_id="aem__textkit-2", image="localhost/aem-missing-image:1")],
               sandbox="container", backend="podman")
    env = SWEEnv(tasks=[task], sandbox="container", backend="podman", command_timeout_s=20,
                 eval_timeout_s=180.0, max_turns=10)
    assert env.check_images() == [image.image]
    apply = f"cd $BACK && git apply <<'AEM_EOF'\n{TASK.patch}AEM_EOF\n"
    module = TASK.repo_snapshot[MODULE]
    try:
        env.reset(seed=0)  # the gold fix through the agent's persistent shell (cd, export carry over)
        for action in [scripted.call("bash", command="cd textkit && export BACK=$OLDPWD"),
                       scripted.call("bash", command=apply), scripted.call("submit")]:
            step = env.step(action)
        assert step.done and step.reward == 1.0, (step.info["evaluation"], env.last_evaluation.output[-2000:])
        assert "resolved" in step.info["evaluation"]
        # Graded by the same harness without an episode: a change that fixes nothing, and
        # the module printing PASSED lines for every required test.
        for diff, why in ((diffs.snapshot_diff({}, {"NOTES.md": "nothing\n"}), "do not pass"),
                          (diffs.file_diff(MODULE, module, _forging(module)), FORGED)):
            evaluation = env.evaluate_diff(task, diff)
            assert not evaluation.resolved and re.search(why, evaluation.reason), evaluation.reason
    finally:
        env.close()
