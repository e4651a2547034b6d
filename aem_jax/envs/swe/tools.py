"""The agent's tools, their documentation and their function-call action formats.

One action per turn, written as a function call in the XML format of
DeepSWE / R2E-Gym and Qwen3-Coder tool use (the ``<tool_call>`` wrapper is
optional; text around the call is ignored, so the model may think first):

    <function=bash>
    <parameter=command>python -m pytest -q tests/test_case.py</parameter>
    </function>

or in the JSON format Qwen3 / Qwen2.5 (Hermes) chat templates teach their
models, one JSON object inside ``<tool_call>`` tags:

    <tool_call>
    {"name": "bash", "arguments": {"command": "python -m pytest -q"}}
    </tool_call>

Whichever call comes first in the text is the action. In the JSON form
``parameters`` (Llama 3.1's key) is accepted for ``arguments``, arguments
given as a JSON-encoded string are decoded, and numbers or lists of numbers
(``"view_range": [10, 40]``) become the text the tools take ("10,40").
Malformed JSON is an unparsable action whose message says what was wrong.

Tools (parameters in brackets are optional):

  bash(command)                      run a shell command in the repository
  view(path, [view_range])           a file with line numbers ("10,40"; -1 = end)
                                     or a directory listing (two levels)
  create(path, file_text)            create a new file
  str_replace(path, old_str, [new_str])  replace the one occurrence of old_str
  insert(path, insert_line, new_str) insert new_str after line insert_line
                                     (0: before the first line)
  undo_edit(path)                    revert the last create / str_replace /
                                     insert of path (repeatable, per episode)
  search(search_term, [path])        a literal text in the files under a
                                     directory (matching-line count per file)
                                     or in one file (the matching lines)
  submit()                           end the episode; the diff is evaluated

The names of the R2E-Gym / DeepSWE and SWE-agent scaffolds are read as the
same tools, so models trained on them act here unchanged: ``file_editor`` /
``str_replace_editor`` with ``command`` = view | create | str_replace |
insert | undo_edit, ``execute_bash`` with ``cmd``, ``finish``.

File tools run inside the sandbox as the sandbox user (never on the host),
so a symlink in the workspace cannot make them read or write host files.
Their relative paths are relative to the repository root (whatever
directory a shell session has moved to). Files are read and written as
bytes-exact UTF-8 (CRLF line endings are kept). The undo history lives in
the workspace's ``.git`` directory (which no diff reads), so it lasts for the
episode and never reaches the evaluated change; at most ``UNDO_LEVELS``
edits per file are kept.

Every observation longer than the environment's limit keeps its head and
tail with a note of how many characters were cut (``truncate_middle``).
Unparsable actions and failed edits return an explanatory observation.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import re
import shlex

from aem_jax.envs.swe.sandbox import ExecResult

_CALL = re.compile(r"<function=([^>\s]*)>(.*?)(?:</function>|\Z)", re.S)
_PARAM = re.compile(r"<parameter=([^>\s]*)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.S)
# A JSON tool call: "<tool_call>" and then a JSON object (XML calls may sit in the same tags).
_JSON_CALL = re.compile(r"<tool_call>\s*(?=\{)")
_JSON_EXAMPLE = '<tool_call>\n{"name": "bash", "arguments": {"command": "ls"}}\n</tool_call>'

TOOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # name: (required parameters, optional parameters)
    "bash": (("command",), ()),
    "view": (("path",), ("view_range",)),
    "create": (("path", "file_text"), ()),
    "str_replace": (("path", "old_str"), ("new_str",)),
    "insert": (("path", "insert_line", "new_str"), ()),
    "undo_edit": (("path",), ()),
    "search": (("search_term",), ("path",)),
    "submit": ((), ()),
}
EDITOR_COMMANDS = ("view", "create", "str_replace", "insert", "undo_edit")
FILE_TOOLS = (*EDITOR_COMMANDS, "search")
# Tool names of other scaffolds: name -> (tool, parameter renames, parameters ignored).
# A "file_editor" call takes its tool from its "command" parameter.
ALIASES: dict[str, tuple[str | None, dict[str, str], tuple[str, ...]]] = {
    "file_editor": (None, {}, ("concise", "enable_linting", "python_only")),
    "str_replace_editor": (None, {}, ("concise", "enable_linting", "python_only")),
    "execute_bash": ("bash", {"cmd": "command"}, ()),
    "finish": ("submit", {}, ("command", "result")),
}

UNDO_LEVELS = 20           # edits per file undo_edit can revert
SEARCH_MAX_FILES = 100     # files a directory search lists
SEARCH_MAX_LINES = 100     # lines a file search shows
SEARCH_MAX_FILE_BYTES = 2 << 20  # larger files are skipped (and counted as skipped)

SYSTEM_PROMPT = """You are a software engineer resolving an issue in a code repository. You work in a sandbox without network access. Each turn, call exactly one tool; its output is the next message. Long outputs are shortened in the middle.

Tools:
- bash: run a shell command in the repository. Parameter: command. The shell is persistent:
  the working directory (cd) and exported variables carry over to the next bash call.
  A command that runs past its time limit is killed; the session goes on.
- view: show a file with line numbers, or list a directory (two levels deep).
  Parameters: path, optionally view_range as "start,end" (1-based; end -1 means the last line).
- create: create a new file. Parameters: path, file_text.
- str_replace: replace the single occurrence of old_str by new_str in a file.
  Parameters: path, old_str, new_str (empty or left out: delete old_str). old_str must
  match the file exactly once, including whitespace.
- insert: insert new_str after line insert_line of a file (0: at the top).
  Parameters: path, insert_line, new_str.
- undo_edit: revert the last create, str_replace or insert of a file; call it again to
  go further back. Parameter: path.
- search: find a literal text. In a directory (default: the repository) it lists the
  files that contain it with the number of matching lines; in a file it shows the
  matching lines. Parameters: search_term, optionally path.
- submit: finish; your changes are then tested with hidden tests. No parameters.

Relative paths are relative to the repository root.

Call a tool in this format:
<function=TOOL_NAME>
<parameter=PARAMETER_NAME>value</parameter>
</function>

For example:
<function=search>
<parameter=search_term>def merge</parameter>
</function>

A JSON call is accepted too:
<tool_call>
{"name": "bash", "arguments": {"command": "python -m pytest -q tests"}}
</tool_call>
"""
# Kept for code that put the documentation in the first user message.
TOOL_DOC = SYSTEM_PROMPT

_DESCRIPTIONS = {
    "bash": "Run a shell command in the repository (network off).",
    "view": "Show a file with line numbers, or list a directory (two levels deep).",
    "create": "Create a new file.",
    "str_replace": "Replace the single occurrence of old_str by new_str in a file.",
    "insert": "Insert new_str after line insert_line of a file (0: at the top).",
    "undo_edit": "Revert the last create, str_replace or insert of a file (repeatable).",
    "search": ("Find a literal text: in a directory, the files containing it with their "
               "matching-line counts; in a file, the matching lines."),
    "submit": "Finish; the changes are tested with hidden tests.",
    "command": "The shell command.",
    "path": "File or directory path, relative to the repository root.",
    "view_range": "Optional [start, end] line range (1-based; end -1 is the last line).",
    "old_str": "Exact text to replace; must occur exactly once.",
    "new_str": "The new text.",
    "file_text": "Content of the new file.",
    "insert_line": "The line after which new_str goes (0: before the first line).",
    "search_term": "The literal text to find.",
}
_TYPES = {"insert_line": {"type": "integer"},
          "view_range": {"type": "array", "items": {"type": "integer"}}}


def tool_schemas() -> list[dict]:
    """The tools as JSON function schemas, for chat templates that list tools.

    Qwen3's template, given ``tools=tool_schemas()`` (e.g. through
    ``ChatFormat(tok, template_kwargs={"tools": tool_schemas()})``), shows
    them in the system message with its own instruction to answer in the
    ``<tool_call>`` JSON format, which `parse_action` reads.
    """
    schemas = []
    for name, (required, optional) in TOOLS.items():
        props = {p: {**_TYPES.get(p, {"type": "string"}), "description": _DESCRIPTIONS.get(p, p)}
                 for p in required + optional}
        schemas.append({"type": "function", "function": {
            "name": name, "description": _DESCRIPTIONS.get(name, name),
            "parameters": {"type": "object", "properties": props, "required": list(required)}}})
    return schemas


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A parsed action."""

    name: str
    params: dict[str, str]


class ActionError(ValueError):
    """The action could not be parsed; the message is shown to the agent."""


def _clean(value: str) -> str:
    # The Qwen3 format puts the value on its own lines: drop one newline each side.
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def _json_value(name: str, key: str, value: object) -> str:
    """A JSON argument as the text a tool takes."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if (isinstance(value, list) and value
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return ",".join(str(v) for v in value)
    raise ActionError(f"tool {name!r} parameter {key!r} must be a string (or a number), "
                      f"got {json.dumps(value)}")


def _parse_json_call(text: str, start: int) -> tuple[str, dict[str, str]]:
    """(name, params) of the JSON object at ``text[start]`` (a ``{``)."""
    try:
        call, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as err:
        raise ActionError(f"the <tool_call> does not hold valid JSON ({err.msg} at character "
                          f"{err.pos - start} of the object); write one call such as "
                          f"{_JSON_EXAMPLE}") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ActionError(f'a JSON tool call is an object with a "name" string and an '
                          f'"arguments" object, got {json.dumps(call)[:200]}; for example '
                          f"{_JSON_EXAMPLE}")
    name = call["name"]
    args = call.get("arguments", call.get("parameters", {}))
    if isinstance(args, str):  # OpenAI style: the arguments as a JSON-encoded string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as err:
            raise ActionError(f"tool {name!r}: the arguments string is not valid JSON "
                              f"({err.msg}); give an object, as in {_JSON_EXAMPLE}") from None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ActionError(f'tool {name!r}: "arguments" must be an object of parameter names '
                          f"to values, got {json.dumps(args)[:200]}")
    return name, {str(key): _json_value(name, str(key), value) for key, value in args.items()}


def _resolve_alias(name: str, params: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The tool and parameters a call named as in another scaffold (``ALIASES``) means."""
    if name not in ALIASES:
        return name, params
    tool, renames, ignored = ALIASES[name]
    params = {renames.get(key, key): value for key, value in params.items() if key not in ignored}
    if tool is None:
        command = params.pop("command", None)
        if command not in EDITOR_COMMANDS:
            raise ActionError(f"tool {name!r} needs parameter 'command', one of "
                              f"{list(EDITOR_COMMANDS)}; got {command!r}")
        tool = command
    return tool, params


def parse_action(text: str) -> ToolCall:
    """Parses the first function call in ``text``; raises ``ActionError`` explaining why not.

    The call is the first XML call (``<function=NAME>``) or JSON call
    (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``) in the text.
    """
    if not isinstance(text, str):
        raise ActionError(f"the action must be text, got {type(text).__name__}")
    match, json_match = _CALL.search(text), _JSON_CALL.search(text)
    if json_match and (not match or json_match.start() < match.start()):
        name, params = _parse_json_call(text, json_match.end())
    elif match:
        name = match.group(1)
        params = {key: _clean(value) for key, value in _PARAM.findall(match.group(2))}
    elif "<tool_call>" in text:
        raise ActionError("the <tool_call> holds neither a JSON object nor <function=NAME>; "
                          f"write one call such as {_JSON_EXAMPLE}")
    else:
        raise ActionError("no tool call found: write one call such as "
                          "<function=bash>\n<parameter=command>ls</parameter>\n</function>")
    name, params = _resolve_alias(name, params)
    if name not in TOOLS:
        raise ActionError(f"unknown tool {name!r}; available tools: {', '.join(TOOLS)}")
    required, optional = TOOLS[name]
    missing = [p for p in required if p not in params]
    unknown = sorted(set(params) - set(required) - set(optional))
    if missing:
        raise ActionError(f"tool {name!r} needs parameter(s) {missing}; got {sorted(params)}")
    if unknown:
        raise ActionError(f"tool {name!r} has no parameter(s) {unknown}; "
                          f"allowed: {list(required) + list(optional)}")
    return ToolCall(name, params)


def truncate_middle(text: str, limit: int) -> str:
    """``text`` cut to its first and last characters, ``limit`` in all, past ``limit``.

    The cut is marked in the middle with how many characters were left out:
    ``head + "\\n[... N of M characters omitted ...]\\n" + tail``, where
    head has ``limit // 2`` characters and tail the rest of ``limit``.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int (characters), got {limit!r}")
    if len(text) <= limit:
        return text
    head = limit // 2
    tail = limit - head
    omitted = len(text) - limit
    return f"{text[:head]}\n[... {omitted} of {len(text)} characters omitted ...]\n{text[len(text) - tail:]}"


# Runs inside the sandbox (stdlib only, no site) with the JSON arguments base64-encoded.
_FILE_TOOL = r'''
import base64, hashlib, json, os, sys
a = json.loads(base64.b64decode(sys.argv[1]).decode("utf-8"))
op, root = a["op"], a["root"] or os.getcwd()
def fail(msg):
    print(msg); sys.exit(1)
def where(p):
    if not p.strip():
        fail("error: path is empty")
    return os.path.normpath(os.path.join(root, p))
def split_lines(text):
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines
def shown_line(line):
    line = line[:-1] if line.endswith("\n") else line
    return line[:-1] if line.endswith("\r") else line
def numbered(lines, first):
    return "\n".join(f"{i:6d}\t{shown_line(line)}" for i, line in enumerate(lines, first))
def context(text, first, last):
    lines = split_lines(text)
    lo, hi = max(1, first - 4), min(len(lines), last + 4)
    return lo, hi, numbered(lines[lo - 1:hi], lo)
def read(p, shown):
    if not os.path.isfile(p):
        why = " (it is a directory)" if os.path.isdir(p) else "" if os.path.lexists(p) else " (it does not exist)"
        fail(f"error: {shown} is not a file{why}")
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as e:
        fail(f"error: cannot read {shown}: {e.strerror}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        fail(f"error: {shown} is not UTF-8 text")
def write(p, shown, text, old=None):
    try:
        with open(p, "wb") as f:
            f.write(text.encode("utf-8"))
    except OSError as e:
        if old is not None:
            try:
                with open(p, "wb") as f:
                    f.write(old.encode("utf-8"))
            except OSError:
                pass
        fail(f"error: cannot write {shown}: {e.strerror}; nothing was changed")
git = os.path.join(root, ".git")
HISTORY = (os.path.join(git, "aem_edit_history") if os.path.isdir(git)
           else os.path.join(os.environ.get("HOME") or "/tmp", ".aem_edit_history"))
def history(p):
    return os.path.join(HISTORY, hashlib.sha256(p.encode("utf-8", "surrogateescape")).hexdigest()[:40])
def levels(d):
    try:
        return sorted(int(n) for n in os.listdir(d) if n.isdigit())
    except OSError:
        return []
def remember(p, old):
    d = history(p)
    try:
        os.makedirs(d, exist_ok=True)
        have = levels(d)
        with open(os.path.join(d, str(have[-1] + 1 if have else 1)), "wb") as f:
            f.write(b"-" if old is None else b"+" + old.encode("utf-8"))
        for n in have[:max(0, len(have) + 1 - a["undo_levels"])]:
            os.remove(os.path.join(d, str(n)))
        return ""
    except OSError as e:
        return f"\n(this edit cannot be undone: its history could not be saved: {e.strerror})"
def crlf(text, s):
    return s.replace("\r\n", "\n").replace("\n", "\r\n") if "\r\n" in text else s
shown = a.get("path") or "."
p = where(shown)
if op == "view":
    if os.path.isdir(p):
        for top, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
            if os.path.relpath(top, p).count(os.sep) >= 1:
                dirs[:] = []
            for name in sorted(files):
                if not name.startswith("."):
                    print(os.path.normpath(os.path.join(shown, os.path.relpath(os.path.join(top, name), p))))
        sys.exit(0)
    lines = split_lines(read(p, shown))
    first, last = 1, len(lines)
    if a.get("view_range"):
        try:
            first, last = [int(x) for x in a["view_range"].strip("[]() ").split(",")]
        except ValueError:
            fail(f"error: view_range must be 'start,end' with integers, got {a['view_range']!r}")
        last = len(lines) if last == -1 else last
        if not 1 <= first <= last <= len(lines):
            fail(f"error: view_range {first},{last} is outside the file's 1..{len(lines)} lines")
    if not lines:
        print(f"{shown} is empty")
    else:
        print(numbered(lines[first - 1:last], first))
elif op == "str_replace":
    text = read(p, shown)
    old, new = a["old_str"], a.get("new_str", "")
    if not old:
        fail("error: old_str is empty")
    count = text.count(old)
    if count == 0 and "\r\n" in text and "\r" not in old:  # CRLF file, LF call
        old, new = crlf(text, old), crlf(text, new)
        count = text.count(old)
    if count == 0:
        fail(f"error: old_str was not found in {shown}; nothing was changed. "
             "It must match the file exactly, including indentation.")
    if count > 1:
        starts, i = [], text.find(old)
        while i >= 0:
            starts.append(text.count("\n", 0, i) + 1); i = text.find(old, i + 1)
        fail(f"error: old_str occurs {count} times in {shown} (lines {starts}); nothing was "
             "changed. Include more surrounding lines to make it unique.")
    i = text.find(old)
    result = text[:i] + new + text[i + len(old):]
    write(p, shown, result, text)
    note = remember(p, text)
    first = text.count("\n", 0, i) + 1
    lo, hi, lines = context(result, first, first + new.count("\n"))
    print(f"edited {shown}; lines {lo}-{hi} now read:\n{lines}{note}")
elif op == "create":
    if os.path.lexists(p):
        fail(f"error: {shown} already exists; edit it with str_replace or insert")
    try:
        os.makedirs(os.path.dirname(p), exist_ok=True)
    except OSError as e:
        fail(f"error: cannot create the directory of {shown}: {e.strerror}")
    write(p, shown, a["file_text"])
    note = remember(p, None)
    print(f"created {shown} ({len(split_lines(a['file_text']))} lines){note}")
elif op == "insert":
    text = read(p, shown)
    try:
        n = int(str(a["insert_line"]).strip())
    except ValueError:
        fail(f"error: insert_line must be an integer line number, got {a['insert_line']!r}")
    lines = split_lines(text)
    if not 0 <= n <= len(lines):
        fail(f"error: insert_line {n} is outside 0..{len(lines)} ({shown} has {len(lines)} "
             "lines; 0 inserts before the first line)")
    nl = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    new = a["new_str"] if nl == "\n" else crlf("\r\n", a["new_str"])
    if not new.endswith("\n"):
        new += nl
    if n == len(lines) and lines and not lines[-1].endswith("\n"):
        lines[-1] += nl
    result = "".join(lines[:n]) + new + "".join(lines[n:])
    write(p, shown, result, text)
    note = remember(p, text)
    added = len(split_lines(new))
    lo, hi, shown_lines = context(result, n + 1, n + added)
    print(f"inserted {added} line(s) after line {n} of {shown}; lines {lo}-{hi} now read:\n"
          f"{shown_lines}{note}")
elif op == "undo_edit":
    d = history(p)
    have = levels(d)
    if not have:
        fail(f"error: there is no edit of {shown} to undo (undo_edit reverts this episode's "
             f"create, str_replace and insert calls, the last {a['undo_levels']} per file)")
    level = os.path.join(d, str(have[-1]))
    with open(level, "rb") as f:
        blob = f.read()
    if blob[:1] == b"-":
        if os.path.isdir(p) and not os.path.islink(p):
            fail(f"error: {shown} is now a directory; nothing was changed")
        if os.path.lexists(p):
            os.remove(p)
        message = f"undid the creation of {shown}: the file is removed"
    else:
        try:
            os.makedirs(os.path.dirname(p), exist_ok=True)
        except OSError as e:
            fail(f"error: cannot recreate the directory of {shown}: {e.strerror}")
        write(p, shown, blob[1:].decode("utf-8"))
        message = f"undid the last edit of {shown}: it reads as before that edit"
    os.remove(level)
    print(f"{message} ({len(have) - 1} earlier edit(s) of it can still be undone)")
elif op == "search":
    term = a["search_term"]
    if not term or "\n" in term:
        fail(f"error: search_term must be a non-empty single line, got {term!r}")
    if os.path.isfile(p):
        hits = [(i, line) for i, line in enumerate(split_lines(read(p, shown)), 1) if term in line]
        if not hits:
            print(f'no matches for "{term}" in {shown}')
            sys.exit(0)
        print(f'{len(hits)} matching lines for "{term}" in {shown}:')
        print("\n".join(f"{i:6d}\t{shown_line(line)}" for i, line in hits[:a["max_lines"]]))
        if len(hits) > a["max_lines"]:
            print(f"[{len(hits) - a['max_lines']} more matching lines not shown; "
                  "search a more specific term]")
        sys.exit(0)
    if not os.path.isdir(p):
        fail(f"error: {shown} does not exist")
    found, skipped = [], 0
    for top, dirs, files in os.walk(p):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for name in files:
            f = os.path.join(top, name)
            if name.startswith(".") or os.path.islink(f) or not os.path.isfile(f):
                continue
            try:
                if os.path.getsize(f) > a["max_file_bytes"]:
                    skipped += 1
                    continue
                with open(f, "rb") as fh:
                    data = fh.read()
            except OSError:
                continue
            if b"\0" in data[:8192]:
                continue
            n = sum(term in line for line in data.decode("utf-8", "replace").split("\n"))
            if n:
                found.append((os.path.normpath(os.path.join(shown, os.path.relpath(f, p))), n))
    found.sort()
    if not found:
        print(f'no matches for "{term}" in {shown}')
    else:
        print(f'{sum(n for _, n in found)} matching lines for "{term}" in {len(found)} files '
              f'under {shown}:')
        for f, n in found[:a["max_files"]]:
            print(f"{f} ({n})")
        if len(found) > a["max_files"]:
            print(f"[{len(found) - a['max_files']} more files not listed; search a more "
                  "specific term or path]")
    if skipped:
        print(f"[{skipped} files larger than {a['max_file_bytes']} bytes were not searched]")
else:
    fail(f"error: unknown file tool {op!r}")
'''
# One argv string may hold at most 128 KiB (Linux MAX_ARG_STRLEN); the command is one.
_MAX_COMMAND_BYTES = 126_000


class ToolInputError(ValueError):
    """A tool call that cannot be run as given; the message is shown to the agent."""


def file_tool_command(op: str, params: dict[str, str], *, root: str | None = None) -> str:
    """The shell command running file tool ``op`` inside the sandbox.

    Args:
      op: one of ``FILE_TOOLS``.
      params: the call's parameters.
      root: the repository root inside the sandbox; relative paths start there
        (None: the command's working directory).

    Raises ``ToolInputError`` when the arguments are too long for one command.
    """
    if op not in FILE_TOOLS:
        raise ValueError(f"op must be one of {FILE_TOOLS}, got {op!r}")
    args = {"op": op, "root": root, "undo_levels": UNDO_LEVELS, "max_files": SEARCH_MAX_FILES,
            "max_lines": SEARCH_MAX_LINES, "max_file_bytes": SEARCH_MAX_FILE_BYTES, **params}
    payload = base64.b64encode(json.dumps(args, ensure_ascii=False).encode("utf-8")).decode()
    command = (f"PY=$(command -v python3 || command -v python); "
               f"\"$PY\" -I -S -c {shlex.quote(_FILE_TOOL)} {payload}")
    if len(command.encode()) > _MAX_COMMAND_BYTES:
        size = sum(len(v.encode("utf-8")) for v in params.values())
        room = (_MAX_COMMAND_BYTES - len(command) + len(payload)) * 3 // 4 - 200
        raise ToolInputError(
            f"the arguments of this {op} call are too long ({size} bytes; one call takes about "
            f"{room}); nothing was changed. Write large files in parts: create the file with "
            "the first part, then add the rest with insert")
    return command


def format_result(result: ExecResult, limit: int) -> str:
    """A command's output for the agent: head and tail past ``limit``, then the exit status."""
    text = truncate_middle(result.output.rstrip("\n"), limit)
    if result.timed_out:
        return f"{text}\n[the command timed out and was killed]"
    return f"{text}\n[exit code: {result.returncode}]"
