"""Init of the ``unshare`` sandbox backend (runs as root inside fresh namespaces).

``LocalSandbox`` starts ``unshare --mount --net --pid ... python -I -S
_unshare_init.py SPEC`` when bubblewrap is missing.  This script is PID 1 of
the new PID namespace and the only process with privileges in it.  It

1. builds a new root on a tmpfs: the system directories and ``/etc`` files
   of the spec bound read-only, an empty tmpfs over hidden paths, a fresh
   ``/proc``, a minimal ``/dev`` (null, zero, full, random, urandom, tty),
   private ``/tmp`` and ``/dev/shm``, the workspace (and the evaluator
   directory) read-write; every mount ``nosuid`` (and ``nodev`` but for
   ``/dev``);
2. ``pivot_root``s into it and detaches the old root, so no host path is
   reachable;
3. sets ``no_new_privs``, empties the capability bounding set, drops to the
   spec's uid/gid with no supplementary groups and no capabilities, applies
   the rlimits and execs ``/bin/sh -c command``.

Any failure exits with status 126 before the command runs.
"""
import ctypes
import json
import os
import platform
import resource
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
MNT_DETACH = 2
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
_LIBC = ctypes.CDLL(None, use_errno=True)
NEW_ROOT = "/tmp"  # a tmpfs is mounted here (in this mount namespace only) and becomes /


def _check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source, target, fstype, flags, data=None):
    _check(_LIBC.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                       flags, data and data.encode()), f"mount {source} on {target}")


def _target(path, directory):
    full = NEW_ROOT + path
    if directory:
        os.makedirs(full, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if not os.path.exists(full):
            open(full, "w").close()
    return full


def _bind(fd, path, *, writable, directory, devices=False):
    target = _target(path, directory)
    _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | (0 if devices else MS_NODEV) | (0 if writable else MS_RDONLY)
    _mount(None, target, None, flags)


def _build_root(spec):
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Sources are opened before anything is covered (the workspace may live in /tmp).
    def opened(path, target, writable, devices=False):
        return os.open(path, os.O_PATH), target, writable, os.path.isdir(path), devices

    system = [opened(path, path, False) for kind, path, _ in spec["ro"] if kind == "bind"]
    binds = [opened(source, target, writable) for source, target, writable in spec["binds"]]
    devices = [opened(f"/dev/{name}", f"/dev/{name}", True, True) for name in spec["devices"]
               if os.path.exists(f"/dev/{name}")]
    _mount("tmpfs", NEW_ROOT, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for kind, path, link in spec["ro"]:
        if kind == "link":
            os.makedirs(os.path.dirname(NEW_ROOT + path), exist_ok=True)
            os.symlink(link, NEW_ROOT + path)
    # Order: the system, then /tmp, /dev and /dev/shm, then what lies below them (an
    # interpreter under /tmp, the devices), then the covers over hidden paths, then
    # the workspace and the identity files.
    under_tmp = [s for s in system if s[1] == "/tmp" or s[1].startswith("/tmp/")]
    for fd, path, writable, directory, is_device in system:
        if (fd, path, writable, directory, is_device) not in under_tmp:
            _bind(fd, path, writable=writable, directory=directory, devices=is_device)
    tmp_options = f"size={spec['tmp_bytes']},mode=1777"
    _mount("tmpfs", _target("/tmp", True), "tmpfs", MS_NOSUID | MS_NODEV, tmp_options)
    _mount("tmpfs", _target("/dev", True), "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    _mount("tmpfs", _target("/dev/shm", True), "tmpfs", MS_NOSUID | MS_NODEV, tmp_options)
    for fd, path, writable, directory, is_device in [*under_tmp, *devices]:
        _bind(fd, path, writable=writable, directory=directory, devices=is_device)
    for path in spec["covered"]:
        _mount("tmpfs", _target(path, True), "tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY, "size=64k,mode=755")
    for fd, path, writable, directory, is_device in binds:
        _bind(fd, path, writable=writable, directory=directory, devices=is_device)
    sources = [*system, *binds, *devices]
    for fd, *_ in sources:
        os.close(fd)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{NEW_ROOT}/dev/{name}")
    os.makedirs(NEW_ROOT + "/proc", exist_ok=True)
    # Into the new root; the old one is detached, so no host path stays reachable.
    number = _PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(0, f"pivot_root: unknown syscall number on {platform.machine()}")
    os.chdir(NEW_ROOT)
    _check(_LIBC.syscall(number, b".", b"."), "pivot_root")
    _check(_LIBC.umount2(b".", MNT_DETACH), "detaching the old root")
    os.chdir("/")
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _last_cap():
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _drop_privileges(spec):
    _check(_LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    for cap in range(_last_cap() + 1):
        _check(_LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"prctl(PR_CAPBSET_DROP, {cap})")
    os.setgroups([])
    os.setresgid(spec["gid"], spec["gid"], spec["gid"])
    os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    # setresuid cleared the permitted/effective/ambient sets; clear the inheritable one too.
    header = _CapHeader(0x20080522, 0)
    data = (_CapData * 2)()
    _check(_LIBC.capset(ctypes.byref(header), data), "capset")
    limits = spec["limits"]
    for name, value in (("RLIMIT_CPU", limits["cpu_seconds"]),
                        ("RLIMIT_AS", limits["memory_bytes"]),
                        ("RLIMIT_NPROC", limits["max_processes"]),
                        ("RLIMIT_FSIZE", limits["max_file_bytes"]),
                        ("RLIMIT_NOFILE", limits["max_open_files"])):
        resource.setrlimit(getattr(resource, name), (value, value))


def main():
    spec = json.loads(sys.argv[1])
    try:
        _build_root(spec)
        _drop_privileges(spec)
        os.chdir(spec["workdir"])
    except OSError as err:
        sys.stderr.write(f"sandbox error: unshare backend set-up failed: {err}\n")
        sys.exit(126)
    os.execve("/bin/sh", ["sh", "-c", spec["command"]], spec["env"])


if __name__ == "__main__":
    main()
