"""Local sandbox: run an untrusted shell command against a workspace directory.

``LocalSandbox(workspace, **limits).execute(command, timeout)`` runs
``/bin/sh -c command`` with

* no network (a fresh network namespace: its own loopback, nothing else),
* a read-only view of the host root, a private ``/tmp`` (tmpfs, wiped after
  every command), ``/root`` and ``/home`` hidden, and the workspace bound
  read-write at ``/tmp/workspace`` (the only place writes survive),
* a separate unprivileged uid (``nobody``, 65534) when the caller is root,
* rlimits on CPU seconds, address space, processes, file size and open files,
* its own PID namespace, so that the whole process tree (background jobs
  included) dies when the command ends or the wall-clock timeout fires.

Two isolation tools are supported: bubblewrap (Debian package
``bubblewrap``, preferred) and util-linux ``unshare`` (root only; mounts are
set up by ``_unshare_init.py``). ``backend="auto"`` takes the first that works.
"""
from __future__ import annotations

import dataclasses
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from typing import NamedTuple

SANDBOX_WORKDIR = "/tmp/workspace"
BACKENDS = ("auto", "bwrap", "unshare")
_HIDDEN_DIRS = ("/root", "/home")
# Directories the sandbox covers with a tmpfs (the interpreter may live below one).
_COVERED_DIRS = ("/tmp", *_HIDDEN_DIRS)
_INIT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_unshare_init.py")


class ExecResult(NamedTuple):
    """What one sandboxed command produced."""

    output: str  # stdout and stderr interleaved, head/tail kept past the cap
    returncode: int  # exit status; 128+N or -N when killed by signal N
    timed_out: bool  # the wall-clock timeout fired and the tree was killed


class SandboxUnavailableError(RuntimeError):
    """No isolation tool works on this machine (the message says what to install)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-command resource limits of the local sandbox."""

    cpu_seconds: int = 60  # RLIMIT_CPU
    memory_bytes: int = 4 << 30  # RLIMIT_AS (address space)
    max_processes: int = 256  # RLIMIT_NPROC (counted inside the user namespace)
    max_file_bytes: int = 256 << 20  # RLIMIT_FSIZE
    max_open_files: int = 256  # RLIMIT_NOFILE
    max_output_bytes: int = 4 << 20  # stdout+stderr read before the tree is killed
    tmp_bytes: int = 256 << 20  # size of the private /tmp tmpfs

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"sandbox limit {field.name} must be a positive int, got {value!r}")

    def prlimit_args(self) -> list[str]:
        """Arguments for util-linux ``prlimit`` (soft=hard so they cannot be raised)."""
        return [
            f"--cpu={self.cpu_seconds}",
            f"--as={self.memory_bytes}",
            f"--nproc={self.max_processes}",
            f"--fsize={self.max_file_bytes}",
            f"--nofile={self.max_open_files}",
        ]


def _tool_works(argv: list[str]) -> bool:
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


_PROBED: dict[str, bool] = {}


def backend_available(name: str) -> bool:
    """Whether backend ``name`` ("bwrap" or "unshare") can create a sandbox here."""
    if name not in _PROBED:
        if name == "bwrap":
            userns = [] if os.geteuid() == 0 else ["--unshare-user"]
            probe = ["bwrap", *userns, "--unshare-pid", "--unshare-net", "--ro-bind", "/", "/",
                     "--proc", "/proc", "--dev", "/dev", "--", "true"]
            ok = (shutil.which("bwrap") is not None and shutil.which("prlimit") is not None
                  and (os.geteuid() != 0 or shutil.which("setpriv") is not None)
                  and _tool_works(probe))
        elif name == "unshare":
            probe = ["unshare", "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "true"]
            ok = (shutil.which("unshare") is not None and shutil.which("prlimit") is not None
                  and os.geteuid() == 0 and _tool_works(probe))
        else:
            raise ValueError(f"backend must be 'bwrap' or 'unshare', got {name!r}")
        _PROBED[name] = ok
    return _PROBED[name]


def resolve_backend(backend: str) -> str:
    """Picks a working backend; raises ``SandboxUnavailableError`` naming the package."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    candidates = ("bwrap", "unshare") if backend == "auto" else (backend,)
    for name in candidates:
        if backend_available(name):
            return name
    raise SandboxUnavailableError(
        f"no working sandbox backend among {candidates}: install the Debian package "
        "'bubblewrap' (apt-get install -y bubblewrap) and allow user namespaces, or run as "
        "root with util-linux 'unshare' and 'prlimit' (package 'util-linux')"
    )


def _read_limited(proc: subprocess.Popen, deadline: float, max_bytes: int) -> tuple[bytes, bool, bool]:
    """Reads the child's output until EOF, the deadline or ``max_bytes``.

    Keeps the first and last ``max_bytes // 2`` bytes.  Returns
    (output, timed_out, output_capped); on a timeout or cap the caller kills.
    """
    half = max_bytes // 2
    head, tail = bytearray(), bytearray()
    total = 0
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    fd = proc.stdout.fileno()
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _join(head, tail, total), True, False
            if not selector.select(timeout=min(remaining, 1.0)):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return _join(head, tail, total), False, False
            total += len(chunk)
            room = half - len(head)
            head += chunk[:room]
            tail += chunk[room:] if room > 0 else chunk
            del tail[:-half]
            if total > max_bytes:
                return _join(head, tail, total), False, True
    finally:
        selector.close()


def _join(head: bytearray, tail: bytearray, total: int) -> bytes:
    skipped = total - len(head) - len(tail)
    if skipped <= 0:
        return bytes(head + tail)
    return bytes(head) + f"\n[... {skipped} bytes omitted ...]\n".encode() + bytes(tail)


def _kill_tree(proc: subprocess.Popen) -> None:
    # The sandbox runs in its own process group and PID namespace: killing the
    # group kills the namespace's init, and with it every process inside.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class LocalSandbox:
    """Runs commands in a namespace sandbox over ``workspace`` (see module doc).

    Args:
      workspace: host directory the commands may write; made owned by ``uid``.
      backend: "auto", "bwrap" or "unshare".
      uid, gid: unprivileged identity when running as root (default nobody);
        ignored when not root (the caller's uid is then used, unmapped).
      env: extra environment variables for the commands.
      **limits: fields of ``Limits`` (cpu_seconds, memory_bytes, ...).
    """

    def __init__(self, workspace: str | os.PathLike, *, backend: str = "auto", uid: int = 65534,
                 gid: int = 65534, env: dict[str, str] | None = None, **limits: int):
        self.workspace = os.path.abspath(os.fspath(workspace))
        if not os.path.isdir(self.workspace):
            raise ValueError(f"workspace must be an existing directory, got {self.workspace!r}")
        unknown = set(limits) - {f.name for f in dataclasses.fields(Limits)}
        if unknown:
            raise ValueError(f"unknown sandbox limits {sorted(unknown)}; allowed: "
                             f"{[f.name for f in dataclasses.fields(Limits)]}")
        self.limits = Limits(**limits)
        self.backend = resolve_backend(backend)
        self.is_root = os.geteuid() == 0
        self.uid, self.gid = (uid, gid) if self.is_root else (os.getuid(), os.getgid())
        self.workdir = SANDBOX_WORKDIR
        self.env = self._base_env() | dict(env or {})
        if self.is_root:
            self.chown_workspace()

    def chown_workspace(self) -> None:
        """Gives the workspace to the sandbox uid (host-side, symlinks not followed)."""
        for root, dirs, files in os.walk(self.workspace):
            for name in [*dirs, *files]:
                os.chown(os.path.join(root, name), self.uid, self.gid, follow_symlinks=False)
        os.chown(self.workspace, self.uid, self.gid)

    def put_file(self, name: str, text: str) -> None:
        """Writes ``text`` to file ``name`` in the workspace root (host side).

        Only plain names are allowed and symlinks are not followed, so a
        workspace the agent has touched cannot redirect the write.
        """
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"name must be a plain file name, got {name!r}")
        path = os.path.join(self.workspace, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if self.is_root:
            os.chown(path, self.uid, self.gid)

    def _base_env(self) -> dict[str, str]:
        python_bin = os.path.dirname(sys.executable)
        return {
            "PATH": f"{python_bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "TERM": "dumb",
            "PAGER": "cat",
            "GIT_PAGER": "cat",
        }

    def _exposed_prefixes(self) -> list[str]:
        # The interpreter may live under a covered directory (pyenv in /root, a
        # virtualenv in /tmp): bind it back read-only so `python -m pytest` works.
        prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
        return sorted(p for p in prefixes if any(p.startswith(h + "/") for h in _COVERED_DIRS))

    def _bwrap_argv(self, command: str) -> list[str]:
        if self.is_root:
            # Privileged bwrap (no user namespace, so real uid 0 never appears
            # as the sandbox's uid); setpriv then drops to the unprivileged uid
            # with no capabilities, and bwrap's no_new_privs blocks setuid binaries.
            argv = ["bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                    "--unshare-cgroup-try"]
            drop = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                    "--inh-caps=-all", "--bounding-set=-all", "--"]
        else:
            argv, drop = ["bwrap", "--unshare-all"], []
        argv += ["--die-with-parent", "--new-session", "--ro-bind", "/", "/", "--dev", "/dev",
                 "--proc", "/proc", "--perms", "1777", "--size", str(self.limits.tmp_bytes),
                 "--tmpfs", "/tmp"]
        for hidden in _HIDDEN_DIRS:
            if os.path.isdir(hidden):
                argv += ["--perms", "0755", "--size", str(1 << 20), "--tmpfs", hidden]
        for prefix in self._exposed_prefixes():
            parents = []
            parent = os.path.dirname(prefix)
            while parent not in _COVERED_DIRS and parent != "/":
                parents.insert(0, parent)
                parent = os.path.dirname(parent)
            for directory in parents:
                argv += ["--perms", "0755", "--dir", directory]
            argv += ["--ro-bind", prefix, prefix]
        argv += ["--bind", self.workspace, self.workdir, "--chdir", self.workdir, "--clearenv"]
        for key, value in sorted(self.env.items()):
            argv += ["--setenv", key, value]
        return [*argv, "--", *drop, "prlimit", *self.limits.prlimit_args(), "--",
                "/bin/sh", "-c", command]

    def _unshare_argv(self, command: str) -> list[str]:
        spec = {
            "workspace": self.workspace, "workdir": self.workdir,
            "hidden": [h for h in _HIDDEN_DIRS if os.path.isdir(h)],
            "exposed": self._exposed_prefixes(),
            "tmp_bytes": self.limits.tmp_bytes, "uid": self.uid, "gid": self.gid,
            "limits": dataclasses.asdict(self.limits), "env": self.env, "command": command,
        }
        return ["unshare", "--mount", "--net", "--pid", "--ipc", "--uts", "--fork",
                "--kill-child", "--mount-proc", "--", sys.executable, "-I", "-S", _INIT_SCRIPT,
                json.dumps(spec)]

    def execute(self, command: str, timeout: float = 60.0) -> ExecResult:
        """Runs ``command`` with ``/bin/sh -c`` in a fresh sandbox.

        Never raises for anything the command does; the tree is killed when
        ``timeout`` seconds pass or the output exceeds ``max_output_bytes``.
        """
        if not isinstance(command, str):
            raise TypeError(f"command must be a str, got {type(command).__name__}")
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not os.path.isdir(self.workspace):
            return ExecResult(f"sandbox error: workspace {self.workspace} no longer exists", 126, False)
        build = self._bwrap_argv if self.backend == "bwrap" else self._unshare_argv
        try:
            # Privileges are dropped inside the namespaces (setpriv for bwrap,
            # _unshare_init for unshare), after the mounts are in place.
            proc = subprocess.Popen(
                build(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, process_group=0, env=self.env)
        except OSError as err:
            return ExecResult(f"sandbox error: could not start {self.backend}: {err}", 126, False)
        with proc:
            data, timed_out, capped = _read_limited(proc, time.monotonic() + timeout,
                                                    self.limits.max_output_bytes)
            if timed_out or capped:
                _kill_tree(proc)
            returncode = proc.wait()
        text = data.decode("utf-8", errors="replace")
        if timed_out:
            text += f"\n[command timed out after {timeout:g} s; all its processes were killed]"
        if capped:
            text += (f"\n[output exceeded {self.limits.max_output_bytes} bytes; "
                     "all its processes were killed]")
        return ExecResult(text, _normalise_returncode(returncode), timed_out)


def _normalise_returncode(code: int) -> int:
    return 128 - code if code < 0 else code
