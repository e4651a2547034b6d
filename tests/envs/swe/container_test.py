"""The container backend end to end with podman: a small image, a persistent shell, an episode.

The image is made here without a registry: a root filesystem holding bash,
coreutils, git, this interpreter with its standard library and pytest, and a
task repository committed at /testbed (the layout of SWE-bench images), put
in a tarball and loaded with ``podman import``; it is built once per session.
Needs ``apt-get install podman runc``; skipped (saying why) only when podman
cannot run a container here.
"""
import ast
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time

import pytest

from aem_jax.envs.swe import container, dataset, grading, tasks
from aem_jax.envs.swe.env import SWEEnv

TOOLS = ("bash sh cat ls mkdir rm cp mv sleep env timeout mktemp head tail wc tr cut dirname basename "
         "touch chmod ln readlink true false echo printf sed grep find xargs git patch sort uniq diff "
         "id tee base64 stat").split()
STDLIB_SKIP = shutil.ignore_patterns("site-packages", "test", "tests", "__pycache__", "idlelib", "tkinter",
                                     "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "config-3*")
RUN_CHECK = ["run", "--rm", "--network=none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def _copy(src, root):
    """Copies host file ``src`` (its content) to the same path under ``root``."""
    dest = root + src
    if not os.path.exists(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(os.path.realpath(src), dest)
    return dest


def _distributions(name):
    """The installed distribution ``name`` and those it requires (markers evaluated)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    todo, seen, found = [name], set(), []
    while todo:
        dist = metadata.distribution(todo.pop())
        key = dist.metadata["Name"].lower()
        if key in seen:
            continue
        seen.add(key)
        found.append(dist)
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def _libraries(paths):
    found = set()
    for chunk in range(0, len(paths), 50):
        out = subprocess.run(["ldd", *paths[chunk:chunk + 50]], capture_output=True, text=True).stdout
        found |= {w for w in out.split() if w.startswith("/") and os.path.exists(w)}
    return sorted(found)


def _build_rootfs(root, task):
    for top in ("bin", "lib", "lib64", "sbin"):  # merged /usr, as on the host
        if os.path.islink("/" + top):
            target = os.readlink("/" + top)
            os.makedirs(os.path.join(root, target.lstrip("/")), exist_ok=True)
            os.symlink(target, os.path.join(root, top))
    binaries = [shutil.which(tool) for tool in TOOLS]
    binaries = [os.path.realpath(b) if os.path.dirname(b) in ("/bin", "/sbin") else b for b in binaries if b]
    for binary in binaries:
        _copy(binary, root)
    interpreter = os.path.realpath(sys.executable)
    _copy(interpreter, root)
    stdlib, purelib = sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]
    # in a venv, pytest lives in the venv's site-packages, which the copied base
    # interpreter does not read: put it in the base interpreter's own
    base_purelib = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["purelib"]
    shutil.copytree(stdlib, root + stdlib, ignore=STDLIB_SKIP, symlinks=True)
    for dist in _distributions("pytest"):  # pytest and what it requires, files as installed
        for file in dist.files or []:
            path = os.path.realpath(dist.locate_file(file))
            if path.startswith(purelib) and "__pycache__" not in path and os.path.isfile(path):
                dest = root + base_purelib + path[len(purelib):]
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copy2(path, dest)
    dynload = [os.path.join(dp, f) for dp, _, fs in os.walk(root + stdlib) for f in fs if f.endswith(".so")]
    for lib in _libraries(binaries + [interpreter] + [p[len(root):] for p in dynload]):
        _copy(lib, root)
    if os.path.isdir("/usr/share/git-core/templates"):
        shutil.copytree("/usr/share/git-core/templates", root + "/usr/share/git-core/templates")
    os.makedirs(root + "/usr/local/bin", exist_ok=True)
    for name in ("python", "python3"):
        os.symlink(interpreter, f"{root}/usr/local/bin/{name}")
    os.makedirs(root + "/etc", exist_ok=True)
    with open(root + "/etc/passwd", "w") as f:
        f.write("root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n")
    with open(root + "/etc/group", "w") as f:
        f.write("root:x:0:\nnogroup:x:65534:\n")
    for d, mode in (("/tmp", 0o1777), ("/root", 0o700), ("/testbed", 0o755)):
        os.makedirs(root + d, exist_ok=True)
        os.chmod(root + d, mode)
    tasks.materialize(task.repo_snapshot, root + "/testbed")
    git = ["git", "-C", root + "/testbed", "-c", "user.name=aem", "-c", "user.email=aem@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "base"]):
        subprocess.run(git + args, check=True, capture_output=True)
    # R2E-Gym's layout too: hidden tests in /r2e_tests, the runner in /root/run_tests.sh.
    hidden = root + "/tmp/hidden"
    tasks.materialize(task.repo_snapshot, hidden)
    subprocess.run(["git", "apply", "-"], input=task.test_patch, text=True, cwd=hidden, check=True)
    os.makedirs(root + "/r2e_tests")
    shutil.copy(os.path.join(hidden, task.FAIL_TO_PASS[0].split("::")[0]), root + "/r2e_tests/test_1.py")
    shutil.rmtree(hidden)
    with open(root + "/root/run_tests.sh", "w") as f:
        f.write("python -m pytest -rA -p no:cacheprovider r2e_tests\n")


def _podman_options(image):
    """CLI options that let podman run ``image`` here, or None and the reason."""
    errors = []
    for options in ([], ["--runtime=runc", "--cgroup-manager=cgroupfs"]):
        done = subprocess.run(["podman", *options, *RUN_CHECK, image, "true"],
                              capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            return options, ""
        errors.append(done.stderr.strip()[-300:])
    return None, f"podman cannot run a container here: {errors}"


@pytest.fixture(scope="session")
def image(tmp_path_factory):
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install -y podman runc)")
    local = tasks.read_jsonl(dataset.LOCAL_TASKS)[0]
    root = str(tmp_path_factory.mktemp("rootfs"))
    _build_rootfs(root, local)
    tarball = str(tmp_path_factory.mktemp("image") / "rootfs.tar")
    with tarfile.open(tarball, "w") as tar:
        tar.add(root, arcname=".")
    name = f"localhost/aem-swe-test:{os.getpid()}"
    subprocess.run(["podman", "import", tarball, name], check=True, capture_output=True)
    shutil.rmtree(root)  # ~100 MB each: the image holds them now
    os.remove(tarball)
    try:
        options, reason = _podman_options(name)
        if options is None:
            pytest.skip(reason)
        record = {k: v for k, v in local.to_record().items() if k != "repo_snapshot"}
        task = tasks.from_record({**record, "image": name, "workdir": "/testbed", "grading": "pytest",
                                  "env": {"AEM_TASK_VAR": "from-task"},
                                  "shell_init": "export AEM_INIT=done; alias ll='ls -l'"})
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(container.CLI_OPTIONS_ENV, shlex.join(options))
            yield task
    finally:
        for _ in range(5):  # a container removed just before may still hold the image
            if subprocess.run(["podman", "rmi", "-f", name], capture_output=True).returncode == 0:
                break
            time.sleep(1)


def test_image_and_task_configuration(image):
    sandbox = container.ContainerSandbox.for_task(image, cli="podman")
    try:
        sandbox.check_image()
        result = sandbox.execute("pwd; echo $AEM_TASK_VAR $AEM_INIT; python -c 'import pytest; print(\"py\")';"
                                 " git log --oneline | wc -l", timeout=60)
        assert result.output.split() == ["/testbed", "from-task", "done", "py", "1"], result.output
        as_nobody = container.ContainerSandbox(image.image, cli="podman", user="65534:65534")
        try:
            assert as_nobody.execute("id -u", timeout=60).output.strip() == "65534"
        finally:
            as_nobody.close()
    finally:
        sandbox.close()
    with pytest.raises(RuntimeError, match="aem-no-such-image"):
        container.ContainerSandbox("localhost/aem-no-such-image:1", cli="podman").check_image()


def test_persistent_shell_keeps_cd_and_exports_and_survives_hangs(image):
    sandbox = container.ContainerSandbox.for_task(image, cli="podman")
    try:
        assert sandbox.shell("cd textkit && export STEP=1 && LOCAL=2", timeout=30).returncode == 0
        result = sandbox.shell("pwd; echo $STEP $LOCAL $AEM_INIT; type ll | head -1", timeout=30)
        assert result.output.splitlines() == ["/testbed/textkit", "1 2 done", "ll is aliased to `ls -l'"]
        hung = sandbox.shell("export STEP=2; sleep 300; echo never", timeout=3)
        assert hung.timed_out and "never" not in hung.output and "timed out" in hung.output
        spin = sandbox.shell("cd /; while :; do :; done", timeout=3)  # a loop inside the shell itself
        assert spin.timed_out
        # The session goes on where the last finished command left it.
        assert sandbox.shell("pwd; echo $STEP", timeout=30).output.split() == ["/testbed/textkit", "1"]
        assert sandbox.shell("exit 4", timeout=30).returncode == 4
        assert sandbox.shell("pwd", timeout=30).output.strip() == "/testbed/textkit"
        # The environment's own commands are not affected by the agent's shell.
        assert sandbox.execute("pwd; echo ${STEP:-unset}", timeout=30).output.split() == ["/testbed", "unset"]
    finally:
        sandbox.close()


def test_episode_through_the_env(image):
    env = SWEEnv(tasks=[image], sandbox="container", backend="podman", command_timeout_s=5.0,
                 eval_timeout_s=180.0, max_turns=10)
    try:
        obs = env.reset(seed=0)
        assert obs.info["env_error"] is None, obs.info["env_error"]
        step = env.step("<function=bash>\n<parameter=command>ls textkit</parameter>\n</function>")
        assert "case.py" in step.observation
        step = env.step("<function=bash>\n<parameter=command>sleep 120</parameter>\n</function>")
        assert not step.done and "timed out" in step.observation
        apply = f"git apply <<'AEM_EOF'\n{image.patch}AEM_EOF\ngit diff --stat"
        step = env.step(f"<function=bash>\n<parameter=command>{apply}</parameter>\n</function>")
        assert "case.py" in step.observation, step.observation
        step = env.step("<function=submit>\n</function>")
        assert step.done and step.reward == 1.0, step.info.get("evaluation")
        env.reset(seed=0)  # a fresh container: the fix is gone
        step = env.step("<function=submit>\n</function>")
        assert step.done and step.reward == 0.0
    finally:
        env.close()


def test_r2e_gym_record_graded_in_the_container(image):
    """An R2E-Gym record as published: hidden tests in the image, graded against the expected map."""
    probe = container.ContainerSandbox(image.image, cli="podman")
    try:
        source = probe.execute("cat /r2e_tests/test_1.py", timeout=60).output
    finally:
        probe.close()
    names = [n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name.startswith("test")]
    task = tasks.from_record({"repo_name": "textkit", "docker_image": image.image, "commit_hash": "0" * 12,
                              "problem_statement": f"[ISSUE]\n{image.problem_statement}\n[/ISSUE]",
                              "expected_output_json": json.dumps({n: "PASSED" for n in names})})
    for fix, expect in ((image.patch, True), ("", False)):
        sandbox = container.ContainerSandbox.for_task(task, cli="podman")
        try:
            if fix:
                applied = sandbox.execute(f"git apply <<'AEM_EOF'\n{fix}AEM_EOF", timeout=60)
                assert applied.returncode == 0, applied.output
            verdict, log = grading.run_tests(task, sandbox, timeout=120)
        finally:
            sandbox.close()
        assert verdict.resolved is expect, (verdict.reason, log[-2000:])
        assert expect or image.FAIL_TO_PASS[0].split("::")[1] in verdict.reason


# -- without a container runtime ---------------------------------------------------------

def test_shell_protocol_on_a_host_bash():
    """The session logic itself, on a plain bash of this machine (KILL_TREE walks its /proc)."""
    from aem_jax.envs.swe import shell

    session = shell.PersistentShell(
        ["bash", "--noprofile", "--norc"], init="export FROM_INIT=1",
        kill_argv=lambda pid, keep: ["bash", "-c", shell.KILL_TREE, "kill", str(pid), keep],
        max_output_bytes=5000)
    try:
        tricky = "printf '%s|' \"it's\" 'a \"b\"' é $'\\t'; echo; cd / && export X=1"
        assert session.run(tricky, 10).output == "it's|a \"b\"|é|\t|\n"
        assert session.run("pwd; echo $X $FROM_INIT; printf 'no newline'", 10).output == "/\n1 1\nno newline"
        assert session.run("cat; echo read-nothing", 10).output == "read-nothing\n"  # stdin is /dev/null
        started = session.run("export BGF=/tmp/.aem_bg_$$; sleep 60 & echo $! > $BGF; echo started", 10)
        assert started.output == "started\n"
        slow = session.run("cd /tmp; sleep 60; echo never", 1)
        assert slow.timed_out and slow.returncode == 137 and "never" not in slow.output
        flood = session.run("while :; do echo yyyyyyyyyyyyyyyy; done", 10)
        assert "output exceeded 5000 bytes" in flood.output and len(flood.output) < 5400
        assert session.run("exit 5", 10).returncode == 5
        after = session.run("pwd; echo $X $FROM_INIT; kill -0 $(cat $BGF) && echo bg-alive", 10)
        assert after.output.split() == ["/", "1", "1", "bg-alive"]  # state and earlier background jobs kept
        session.run("kill $(cat $BGF); rm -f $BGF", 10)
    finally:
        session.close()


def test_container_configuration_from_a_task(monkeypatch):
    monkeypatch.setenv(container.CLI_OPTIONS_ENV, "--runtime=runc --cgroup-manager=cgroupfs")
    task = tasks.from_record({"instance_id": "django__django-11099", "repo": "django/django",
                              "base_commit": "abc", "problem_statement": "bug", "patch": "p", "test_patch": "t",
                              "FAIL_TO_PASS": ["a"], "PASS_TO_PASS": [], "version": "3.0", "user": "1000",
                              "env": {"PATH": "/opt/bin:/usr/bin", "A": "task"}})
    box = container.ContainerSandbox.for_task(task, cli="podman", env={"A": "env"})
    assert box.image == "swebench/sweb.eval.x86_64.django_1776_django-11099:latest"
    assert box.run_argv()[:3] == ["podman", "--runtime=runc", "--cgroup-manager=cgroupfs"]
    argv = box.exec_argv("pytest", 5)
    assert argv[argv.index("--user") + 1] == "1000" and "A=env" in argv and "PATH=/opt/bin:/usr/bin" in argv
    assert argv[-3:-1] == ["bash", "-c"] and argv[-1].endswith("conda activate testbed\n} >/dev/null 2>&1\npytest")
    assert box.shell_argv()[-3:] == ["bash", "--noprofile", "--norc"] and "-i" in box.shell_argv()
