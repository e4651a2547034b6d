"""The agent's tools and their function-call action formats.

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
                                     or a directory listing
  str_replace(path, old_str, new_str) replace the one occurrence of old_str
  create(path, file_text)            create a new file
  submit()                           end the episode; the diff is evaluated

File tools run inside the sandbox as the sandbox user (never on the host),
so a symlink in the workspace cannot make them read or write host files.
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
    "str_replace": (("path", "old_str", "new_str"), ()),
    "create": (("path", "file_text"), ()),
    "submit": ((), ()),
}

TOOL_DOC = """You act by calling exactly one tool per turn, in this format:

<function=TOOL_NAME>
<parameter=PARAMETER_NAME>value</parameter>
</function>

Tools:
- bash: run a shell command in the repository. Parameter: command.
  The network is off; each command runs in a fresh shell (cd does not persist).
- view: show a file with line numbers, or list a directory. Parameters: path,
  optionally view_range as "start,end" (1-based, end -1 means the last line).
- str_replace: replace the single occurrence of old_str by new_str in a file.
  Parameters: path, old_str, new_str. old_str must match exactly once.
- create: create a new file. Parameters: path, file_text.
- submit: finish; your changes are then tested with hidden tests. No parameters.

Example:
<function=bash>
<parameter=command>grep -rn "def merge" .</parameter>
</function>

A JSON call is accepted too:
<tool_call>
{"name": "bash", "arguments": {"command": "grep -rn \\"def merge\\" ."}}
</tool_call>
"""

_DESCRIPTIONS = {
    "bash": "Run a shell command in the repository (network off).",
    "view": "Show a file with line numbers, or list a directory.",
    "str_replace": "Replace the single occurrence of old_str by new_str in a file.",
    "create": "Create a new file.",
    "submit": "Finish; the changes are tested with hidden tests.",
    "command": "The shell command.",
    "path": "File or directory path, relative to the repository root.",
    "view_range": "Optional 'start,end' line range (1-based; end -1 is the last line).",
    "old_str": "Exact text to replace; must occur exactly once.",
    "new_str": "Replacement text.",
    "file_text": "Content of the new file.",
}


def tool_schemas() -> list[dict]:
    """The tools as JSON function schemas, for chat templates that list tools.

    Qwen3's template, given ``tools=tool_schemas()`` (e.g. through
    ``ChatFormat(tok, template_kwargs={"tools": tool_schemas()})``), shows
    them in the system message with its own instruction to answer in the
    ``<tool_call>`` JSON format, which `parse_action` reads.
    """
    schemas = []
    for name, (required, optional) in TOOLS.items():
        props = {p: {"type": "string", "description": _DESCRIPTIONS.get(p, p)}
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
    """Keeps the first and last ``limit // 2`` characters of long text."""
    if len(text) <= limit:
        return text
    half = limit // 2
    omitted = len(text) - 2 * half
    return f"{text[:half]}\n[... {omitted} characters omitted ...]\n{text[-half:]}"


# Runs inside the sandbox (stdlib only, no site) with the JSON arguments base64-encoded.
_FILE_TOOL = r'''
import base64, json, os, sys
a = json.loads(base64.b64decode(sys.argv[1]))
op, path = a["op"], a["path"]
def fail(msg):
    print(msg); sys.exit(1)
def numbered(lines, first):
    return "\n".join(f"{i:6d}\t{line}" for i, line in enumerate(lines, first))
def read(p):
    if not os.path.isfile(p):
        fail(f"error: {p} is not a file" + (" (it is a directory)" if os.path.isdir(p) else ""))
    try:
        with open(p, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        fail(f"error: {p} is not UTF-8 text")
if op == "view":
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
            depth = root[len(path):].count(os.sep)
            if depth >= 2:
                dirs[:] = []
            for name in sorted(files):
                if not name.startswith("."):
                    print(os.path.join(root, name))
        sys.exit(0)
    lines = read(path).split("\n")
    first, last = 1, len(lines)
    if a.get("view_range"):
        try:
            first, last = [int(x) for x in a["view_range"].strip("[]() ").split(",")]
        except ValueError:
            fail(f"error: view_range must be 'start,end' with integers, got {a['view_range']!r}")
        last = len(lines) if last == -1 else last
        if not 1 <= first <= last <= len(lines):
            fail(f"error: view_range {first},{last} is outside the file's 1..{len(lines)} lines")
    print(numbered(lines[first - 1:last], first))
elif op == "str_replace":
    text = read(path)
    old, new = a["old_str"], a["new_str"]
    if not old:
        fail("error: old_str is empty")
    count = text.count(old)
    if count == 0:
        fail(f"error: old_str was not found in {path}; nothing was changed. "
             "It must match the file exactly, including indentation.")
    if count > 1:
        starts, i = [], text.find(old)
        while i >= 0:
            starts.append(text.count("\n", 0, i) + 1); i = text.find(old, i + 1)
        fail(f"error: old_str occurs {count} times in {path} (lines {starts}); nothing was "
             "changed. Include more surrounding lines to make it unique.")
    text = text.replace(old, new)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    line = text.count("\n", 0, text.find(new)) + 1 if new else 1
    lines = text.split("\n")
    lo, hi = max(1, line - 4), min(len(lines), line + new.count("\n") + 4)
    print(f"edited {path}; lines {lo}-{hi} now read:")
    print(numbered(lines[lo - 1:hi], lo))
elif op == "create":
    if os.path.lexists(path):
        fail(f"error: {path} already exists; use str_replace to edit it")
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(a["file_text"])
    print(f"created {path} ({len(a['file_text'])} characters)")
'''


def file_tool_command(op: str, params: dict[str, str]) -> str:
    """The shell command running a file tool inside the sandbox."""
    payload = base64.b64encode(json.dumps({"op": op, **params}).encode()).decode()
    return (f"PY=$(command -v python3 || command -v python); "
            f"\"$PY\" -I -S -c {shlex.quote(_FILE_TOOL)} {payload}")


def format_result(result: ExecResult, limit: int) -> str:
    """A command's output for the agent: head and tail past ``limit``, then the exit status."""
    text = truncate_middle(result.output.rstrip("\n"), limit)
    if result.timed_out:
        return f"{text}\n[the command timed out and was killed]"
    return f"{text}\n[exit code: {result.returncode}]"
