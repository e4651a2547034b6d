"""Isolation of the local sandbox, on every backend available here.

What a sandbox may see (the system, the interpreter, its own workspace) and
what it may not (the package's task data with the hidden tests and gold
patches, the project tree, other workspaces, host sockets); a distinct uid
per sandbox; per-sandbox memory, process and disk limits; no privileges
(no_new_privs, empty bounding set, nosuid mounts).
"""
import concurrent.futures
import os
import shutil
import socket
import sys
import uuid

import pytest

from aem_jax.envs.swe import SWEEnv, dataset, read_jsonl
from aem_jax.envs.swe import sandbox as sandbox_lib
from aem_jax.envs.swe.sandbox import LocalSandbox

BACKENDS = [b for b in ("bwrap", "unshare") if sandbox_lib.backend_available(b)]
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="uids, cgroups and the workspace tmpfs need root")
PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def make_box(tmp_path, backend):
    boxes = []

    def make(name="ws", files=None, **kwargs):
        workspace = tmp_path / f"{name}_{uuid.uuid4().hex[:8]}"
        workspace.mkdir()
        for path, text in (files or {}).items():
            (workspace / path).write_text(text)
        box = LocalSandbox(workspace, backend=backend, **kwargs)
        boxes.append(box)
        return box

    yield make
    for box in boxes:
        box.close()


def test_task_data_and_project_tree_are_invisible(make_box):
    box = make_box()
    secret_paths = [dataset.LOCAL_TASKS, os.path.dirname(dataset.LOCAL_TASKS), PROJECT,
                    os.path.join(PROJECT, "aem_jax"), dataset.default_data_dir(), "/home", "/run",
                    "/var/run", "/sys"]
    checks = "; ".join(f"test -e {p} && echo VISIBLE {p}" for p in secret_paths)
    result = box.execute(f"{checks}; python -c 'import aem_jax' 2>&1 | tail -1; ls /", timeout=30)
    assert "VISIBLE" not in result.output, result.output
    assert "No module named 'aem_jax'" in result.output
    top = set(result.output.splitlines()[1:])
    assert top <= {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "proc", "dev", "tmp",
                   "root", "aem_eval"}, top
    # The gold patch of a task is nowhere in what the sandbox can read of /tmp.
    gold_line = next(line for line in read_jsonl(dataset.LOCAL_TASKS)[0].patch.splitlines()
                     if line.startswith("+") and not line.startswith("+++"))
    probe = box.execute(f"grep -rF -- {gold_line[1:].strip()!r} /tmp /etc 2>/dev/null | head -1", timeout=30)
    assert probe.output.strip() == ""


def test_another_workspace_is_invisible(make_box):
    marker = f"marker_{uuid.uuid4().hex}"
    first = make_box(files={"a.py": "x = 1\n"})
    second = make_box(files={f"{marker}.txt": "secret\n"})
    result = first.execute(f"ls -A /tmp /tmp/workspace; cat {second.workspace}/{marker}.txt; "
                           f"ls {os.path.dirname(second.workspace)}", timeout=20)
    assert "secret" not in result.output and result.output.count("No such file or directory") == 2
    assert marker not in result.output.split("/tmp/workspace:")[1].split("cat:")[0]  # own listing


def test_host_unix_sockets_are_unreachable(make_box, tmp_path):
    path = str(tmp_path / "host.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"aem_test_{uuid.uuid4().hex}"
    abstract.bind("\0" + name)
    server.listen(1)
    abstract.listen(1)
    code = ("import socket\nfor a in (%r, %r):\n    s = socket.socket(socket.AF_UNIX)\n    try:\n"
            "        s.connect(a); print('CONNECTED', a)\n    except OSError as e:\n        print('BLOCKED', e)\n"
            % (path, "\0" + name))
    box = make_box()
    box.put_file("probe.py", code)
    result = box.execute("python probe.py", timeout=20)
    server.close()
    abstract.close()
    assert "CONNECTED" not in result.output and result.output.count("BLOCKED") == 2, result.output


@needs_root
def test_each_sandbox_gets_its_own_uid_from_the_range(make_box):
    low = 150000 + uuid.uuid4().int % 10000
    first = make_box(uid_range=(low, low + 1))
    second = make_box(uid_range=(low, low + 1))
    assert {first.uid, second.uid} == {low, low + 1}
    with pytest.raises(RuntimeError, match="uid_range"):
        make_box(uid_range=(low, low + 1))
    assert first.execute("id -u", timeout=10).output.strip() == str(first.uid)
    first.close()
    third = make_box(uid_range=(low, low + 1))  # released on close
    assert third.uid == first.uid
    with pytest.raises(ValueError, match="uid_range"):
        make_box(uid_range=(5, 10))


@needs_root
def test_fork_bomb_does_not_fail_a_concurrent_correct_solution(make_box, backend):
    task = read_jsonl(dataset.LOCAL_TASKS)[5]
    bomb = make_box(max_processes=64)
    env = SWEEnv(tasks=[task], backend=backend)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        bombing = pool.submit(bomb.execute, "b() { b | b & }; b; sleep 5", 5)
        evaluation = env.evaluate_diff(task, task.patch)
        bombing.result()
    env.close()
    assert evaluation.resolved, evaluation.reason


@needs_root
def test_memory_limit_covers_all_processes_together(make_box):
    box = make_box(memory_bytes=512 << 20)
    if box.cgroup_mode is None:
        pytest.skip("no writable cgroup (v2 memory+pids or v1 memory/pids) here: only per-process limits")
    hold = "import time; b = b'x' * (400 << 20); time.sleep(1.5); print('held')"
    result = box.execute(f"for i in 1 2 3 4 5; do python -c \"{hold}\" & done; wait", timeout=60)
    assert result.output.count("held") < 5, result.output
    single = box.execute(f"python -c \"{hold}\"", timeout=60)
    assert single.output.count("held") == 1, single.output  # one alone fits


@needs_root
def test_process_limit_is_per_sandbox(make_box):
    box = make_box(max_processes=20)
    result = box.execute("for i in $(seq 40); do sleep 5 & done; wait", timeout=30)
    assert "fork" in result.output.lower() or "resource" in result.output.lower(), result.output


@needs_root
def test_writing_more_than_the_disk_limit_fails(make_box):
    box = make_box(disk_bytes=32 << 20, max_file_bytes=1 << 30)
    result = box.execute("for i in 1 2 3 4 5; do head -c 10000000 /dev/zero > f$i || echo FULL; done; du -sm .",
                         timeout=30)
    assert "No space left on device" in result.output and "FULL" in result.output
    used = sum(os.path.getsize(os.path.join(box.workspace, f)) for f in os.listdir(box.workspace))
    assert used <= 32 << 20
    with pytest.raises(ValueError, match="disk_bytes"):
        make_box(files={"big.bin": "x" * (2 << 20)}, disk_bytes=1 << 20)


@needs_root
def test_setuid_binary_does_not_regain_privileges(make_box):
    box = make_box()
    target = os.path.join(box.workspace, "myid")
    shutil.copy("/usr/bin/id", target)
    os.chown(target, 0, 0)
    os.chmod(target, 0o4755)
    result = box.execute("ls -l myid; ./myid -u; ./myid -ru; grep -E '^(CapEff|CapPrm|CapBnd)' /proc/self/status; "
                         "mount -t tmpfs none /tmp 2>&1 | head -1; su -c true root </dev/null 2>&1 | head -1",
                         timeout=20)
    lines = result.output.splitlines()
    assert lines[0].startswith("-rwsr-xr-x"), result.output  # the bit is there...
    assert lines[1] == lines[2] == str(box.uid), result.output  # ...and grants nothing
    for line in lines[3:6]:
        assert line.split()[1] == "0000000000000000", line
    assert "must be superuser" in result.output or "denied" in result.output.lower()


def test_no_new_privs_and_nosuid_mounts(make_box):
    box = make_box()
    result = box.execute("grep NoNewPrivs /proc/self/status; cat /proc/self/mountinfo", timeout=10)
    lines = result.output.splitlines()
    assert lines[0].split() == ["NoNewPrivs:", "1"]
    for line in lines[1:]:
        point, options = line.split()[4], line.split()[5]
        assert "nosuid" in options.split(","), f"{point} is mounted without nosuid: {line}"


@needs_root
def test_close_releases_the_cgroup_and_the_workspace_mount(make_box):
    box = make_box(files={"a.py": "x\n"})
    mounted = lambda: any(line.split()[4] == box.workspace for line in open("/proc/self/mountinfo"))  # noqa: E731
    assert mounted()
    cgroups = list(box._state["cgroup"].dirs)
    box.close()
    assert not mounted() and not any(os.path.exists(d) for d in cgroups)
    assert box.execute("true", timeout=5).returncode == 126


def test_unprivileged_python_sees_only_system_site_packages(make_box):
    box = make_box()
    result = box.execute("python -c 'import sys; print(sys.prefix)'", timeout=20)
    assert result.output.strip() == sys.prefix


def test_cgroup_v2_and_v1_file_protocols(tmp_path):
    """The cgroup set-up on fake hierarchies (this machine may have only one of v1 / v2)."""
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpu io memory pids\n")
    mode, parents = sandbox_lib._find_cgroup_parents([(str(v2), "cgroup2", "rw")])
    assert (mode, parents) == ("v2", [str(v2 / "aem_jax_sandboxes")])
    assert (v2 / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert (v2 / "aem_jax_sandboxes" / "cgroup.subtree_control").read_text() == "+memory +pids"
    limits = sandbox_lib.Limits(memory_bytes=512 << 20, max_processes=77)
    group = sandbox_lib._Cgroup("sbx_1", limits, (mode, parents))
    leaf = v2 / "aem_jax_sandboxes" / "sbx_1"
    assert (leaf / "memory.max").read_text() == str(512 << 20) and (leaf / "pids.max").read_text() == "77"
    assert group.procs_files == [str(leaf / "cgroup.procs")]
    (v2 / "other").mkdir()
    (v2 / "other" / "cgroup.controllers").write_text("cpu\n")  # no memory controller: not used
    assert sandbox_lib._find_cgroup_parents([(str(v2 / "other"), "cgroup2", "rw")]) == (None, [])

    memory, pids = tmp_path / "memory", tmp_path / "pids"
    mounts = [(str(memory), "cgroup", "rw,memory"), (str(pids), "cgroup", "rw,pids")]
    mode, parents = sandbox_lib._find_cgroup_parents(mounts, own=lambda controller: "/job/7")
    assert (mode, parents) == ("v1", [str(memory / "job/7/aem_jax_sandboxes"), str(pids / "job/7/aem_jax_sandboxes")])
    sandbox_lib._Cgroup("sbx_2", limits, (mode, parents))
    assert (memory / "job/7/aem_jax_sandboxes/sbx_2/memory.limit_in_bytes").read_text() == str(512 << 20)
    assert (pids / "job/7/aem_jax_sandboxes/sbx_2/pids.max").read_text() == "77"


def test_package_data_inside_a_mounted_directory_is_covered(make_box, tmp_path, monkeypatch):
    """E.g. aem_jax installed into the interpreter's site-packages: its task file stays hidden."""
    prefix = tmp_path / "prefix"
    package = prefix / "lib" / "site-packages" / "aem_jax"
    (package / "data").mkdir(parents=True)
    (package / "data" / "local_tasks.jsonl").write_text('{"patch": "SECRET GOLD"}\n')
    (prefix / "lib" / "site-packages" / "other.py").write_text("print('visible')\n")
    os.chmod(tmp_path, 0o755)
    box = make_box()
    monkeypatch.setattr(sandbox_lib, "_hidden_paths", lambda: [str(package)])
    monkeypatch.setattr(box, "_ro_paths", lambda: [*LocalSandbox._ro_paths(box), ("bind", str(prefix))])
    result = box.execute(f"cat {package}/data/local_tasks.jsonl; ls -A {package}; "
                         f"cat {prefix}/lib/site-packages/other.py", timeout=20)
    assert "SECRET" not in result.output and "data" not in result.output.split("\n")[:2]
    assert "print('visible')" in result.output
