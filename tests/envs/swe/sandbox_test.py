"""Security and resource tests of the local sandbox, on every backend available here.

Each attack must be contained with a clear result, and the sandbox must keep
working afterwards (the rollout goes on).  Network tests aim only at a server
this test starts on 127.0.0.1.
"""
import os
import socket
import sys
import threading
import time
import uuid

import pytest

from aem_jax.envs.swe import sandbox as sandbox_lib
from aem_jax.envs.swe.sandbox import ExecResult, LocalSandbox

BACKENDS = [b for b in ("bwrap", "unshare") if sandbox_lib.backend_available(b)]


def test_some_backend_works_here():
    # CI installs bubblewrap and runs as root (unshare fallback): one must work.
    assert BACKENDS, "neither bubblewrap nor root unshare works on this machine"


@pytest.fixture(params=BACKENDS)
def box(request, tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "hello.py").write_text("print('hello from the workspace')\n")
    sandbox = LocalSandbox(workspace, backend=request.param, cpu_seconds=5, max_processes=64,
                           memory_bytes=2 << 30, max_output_bytes=1 << 20)
    yield sandbox
    assert sandbox.execute("echo alive", timeout=10).output.strip() == "alive"


def _processes_with(marker):
    """Host processes whose command line contains ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def test_runs_in_workspace_as_unprivileged_user(box):
    result = box.execute("pwd; id -u; python hello.py; echo out > made.txt", timeout=20)
    assert result == ExecResult(
        f"{box.workdir}\n{box.uid}\nhello from the workspace\n", 0, False)
    assert os.path.exists(os.path.join(box.workspace, "made.txt"))
    if os.geteuid() == 0:
        lo, hi = sandbox_lib.DEFAULT_UID_RANGE
        assert lo <= box.uid <= hi


def test_exit_status_is_reported(box):
    assert box.execute("exit 3", timeout=5).returncode == 3


def test_fork_bomb_is_contained(box):
    marker = f"bomb{uuid.uuid4().hex[:8]}"  # $0 of every forked shell
    start = time.monotonic()
    result = box.execute(f"sh -c 'b() {{ b | b & }}; b; sleep 30' {marker}", timeout=3)
    assert time.monotonic() - start < 15
    # The process limit stops it (the outer shell may itself fail to fork `sleep`).
    assert "Cannot fork" in result.output and (result.timed_out or result.returncode != 0)
    time.sleep(0.2)
    assert not _processes_with(marker), "fork bomb processes survived"


def test_infinite_loop_hits_wall_timeout(box):
    start = time.monotonic()
    result = box.execute("while :; do :; done", timeout=1.5)
    assert result.timed_out and "timed out" in result.output
    assert time.monotonic() - start < 6


def test_cpu_time_limit_kills_busy_process(tmp_path):
    box = LocalSandbox(tmp_path, backend=BACKENDS[0], cpu_seconds=1)
    result = box.execute("python -c 'while True: pass'", timeout=20)
    assert not result.timed_out and result.returncode != 0  # SIGXCPU / SIGKILL


def test_allocating_20_gb_fails_cleanly(box):
    result = box.execute("python -c 'b = bytearray(20 * 2**30)'", timeout=20)
    assert result.returncode != 0 and "MemoryError" in result.output


def test_writing_outside_workspace_fails(box, tmp_path):
    probe = f"/var/tmp/aem_probe_{uuid.uuid4().hex}"
    outside = tmp_path / "outside.txt"
    result = box.execute(f"echo x > {probe}; echo x > /etc/aem_probe; echo x > {outside}; "
                         "echo x > /usr/aem_probe; echo done", timeout=10)
    assert "Read-only file system" in result.output or "Permission denied" in result.output
    assert not os.path.exists(probe) and not os.path.exists("/etc/aem_probe")
    assert not outside.exists() and not os.path.exists("/usr/aem_probe")


def test_reading_root_and_shadow_fails(box):
    result = box.execute("cat /etc/shadow; ls -A /root", timeout=10)
    assert "/etc/shadow: No such file or directory" in result.output  # not mounted at all
    with open("/etc/passwd") as f:
        assert "root:" in f.read()  # sanity: the host file exists
    listing = set(result.output.splitlines()[1:])
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
    exposed = {p.split("/")[2] for p in prefixes if p.startswith("/root/")}  # the interpreter only
    assert listing <= exposed, f"/root shows {listing}"


def test_host_loopback_server_is_unreachable(box):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3)
    port = server.getsockname()[1]
    accepted = []
    thread = threading.Thread(target=lambda: _accept(server, accepted), daemon=True)
    thread.start()
    code = ("import socket; s = socket.socket(); s.settimeout(2); "
            f"s.connect(('127.0.0.1', {port})); print('CONNECTED')")
    result = box.execute(f"python -c \"{code}\"; tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '", timeout=20)
    thread.join()
    server.close()
    assert "CONNECTED" not in result.output and not accepted
    assert result.output.split()[-1:] == ["lo"]  # no interface but its own loopback


def _accept(server, accepted):
    try:
        accepted.append(server.accept())
    except OSError:
        pass


def test_printing_1_gb_is_capped(box):
    start = time.monotonic()
    result = box.execute("head -c 1000000000 /dev/zero | tr '\\0' x", timeout=60)
    assert len(result.output) < 2 * box.limits.max_output_bytes
    assert "output exceeded" in result.output
    assert time.monotonic() - start < 30


def test_deleting_the_workspace_is_contained(box):
    box.execute("rm -rf /tmp/workspace/* /tmp/workspace/.[!.]* /tmp/workspace; rm -rf / 2>/dev/null",
                timeout=20)
    assert os.path.isdir(box.workspace) and not os.listdir(box.workspace)
    assert os.path.exists("/etc/passwd")


def test_killing_the_parent_is_contained(box):
    result = box.execute("kill -9 $PPID; kill -9 1; kill -9 -1; echo after", timeout=10)
    assert result.returncode in (0, 137) and not result.timed_out


def test_sleeping_past_timeout_is_killed(box):
    start = time.monotonic()
    result = box.execute("sleep 30", timeout=1)
    assert result.timed_out and time.monotonic() - start < 5


def test_background_process_does_not_survive(box):
    marker = "4173"  # an unusual sleep length to find leftovers by
    start = time.monotonic()
    result = box.execute(f"(sleep {marker} &); nohup sleep {marker} >/dev/null 2>&1 & echo started",
                         timeout=10)
    assert result.output.strip() == "started" and time.monotonic() - start < 5
    time.sleep(0.2)
    assert not _processes_with(f"sleep\0{marker}\0")


def test_bad_arguments_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="workspace"):
        LocalSandbox(tmp_path / "missing")
    with pytest.raises(ValueError, match="cpu_seconds"):
        LocalSandbox(tmp_path, cpu_seconds=0)
    with pytest.raises(ValueError, match="unknown sandbox limits"):
        LocalSandbox(tmp_path, gpu=1)
    with pytest.raises(ValueError, match="backend"):
        LocalSandbox(tmp_path, backend="chroot")


def test_missing_tools_name_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox_lib, "_PROBED", {"bwrap": False, "unshare": False})
    with pytest.raises(sandbox_lib.SandboxUnavailableError, match="bubblewrap"):
        LocalSandbox(tmp_path)
