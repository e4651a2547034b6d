"""Init of the ``unshare`` sandbox backend (runs as root inside fresh namespaces).

``LocalSandbox`` starts ``unshare --mount --net --pid ... python -I -S
_unshare_init.py SPEC`` when bubblewrap is missing.  This script is PID 1 of
the new PID namespace and the only process with privileges in it: it makes
every inherited mount read-only, puts private tmpfs over /tmp, /dev/shm and
the hidden home directories, binds the workspace read-write, then drops to the
unprivileged uid, applies the rlimits and execs ``/bin/sh -c command``.  Any
failure exits with status 126 before the command runs.
"""
import ctypes
import json
import os
import resource
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 32, 4096, 16384, 1 << 18)
_LIBC = ctypes.CDLL(None, use_errno=True)
# Mounts replaced by fresh ones (or that must stay writable for the kernel).
_SKIP_RO = ("/proc", "/dev/pts", "/dev/shm", "/dev/mqueue")


def _mount(source, target, fstype, flags, data=None):
    if _LIBC.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                   flags, data and data.encode()) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")


def _mount_points():
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, octal-escaped.
            point = line.split()[4].encode().decode("unicode_escape")
            points.append(point)
    return points


def _bind_ro(fd, target):
    os.makedirs(target, exist_ok=True)
    _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
    os.close(fd)
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)


def _setup_mounts(spec):
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Opened before /tmp and the home directories are covered by tmpfs.
    workspace_fd = os.open(spec["workspace"], os.O_PATH | os.O_DIRECTORY)
    exposed = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in spec["exposed"]}
    for point in sorted(set(_mount_points()), key=len):
        if point.startswith(_SKIP_RO) or point.startswith(tuple(spec["hidden"])):
            continue
        flags = os.statvfs(point).f_flag
        # Keep nosuid/nodev/noexec (ST_* equal MS_* for these bits) when adding ro.
        _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | (flags & 0b1110))
    size = spec["tmp_bytes"]
    for point in ["/tmp", "/dev/shm", *spec["hidden"]]:
        if os.path.isdir(point):
            _mount("tmpfs", point, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=1777"
                   if point in ("/tmp", "/dev/shm") else "size=1m,mode=755")
    for prefix, fd in exposed.items():
        _bind_ro(fd, prefix)
    os.makedirs(spec["workdir"], exist_ok=True)
    _mount(f"/proc/self/fd/{workspace_fd}", spec["workdir"], None, MS_BIND)
    # The bind inherits the read-only flag just set on its source mount.
    _mount(None, spec["workdir"], None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
    os.close(workspace_fd)


def _drop_privileges(spec):
    limits = spec["limits"]
    os.setgroups([])
    os.setresgid(spec["gid"], spec["gid"], spec["gid"])
    os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    for name, value in (("RLIMIT_CPU", limits["cpu_seconds"]),
                        ("RLIMIT_AS", limits["memory_bytes"]),
                        ("RLIMIT_NPROC", limits["max_processes"]),
                        ("RLIMIT_FSIZE", limits["max_file_bytes"]),
                        ("RLIMIT_NOFILE", limits["max_open_files"])):
        resource.setrlimit(getattr(resource, name), (value, value))


def main():
    spec = json.loads(sys.argv[1])
    try:
        _setup_mounts(spec)
        _drop_privileges(spec)
        os.chdir(spec["workdir"])
    except OSError as err:
        sys.stderr.write(f"sandbox error: unshare backend set-up failed: {err}\n")
        sys.exit(126)
    os.execve("/bin/sh", ["sh", "-c", spec["command"]], spec["env"])


if __name__ == "__main__":
    main()
