"""Local sandbox: run an untrusted shell command against a workspace directory.

``LocalSandbox(workspace, **limits).execute(command, timeout)`` runs
``/bin/sh -c command`` in fresh namespaces (mount, PID, network, IPC, UTS)
that see only what the tools need:

* the system read-only: ``/usr`` (and the ``/bin``, ``/sbin``, ``/lib*``
  links or directories), a minimal ``/etc`` (``_ETC_FILES``, with a
  generated ``passwd`` / ``group``), the interpreter's prefix;
* the workspace read-write at ``/tmp/workspace``, a private ``/tmp`` and
  ``/dev/shm`` (tmpfs, wiped after every command), a fresh ``/proc``, a
  minimal ``/dev``; and, for evaluations only, the evaluator directory at
  ``/aem_eval``.

Nothing else exists inside: not the project tree, the package's task data
(hidden tests, gold patches; covered by an empty tmpfs should they lie below
a mounted directory), other workspaces, ``/home``, ``/root``, the host's
``/tmp``, ``/run`` or ``/var`` (host unix sockets), ``/sys``.  There is no
network but a private loopback.

Identity and limits, per sandbox (when the host process is root):

* a distinct uid (= gid) from ``uid_range``, leased while the sandbox is
  open (a ``flock`` per uid, so concurrent processes never share one);
  RLIMIT_NPROC counts per uid, so one sandbox's fork bomb cannot exhaust
  another's processes;
* a cgroup (v2 where its memory and pids controllers are writable, else
  the v1 memory and pids hierarchies) bounding the memory of all processes
  together (``memory_bytes``, no swap) and their number (``max_processes``);
  ``cgroup_mode`` says which applies (None: the rlimits only);
* the workspace is a tmpfs of ``disk_bytes`` mounted over the workspace
  directory (so writing more fails with ENOSPC), ``/tmp`` one of
  ``tmp_bytes``;
* rlimits (soft = hard) on CPU seconds, address space per process, file
  size, open files and processes;
* no capabilities: an empty bounding set, no_new_privs (setuid binaries and
  file capabilities grant nothing), every mount nosuid.

The agent's persistent shell (``shell(command, timeout)``): one bash started
inside a sandbox like the one ``execute`` makes (same mounts, uid, cgroup and
rlimits), kept for the episode and driven by ``shell.PersistentShell``, so
``cd`` and exported variables carry over.  A command still running at its
deadline is killed with that sandbox as a whole (its PID namespace ends with
it: no process survives, background jobs included); the next command starts a
new one in the saved working directory with the saved exports, which live in
a small directory of this sandbox's own (``SHELL_STATE_MOUNT``, a 4 MiB tmpfs
when root).  ``/tmp`` lasts as long as one shell.  ``execute`` stays a fresh
sandbox per command: the environment's file tools, the diff and the
evaluation never run in the agent's shell.

Two isolation tools are supported: bubblewrap (Debian package
``bubblewrap``, preferred) and util-linux ``unshare`` (root only; the root
file system is built by ``_unshare_init.py``).  ``backend="auto"`` takes the
first that works.  Without root, bubblewrap runs in a user namespace as the
caller's uid: there is then no uid per sandbox, no cgroup and no disk quota
(only the rlimits).
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import json
import os
import random
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from typing import NamedTuple

SANDBOX_WORKDIR = "/tmp/workspace"
EVALUATOR_MOUNT = "/aem_eval"
SHELL_STATE_MOUNT = "/aem_shell"  # the persistent shell's saved directory and exports
_SHELL_STATE_BYTES = 4 << 20
# Kills the process group whose id is in file argv[1] (the shell's launcher): the
# sandbox's PID namespace ends with it.
_KILL_GROUP = """
import os, signal, sys
try:
    with open(sys.argv[1]) as f:
        os.killpg(int(f.read().split()[0]), signal.SIGKILL)
except (OSError, ValueError, IndexError):
    pass
"""
BACKENDS = ("auto", "bwrap", "unshare")
DEFAULT_UID_RANGE = (100000, 165535)
# Read-only system directories (links such as /bin -> usr/bin are recreated as links).
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# The /etc entries shells, Python, git and the dynamic linker read.
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "nsswitch.conf", "localtime",
              "timezone", "hosts", "host.conf", "alternatives", "bash.bashrc", "profile",
              "inputrc", "terminfo", "mime.types", "os-release", "debian_version", "services",
              "protocols", "ssl", "ca-certificates", "mailcap", "environment")
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_INIT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_unshare_init.py")
# The aem_jax package directory (it holds the task data: hidden tests, gold patches).
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MS_NOSUID, MS_NODEV, MNT_DETACH = 2, 4, 2
_LIBC = ctypes.CDLL(None, use_errno=True)


class ExecResult(NamedTuple):
    """What one sandboxed command produced."""

    output: str  # stdout and stderr interleaved, head/tail kept past the cap
    returncode: int  # exit status; 128+N or -N when killed by signal N
    timed_out: bool  # the wall-clock timeout fired and the tree was killed


class SandboxUnavailableError(RuntimeError):
    """No isolation tool works on this machine (the message says what to install)."""


class WorkspaceError(ValueError):
    """The workspace holds something the evaluator does not take (symlink, device, too large)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-sandbox resource limits (see the module docstring for how each is enforced)."""

    cpu_seconds: int = 60  # RLIMIT_CPU per process
    memory_bytes: int = 4 << 30  # cgroup memory of all processes, and RLIMIT_AS per process
    max_processes: int = 256  # cgroup pids.max, and RLIMIT_NPROC for the sandbox's own uid
    max_file_bytes: int = 256 << 20  # RLIMIT_FSIZE
    max_open_files: int = 256  # RLIMIT_NOFILE
    max_output_bytes: int = 4 << 20  # stdout+stderr read before the tree is killed
    tmp_bytes: int = 256 << 20  # size of the private /tmp and /dev/shm tmpfs
    disk_bytes: int = 1 << 30  # size of the workspace file system (root only)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
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
            probe = ["bwrap", *userns, "--unshare-pid", "--unshare-net", "--ro-bind", "/usr", "/usr",
                     "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
                     "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev",
                     "--", "/usr/bin/true"]
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


# -- uids ------------------------------------------------------------------------------------


def _lock_dir() -> str:
    base = "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()
    path = os.path.join(base, "aem_jax_sandbox_uids")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def lease_uid(uid_range: tuple[int, int]) -> tuple[int, int]:
    """(uid, lock fd): a uid of ``uid_range`` (inclusive) no other open sandbox holds.

    A ``flock`` on one file per uid, held until the fd is closed (or the
    process dies), makes leases exclusive across processes.
    """
    low, high = uid_range
    if not (isinstance(low, int) and isinstance(high, int) and 1000 <= low <= high < 2**31 - 2):
        raise ValueError(f"uid_range must be (low, high) ints with 1000 <= low <= high < 2**31-2, "
                         f"got {uid_range!r}")
    directory = _lock_dir()
    count = high - low + 1
    start = random.randrange(count)
    for i in range(count):
        uid = low + (start + i) % count
        fd = os.open(os.path.join(directory, f"{uid}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return uid, fd
        except BlockingIOError:
            os.close(fd)
    raise RuntimeError(f"all {count} uids of uid_range {uid_range} are leased by open sandboxes")


# -- cgroups ------------------------------------------------------------------------------------


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) of this process's mounts."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if len(fields) >= 5 and len(rest) >= 3:
                point = fields[4].encode().decode("unicode_escape")
                found.append((point, rest[0], rest[2]))
    return found


def _own_cgroup(controller: str | None) -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if (controller is None and names == "") or (controller and controller in names.split(",")):
                return path
    return "/"


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


_CGROUP_LOCK = threading.Lock()
_CGROUP_PARENTS: dict[str, object] = {}


def _cgroup_parents() -> tuple[str | None, list[str]]:
    """("v2" | "v1" | None, parent directories in which per-sandbox cgroups are made)."""
    with _CGROUP_LOCK:
        if "mode" in _CGROUP_PARENTS:
            return _CGROUP_PARENTS["mode"], _CGROUP_PARENTS["dirs"]
        mode, dirs = None, []
        if os.geteuid() == 0:
            try:
                mode, dirs = _find_cgroup_parents()
            except OSError:
                mode, dirs = None, []
        _CGROUP_PARENTS.update(mode=mode, dirs=dirs)
        return mode, dirs


def _find_cgroup_parents(mounts: list[tuple[str, str, str]] | None = None, own=None
                         ) -> tuple[str | None, list[str]]:
    """("v2", [parent]) or ("v1", [memory parent, pids parent]) or (None, []).

    ``mounts`` (mount point, fs type, super options) and ``own(controller)`` (this
    process's cgroup path) default to this process's; tests pass fake ones.
    """
    mounts = _mounts() if mounts is None else mounts
    own = own or _own_cgroup
    for point, fstype, _ in mounts:
        if fstype != "cgroup2":
            continue
        try:
            with open(os.path.join(point, "cgroup.controllers")) as f:
                controllers = f.read().split()
        except OSError:
            continue
        if not {"memory", "pids"} <= set(controllers):
            continue
        # A cgroup with processes cannot delegate controllers (v2's no-internal-
        # process rule), so the parent is made at the hierarchy's root.
        parent = os.path.join(point, "aem_jax_sandboxes")
        try:
            os.makedirs(parent, exist_ok=True)
            _write(os.path.join(point, "cgroup.subtree_control"), "+memory +pids")
            _write(os.path.join(parent, "cgroup.subtree_control"), "+memory +pids")
            return "v2", [parent]
        except OSError:
            continue
    parents = []
    for controller in ("memory", "pids"):
        point = next((p for p, fstype, opts in mounts
                      if fstype == "cgroup" and controller in opts.split(",")), None)
        if point is None:
            return None, []
        for base in (os.path.join(point, own(controller).lstrip("/")), point):
            parent = os.path.join(base, "aem_jax_sandboxes")
            try:
                os.makedirs(parent, exist_ok=True)
                probe = os.path.join(parent, f"probe_{os.getpid()}")
                os.mkdir(probe)
                os.rmdir(probe)
                parents.append(parent)
                break
            except OSError:
                continue
        else:
            return None, []
    return "v1", parents


class _Cgroup:
    """One sandbox's cgroup(s): memory (no swap) and process-count limits."""

    def __init__(self, name: str, limits: Limits, found: tuple[str | None, list[str]] | None = None):
        self.mode, parents = found or _cgroup_parents()
        self.dirs: list[str] = []
        if self.mode is None:
            return
        try:
            for index, parent in enumerate(parents):
                path = os.path.join(parent, name)
                if os.path.isdir(path):
                    _remove_cgroup(path)
                os.mkdir(path)
                self.dirs.append(path)
                if self.mode == "v2":
                    _write(os.path.join(path, "memory.max"), str(limits.memory_bytes))
                    if os.path.exists(os.path.join(path, "memory.swap.max")):
                        _write(os.path.join(path, "memory.swap.max"), "0")
                    _write(os.path.join(path, "pids.max"), str(limits.max_processes))
                elif index == 0:  # v1: the memory hierarchy, then the pids one
                    _write(os.path.join(path, "memory.limit_in_bytes"), str(limits.memory_bytes))
                    memsw = os.path.join(path, "memory.memsw.limit_in_bytes")
                    if os.path.exists(memsw):
                        _write(memsw, str(limits.memory_bytes))
                else:
                    _write(os.path.join(path, "pids.max"), str(limits.max_processes))
        except OSError:
            self.close()
            self.mode, self.dirs = None, []

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def close(self) -> None:
        for path in self.dirs:
            _remove_cgroup(path)
        self.dirs = []


def _remove_cgroup(path: str) -> None:
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    for pid in f.read().split():
                        try:
                            os.kill(int(pid), signal.SIGKILL)
                        except ProcessLookupError:
                            pass
            except OSError:
                return
            time.sleep(0.02)


# -- host mounts (root only) ------------------------------------------------------------------------


def _mount_tmpfs(target: str, size: int, uid: int, gid: int) -> None:
    options = f"size={size},mode=0755,uid={uid},gid={gid}".encode()
    if _LIBC.mount(b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs on {target}: {os.strerror(err)}")


def _unmount(target: str) -> None:
    _LIBC.umount2(target.encode(), MNT_DETACH)


def _hidden_paths() -> list[str]:
    """Host paths no sandbox may see: the package (its task data) and the dataset cache.

    None is mounted; these are covered by an empty tmpfs should one lie inside
    a mounted directory (the package installed into the interpreter's
    site-packages, a cache below the interpreter's prefix).
    """
    root = os.environ.get("AEM_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "aem_jax")
    return sorted({os.path.realpath(p) for p in (_PACKAGE_DIR, root)})


def _cleanup(state: dict) -> None:
    """Releases what a sandbox holds (also run by the finalizer when it is collected)."""
    for path in state.pop("mounts", []):
        _unmount(path)
    for path in state.pop("dirs", []):
        shutil.rmtree(path, ignore_errors=True)
    cgroup = state.pop("cgroup", None)
    if cgroup is not None:
        cgroup.close()
    fd = state.pop("uid_fd", None)
    if fd is not None:
        os.close(fd)


class LocalSandbox:
    """Runs commands in a namespace sandbox over ``workspace`` (see module doc).

    Args:
      workspace: host directory the commands may write; when root, a tmpfs of
        ``disk_bytes`` is mounted over it (its files copied in) and given to
        the sandbox's uid; ``close()`` unmounts it (its contents are lost).
      backend: "auto", "bwrap" or "unshare".
      uid_range: (low, high) uids to lease one from (root only).
      env: extra environment variables for the commands.
      **limits: fields of ``Limits`` (cpu_seconds, memory_bytes, disk_bytes ...).
    """

    own_pid_namespace = True  # every command runs in a fresh PID namespace

    def __init__(self, workspace: str | os.PathLike, *, backend: str = "auto",
                 uid_range: tuple[int, int] = DEFAULT_UID_RANGE,
                 env: dict[str, str] | None = None, **limits: int):
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
        self.workdir = SANDBOX_WORKDIR
        self.python = sys.executable
        self._state: dict = {"mounts": [], "dirs": []}
        self._finalizer = weakref.finalize(self, _cleanup, self._state)
        self._evaluator_dir: str | None = None
        self._shell = None  # shell.PersistentShell, started by the first shell() call
        self._shell_dir: str | None = None
        try:
            if self.is_root:
                self.uid, self._state["uid_fd"] = lease_uid(uid_range)
                self.gid = self.uid
                self._state["cgroup"] = _Cgroup(f"sbx_{self.uid}", self.limits)
                self._make_workspace_fs()
            else:
                self.uid, self.gid = os.getuid(), os.getgid()
            self._etc_dir = tempfile.mkdtemp(prefix="aem_sbx_etc_")
            self._state["dirs"].append(self._etc_dir)
            self._write_identity_files()
        except BaseException:
            self.close()
            raise
        self.env = self._base_env() | dict(env or {})

    # -- set-up ----------------------------------------------------------------------------
    @property
    def cgroup_mode(self) -> str | None:
        """"v2", "v1" or None (no cgroup: only the per-process and per-uid rlimits)."""
        cgroup = self._state.get("cgroup")
        return cgroup.mode if cgroup is not None else None

    def _make_workspace_fs(self) -> None:
        # The existing files are copied into a size-limited tmpfs mounted over
        # the directory; the originals (hidden below it) are deleted.
        below = os.open(self.workspace, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _mount_tmpfs(self.workspace, self.limits.disk_bytes, self.uid, self.gid)
            self._state["mounts"].append(self.workspace)
            source = f"/proc/self/fd/{below}"
            for name in os.listdir(source):
                src, dst = os.path.join(source, name), os.path.join(self.workspace, name)
                if os.path.isdir(src) and not os.path.islink(src):
                    shutil.copytree(src, dst, symlinks=True)
                    shutil.rmtree(src)
                else:
                    shutil.copy2(src, dst, follow_symlinks=False)
                    os.unlink(src)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise ValueError(f"the workspace {self.workspace} is larger than disk_bytes="
                                 f"{self.limits.disk_bytes}") from None
            raise
        finally:
            os.close(below)
        self.chown_workspace()

    def _write_identity_files(self) -> None:
        user = "agent" if self.uid not in (0, 65534) else "sandbox"
        with open(os.path.join(self._etc_dir, "passwd"), "w") as f:
            f.write(f"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
                    f"{user}:x:{self.uid}:{self.gid}:{user}:/tmp:/bin/sh\n")
        with open(os.path.join(self._etc_dir, "group"), "w") as f:
            f.write(f"root:x:0:\nnogroup:x:65534:\n{user}:x:{self.gid}:\n")
        for name in ("passwd", "group"):
            os.chmod(os.path.join(self._etc_dir, name), 0o644)

    def chown_workspace(self) -> None:
        """Gives the workspace to the sandbox uid (host-side, symlinks not followed)."""
        if not self.is_root:
            return
        for root, dirs, files in os.walk(self.workspace):
            for name in [*dirs, *files]:
                os.chown(os.path.join(root, name), self.uid, self.gid, follow_symlinks=False)
        os.chown(self.workspace, self.uid, self.gid)

    def close(self) -> None:
        """Unmounts the workspace file system, removes the cgroup, releases the uid."""
        self.close_shell()
        self._finalizer()

    # -- host-side file access (never follows links the sandbox made) ------------------------
    def _dir_fd(self, parts: list[str], create: bool) -> int:
        fd = os.open(self.workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for part in parts:
                if create:
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                        if self.is_root:
                            os.chown(part, self.uid, self.gid, dir_fd=fd, follow_symlinks=False)
                    except FileExistsError:
                        pass
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _parts(path: str) -> list[str]:
        parts = path.split("/")
        if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"path must be a plain relative path, got {path!r}")
        return parts

    def read_file(self, path: str):
        """The workspace file ``path`` as ``diffs.File``, or None if it is absent or not a regular file."""
        from aem_jax.envs.swe.diffs import EXECUTABLE, REGULAR, File

        parts = self._parts(path)
        try:
            fd = self._dir_fd(parts[:-1], create=False)
        except (FileNotFoundError, NotADirectoryError, OSError):
            return None
        try:
            file_fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        except OSError:
            return None
        finally:
            os.close(fd)
        with os.fdopen(file_fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                return None
            return File(f.read(), EXECUTABLE if info.st_mode & 0o111 else REGULAR)

    def write_file(self, path: str, data: bytes, *, executable: bool = False) -> None:
        """Writes ``data`` to workspace file ``path`` (parents created, links not followed)."""
        parts = self._parts(path)
        fd = self._dir_fd(parts[:-1], create=True)
        try:
            try:
                os.unlink(parts[-1], dir_fd=fd)
            except FileNotFoundError:
                pass
            mode = 0o755 if executable else 0o644
            file_fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode,
                              dir_fd=fd)
            with os.fdopen(file_fd, "wb") as f:
                f.write(data)
                os.fchmod(f.fileno(), mode)
                if self.is_root:
                    os.fchown(f.fileno(), self.uid, self.gid)
        finally:
            os.close(fd)

    def remove_file(self, path: str) -> None:
        """Removes workspace file ``path`` if it exists."""
        parts = self._parts(path)
        try:
            fd = self._dir_fd(parts[:-1], create=False)
        except OSError:
            return
        try:
            os.unlink(parts[-1], dir_fd=fd)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def put_file(self, name: str, text: str) -> None:
        """Writes ``text`` to file ``name`` in the workspace root (host side, a plain name)."""
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"name must be a plain file name, got {name!r}")
        self.write_file(name, text.encode("utf-8"))

    def read_tree(self, *, max_files: int = 50_000, max_bytes: int = 256 << 20,
                  skip_dirs=(".git", "__pycache__", ".pytest_cache"), skip_suffixes=(".pyc", ".pyo")):
        """{path: diffs.File} of the workspace's regular files (host side).

        Skips ``skip_dirs`` at any depth and ``skip_suffixes``; raises
        ``WorkspaceError`` for symbolic links, devices, sockets and fifos (the
        evaluator takes regular files only) and past ``max_files`` files or
        ``max_bytes`` bytes in all (so a filled workspace cannot exhaust the
        host's memory).
        """
        from aem_jax.envs.swe.diffs import EXECUTABLE, REGULAR, File

        tree, total = {}, 0
        for root, dirs, files in os.walk(self.workspace, followlinks=False):
            rel_root = os.path.relpath(root, self.workspace)
            keep = []
            for name in sorted(dirs):
                full = os.path.join(root, name)
                if os.path.islink(full):
                    files.append(name)
                elif name not in skip_dirs:
                    keep.append(name)
            dirs[:] = keep
            for name in sorted(files):
                rel = name if rel_root == "." else f"{rel_root}/{name}"
                if name.endswith(skip_suffixes):
                    continue
                info = os.lstat(os.path.join(root, name))
                if not stat.S_ISREG(info.st_mode):
                    kind = "symbolic link" if stat.S_ISLNK(info.st_mode) else "special file"
                    raise WorkspaceError(f"the workspace holds a {kind} {rel!r}; only regular "
                                         "files are taken")
                total += info.st_size
                if len(tree) >= max_files or total > max_bytes:
                    raise WorkspaceError(f"the workspace holds more than {max_files} files or "
                                         f"{max_bytes} bytes of files")
                file = self.read_file(rel)
                if file is None:
                    raise WorkspaceError(f"could not read {rel!r} from the workspace")
                tree[rel] = File(file.data, EXECUTABLE if info.st_mode & 0o111 else REGULAR)
        return tree

    def seal_workspace(self) -> None:
        """Makes every existing file unchangeable by the sandbox user (before an evaluation run).

        Files become root's (mode 0644 / 0755), directories root's with mode 1777
        (sticky): code under test may still create new files, but cannot modify,
        replace, rename or delete any file the evaluator wrote (tests, conftest,
        configuration, the applied diff).  Root only; a no-op otherwise.
        """
        if not self.is_root:
            return
        for root, dirs, files in os.walk(self.workspace):
            for name in files:
                path = os.path.join(root, name)
                info = os.lstat(path)
                os.chown(path, 0, 0, follow_symlinks=False)
                if stat.S_ISREG(info.st_mode):
                    os.chmod(path, 0o755 if info.st_mode & 0o111 else 0o644)
            for name in dirs:
                path = os.path.join(root, name)
                os.chown(path, 0, 0, follow_symlinks=False)
                if not os.path.islink(path):
                    os.chmod(path, 0o1777)
        os.chown(self.workspace, 0, 0)
        os.chmod(self.workspace, 0o1777)

    # -- the evaluator directory ----------------------------------------------------------------
    def stage_evaluator(self, files: dict[str, bytes]) -> str:
        """Writes evaluator files (read-only for the sandbox user); returns their in-sandbox dir.

        The directory is mounted at ``EVALUATOR_MOUNT`` in every later command;
        its ``out/`` subdirectory is the only part the sandbox user may write
        (``read_evaluator_report`` reads ``out/report.json`` from the host).
        """
        if self._evaluator_dir is None:
            directory = tempfile.mkdtemp(prefix="aem_sbx_eval_")
            self._state["dirs"].append(directory)
            if self.is_root:
                _mount_tmpfs(directory, 16 << 20, 0, 0)
                self._state["mounts"].insert(0, directory)
            os.mkdir(os.path.join(directory, "out"), 0o700)
            if self.is_root:
                os.chown(os.path.join(directory, "out"), self.uid, self.gid)
            os.chmod(directory, 0o755)
            self._evaluator_dir = directory
        for name, data in files.items():
            if not name or "/" in name or name in (".", "..", "out"):
                raise ValueError(f"evaluator file names must be plain names, got {name!r}")
            path = os.path.join(self._evaluator_dir, name)
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o644)
        return EVALUATOR_MOUNT

    def read_evaluator_report(self, name: str = "report.json", max_bytes: int = 32 << 20) -> bytes | None:
        """``out/name`` of the evaluator directory (None if absent, not a regular file or too big)."""
        if self._evaluator_dir is None:
            return None
        try:
            fd = os.open(os.path.join(self._evaluator_dir, "out", name),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
                return None
            return f.read(max_bytes + 1)

    # -- commands ----------------------------------------------------------------------------------
    def _base_env(self) -> dict[str, str]:
        python_bin = os.path.dirname(sys.executable)
        return {
            "PATH": f"{python_bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": "/tmp",
            "USER": "agent",
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "TERM": "dumb",
            "PAGER": "cat",
            "GIT_PAGER": "cat",
        }

    def _ro_paths(self) -> list[tuple[str, str]]:
        """(kind, path): "bind" read-only or "link" (a host symlink recreated as one)."""
        entries = []
        for path in _SYSTEM_DIRS:
            if os.path.islink(path):
                entries.append(("link", path))
            elif os.path.isdir(path):
                entries.append(("bind", path))
        for name in _ETC_FILES:
            path = os.path.join("/etc", name)
            if os.path.lexists(path) and not os.path.islink(path):
                entries.append(("bind", path))
            elif os.path.islink(path) and os.path.exists(path):
                entries.append(("bind", path))
        for prefix in sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}):
            if not any(prefix == d or prefix.startswith(d + "/") for d in _SYSTEM_DIRS):
                entries.append(("bind", prefix))
        return entries

    def _covered(self, ro: list[tuple[str, str]]) -> list[str]:
        """Hidden host paths that lie inside a mounted directory: covered by an empty tmpfs."""
        mounted = [p for kind, p in ro if kind == "bind"]
        return [h for h in _hidden_paths() if os.path.isdir(h)
                and any(h.startswith(m + "/") for m in mounted)]

    def _binds(self) -> list[tuple[str, str, bool]]:
        """(host path, sandbox path, writable) beyond the system: identity files, workspace, evaluator."""
        binds = [(os.path.join(self._etc_dir, "passwd"), "/etc/passwd", False),
                 (os.path.join(self._etc_dir, "group"), "/etc/group", False),
                 (self.workspace, self.workdir, True)]
        if self._evaluator_dir is not None:
            binds.append((self._evaluator_dir, EVALUATOR_MOUNT, True))
        if self._shell_dir is not None:
            binds.append((os.path.join(self._shell_dir, "state"), SHELL_STATE_MOUNT, True))
        return binds

    def _bwrap_argv(self, command: str) -> list[str]:
        if self.is_root:
            # Privileged bwrap (no user namespace, so real uid 0 never appears
            # as the sandbox's uid); setpriv then drops to the leased uid with an
            # empty bounding set and no_new_privs.
            argv = ["bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                    "--unshare-cgroup-try"]
            drop = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                    "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
        else:
            argv, drop = ["bwrap", "--unshare-all"], []
        argv += ["--die-with-parent", "--new-session"]
        ro = self._ro_paths()
        below_tmp = [(k, p) for k, p in ro if p == "/tmp" or p.startswith("/tmp/")]
        made = {"/"}

        def mount_ro(entries):
            out = []
            for kind, path in entries:
                # Parents bwrap would otherwise create with its default (0700) permissions.
                parents = []
                parent = os.path.dirname(path)
                while parent not in made:
                    parents.insert(0, parent)
                    made.add(parent)
                    parent = os.path.dirname(parent)
                for directory in parents:
                    out += ["--perms", "0755", "--dir", directory]
                if kind == "link":
                    out += ["--symlink", os.readlink(path), path]
                elif kind == "bind":
                    out += ["--ro-bind", path, path]
            return out

        # Order: the system, then /tmp, /proc, /dev, then what lies below /tmp (an
        # interpreter), then the covers over hidden paths, then the binds.
        argv += mount_ro([e for e in ro if e not in below_tmp] + [("dir", "/etc/passwd")])
        argv += ["--proc", "/proc", "--dev", "/dev",
                 "--perms", "1777", "--size", str(self.limits.tmp_bytes), "--tmpfs", "/tmp",
                 "--perms", "1777", "--size", str(self.limits.tmp_bytes), "--tmpfs", "/dev/shm"]
        made.add("/tmp")
        argv += mount_ro(below_tmp)
        for path in self._covered(ro):
            argv += ["--perms", "0755", "--size", str(1 << 16), "--tmpfs", path]
        for source, target, writable in self._binds():
            argv += ["--bind" if writable else "--ro-bind", source, target]
        argv += ["--remount-ro", "/", "--chdir", self.workdir, "--clearenv"]
        for key, value in sorted(self.env.items()):
            argv += ["--setenv", key, value]
        return [*argv, "--", *drop, "prlimit", *self.limits.prlimit_args(), "--",
                "/bin/sh", "-c", command]

    def _unshare_argv(self, command: str) -> list[str]:
        ro = self._ro_paths()
        spec = {
            "ro": [[kind, path, os.readlink(path) if kind == "link" else None] for kind, path in ro],
            "covered": self._covered(ro), "binds": self._binds(), "devices": list(_DEVICES),
            "workdir": self.workdir, "tmp_bytes": self.limits.tmp_bytes, "uid": self.uid,
            "gid": self.gid, "limits": dataclasses.asdict(self.limits), "env": self.env,
            "command": command,
        }
        return ["unshare", "--mount", "--net", "--pid", "--ipc", "--uts", "--fork",
                "--kill-child", "--", sys.executable, "-I", "-S", _INIT_SCRIPT, json.dumps(spec)]

    def _launch_argv(self, command: str) -> list[str]:
        build = self._bwrap_argv if self.backend == "bwrap" else self._unshare_argv
        argv = build(command)
        cgroup = self._state.get("cgroup")
        if cgroup is not None and cgroup.dirs:
            # The launcher shell joins the sandbox's cgroup(s), then becomes the sandbox.
            join = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done; exec "$@"'
            argv = ["/bin/sh", "-c", join, "aem-sandbox", str(len(cgroup.procs_files)),
                    *cgroup.procs_files, *argv]
        return argv

    def _check_call(self, command: str, timeout: float) -> ExecResult | None:
        """Raises for a bad argument; the error result when the sandbox is closed, else None."""
        if not isinstance(command, str):
            raise TypeError(f"command must be a str, got {type(command).__name__}")
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not os.path.isdir(self.workspace) or not self._finalizer.alive:
            return ExecResult(f"sandbox error: workspace {self.workspace} is closed or gone", 126, False)
        return None

    def execute(self, command: str, timeout: float = 60.0) -> ExecResult:
        """Runs ``command`` with ``/bin/sh -c`` in a fresh sandbox.

        Never raises for anything the command does; the tree is killed when
        ``timeout`` seconds pass or the output exceeds ``max_output_bytes``.
        """
        closed = self._check_call(command, timeout)
        if closed is not None:
            return closed
        try:
            # Privileges are dropped inside the namespaces (setpriv for bwrap,
            # _unshare_init for unshare), after the mounts are in place.
            proc = subprocess.Popen(
                self._launch_argv(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
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

    # -- the agent's persistent shell ---------------------------------------------------------------
    def shell(self, command: str, timeout: float = 60.0) -> ExecResult:
        """Runs ``command`` in the episode's persistent bash (see module docstring).

        ``cd``, exported variables, functions and aliases carry over between
        calls; a command past ``timeout`` (or past ``max_output_bytes`` of
        output) is killed with its sandbox and the session resumes, as of the
        end of the last command that finished, in a new one.  Never raises for
        anything the command does.
        """
        from aem_jax.envs.swe import shell as shell_lib  # shell.py imports this module

        closed = self._check_call(command, timeout)
        if closed is not None:
            return closed
        if self._shell is None:
            try:
                self._make_shell_dir()
            except OSError as err:
                return ExecResult(f"sandbox error: could not set up the shell: {err}", 126, False)
            # The launcher records its pid (= its process group) in a host-only file;
            # killing that group ends the sandbox's PID namespace and all inside.
            pid_file = os.path.join(self._shell_dir, "launcher.pid")
            start = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', pid_file,
                     *self._launch_argv("exec bash --noprofile --norc")]
            kill = [sys.executable, "-I", "-S", "-c", _KILL_GROUP, pid_file]
            self._shell = shell_lib.PersistentShell(
                start, kill_argv=lambda pid, keep_file: kill, state_dir=SHELL_STATE_MOUNT,
                max_output_bytes=self.limits.max_output_bytes, start_timeout=60.0)
        return self._shell.run(command, timeout)

    def _make_shell_dir(self) -> None:
        """A host directory for the shell: ``launcher.pid`` (host only) and ``state/`` (mounted)."""
        if self._shell_dir is None:
            directory = tempfile.mkdtemp(prefix="aem_sbx_shell_")
            self._state["dirs"].append(directory)
            state = os.path.join(directory, "state")
            os.mkdir(state, 0o700)
            if self.is_root:
                _mount_tmpfs(state, _SHELL_STATE_BYTES, self.uid, self.gid)
                self._state["mounts"].insert(0, state)
                os.chmod(state, 0o700)
            self._shell_dir = directory

    def close_shell(self) -> None:
        """Ends the persistent shell and every process it started (a later ``shell`` starts anew)."""
        if self._shell is not None:
            self._shell.close()
            self._shell = None

    def __repr__(self) -> str:
        return (f"LocalSandbox({self.workspace!r}, backend={self.backend!r}, uid={self.uid}, "
                f"cgroup={self.cgroup_mode!r})")


def _normalise_returncode(code: int) -> int:
    return 128 - code if code < 0 else code
