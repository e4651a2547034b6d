"""Unified diffs: writing them (git style) and reading the paths they touch.

The reward rejects a diff that touches test files or files that change how
tests run (``is_protected_path``), so the paths are read from every header
form git and GNU diff write: ``diff --git a/X b/Y``, ``--- a/X``, ``+++ b/Y``,
``rename from/to``, ``copy from/to``.
"""
from __future__ import annotations

import difflib
import posixpath
import re
from typing import Mapping

_GIT_HEADER = re.compile(r'^diff --git "?a/(.+?)"? "?b/(.+?)"?$')
_FILE_HEADER = re.compile(r"^(?:---|\+\+\+) (.+?)(?:\t.*)?$")
_RENAME = re.compile(r"^(?:rename|copy) (?:from|to) (.+)$")
# Files that decide which tests run and how (pytest reads all of these, and
# Python runs sitecustomize / .pth files at start-up).
_PROTECTED_NAMES = {"conftest.py", "pytest.ini", "tox.ini", "setup.cfg", "pyproject.toml",
                    "sitecustomize.py", "usercustomize.py", ".pytest.ini", "noxfile.py"}


def file_diff(path: str, old: str | None, new: str | None) -> str:
    """A git-style unified diff of one file (``None`` = file absent)."""
    if old == new:
        return ""
    old_lines = (old or "").splitlines(keepends=True)
    new_lines = (new or "").splitlines(keepends=True)
    for lines in (old_lines, new_lines):
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n\\ No newline at end of file\n"
    head = [f"diff --git a/{path} b/{path}\n"]
    if old is None:
        head.append("new file mode 100644\n")
    elif new is None:
        head.append("deleted file mode 100644\n")
    body = difflib.unified_diff(old_lines, new_lines,
                                "/dev/null" if old is None else f"a/{path}",
                                "/dev/null" if new is None else f"b/{path}", n=3)
    return "".join(head) + "".join(body)


def snapshot_diff(old: Mapping[str, str], new: Mapping[str, str]) -> str:
    """The diff turning snapshot ``old`` into ``new`` (paths in sorted order)."""
    return "".join(file_diff(path, old.get(path), new.get(path))
                   for path in sorted(set(old) | set(new)))


def _strip_prefix(path: str) -> str | None:
    path = path.strip().strip('"')
    if path == "/dev/null":
        return None
    if path.startswith(("a/", "b/")):
        path = path[2:]
    return posixpath.normpath(path)


def touched_paths(diff: str) -> list[str]:
    """Every path a unified diff creates, deletes, modifies or renames."""
    paths: set[str] = set()
    for line in diff.splitlines():
        match = _GIT_HEADER.match(line)
        if match:
            paths.update(filter(None, map(_strip_prefix, match.groups())))
            continue
        match = _FILE_HEADER.match(line) or _RENAME.match(line)
        if match and (line.startswith(("---", "+++", "rename", "copy"))):
            path = _strip_prefix(match.group(1))
            if path:
                paths.add(path)
    return sorted(paths)


def is_test_path(path: str) -> bool:
    """Test modules and anything under a tests/ or test/ directory."""
    parts = path.split("/")
    name = parts[-1]
    return (any(p in ("tests", "test", "testing") for p in parts[:-1])
            or name.startswith("test_") or name.endswith(("_test.py", "_tests.py")))


def is_protected_path(path: str) -> bool:
    """Whether a diff may not touch ``path`` (tests, test configuration, start-up hooks)."""
    name = path.split("/")[-1]
    return (is_test_path(path) or name in _PROTECTED_NAMES or name.endswith(".pth")
            or path.startswith("..") or path.startswith("/") or "/.git/" in f"/{path}")


def protected_paths(diff: str) -> list[str]:
    """The paths of ``diff`` that ``is_protected_path`` forbids."""
    return [p for p in touched_paths(diff) if is_protected_path(p)]
