"""Grading published tasks from their test logs, with the ``swebench`` package's parsers.

Two pure functions make the seam with the evaluator (``reward.py``), and
``run_tests(task, sandbox, timeout)`` joins them for a sandbox that already
holds the agent's change:

* ``eval_script(task)``: the bash script to run, in a fresh container of the
  task's image holding the agent's diff, for "swebench" and "r2e" tasks.
  For SWE-bench records it is the ``swebench`` harness's own eval script for
  the record's repository and version (``MAP_REPO_VERSION_TO_SPECS``: reset
  the test files to ``base_commit``, apply ``test_patch``, run the
  repository's test command - pytest, Django's ``tests/runtests.py``,
  sympy's ``bin/test`` ... - on the test files of the patch), or the record's
  own ``eval_script`` (swebench >= 5 records); for R2E-Gym records it runs the
  image's hidden tests.  Its output is framed by the harness's start / end
  markers and ends with the test command's exit status.
* ``resolved(task, log) -> Verdict``: SWE-bench semantics, resolved iff every
  FAIL_TO_PASS and every PASS_TO_PASS test passes (PASSED, or XFAIL as the
  harness counts it); for R2E-Gym, iff the parsed status map equals
  ``expected_output_json``.  Per-test statuses come from the ``swebench`` log
  parser of the repository (``MAP_REPO_TO_PARSER``, or the record's
  ``log_parser``) and from a scan of the per-test lines that keeps test ids
  containing spaces whole.  A run is *not* resolved, whatever the parser says,
  when the log contradicts itself:

  - a test reported both passing and failing (a later fake PASSED line does
    not override an earlier FAILED one);
  - a summary line disagreeing with the per-test lines: pytest's
    ``N failed`` / ``N errors`` / ``N passed`` against its FAILED / ERROR /
    PASSED lines, Django's ``FAILED (failures=F, errors=E)`` against its
    ``FAIL:`` / ``ERROR:`` blocks, sympy's ``tests finished: P passed, F
    failed, ... E exceptions`` against its ``ok`` / ``F`` / ``E`` lines, or
    two different summary lines;
  - no summary line where the runner always prints one (the run did not
    finish, e.g. ``os._exit``), missing markers, or a non-zero exit status
    with no failing test in the log.

Code under test runs inside the test process and can print anything; these
checks make the printed record agree with itself and with the exit status,
which a patch cannot fake without also making the real run agree.

Code under test can still rewrite the run itself (force every report to
"passed", replace test functions with no-ops, or capture the real output
and print a consistent forged one at exit).  **Canaries** detect that:
``run_tests`` draws, per evaluation, a ``Canaries`` pair of test names with
a random nonce (``draw_canaries``; never shown to the agent), and
``eval_script(task, canaries)`` appends one must-pass and one must-fail test
to each test file holding a FAIL_TO_PASS / PASS_TO_PASS test, right after
the test patch is applied and before the start marker.  ``resolved`` then
requires the must-pass canary reported passing only and the must-fail
canary reported failing only; anything else (forced, missing, both) is not
resolved.  Formats with canaries: pytest ``-rA`` logs (the swebench pytest
parsers, Sphinx's tox-run pytest, the fallback for repositories swebench
does not know, R2E-Gym's ``r2e_tests``), Django's ``runtests.py`` (a
``unittest.TestCase`` class) and sympy's ``bin/test`` (functions).  Other
log formats (the non-Python parsers) get none: ``Verdict.canaries`` is
False for them.
"""
from __future__ import annotations

import base64
import re
import secrets
import shlex
import types
from typing import Any, Mapping, NamedTuple

from aem_jax.envs.swe.tasks import Task, TaskFormatError

START = ">>>>> Start Test Output"
END = ">>>>> End Test Output"
EXIT = ">>>>> Test Exit Code"
_PASSING = ("PASSED", "XFAIL")
_FAILING = ("FAILED", "ERROR")
_PYTEST_LINE = re.compile(r"^(PASSED|FAILED|ERROR|XFAIL|XPASS|SKIPPED) (.+)$")
_PYTEST_SUMMARY = re.compile(
    r"^=*\s*((?:\d+ (?:failed|passed|errors?|skipped|xfailed|xpassed|warnings?|deselected|"
    r"rerun)(?:, )?)+) in [\d.]+s(?: \([^)]*\))?\s*=*$")
_DJANGO_RAN = re.compile(r"^Ran (\d+) tests? in [\d.]+s$")
_DJANGO_RESULT = re.compile(r"^(OK|FAILED)(?: \((.*)\))?$")
_DJANGO_LINE = re.compile(r"^(.+?) \.\.\. +(ok|OK|FAIL|ERROR|skipped.*|expected failure|"
                          r"unexpected success)$")
_DJANGO_BLOCK = re.compile(r"^(FAIL|ERROR): (.+)$")
_SYMPY_SUMMARY = re.compile(r"tests finished: (.*?) in [\d.]+ seconds")
# sympy's bin/test --verbose: "test_name ok" (a file's last test ends with "[OK]" / "[FAIL]").
_SYMPY_LINE = re.compile(r"^(test_\S+) +(ok|F|E|f|X|s)(?: +\[(?:OK|FAIL)\])?$")
_PYTEST_NONE = re.compile(r"^=*\s*no tests ran in [\d.]+s\s*=*$")
_DJANGO_STATUS = {"ok": "PASSED", "OK": "PASSED", "FAIL": "FAILED", "ERROR": "ERROR",
                  "expected failure": "XFAIL", "unexpected success": "FAILED"}
_SYMPY_STATUS = {"ok": "PASSED", "F": "FAILED", "E": "ERROR", "f": "XFAIL", "X": "FAILED"}
_EXIT = re.compile(re.escape(EXIT) + r":\s*(-?\d+)")


class Verdict(NamedTuple):
    """The judgement of one test log."""

    resolved: bool
    reason: str  # one line
    tests: dict[str, str]  # required test id -> status ("MISSING" when not reported)
    canaries: bool = False  # whether evaluator canaries were placed and checked
    tampered: bool = False  # a canary had the wrong outcome (the run was tampered with)


# -- the swebench package --------------------------------------------------------

def _swebench():
    try:
        from swebench.harness import constants
        from swebench.harness import log_parsers
    except ImportError as err:
        raise ImportError(f"grading SWE-bench records needs the swebench package ({err}); "
                          "install the SWE extra: pip install 'aem_jax[swe]'") from err
    return constants, log_parsers


# Repositories the swebench package has no specification for (SWE-Gym's: pandas,
# moto, mypy, dask, pydantic, ...) run pytest on the test files of the test patch
# in the SWE-bench image layout, read by the harness's pytest parser.
FALLBACK_TEST_CMD = "pytest -rA"
FALLBACK_PARSER = "parse_log_pytest"


def _known_repo(repo: str) -> bool:
    constants, _ = _swebench()
    return repo in getattr(constants, "MAP_REPO_VERSION_TO_SPECS", {})


def _specs(repo: str, version: str) -> dict[str, Any] | None:
    """The swebench specification of (repo, version); None for repositories it does not know."""
    constants, _ = _swebench()
    table = getattr(constants, "MAP_REPO_VERSION_TO_SPECS", None)  # removed in swebench 5
    return None if table is None else table.get(repo, {}).get(version)


def check_swebench_record(record: Mapping[str, Any], where: str) -> None:
    """Raises ``TaskFormatError`` unless the installed swebench can grade ``record``.

    A repository swebench does not know is graded with ``FALLBACK_TEST_CMD``; an
    unknown version of a repository it knows is an error (a wrong record).
    """
    if record.get("eval_script") and record.get("log_parser"):
        _parser(record)  # swebench >= 5 records carry their script and parser name
        return
    if record.get("version") in (None, ""):
        raise TaskFormatError(f"{where}: SWE-bench record misses required field 'version' "
                              "(it selects the repository's test command and log parser)")
    constants, _ = _swebench()
    if getattr(constants, "MAP_REPO_VERSION_TO_SPECS", None) is None:
        raise TaskFormatError(f"{where}: the installed swebench (>= 5) has no per-repository test "
                              "specifications; install swebench<5 or give 'eval_script' and 'log_parser'")
    if _known_repo(record["repo"]) and _specs(record["repo"], str(record["version"])) is None:
        raise TaskFormatError(
            f"{where}: the installed swebench package has no test specification for repo "
            f"{record['repo']!r} version {record['version']!r}; give the record 'eval_script' "
            "and 'log_parser', or 'eval_command' (a pytest command, graded like local tasks)")


def _parser(record: Mapping[str, Any]):
    _, log_parsers = _swebench()
    name = record.get("log_parser")
    if name:
        registry = getattr(log_parsers, "PARSER_REGISTRY", None)  # swebench >= 5
        if registry is not None and name in registry:
            return registry[name]
        for module in ("python", "javascript", "c", "go", "java", "php", "ruby", "rust"):
            parser = getattr(getattr(log_parsers, module, None), name, None)
            if parser is not None:
                return parser
        raise TaskFormatError(f"log_parser {name!r} is not a parser of the installed swebench")
    table = getattr(log_parsers, "MAP_REPO_TO_PARSER", {})
    if record["repo"] not in table:
        return _parser({"log_parser": FALLBACK_PARSER})
    return table[record["repo"]]


def _record(task: Task) -> dict[str, Any]:
    return {**task.extra, "instance_id": task.instance_id, "repo": task.repo,
            "base_commit": task.base_commit, "test_patch": task.test_patch,
            "FAIL_TO_PASS": list(task.FAIL_TO_PASS), "PASS_TO_PASS": list(task.PASS_TO_PASS)}


def _with_exit_status(lines: list[str]) -> list[str]:
    """Records the test command's status after the end marker (as swebench >= 5 does)."""
    for i, line in enumerate(lines):
        if END in line:
            return [*lines[:i], "__aem_status=$?", line, f'echo "{EXIT}: $__aem_status"',
                    *lines[i + 1:]]
    raise ValueError(f"eval script has no {END!r} marker line")


def test_command(task: Task) -> str:
    """The command line of the tests (the runner decides which summary lines are required)."""
    if task.grading == "swebench" and not task.extra.get("eval_script"):
        specs = _specs(task.repo, str(task.extra.get("version")))
        return FALLBACK_TEST_CMD if specs is None else specs["test_cmd"]
    return task.extra.get("eval_script") or task.eval_command or task.test_command


def _fallback_script(task: Task) -> list[str]:
    """The SWE-bench eval script's steps with ``FALLBACK_TEST_CMD`` (repositories swebench lacks)."""
    from swebench.harness.test_spec.python import get_test_directives
    from swebench.harness.utils import get_modified_files

    workdir, files = task.workdir or "/testbed", " ".join(get_modified_files(task.test_patch))
    delimiter = "EOF_AEM_TEST_PATCH"
    return [*([task.shell_init] if task.shell_init else []), f"cd {workdir}",
            f"git config --global --add safe.directory {workdir}",
            f"git checkout {task.base_commit} {files}",
            f"git apply -v - <<'{delimiter}'\n{task.test_patch}\n{delimiter}",
            f": '{START}'", " ".join([FALLBACK_TEST_CMD, *get_test_directives(_record(task))]),
            f": '{END}'", f"git checkout {task.base_commit} {files}"]


def eval_script(task: Task, canaries: Canaries | None = None) -> str:
    """The bash script that runs the hidden tests of a "swebench" or "r2e" task.

    With ``canaries`` (``draw_canaries``), they are appended to their test files
    after the test patch is applied, just before the start marker.
    """
    if task.grading == "swebench":
        record = _record(task)
        if record.get("eval_script"):
            lines = [line for line in record["eval_script"].strip().split("\n")
                     if line not in ("#!/bin/bash", "set -uxo pipefail")]
        elif _known_repo(task.repo):
            from swebench.harness.test_spec.create_scripts import make_eval_script_list

            specs = _specs(task.repo, str(record.get("version")))
            lines = make_eval_script_list(record, specs, "testbed", task.workdir or "/testbed",
                                          task.base_commit, task.test_patch)
        else:
            lines = _fallback_script(task)
    elif task.grading == "r2e":
        lines = [f"cd {task.workdir or '/testbed'}", f": '{START}'", task.eval_command, f": '{END}'"]
    else:
        raise ValueError(f"eval_script is for 'swebench' and 'r2e' tasks; task "
                         f"{task.instance_id!r} is graded {task.grading!r} (reward.evaluate)")
    lines = _with_canaries(lines, canaries)
    return "\n".join(["#!/bin/bash", "set -uxo pipefail", *_with_exit_status(lines)]) + "\n"


# -- canaries ------------------------------------------------------------------------

# The log formats canaries are written for, by the name of the record's swebench parser
# (sphinx's tox-run tests print pytest's -rA lines too); other parsers get none.
_CANARY_STYLES = {"parse_log_pytest": "pytest", "parse_log_pytest_options": "pytest",
                  "parse_log_pytest_v2": "pytest", "parse_log_matplotlib": "pytest",
                  "parse_log_seaborn": "pytest", "parse_log_django": "django",
                  "parse_log_sympy": "sympy"}
_WORDS = ("value", "case", "result", "check", "basic", "empty", "default", "order", "format",
          "parse", "input", "output", "name", "type", "items", "state", "limit", "repr")
_CANARY_EOF = "EOF_AEM_CANARY"


class Canaries(NamedTuple):
    """Evaluator-added tests: ``passing[i]`` must pass and ``failing[i]`` must fail.

    ``files[i]`` is the test file (relative to the task's workdir) that gets
    ``blocks[i]`` appended; for R2E-Gym (``files == ()``) the block goes into the
    first ``test_*.py`` of the image's hidden test directory.  The names carry
    a random nonce drawn per evaluation, so no patch can name them in advance.
    """

    style: str  # "pytest", "django" or "sympy"
    files: tuple[str, ...]
    passing: tuple[str, ...]
    failing: tuple[str, ...]
    blocks: tuple[str, ...]


def canary_style(task: Task) -> str | None:
    """The canary format of ``task``'s test log, or None where canaries cannot be placed."""
    if task.grading == "r2e":
        return "pytest"  # R2E-Gym's run_tests.sh runs pytest -rA (the only format _resolved_r2e reads)
    if task.grading != "swebench":
        return None
    name = task.extra.get("log_parser") or getattr(_parser(_record(task)), "__name__", "")
    return _CANARY_STYLES.get(str(name))


def _canary_files(task: Task, style: str) -> list[str]:
    """The test files of the test patch that get canaries (those the harness runs)."""
    from swebench.harness.utils import get_modified_files

    patched = [f for f in get_modified_files(task.test_patch) if f.endswith(".py")]
    if style == "pytest":
        holding = {t.split("::")[0] for t in (*task.FAIL_TO_PASS, *task.PASS_TO_PASS) if "::" in t}
        return sorted(f for f in patched if f in holding)
    # Django / sympy ids name no file: every test module of the patch (all of them run).
    base = lambda f: f.rsplit("/", 1)[-1]  # noqa: E731
    return sorted(f for f in patched if base(f).startswith("test") or base(f) == "tests.py")


def draw_canaries(task: Task) -> Canaries | None:
    """Fresh canaries for one evaluation of ``task`` (None where its log format has none)."""
    style = canary_style(task)
    if style is None:
        return None
    files = tuple(_canary_files(task, style)) if task.grading == "swebench" else ()
    if task.grading == "swebench" and not files:
        return None
    rng = secrets.SystemRandom()
    passing, failing, blocks = [], [], []
    for _ in range(max(1, len(files))):
        good, bad = (f"test_{rng.choice(_WORDS)}_{rng.choice(_WORDS)}_{secrets.token_hex(5)}"
                     for _ in range(2))
        a, b = rng.randint(2, 10_000), rng.randint(2, 10_000)
        ok, wrong = f"assert {a} + {b} == {a + b}", f"assert {a} * {b} == {a * b + rng.randint(1, 9)}"
        if style == "django":  # the runner collects unittest.TestCase classes
            alias = f"_unittest_{secrets.token_hex(4)}"
            cls = f"{rng.choice(_WORDS).title()}{rng.choice(_WORDS).title()}Tests{secrets.token_hex(3)}"
            block = (f"\n\nimport unittest as {alias}\n\n\nclass {cls}({alias}.TestCase):\n"
                     f"    def {good}(self):\n        {ok}\n\n    def {bad}(self):\n        {wrong}\n")
        else:  # pytest and sympy's bin/test collect module-level test_ functions
            block = f"\n\ndef {good}():\n    {ok}\n\n\ndef {bad}():\n    {wrong}\n"
        passing.append(good)
        failing.append(bad)
        blocks.append(block)
    return Canaries(style, files, tuple(passing), tuple(failing), tuple(blocks))


def _canary_lines(canaries: Canaries) -> list[str]:
    """Script lines appending the canaries (run after the test patch, before the tests)."""
    if not canaries.files:  # R2E-Gym: the hidden tests' directory, as R2E_EVAL_COMMAND finds it
        return ["for __aem_d in /r2e_tests /root/r2e_tests r2e_tests; do if [ -d \"$__aem_d\" ]; then "
                "set -- \"$__aem_d\"/test_*.py; if [ -f \"$1\" ]; then "
                f"cat >> \"$1\" <<'{_CANARY_EOF}'\n{canaries.blocks[0]}{_CANARY_EOF}\nfi; break; fi; done"]
    return [f"if [ -f {shlex.quote(path)} ]; then cat >> {shlex.quote(path)} <<'{_CANARY_EOF}'\n"
            f"{block}{_CANARY_EOF}\nfi" for path, block in zip(canaries.files, canaries.blocks)]


def _with_canaries(lines: list[str], canaries: Canaries | None) -> list[str]:
    if canaries is None:
        return lines
    for i, line in enumerate(lines):
        if START in line:
            return [*lines[:i], *_canary_lines(canaries), *lines[i:]]
    raise ValueError(f"eval script has no {START!r} marker line")


def _canary_statuses(name: str, index: Mapping[str, set[str]], parsed: Mapping[str, str]) -> set[str]:
    """Every status the log reports for the canary ``name`` (a test id or name containing it)."""
    pattern = re.compile(rf"(?<![\w]){re.escape(name)}(?!\w)")
    found = {status for key, statuses in index.items() if pattern.search(key) for status in statuses}
    return found | {status for key, status in parsed.items() if pattern.search(key)}


def _canary_problem(canaries: Canaries, statuses) -> tuple[str | None, bool]:
    """(why the canaries' outcomes fail the run, whether that is a sign of tampering)."""
    missing = None
    for names, want in ((canaries.passing, "PASSED"), (canaries.failing, "FAILED")):
        for name in names:
            seen = statuses(name)
            if not seen:
                missing = missing or ("an evaluator canary test was not reported (the test files "
                                      "did not run as the harness runs them)")
            elif seen != {want}:
                kind = "pass" if want == "PASSED" else "fail"
                return (f"tampering: an evaluator canary test that must {kind} was reported "
                        f"{'/'.join(sorted(seen))}"), True
    return missing, False


# -- reading the log ---------------------------------------------------------------

def _status_index(log: str) -> dict[str, set[str]]:
    """Test id -> every status the per-test lines report for it, read once.

    A pytest line ``STATUS rest`` is filed under ``rest``, under each prefix of
    it that ends before a " - " (the message of FAILED / ERROR / XFAIL lines;
    ids may contain spaces), and under its first word (the id cut at its first
    space, as the swebench pytest parser stores it: ``tests/t.py::test[a b]`` ->
    ``tests/t.py::test[a``).  Django's ``id ... ok`` lines and ``FAIL: id``
    blocks and sympy's ``id ok`` lines are filed under the id.
    """
    index: dict[str, set[str]] = {}
    for line in log.splitlines():
        line = line.strip()
        m = _PYTEST_LINE.match(line)
        if m:
            status, rest = m.groups()
            parts = rest.split(" - ")
            for key in {rest, rest.split()[0], *(" - ".join(parts[:i]) for i in range(1, len(parts)))}:
                index.setdefault(key, set()).add(status)
            continue
        m = _DJANGO_LINE.match(line)
        if m:
            index.setdefault(m.group(1), set()).add(_DJANGO_STATUS.get(m.group(2), "SKIPPED"))
            continue
        m = _DJANGO_BLOCK.match(line)
        if m:
            index.setdefault(m.group(2), set()).add("FAILED" if m.group(1) == "FAIL" else "ERROR")
            continue
        m = _SYMPY_LINE.match(line)
        if m:
            index.setdefault(m.group(1), set()).add(_SYMPY_STATUS.get(m.group(2), "SKIPPED"))
    return index


def _any_failure(log: str, parsed: Mapping[str, str]) -> bool:
    """Whether any test of the log (required or not) is reported failing."""
    if set(parsed.values()) & set(_FAILING):
        return True
    for line in log.splitlines():
        line = line.strip()
        m = _PYTEST_LINE.match(line) or _DJANGO_BLOCK.match(line)
        if m and m.group(1) in ("FAILED", "ERROR", "FAIL"):
            return True
        m = _SYMPY_LINE.match(line)
        if m and m.group(2) in ("F", "E"):
            return True
    return False


def _counts(text: str) -> dict[str, int]:
    counts = {}
    for part in text.split(","):
        number, _, word = part.strip().partition(" ")
        if number.isdigit():
            counts[word.strip()] = int(number)
    return counts


def _pytest_lines(log: str) -> dict[str, set[str]]:
    by_status: dict[str, set[str]] = {s: set() for s in ("PASSED", "FAILED", "ERROR", "XFAIL", "XPASS")}
    for line in log.splitlines():
        m = _PYTEST_LINE.match(line.strip())
        if m and m.group(1) in by_status:
            by_status[m.group(1)].add(m.group(2).split(" - ")[0] if m.group(1) in _FAILING
                                      else m.group(2))
    return by_status


def _contradiction(log: str, command: str) -> str | None:
    """Why the log's summary lines disagree with its per-test lines (None if they agree)."""
    lines = [line.strip() for line in log.splitlines()]
    pytest_summaries = {m.group(1) for m in map(_PYTEST_SUMMARY.match, lines) if m}
    pytest_summaries |= {"" for line in lines if _PYTEST_NONE.match(line)}
    if pytest_summaries:
        if len(pytest_summaries) > 1:
            return f"several different pytest summaries: {sorted(pytest_summaries)}"
        counts = _counts(next(iter(pytest_summaries)))
        seen = _pytest_lines(log)
        for word, status in (("failed", "FAILED"), ("passed", "PASSED"), ("xfailed", "XFAIL"),
                             ("xpassed", "XPASS")):
            if counts.get(word, 0) != len(seen[status]):
                return (f"pytest's summary says {counts.get(word, 0)} {word} but the log has "
                        f"{len(seen[status])} {status} lines")
        errors = counts.get("errors", counts.get("error", 0))
        if errors != len(seen["ERROR"]):
            return f"pytest's summary says {errors} errors but the log has {len(seen['ERROR'])} ERROR lines"
    elif "pytest" in command and "runtests.py" not in command and "bin/test" not in command:
        return "no pytest summary line: the test run did not finish"
    ran = {m.group(1) for m in map(_DJANGO_RAN.match, lines) if m}
    results = {m.group(0) for m in map(_DJANGO_RESULT.match, lines) if m}
    if ran or results:
        if len(ran) != 1 or len(results) != 1:
            return f"Django's runner summaries disagree or are missing: Ran {sorted(ran)}, {sorted(results)}"
        result = _DJANGO_RESULT.match(next(iter(results)))
        counts = {k.strip(): int(v) for k, v in re.findall(r"([\w ]+)=(\d+)", result.group(2) or "")}
        blocks = [m.group(0) for m in map(_DJANGO_BLOCK.match, lines) if m]  # one per failure
        bad = counts.get("failures", 0) + counts.get("errors", 0)
        ok = bad + counts.get("unexpected successes", 0) == 0
        if (result.group(1) == "OK") != ok or bad != len(blocks):
            return (f"Django's runner says {result.group(0)!r} but the log has {len(blocks)} "
                    "FAIL:/ERROR: blocks")
    elif "runtests.py" in command:
        return "no 'Ran N tests' summary from Django's runner: the test run did not finish"
    sympy = [m.group(1) for m in map(_SYMPY_SUMMARY.search, lines) if m]
    if sympy:
        if len(set(sympy)) != 1:
            return f"several different sympy summaries: {sorted(set(sympy))}"
        counts = _counts(sympy[0])
        marks: dict[str, set[str]] = {"ok": set(), "F": set(), "E": set()}
        for m in map(_SYMPY_LINE.match, lines):
            if m and m.group(2) in marks:
                marks[m.group(2)].add(m.group(1))
        for word, mark in (("passed", "ok"), ("failed", "F"), ("exceptions", "E")):
            if counts.get(word, 0) != len(marks[mark]):
                return (f"sympy's summary says {counts.get(word, 0)} {word} but the log has "
                        f"{len(marks[mark])} '{mark}' test lines")
    elif "bin/test" in command:
        return "no 'tests finished' summary from sympy's runner: the test run did not finish"
    return None


def _slice(log: str) -> tuple[str | None, int | None]:
    """The test output between the first start and the last end marker, and the exit status."""
    start, end = log.find(START), log.rfind(END)
    if start < 0 or end < start:
        return None, None
    statuses = _EXIT.findall(log[end:])
    return log[start + len(START):end], (int(statuses[-1]) if statuses else None)


def resolved(task: Task, log: str, canaries: Canaries | None = None) -> Verdict:
    """Judges the output of ``eval_script(task, canaries)`` (see module docstring)."""
    text, exit_status = _slice(log)
    placed = canaries is not None
    if text is None:
        return Verdict(False, "the test output markers are missing (the test patch did not "
                              "apply or the script failed before the tests)", {}, placed)
    if task.grading == "r2e":
        return _resolved_r2e(task, text, exit_status, canaries)
    parsed: dict[str, str] = {}
    if task.grading == "swebench":
        spec = types.SimpleNamespace(instance_id=task.instance_id, repo=task.repo,
                                     version=str(task.extra.get("version")))
        parsed = _parser(_record(task))(text, spec)
    tests, index = {}, _status_index(text)
    for test_id in (*task.FAIL_TO_PASS, *task.PASS_TO_PASS):
        statuses = index.get(test_id, set()) | ({parsed[test_id]} if test_id in parsed else set())
        if not statuses:
            tests[test_id] = "MISSING"
        elif len(statuses) > 1 and statuses & set(_FAILING) and statuses & set(_PASSING):
            tests[test_id] = "CONFLICT"
        else:
            tests[test_id] = sorted(statuses, key=lambda s: s not in _FAILING)[0]
    problem = _contradiction(text, test_command(task))
    if problem:
        return Verdict(False, f"the test log contradicts itself: {problem}", tests, placed)
    missing = None
    if canaries is not None:
        missing, tampered = _canary_problem(canaries, lambda name: _canary_statuses(name, index, parsed))
        if tampered:
            return Verdict(False, missing, tests, placed, True)
    failing = [t for t, s in tests.items() if s not in _PASSING]
    if failing:
        return Verdict(False, f"{len(failing)} of {len(tests)} required tests do not pass: "
                              + ", ".join(f"{t} ({tests[t]})" for t in failing[:5]), tests, placed)
    if missing:
        return Verdict(False, missing, tests, placed)
    if canaries is not None and exit_status == 0:
        return Verdict(False, "tampering: the tests exited with status 0 although an evaluator "
                              "canary test failed", tests, placed, True)
    if exit_status not in (None, 0) and not _any_failure(text, parsed):
        return Verdict(False, f"the tests exited with status {exit_status} but the log reports "
                              "no failing test", tests, placed)
    return Verdict(True, f"resolved: all {len(tests)} required tests pass", tests, placed)


def _resolved_r2e(task: Task, text: str, exit_status: int | None,
                  canaries: Canaries | None = None) -> Verdict:
    """R2E-Gym: the parsed pytest status map (canaries set apart) must equal ``expected_output_json``."""
    import json

    placed = canaries is not None
    expected = task.extra.get("expected_output_json")
    expected = json.loads(expected) if isinstance(expected, str) else dict(expected or {})
    strip = lambda name: re.sub(r"\x1b\[\d+m", "", name).split(" - ")[0]  # noqa: E731
    expected = {strip(k): v for k, v in expected.items()}
    parsed: dict[str, set[str]] = {}
    summary = text.split("short test summary info", 1)
    for line in (summary[1].splitlines() if len(summary) > 1 else []):
        m = _PYTEST_LINE.match(line.strip())
        if m and m.group(1) in ("PASSED", "FAILED", "ERROR"):
            name = strip(".".join(m.group(2).split("::")[1:]))
            parsed.setdefault(name, set()).add(m.group(1))
    names = set(canaries.passing + canaries.failing) if canaries else set()
    tests = {k: ("CONFLICT" if len(v) > 1 else next(iter(v))) for k, v in parsed.items() if k not in names}
    # R2E-Gym's runners are pytest; a short summary without pytest's final line is a cut-off run.
    problem = _contradiction(text, "pytest" if len(summary) > 1 else "")
    if problem:
        return Verdict(False, f"the test log contradicts itself: {problem}", tests, placed)
    if canaries is not None:
        why, tampered = _canary_problem(canaries, lambda name: parsed.get(name, set()))
        if why:
            return Verdict(False, why, tests, placed, tampered)
    if tests != expected:
        diff = sorted(k for k in set(tests) | set(expected) if tests.get(k) != expected.get(k))
        return Verdict(False, f"{len(diff)} tests differ from the expected statuses: "
                              + ", ".join(f"{k} ({tests.get(k, 'MISSING')} != "
                                          f"{expected.get(k, 'absent')})" for k in diff[:5]), tests, placed)
    return Verdict(True, f"resolved: all {len(expected)} tests have their expected status", tests, placed)


_SCRIPT_DIR = "/tmp/.aem_eval"
_CHUNK = 60_000  # base64 characters per command line (well under the kernel's argument limit)


def run_tests(task: Task, sandbox, timeout: float = 1800.0, *, canaries: bool = True
              ) -> tuple[Verdict, str]:
    """Runs ``eval_script(task, ...)`` in ``sandbox`` (holding the agent's change) and judges it.

    ``sandbox`` needs ``execute(command, timeout) -> ExecResult`` (local or
    container).  With ``canaries`` (the default) fresh ones are drawn for this
    run where the log format allows (``draw_canaries``).  The script is staged
    outside the repository: in the evaluator directory where the sandbox has
    one (``stage_evaluator``, read-only to the code under test), else in
    chunks under /tmp.  Returns the verdict and the log.
    """
    drawn = draw_canaries(task) if canaries else None
    script = eval_script(task, drawn)
    if hasattr(sandbox, "stage_evaluator"):
        path = f"{sandbox.stage_evaluator({'eval.sh': script.encode()})}/eval.sh"
    else:
        data = base64.b64encode(script.encode()).decode()
        path = f"{_SCRIPT_DIR}/eval.sh"
        staged = sandbox.execute(f"mkdir -p {_SCRIPT_DIR} && : > {path}.b64", timeout=60)
        for start in range(0, len(data), _CHUNK):
            if staged.returncode != 0:
                break
            staged = sandbox.execute(f"printf %s {data[start:start + _CHUNK]} >> {path}.b64", timeout=60)
        if staged.returncode == 0:
            staged = sandbox.execute(f"base64 -d {path}.b64 > {path}", timeout=60)
        if staged.returncode != 0:
            return Verdict(False, f"could not stage the eval script: {staged.output.strip()[-300:]}",
                           {}, drawn is not None), ""
    result = sandbox.execute(f"bash {path}", timeout=timeout)
    if result.timed_out:
        return Verdict(False, f"the tests timed out after {timeout:g} s", {}, drawn is not None), result.output
    return resolved(task, result.output, drawn), result.output
