"""One path abstraction for everything a run reads or writes in its workdir.

Workdirs may be local directories or object-store URIs (``gs://bucket/run``).
Every module that touches the workdir goes through :func:`workdir_path`
(an ``etils.epath.Path``, the abstraction orbax already uses) and asks
:func:`is_local` when local disks and object stores need different code: a
local disk can rename atomically, append and report free space; an object
store cannot, but it publishes an object only once its upload completed.
"""

from __future__ import annotations

import os
import uuid

from etils import epath


def is_local(path: str | os.PathLike) -> bool:
    """Whether ``path`` lives on a local (POSIX) file system, not an object store."""
    # The one place that decides it: URIs (gs://, s3://, ...) carry a scheme.
    return "://" not in os.fspath(path)


def workdir_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``; local paths are made absolute.

    orbax needs absolute paths, and a relative workdir must keep meaning the
    directory it named when the run started, whatever the cwd later is.
    """
    text = os.fspath(path)
    return epath.Path(text if not is_local(text) else os.path.abspath(text))


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes ``data`` to ``path`` so that readers see the old or the new content.

    Local disks: a temporary file in the same directory, flushed to disk, then
    ``os.replace`` (atomic within a file system). Object stores: the object is
    written once; the store publishes it only when the upload completed, and a
    temporary object + copy would double the traffic for no gain.
    """
    target = workdir_path(path)
    if not is_local(target):
        if isinstance(data, bytes):
            target.write_bytes(data)
        else:
            target.write_text(data)
        return
    # A unique name: two writers of the same file never share a temporary.
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
