"""Scripted agents for checks and benchmarks (they write actions like a model).

* ``gold_actions``: applies the task's gold ``patch`` hunk by hunk with
  ``str_replace`` / ``create`` / ``bash rm``, then submits (must resolve 100%).
* ``empty_actions``: submits without changing anything (must resolve 0%).
* ``test_editing_actions``: makes the failing tests pass by rewriting test
  files, then submits (must be rejected).
"""
from __future__ import annotations

import re

from aem_jax.envs.swe.tasks import Task

_HUNK = re.compile(r"^@@ -\d+(?:,\d+)? \+\d+(?:,\d+)? @@")


def call(tool: str, **params: str) -> str:
    """One action in the XML function-call format."""
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"I will use {tool}.\n<function={tool}>\n{body}</function>"


def _file_patches(patch: str) -> list[tuple[str | None, str | None, list[str]]]:
    """(old path, new path, body lines) for each file of a unified diff."""
    files: list[tuple[str | None, str | None, list[str]]] = []
    old = None
    for line in patch.splitlines():
        if line.startswith("--- "):
            old = None if line[4:].strip() == "/dev/null" else line[4:].strip()[2:]
        elif line.startswith("+++ "):
            new = None if line[4:].strip() == "/dev/null" else line[4:].strip()[2:]
            files.append((old, new, []))
        elif files and not line.startswith("diff --git"):
            files[-1][2].append(line)
    return files


def _hunks(lines: list[str]) -> list[tuple[str, str]]:
    hunks: list[tuple[list[str], list[str]]] = []
    for line in lines:
        if _HUNK.match(line):
            hunks.append(([], []))
        elif hunks and line.startswith(" "):
            hunks[-1][0].append(line[1:])
            hunks[-1][1].append(line[1:])
        elif hunks and line.startswith("-"):
            hunks[-1][0].append(line[1:])
        elif hunks and line.startswith("+"):
            hunks[-1][1].append(line[1:])
        elif hunks and line == "":  # a blank context line some tools strip
            hunks[-1][0].append("")
            hunks[-1][1].append("")
    return [("\n".join(old) + "\n", "\n".join(new) + "\n") for old, new in hunks]


def gold_actions(task: Task) -> list[str]:
    """Actions that apply ``task.patch`` through the tools and submit."""
    actions = []
    for old, new, lines in _file_patches(task.patch):
        if old is None:
            text = "\n".join(l[1:] for l in lines if l.startswith("+")) + "\n"
            actions.append(call("create", path=new, file_text=text))
        elif new is None:
            actions.append(call("bash", command=f"rm -f -- '{old}'"))
        else:
            for old_str, new_str in _hunks(lines):
                actions.append(call("str_replace", path=old, old_str=old_str, new_str=new_str))
    return [*actions, call("submit")]


def empty_actions(task: Task) -> list[str]:
    """Looks around, changes nothing, submits."""
    del task
    return [call("bash", command="ls -R | head -50"), call("submit")]


def test_editing_actions(task: Task) -> list[str]:
    """Replaces every visible test module by one trivial passing test, then submits."""
    paths = sorted({test_id.split("::")[0] for test_id in (*task.FAIL_TO_PASS, *task.PASS_TO_PASS)})
    script = "; ".join(f"printf 'def test_ok():\\n    assert True\\n' > '{p}'" for p in paths)
    return [call("bash", command=script), call("submit")]
