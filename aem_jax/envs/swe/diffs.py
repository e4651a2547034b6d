"""Git diffs: writing them, parsing them strictly, applying them without git.

The reward never hands a diff to ``git apply`` or GNU ``patch``: the agent's
change is parsed once by ``parse`` into ``FilePatch`` records, the path
policy (``is_protected_path``) is checked on exactly those records, and
``apply`` applies exactly those records to a trusted copy of the base
files.  A check and an application that read the same text differently (a
C-quoted ``"b/conf\\164est.py"`` the checker does not unquote, an ``Index:``
diff one tool rejects and another applies) cannot happen, because there is
one reader.

``parse`` accepts the format ``git diff`` writes and nothing else:

* every file section starts with ``diff --git a/X b/Y``; paths may be
  C-quoted (``"a/t\\303\\251st.py"``, octal escapes are UTF-8 bytes);
* extended headers: ``old/new mode``, ``new/deleted file mode``,
  ``similarity/dissimilarity index``, ``rename/copy from/to``, ``index``;
* text hunks (``@@ -a,b +c,d @@``) whose line counts must match, with
  ``\\ No newline at end of file`` markers;
* ``GIT binary patch`` data (``literal`` and ``delta``, base85 + zlib).

Anything else (text outside a section, ``Index:`` or normal / context
diffs, a ``Binary files ... differ`` line without data, miscounted hunks,
absolute or ``..`` paths, ``.git`` paths, symlinks and submodules) raises
``DiffError``.  ``apply`` matches context exactly (hunks may move by an
offset, as in ``git apply``, but there is no fuzz).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
import zlib
from typing import Mapping, NamedTuple

REGULAR, EXECUTABLE = 0o100644, 0o100755
ALLOWED_MODES = (REGULAR, EXECUTABLE)
_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@(?: .*)?$")
_MODE = re.compile(r"^(old mode|new mode|new file mode|deleted file mode) ([0-7]{6})$")
_INDEX = re.compile(r"^index [0-9a-f]{4,64}\.\.[0-9a-f]{4,64}(?: ([0-7]{6}))?$")
_SIMILARITY = re.compile(r"^(?:dis)?similarity index \d{1,3}%$")
_PATH_HEADER = re.compile(r"^(rename from|rename to|copy from|copy to) (.+)$")
_C_ESCAPES = {"a": 7, "b": 8, "t": 9, "n": 10, "v": 11, "f": 12, "r": 13, '"': 34, "\\": 92}
_B85 = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~"
_B85_INDEX = {c: i for i, c in enumerate(_B85)}
# Files that decide which tests run and how: pytest reads all of these (and
# pyproject.toml's [tool.pytest*] sections), Python runs sitecustomize /
# usercustomize / .pth files at start-up.
PROTECTED_NAMES = frozenset({
    "conftest.py", "pytest.ini", ".pytest.ini", "pytest.toml", ".pytest.toml", "tox.ini",
    "setup.cfg", "pyproject.toml", "sitecustomize.py", "usercustomize.py", "noxfile.py"})


class DiffError(ValueError):
    """The diff is not in git's format or does not apply; the message says where."""


class File(NamedTuple):
    """One file of a tree: its bytes and its git mode (0o100644 or 0o100755)."""

    data: bytes
    mode: int = REGULAR


@dataclasses.dataclass
class Hunk:
    old_start: int
    old_lines: list[bytes]  # each with its line ending, as in the file
    new_lines: list[bytes]


@dataclasses.dataclass
class FilePatch:
    """One ``diff --git`` section: what happens to one path."""

    old_path: str | None  # None: the file is created
    new_path: str | None  # None: the file is deleted
    old_mode: int | None = None
    new_mode: int | None = None
    copy: bool = False  # a copy keeps old_path
    hunks: list[Hunk] = dataclasses.field(default_factory=list)
    binary: tuple[str, int, bytes] | None = None  # ("literal" | "delta", size, data)

    @property
    def paths(self) -> list[str]:
        return sorted({p for p in (self.old_path, self.new_path) if p})


# -- writing ---------------------------------------------------------------------------


def quote_path(path: str) -> str:
    """``path`` as git writes it in headers: C-quoted when it has special bytes."""
    raw = path.encode("utf-8", "surrogateescape")
    if all(32 < b < 127 and b not in (34, 92) for b in raw):
        return path
    out = []
    for b in raw:
        char = chr(b)
        if char in '"\\':
            out.append("\\" + char)
        elif 32 <= b < 127:
            out.append(char)
        else:
            names = {v: k for k, v in _C_ESCAPES.items()}
            out.append("\\" + names[b] if b in names and b < 32 else f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def _prefixed(prefix: str, path: str) -> str:
    quoted = quote_path(path)
    return f'"{prefix}{quoted[1:]}' if quoted.startswith('"') else f"{prefix}{path}"


def file_diff(path: str, old: str | bytes | File | None, new: str | bytes | File | None) -> str:
    """A git-style diff of one file (``None`` = absent); binary data as ``GIT binary patch``."""
    old_file, new_file = _as_file(old), _as_file(new)
    if old_file == new_file:
        return ""
    head = [f"diff --git {_prefixed('a/', path)} {_prefixed('b/', path)}\n"]
    if old_file is None:
        head.append(f"new file mode {new_file.mode:06o}\n")
    elif new_file is None:
        head.append(f"deleted file mode {old_file.mode:06o}\n")
    elif old_file.mode != new_file.mode:
        head += [f"old mode {old_file.mode:06o}\n", f"new mode {new_file.mode:06o}\n"]
    old_data = old_file.data if old_file else b""
    new_data = new_file.data if new_file else b""
    if old_data == new_data:
        return "".join(head)
    old_text, new_text = _text(old_data), _text(new_data)
    if old_text is None or new_text is None:
        # git applies binary data only with the full blob ids of both sides.
        ids = f"index {_blob_id(old_file)}..{_blob_id(new_file)}"
        same_mode = old_file is not None and new_file is not None and old_file.mode == new_file.mode
        head.append(ids + (f" {old_file.mode:06o}\n" if same_mode else "\n"))
        return "".join(head) + "GIT binary patch\n" + _binary_literal(new_data) + "\n" \
            + _binary_literal(old_data) + "\n"
    old_lines = _split_lines(old_text)
    new_lines = _split_lines(new_text)
    for lines in (old_lines, new_lines):
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n\\ No newline at end of file\n"
    body = difflib.unified_diff(old_lines, new_lines,
                                "/dev/null" if old_file is None else _prefixed("a/", path),
                                "/dev/null" if new_file is None else _prefixed("b/", path),
                                n=3, lineterm="\n")
    return "".join(head) + "".join(body)


def _blob_id(file: File | None) -> str:
    if file is None:
        return "0" * 40
    return hashlib.sha1(b"blob %d\0" % len(file.data) + file.data).hexdigest()


def _as_file(value) -> File | None:
    if value is None or isinstance(value, File):
        return value
    if isinstance(value, str):
        return File(value.encode("utf-8", "surrogateescape"))
    if isinstance(value, bytes):
        return File(value)
    raise TypeError(f"file content must be str, bytes, File or None, got {type(value).__name__}")


def _text(data: bytes) -> str | None:
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _split_lines(text: str) -> list[str]:
    # Only "\n" ends a line (str.splitlines would also split at \r, \x0c, \u2028 ...).
    lines = text.split("\n")
    out = [line + "\n" for line in lines[:-1]]
    if lines[-1]:
        out.append(lines[-1])
    return out


def snapshot_diff(old: Mapping[str, str | bytes | File], new: Mapping[str, str | bytes | File]) -> str:
    """The diff turning snapshot ``old`` into ``new`` (paths in sorted order)."""
    return "".join(file_diff(path, old.get(path), new.get(path))
                   for path in sorted(set(old) | set(new)))


def _b85_encode(data: bytes) -> str:
    padded = data + b"\0" * (-len(data) % 4)
    out = bytearray()
    for i in range(0, len(padded), 4):
        value = int.from_bytes(padded[i:i + 4], "big")
        chunk = bytearray()
        for _ in range(5):
            value, rest = divmod(value, 85)
            chunk.append(_B85[rest])
        out += chunk[::-1]
    return out.decode()


def _binary_literal(data: bytes) -> str:
    packed = zlib.compress(data, 9)
    lines = [f"literal {len(data)}\n"]
    for i in range(0, len(packed), 52):
        piece = packed[i:i + 52]
        size = len(piece)
        lines.append((chr(ord("A") + size - 1) if size <= 26 else chr(ord("a") + size - 27))
                     + _b85_encode(piece) + "\n")
    return "".join(lines)


# -- parsing -----------------------------------------------------------------------------


def unquote_path(text: str) -> str:
    """Inverse of git's C quoting (``"conf\\164est.py"`` -> ``conftest.py``)."""
    if not (len(text) >= 2 and text.startswith('"') and text.endswith('"')):
        return text
    body, raw, i = text[1:-1], bytearray(), 0
    while i < len(body):
        char = body[i]
        if char == '"':
            raise DiffError(f"unescaped quote inside quoted path {text!r}")
        if char != "\\":
            raw += char.encode("utf-8", "surrogateescape")
            i += 1
            continue
        if i + 1 >= len(body):
            raise DiffError(f"quoted path {text!r} ends with a backslash")
        nxt = body[i + 1]
        if nxt in _C_ESCAPES:
            raw.append(_C_ESCAPES[nxt])
            i += 2
        elif re.fullmatch(r"[0-3][0-7]{2}", body[i + 1:i + 4]):
            raw.append(int(body[i + 1:i + 4], 8))
            i += 4
        else:
            raise DiffError(f"bad escape \\{nxt} in quoted path {text!r}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DiffError(f"quoted path {text!r} is not UTF-8") from None


def _take_quoted(text: str) -> tuple[str, str]:
    """Splits a leading C-quoted string off ``text``: (quoted, rest)."""
    i = 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return text[:i + 1], text[i + 1:]
        i += 1
    raise DiffError(f"unterminated quoted path in {text!r}")


def _strip(prefix: str, name: str, where: str) -> str:
    if not name.startswith(prefix):
        raise DiffError(f"{where}: path {name!r} must start with {prefix!r}")
    return check_path(name[len(prefix):], where)


def check_path(path: str, where: str = "diff") -> str:
    """``path`` if it is a plain relative path inside the repository, else ``DiffError``."""
    parts = path.split("/")
    if (not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts)
            or any(p == ".git" for p in parts) or "\0" in path):
        raise DiffError(f"{where}: path {path!r} is not a plain relative path inside the "
                        "repository (no absolute, '.', '..', empty or .git components)")
    return path


def _git_header_paths(rest: str, where: str) -> tuple[str | None, str | None]:
    """The two names of ``diff --git A B`` (None when unquoted and ambiguous)."""
    if rest.startswith('"'):
        first, tail = _take_quoted(rest)
        if not tail.startswith(" "):
            raise DiffError(f"{where}: malformed 'diff --git' line")
        second = tail[1:]
        return (_strip("a/", unquote_path(first), where),
                _strip("b/", unquote_path(second) if second.startswith('"') else second, where))
    if rest.endswith('"'):
        cut = rest.rfind(' "')
        if cut < 0:
            raise DiffError(f"{where}: malformed 'diff --git' line")
        return (_strip("a/", rest[:cut], where), _strip("b/", unquote_path(rest[cut + 1:]), where))
    # Unquoted: "a/X b/X" is unambiguous only when both names are equal.
    if (len(rest) - 5) % 2 == 0 and len(rest) > 5:
        half = (len(rest) - 5) // 2
        name = rest[2:2 + half]
        if rest == f"a/{name} b/{name}":
            return _strip("a/", f"a/{name}", where), _strip("b/", f"b/{name}", where)
    return None, None


def _file_name(text: str, where: str) -> str:
    """The name of a ``---`` / ``+++`` line (tab-separated timestamps dropped)."""
    if text.startswith('"'):
        quoted, tail = _take_quoted(text)
        if tail and not tail.startswith("\t"):
            raise DiffError(f"{where}: text after the quoted file name")
        return unquote_path(quoted)
    return text.split("\t")[0]


def _b85_decode(text: str, where: str) -> bytes:
    if len(text) % 5:
        raise DiffError(f"{where}: base85 line length is not a multiple of 5")
    out = bytearray()
    for i in range(0, len(text), 5):
        value = 0
        for char in text[i:i + 5]:
            digit = _B85_INDEX.get(ord(char))
            if digit is None:
                raise DiffError(f"{where}: bad base85 character {char!r}")
            value = value * 85 + digit
        if value >= 1 << 32:
            raise DiffError(f"{where}: base85 group out of range")
        out += value.to_bytes(4, "big")
    return bytes(out)


def _read_binary(lines: list[str], i: int, where: str) -> tuple[tuple[str, int, bytes], int]:
    match = re.fullmatch(r"(literal|delta) (\d+)", lines[i]) if i < len(lines) else None
    if not match:
        raise DiffError(f"{where}: 'GIT binary patch' must be followed by 'literal N' or 'delta N'")
    kind, size = match.group(1), int(match.group(2))
    i += 1
    packed = bytearray()
    while i < len(lines) and lines[i]:
        line = lines[i]
        length_char = line[0]
        if "A" <= length_char <= "Z":
            length = ord(length_char) - ord("A") + 1
        elif "a" <= length_char <= "z":
            length = ord(length_char) - ord("a") + 27
        else:
            raise DiffError(f"{where}: bad binary line length character {length_char!r}")
        chunk = _b85_decode(line[1:], where)
        if length > len(chunk):
            raise DiffError(f"{where}: binary line shorter than its length character")
        packed += chunk[:length]
        i += 1
    try:
        data = zlib.decompress(bytes(packed))
    except zlib.error as err:
        raise DiffError(f"{where}: binary data does not inflate: {err}") from None
    if kind == "literal" and len(data) != size:
        raise DiffError(f"{where}: binary literal has {len(data)} bytes, header says {size}")
    return (kind, size, data), i + 1  # skip the blank line ending the block


def _parse_hunk(lines: list[str], i: int, where: str) -> tuple[Hunk, int]:
    match = _HUNK.match(lines[i])
    if not match:
        raise DiffError(f"{where}: bad hunk header {lines[i]!r}")
    old_start = int(match.group(1))
    old_count = 1 if match.group(2) is None else int(match.group(2))
    new_count = 1 if match.group(4) is None else int(match.group(4))
    hunk = Hunk(old_start, [], [])
    i += 1
    old_left, new_left = old_count, new_count
    last = None
    while old_left > 0 or new_left > 0:
        if i >= len(lines):
            raise DiffError(f"{where}: hunk ends early ({old_left} old and {new_left} new lines missing)")
        line = lines[i]
        tag, body = (line[:1] or " "), line[1:]
        raw = (body + "\n").encode("utf-8", "surrogateescape")
        if tag == " " and old_left > 0 and new_left > 0:
            hunk.old_lines.append(raw)
            hunk.new_lines.append(raw)
            old_left, new_left, last = old_left - 1, new_left - 1, "both"
        elif tag == "-" and old_left > 0:
            hunk.old_lines.append(raw)
            old_left, last = old_left - 1, "old"
        elif tag == "+" and new_left > 0:
            hunk.new_lines.append(raw)
            new_left, last = new_left - 1, "new"
        elif tag == "\\" and last is not None:
            _drop_newline(hunk, last)
        else:
            raise DiffError(f"{where}: unexpected line {line[:80]!r} in a hunk "
                            f"({old_left} old and {new_left} new lines still expected)")
        i += 1
    if i < len(lines) and lines[i].startswith("\\"):
        _drop_newline(hunk, last)
        i += 1
    return hunk, i


def _drop_newline(hunk: Hunk, last: str | None) -> None:
    targets = {"both": (hunk.old_lines, hunk.new_lines), "old": (hunk.old_lines,),
               "new": (hunk.new_lines,)}[last]
    for side in targets:
        side[-1] = side[-1][:-1]


def parse(diff: str) -> list[FilePatch]:
    """Parses a git diff strictly (see module docstring); raises ``DiffError``."""
    if not isinstance(diff, str):
        raise DiffError(f"a diff must be text, got {type(diff).__name__}")
    lines = diff.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    patches: list[FilePatch] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        where = f"diff line {i + 1}"
        if not line.startswith("diff --git "):
            raise DiffError(f"{where}: expected 'diff --git a/... b/...', got {line[:80]!r} "
                            "(only git's diff format is accepted)")
        header_old, header_new = _git_header_paths(line[len("diff --git "):], where)
        patch = FilePatch(header_old, header_new)
        named: dict[str, str] = {}
        created = deleted = False
        i += 1
        while i < len(lines) and not lines[i].startswith(("diff --git ", "--- ", "@@ ", "GIT binary patch",
                                                          "Binary files ")):
            where = f"diff line {i + 1}"
            header = lines[i]
            mode = _MODE.match(header)
            path_header = _PATH_HEADER.match(header)
            index = _INDEX.match(header)
            if mode:
                kind, value = mode.group(1), int(mode.group(2), 8)
                if value not in ALLOWED_MODES:
                    raise DiffError(f"{where}: file mode {value:06o} is not allowed (only regular "
                                    "files 100644 / 100755; no symlinks or submodules)")
                if kind in ("old mode", "deleted file mode"):
                    patch.old_mode = value
                else:
                    patch.new_mode = value
                created |= kind == "new file mode"
                deleted |= kind == "deleted file mode"
            elif path_header:
                kind, name = path_header.group(1), unquote_path(path_header.group(2))
                named[kind] = check_path(name, where)
            elif index:
                if index.group(1) and int(index.group(1), 8) not in ALLOWED_MODES:
                    raise DiffError(f"{where}: file mode {index.group(1)} is not allowed")
            elif not _SIMILARITY.match(header):
                raise DiffError(f"{where}: unknown extended header {header[:80]!r}")
            i += 1
        if created and deleted:
            raise DiffError(f"{where}: a file cannot be both created and deleted")
        if ("rename from" in named) != ("rename to" in named) or \
                ("copy from" in named) != ("copy to" in named):
            raise DiffError(f"{where}: rename/copy needs both 'from' and 'to'")
        if "rename from" in named or "copy from" in named:
            key = "rename" if "rename from" in named else "copy"
            for have, got in ((header_old, named[f"{key} from"]), (header_new, named[f"{key} to"])):
                if have is not None and have != got:
                    raise DiffError(f"{where}: {key} path {got!r} contradicts the header's {have!r}")
            patch.old_path, patch.new_path = named[f"{key} from"], named[f"{key} to"]
            patch.copy = key == "copy"
        # --- / +++ lines
        if i < len(lines) and lines[i].startswith("--- "):
            if i + 1 >= len(lines) or not lines[i + 1].startswith("+++ "):
                raise DiffError(f"diff line {i + 1}: '---' must be followed by '+++'")
            old_name = _file_name(lines[i][4:], f"diff line {i + 1}")
            new_name = _file_name(lines[i + 1][4:], f"diff line {i + 2}")
            old_path = None if old_name == "/dev/null" else _strip("a/", old_name, f"diff line {i + 1}")
            new_path = None if new_name == "/dev/null" else _strip("b/", new_name, f"diff line {i + 2}")
            if old_path is None and not created or new_path is None and not deleted:
                raise DiffError(f"diff line {i + 1}: /dev/null without 'new file' / 'deleted file' header")
            for have, got in ((patch.old_path, old_path), (patch.new_path, new_path)):
                if have is not None and got is not None and have != got:
                    raise DiffError(f"diff line {i + 1}: file name {got!r} contradicts the header's {have!r}")
            patch.old_path = old_path if old_path is not None else patch.old_path
            patch.new_path = new_path if new_path is not None else patch.new_path
            i += 2
            if i >= len(lines) or not lines[i].startswith("@@ "):
                raise DiffError(f"diff line {i + 1}: expected a hunk after the file names")
            while i < len(lines) and lines[i].startswith("@@ "):
                hunk, i = _parse_hunk(lines, i, f"diff line {i + 1}")
                patch.hunks.append(hunk)
        elif i < len(lines) and lines[i] == "GIT binary patch":
            forward, i = _read_binary(lines, i + 1, f"diff line {i + 2}")
            patch.binary = forward
            if i < len(lines) and re.fullmatch(r"(literal|delta) \d+", lines[i]):
                _, i = _read_binary(lines, i, f"diff line {i + 1}")  # the reverse data
        elif i < len(lines) and lines[i].startswith("Binary files "):
            raise DiffError(f"diff line {i + 1}: a binary change without data "
                            "('Binary files ... differ') cannot be applied; use --binary")
        if patch.old_path is None and patch.new_path is None:
            raise DiffError(f"{where}: cannot tell the file names of 'diff --git {line[11:80]}'")
        if created:
            patch.old_path = None
        if deleted:
            patch.new_path = None
        if (patch.old_path is not None and patch.new_path is not None and patch.old_path == patch.new_path
                and not patch.hunks and patch.binary is None and patch.new_mode is None):
            raise DiffError(f"{where}: the section for {patch.old_path!r} changes nothing")
        patches.append(patch)
    targets = [p.new_path for p in patches if p.new_path] + \
              [p.old_path for p in patches if p.old_path and not p.copy and p.old_path != p.new_path]
    duplicated = sorted({p for p in targets if targets.count(p) > 1})
    if duplicated:
        raise DiffError(f"the diff changes {duplicated} more than once")
    return patches


# -- applying ------------------------------------------------------------------------------


def _split_bytes(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    out = [line + b"\n" for line in lines[:-1]]
    if lines[-1]:
        out.append(lines[-1])
    return out


def _apply_hunks(data: bytes, hunks: list[Hunk], path: str) -> bytes:
    lines = _split_bytes(data)
    out: list[bytes] = []
    cursor = 0  # next unconsumed line of the original
    offset = 0
    for number, hunk in enumerate(hunks, 1):
        size = len(hunk.old_lines)
        want = max(0, hunk.old_start - 1 + offset) if size else hunk.old_start + offset
        if not size and hunk.old_start == 0:
            want = 0
        found = None
        for delta in range(0, len(lines) + 1):
            for start in ((want,) if delta == 0 else (want - delta, want + delta)):
                if cursor <= start <= len(lines) - size and lines[start:start + size] == hunk.old_lines:
                    found = start
                    break
            if found is not None:
                break
        if found is None:
            raise DiffError(f"hunk {number} of {path!r} does not apply (its context or removed "
                            f"lines are not in the file near line {hunk.old_start})")
        offset += found - want
        out += lines[cursor:found]
        out += hunk.new_lines
        cursor = found + size
    out += lines[cursor:]
    for line in out[:-1]:
        if not line.endswith(b"\n"):
            raise DiffError(f"the patch of {path!r} leaves a line without newline inside the file")
    return b"".join(out)


def _apply_delta(base: bytes, delta: bytes, path: str) -> bytes:
    def varint(pos):
        value = shift = 0
        while True:
            if pos >= len(delta):
                raise DiffError(f"binary delta of {path!r} is truncated")
            byte = delta[pos]
            value |= (byte & 0x7F) << shift
            shift += 7
            pos += 1
            if not byte & 0x80:
                return value, pos
    src_size, pos = varint(0)
    dst_size, pos = varint(pos)
    if src_size != len(base):
        raise DiffError(f"binary delta of {path!r} expects a {src_size}-byte file, it has {len(base)}")
    out = bytearray()
    while pos < len(delta):
        cmd = delta[pos]
        pos += 1
        if cmd & 0x80:
            offset = size = 0
            for bit, shift in ((1, 0), (2, 8), (4, 16), (8, 24)):
                if cmd & bit:
                    offset |= delta[pos] << shift
                    pos += 1
            for bit, shift in ((16, 0), (32, 8), (64, 16)):
                if cmd & bit:
                    size |= delta[pos] << shift
                    pos += 1
            size = size or 0x10000
            if offset + size > len(base):
                raise DiffError(f"binary delta of {path!r} copies past the end of the file")
            out += base[offset:offset + size]
        elif cmd:
            out += delta[pos:pos + cmd]
            pos += cmd
        else:
            raise DiffError(f"binary delta of {path!r} has a reserved zero opcode")
    if len(out) != dst_size:
        raise DiffError(f"binary delta of {path!r} gives {len(out)} bytes, header says {dst_size}")
    return bytes(out)


def apply(tree: Mapping[str, File], patches: list[FilePatch]) -> dict[str, File]:
    """``tree`` (path -> File) with ``patches`` applied; raises ``DiffError`` if any does not apply."""
    result = dict(tree)
    for patch in patches:
        old = None
        if patch.old_path is not None:
            if patch.old_path not in tree:
                raise DiffError(f"the diff changes {patch.old_path!r}, which does not exist")
            old = tree[patch.old_path]
            if patch.old_mode is not None and patch.old_mode != old.mode:
                raise DiffError(f"the diff expects {patch.old_path!r} to have mode "
                                f"{patch.old_mode:06o}, it has {old.mode:06o}")
            if not patch.copy and patch.old_path != patch.new_path:
                result.pop(patch.old_path)
        data = old.data if old else b""
        if patch.binary is not None:
            kind, _, payload = patch.binary
            data = payload if kind == "literal" else _apply_delta(data, payload, patch.old_path or "")
        elif patch.hunks:
            data = _apply_hunks(data, patch.hunks, patch.new_path or patch.old_path)
        if patch.new_path is None:
            if data:
                raise DiffError(f"the deletion of {patch.old_path!r} does not remove all its content")
            continue
        if patch.new_path != patch.old_path and patch.new_path in result:
            raise DiffError(f"the diff creates {patch.new_path!r}, which already exists")
        mode = patch.new_mode if patch.new_mode is not None else (old.mode if old else REGULAR)
        result[patch.new_path] = File(data, mode)
    _check_tree(result)
    return result


def _check_tree(tree: Mapping[str, File]) -> None:
    # A file may not sit where another file needs a directory ("a" and "a/b").
    paths = set(tree)
    for path in paths:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in paths:
                raise DiffError(f"{path!r} needs a directory where the file {'/'.join(parts[:i])!r} is")


def apply_text(snapshot: Mapping[str, str], diff: str) -> dict[str, str]:
    """``apply`` for text snapshots (path -> str); every result must be UTF-8 text."""
    tree = {p: File(t.encode("utf-8")) for p, t in snapshot.items()}
    out = {}
    for path, file in apply(tree, parse(diff)).items():
        text = _text(file.data)
        if text is None:
            raise DiffError(f"{path!r} is not UTF-8 text after the patch")
        out[path] = text
    return out


# -- paths -----------------------------------------------------------------------------------


def touched_paths(diff: str) -> list[str]:
    """Every path a git diff creates, deletes, modifies, renames or copies (``DiffError`` if unparseable)."""
    return sorted({p for patch in parse(diff) for p in patch.paths})


def is_test_path(path: str) -> bool:
    """Test modules and anything under a tests/ or test/ directory."""
    parts = path.split("/")
    name = parts[-1]
    return (any(p in ("tests", "test", "testing") for p in parts[:-1])
            or name.startswith("test_") or name.endswith(("_test.py", "_tests.py")))


def is_protected_path(path: str) -> bool:
    """Whether a diff may not touch ``path`` (tests, test configuration, start-up hooks)."""
    name = path.split("/")[-1]
    return (is_test_path(path) or name in PROTECTED_NAMES or name.endswith(".pth")
            or path.startswith("..") or path.startswith("/") or ".git" in path.split("/"))


def protected_paths(diff: str) -> list[str]:
    """The paths of ``diff`` that ``is_protected_path`` forbids."""
    return [p for p in touched_paths(diff) if is_protected_path(p)]
