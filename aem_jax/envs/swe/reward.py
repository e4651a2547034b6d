"""The SWE reward: apply only the agent's change to a trusted base, run the tests.

``evaluate(task, diff, sandbox)`` follows the SWE-bench harness (Jimenez et
al., 2024) with the reward treated as the target of an adversary (an RL
policy finds every hole): ``sandbox`` is *fresh*, holding the repository at
its base commit, and the task is resolved iff every step below succeeds.

1. **One reader of the diff.**  ``diffs.parse`` reads the diff strictly (git
   format only: quoted paths, renames, modes, binary; anything else is
   rejected).  The same parsed records are checked and applied: the diff
   may not touch a protected path (test files, ``conftest.py`` at any depth,
   every pytest configuration file, ``sitecustomize`` / ``usercustomize`` /
   ``.pth``; ``diffs.is_protected_path``).  Such diffs are *rejected*, not
   partially restored, so the agent sees why it got 0.  Then the hidden
   ``test_patch`` is applied.  Both are applied by ``diffs.apply`` in
   Python to base files read from the fresh sandbox: no ``git apply``, no
   ``patch`` fallback, no repository configuration involved.
2. **Canaries.**  Into every test file that holds a required test, the
   evaluator appends two tests with random names made of the file's own
   words: one that must pass and one that must fail (an ``assert``).
3. **A runner nothing can shadow** (``_pytest_runner.py``), staged in an
   evaluator directory outside the workspace and started with ``python -I``,
   an explicit ``-c`` copy of the base configuration, ``--rootdir``, plugin
   autoload off.  Where the sandbox supports it the workspace is sealed first
   (``LocalSandbox.seal_workspace``: the files the evaluator wrote cannot be
   modified, replaced or deleted by the code under test).  Outcomes come from
   the JSON report the runner writes into the evaluator directory, never from
   the printed output.
4. **The judge** (``judge_report``): the run did not time out; a report
   exists; no guarded pytest / pluggy function was replaced; reported
   outcomes agree with the exceptions observed in every phase; pytest's
   summary counts agree with the per-test reports; the must-fail canary
   failed with an ``AssertionError`` and the must-pass canary passed (code
   under test that forces passes, skips, xfails or exits early trips one of
   these); the exit status is the report's and is 1 (the failing canary);
   every FAIL_TO_PASS and PASS_TO_PASS test passed in every phase (one
   failed phase is a failure, whatever else was reported for the test).
   Any tampering sign scores 0.

The grader is chosen by ``task.grading`` (``grader_name``): "pytest" (the
runner and judge above, the default), "swebench" and "r2e" (``run_harness``:
the task's own harness script, ``grading.run_tests``, judged from its log by
the ``swebench`` parsers with ``grading.resolved``'s consistency checks).
Step 1 holds for every grader: the agent's diff is read by the strict parser,
rejected if it touches a protected path, and applied by the evaluator; the
harness graders then reset the test files of the test patch to the base
commit and apply the test patch themselves, as the SWE-bench harness does,
then append canaries (a must-pass and a must-fail test with per-evaluation
random names) to the test files where the log format allows: pytest, Django
and sympy logs, R2E-Gym (``grading.draw_canaries``; ``Evaluation.canaries``
is False for other formats, whose verdict is only as strong as a log can be).
Other test frameworks plug in through ``register_grader``: a grader is
``fn(task, sandbox, timeout, prepared) -> Evaluation``, selected by a task's
``extra["grader"]`` when given.  ``parse_pytest_outcomes`` / ``judge`` read
pytest ``-rA`` logs for graders that only have a log.
"""
from __future__ import annotations

import ast
import base64
import dataclasses
import json
import os
import re
import secrets
import shlex
from typing import Any, Callable, Mapping, Protocol

from aem_jax.envs.swe import diffs
from aem_jax.envs.swe.sandbox import ExecResult
from aem_jax.envs.swe.tasks import Task

_OUTCOME = re.compile(r"^(PASSED|FAILED|ERROR|XPASS|XFAIL|SKIPPED) (\S+?)(?: - .*)?$")
_SUMMARY = re.compile(r"^=*\s*((?:\d+ \w+(?:, )?)+)(?: in [\d.]+s.*)?\s*=*$")
_RUNNER_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_pytest_runner.py")
MAX_DIFF_CHARS = 8 << 20
MAX_REPORT_BYTES = 32 << 20
# pytest's configuration files, in the order pytest looks for them in a directory.
_CONFIG_FILES = ("pytest.toml", ".pytest.toml", "pytest.ini", ".pytest.ini", "pyproject.toml",
                 "tox.ini", "setup.cfg")
_SEVERITY = {"PASSED": 0, "XPASS": 0, "SKIPPED": 1, "XFAIL": 1, "ERROR": 2, "FAILED": 2}


class Sandbox(Protocol):
    """What the reward needs from a sandbox (local or container)."""

    workdir: str

    def execute(self, command: str, timeout: float = 60.0) -> ExecResult:
        ...


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The outcome of evaluating one diff."""

    resolved: bool
    reason: str  # one line for logs and the final observation
    tests: dict[str, str] = dataclasses.field(default_factory=dict)  # test id -> outcome
    returncode: int | None = None
    output: str = ""
    tampered: bool = False  # a sign of tampering was found (always scores 0)
    canaries: bool | None = None  # harness graders: whether canaries were placed (None: not a harness run)


class EvaluationError(RuntimeError):
    """The evaluator could not run (sandbox broken); the episode scores 0."""


# -- log grading (for graders that only have pytest's printed report) ---------------------


def parse_pytest_outcomes(output: str) -> dict[str, str]:
    """Test id -> outcome from pytest ``-rA`` lines; a failure is never overridden by a later pass."""
    outcomes: dict[str, str] = {}
    for line in output.splitlines():
        match = _OUTCOME.match(line.rstrip())
        if match:
            test, outcome = match.group(2), match.group(1)
            if _SEVERITY[outcome] >= _SEVERITY.get(outcomes.get(test, "PASSED"), 0) or test not in outcomes:
                outcomes[test] = outcome
    return outcomes


def _summary_counts(output: str) -> dict[str, int] | None:
    counts = None
    for line in output.splitlines():
        match = _SUMMARY.match(line.strip())
        if match and re.search(r"\d+ (passed|failed|error|errors|skipped|xfailed|xpassed)\b", line):
            counts = {}
            for number, word in re.findall(r"(\d+) (\w+)", match.group(1)):
                counts[{"errors": "error"}.get(word, word)] = int(number)
    return counts


def judge(task: Task, result: ExecResult) -> Evaluation:
    """Resolution from a pytest ``-rA`` log and the exit status (log-only graders).

    Weaker than ``judge_report`` (printed output can be forged by code under
    test): the exit status must be 0, every required test PASSED, nothing
    FAILED or ERROR, and the final summary counts must match the per-test lines.
    """
    tests = parse_pytest_outcomes(result.output)
    required = [*task.FAIL_TO_PASS, *task.PASS_TO_PASS]
    not_passed = [t for t in required if tests.get(t) != "PASSED"]
    bad = sorted(t for t, outcome in tests.items() if outcome in ("FAILED", "ERROR"))
    counts = _summary_counts(result.output)
    line_counts = {"passed": sum(o == "PASSED" for o in tests.values()),
                   "failed": sum(o == "FAILED" for o in tests.values())}
    if result.timed_out:
        reason = "the tests timed out"
    elif result.returncode != 0:
        reason = f"the test command exited with status {result.returncode}"
    elif not_passed or bad:
        reason = f"tests not reported as passed: {sorted(set(not_passed) | set(bad))[:10]}"
    elif counts is None or any(counts.get(k, 0) != v for k, v in line_counts.items()):
        reason = f"the summary counts {counts} contradict the per-test lines {line_counts}"
    else:
        return Evaluation(True, f"resolved: all {len(required)} tests pass", tests,
                          result.returncode, result.output)
    if not_passed:
        reason += f" ({len(not_passed)} of {len(required)} required tests not passed)"
    return Evaluation(False, reason, tests, result.returncode, result.output)


# -- files in the sandbox ------------------------------------------------------------------


def _read_base(sandbox, paths: list[str], timeout: float) -> dict[str, diffs.File]:
    """The base files among ``paths`` (absent ones left out), read from the fresh sandbox."""
    if hasattr(sandbox, "read_file"):
        found = {}
        for path in paths:
            file = sandbox.read_file(path)
            if file is not None:
                found[path] = file
        return found
    if not paths:
        return {}
    # Generic sandboxes: one command prints "path-b64 mode data-b64" per file.
    script = "".join(
        f"p={shlex.quote(p)}; if [ -f \"$p\" ] && [ ! -L \"$p\" ]; then "
        f"printf '%s %s ' {base64.b64encode(p.encode()).decode()} "
        "$( [ -x \"$p\" ] && echo 755 || echo 644 ); base64 < \"$p\" | tr -d '\\n'; echo; fi; "
        for p in paths)
    result = sandbox.execute(script, timeout=timeout)
    if result.returncode != 0 or result.timed_out:
        raise EvaluationError(f"reading base files failed: {result.output.strip()[-300:]}")
    found = {}
    for line in result.output.splitlines():
        parts = line.split(" ")
        if len(parts) != 3:
            continue
        path = base64.b64decode(parts[0]).decode()
        found[path] = diffs.File(base64.b64decode(parts[2]),
                                 diffs.EXECUTABLE if parts[1] == "755" else diffs.REGULAR)
    return found


def _write(sandbox, changes: Mapping[str, diffs.File | None], timeout: float) -> None:
    """Writes (File) or removes (None) files in the sandbox's workspace."""
    if hasattr(sandbox, "write_file"):
        for path, file in sorted(changes.items()):
            if file is None:
                sandbox.remove_file(path)
            else:
                sandbox.write_file(path, file.data, executable=file.mode == diffs.EXECUTABLE)
        return
    commands = []
    for path, file in sorted(changes.items()):
        quoted = shlex.quote(path)
        if file is None:
            commands.append(f"rm -f -- {quoted}")
            continue
        if len(file.data) > _CHUNK:
            _put_bytes(sandbox, path, file.data, timeout)
            data_command = "true"
        else:
            data_command = f"echo {base64.b64encode(file.data).decode()} | base64 -d > {quoted}"
        commands.append(f"mkdir -p -- \"$(dirname -- {quoted})\" && "
                        + ("" if data_command == "true" else f"rm -f -- {quoted} && ")
                        + f"{data_command} && chmod {'755' if file.mode == diffs.EXECUTABLE else '644'} -- {quoted}")
    # Chunks keep each command far below the kernel's 128 KiB argument limit.
    chunk, size = [], 0
    for command in [*commands, None]:
        if command is None or size + len(command) > 60_000:
            if chunk:
                result = sandbox.execute("set -e; " + "; ".join(chunk), timeout=timeout)
                if result.returncode != 0 or result.timed_out:
                    raise EvaluationError(f"writing files failed: {result.output.strip()[-300:]}")
            chunk, size = [], 0
        if command is not None:
            chunk.append(command)
            size += len(command)


_CHUNK = 48_000  # bytes per shell command (the kernel caps one argument at 128 KiB)


def _put_bytes(sandbox, path: str, data: bytes, timeout: float) -> None:
    """Writes ``data`` to ``path`` in a generic sandbox, in base64 chunks small enough for one argument."""
    quoted, encoded = shlex.quote(path), base64.b64encode(data).decode()
    staging = shlex.quote(path + ".aem_b64")
    steps = [f"mkdir -p -- \"$(dirname -- {quoted})\" && : > {staging}"]
    steps += [f"printf %s {encoded[i:i + _CHUNK]} >> {staging}" for i in range(0, len(encoded), _CHUNK)]
    steps.append(f"rm -f -- {quoted} && base64 -d < {staging} > {quoted} && rm -f -- {staging}")
    for step in steps:
        result = sandbox.execute(step, timeout=timeout)
        if result.returncode != 0 or result.timed_out:
            raise EvaluationError(f"writing {path} failed: {result.output.strip()[-300:]}")


# -- canaries and the runner's staging --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Canaries:
    """Evaluator-added tests: ``passing`` must pass, ``failing`` must fail."""

    passing: tuple[str, ...]
    failing: tuple[str, ...]


def add_canaries(tree: dict[str, diffs.File], test_ids: list[str]) -> Canaries:
    """Appends a must-pass and a must-fail test to each test file of ``test_ids`` (in place).

    Names are random and made of words of the file's own test names, so code
    under test cannot tell them from the hidden tests by name.
    """
    passing, failing = [], []
    rng = secrets.SystemRandom()
    files = sorted({t.split("::")[0] for t in test_ids if t.split("::")[0] in tree
                    and t.split("::")[0].endswith(".py")})
    for path in files:
        text = tree[path].data.decode("utf-8", "replace")
        words = [w for w in re.findall(r"def test_?(\w+)\(", text) for w in w.split("_") if w] \
            or ["value", "case", "result", "check", "basic"]
        names = []
        while len(names) < 2:
            name = "test_" + "_".join(rng.choice(words) for _ in range(rng.randint(2, 3))) \
                + f"_{rng.choice(['case', 'basic', 'edge', 'more', 'again', 'works'])}{rng.randint(2, 99)}"
            if f"def {name}(" not in text and name not in names:
                names.append(name)
        a, b = rng.randint(2, 10_000), rng.randint(2, 10_000)
        # The canaries mention a name the file imports, as the file's own tests do.
        imported = _imported_names(text)
        ref = f"callable({rng.choice(imported)}) and " if imported else ""
        blocks = [f"def {names[0]}():\n    assert {ref}{a} + {b} == {a + b}\n\n\n",
                  f"def {names[1]}():\n    assert {ref}{a} * {b} == {a * b + rng.randint(1, 9)}\n\n\n"]
        if text and not text.endswith("\n"):
            text += "\n"
        # Each canary goes before a random top-level definition (or at the end), so its
        # place in the file and in the run order tells nothing either.
        for block in blocks:
            lines = text.splitlines(keepends=True)
            spot = rng.choice([*_top_level_starts(text), len(lines)])
            text = "".join(lines[:spot]) + ("\n\n" if spot == len(lines) else "") + block + "".join(lines[spot:])
        tree[path] = diffs.File(text.encode(), tree[path].mode)
        passing.append(f"{path}::{names[0]}")
        failing.append(f"{path}::{names[1]}")
    return Canaries(tuple(passing), tuple(failing))


def _imported_names(text: str) -> list[str]:
    """Names a module binds with top-level ``from X import name`` (callables, likely)."""
    try:
        module = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    return sorted({alias.asname or alias.name for node in module.body if isinstance(node, ast.ImportFrom)
                   for alias in node.names if alias.name != "*" and not alias.name.isupper()})


def _top_level_starts(text: str) -> list[int]:
    """0-based line numbers where top-level functions and classes start (decorators included)."""
    try:
        module = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    starts = []
    for node in module.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            starts.append(min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1)
    return starts


def base_pytest_config(base: Mapping[str, diffs.File]) -> tuple[str, bytes]:
    """(file name, content) of the pytest configuration of the base commit's root.

    Mirrors pytest's search in the root directory: the first of pytest.toml,
    .pytest.toml, pytest.ini, .pytest.ini, then pyproject.toml with a
    [tool.pytest...] table, tox.ini with [pytest], setup.cfg with [tool:pytest].
    Without one, an empty ``pytest.ini``.
    """
    markers = {"pyproject.toml": rb"^\[tool\.pytest(\.ini_options)?\]", "tox.ini": rb"^\[pytest\]",
               "setup.cfg": rb"^\[tool:pytest\]"}
    for name in _CONFIG_FILES:
        file = base.get(name)
        if file is None:
            continue
        if name not in markers or re.search(markers[name], file.data, re.M):
            return name, file.data
    return "pytest.ini", b"[pytest]\n"


# -- graders -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Prepared:
    """What ``evaluate`` hands a grader besides the sandbox."""

    canaries: Canaries | None  # set when the grader has ``wants_canaries = True``
    config: tuple[str, bytes]  # the base commit's pytest configuration (name, content)
    base: Mapping[str, diffs.File]  # base files read for the evaluation


Grader = Callable[[Task, Any, float, Prepared], Evaluation]
_GRADERS: dict[str, Grader] = {}


def register_grader(name: str, grader: Grader) -> None:
    """Registers ``grader(task, sandbox, timeout, prepared) -> Evaluation`` under ``name``.

    The sandbox then holds the applied diff and test patch (and canaries when
    the grader asked for them with ``grader.wants_canaries = True``; the test
    patch is left to graders with ``grader.applies_test_patch = True``);
    ``prepared`` is a ``Prepared``.
    """
    if not callable(grader):
        raise TypeError(f"grader must be callable, got {grader!r}")
    _GRADERS[name] = grader


def grader_name(task: Task) -> str:
    """The grader of a task: ``extra["grader"]`` (a registered custom grader), else ``task.grading``."""
    return str(task.extra.get("grader") or task.grading or "pytest")


def evaluate(task: Task, diff: str, sandbox, *, timeout: float = 300.0) -> Evaluation:
    """Evaluates the agent's ``diff`` in ``sandbox``, which must hold the original repo."""
    if not isinstance(diff, str):
        return Evaluation(False, f"rejected: the diff must be text, got {type(diff).__name__}")
    if len(diff) > MAX_DIFF_CHARS:
        return Evaluation(False, f"rejected: the diff has {len(diff)} characters, more than "
                                 f"{MAX_DIFF_CHARS}")
    try:
        patches = diffs.parse(diff)
    except diffs.DiffError as err:
        return Evaluation(False, f"rejected: the diff is not a valid git diff: {err}")
    if not patches:
        return Evaluation(False, "no changes were submitted")
    protected = sorted({p for patch in patches for p in patch.paths if diffs.is_protected_path(p)})
    if protected:
        return Evaluation(False, f"rejected: the diff modifies protected files {protected} "
                                 "(tests, test configuration or start-up hooks)")
    name = grader_name(task)
    grader = _GRADERS.get(name)
    if grader is None:
        return Evaluation(False, f"evaluation failed: no grader {name!r} (registered: {sorted(_GRADERS)})")
    harness = getattr(grader, "applies_test_patch", False)
    try:
        test_patches = diffs.parse(task.test_patch) if task.test_patch.strip() and not harness else []
    except diffs.DiffError as err:
        return Evaluation(False, f"evaluation failed: the task's test patch is invalid: {err}")
    required = [*task.FAIL_TO_PASS, *task.PASS_TO_PASS]
    try:
        paths = sorted({p for patch in [*patches, *test_patches] for p in patch.paths}
                       | {t.split("::")[0] for t in required} | set(_CONFIG_FILES))
        base = _read_base(sandbox, paths, timeout)
        try:
            tree = diffs.apply(base, patches)
        except diffs.DiffError as err:
            return Evaluation(False, f"the submitted diff does not apply: {err}")
        try:
            tree = diffs.apply(tree, test_patches)
        except diffs.DiffError as err:
            return Evaluation(False, f"the hidden test patch does not apply after the diff: {err}")
        canaries = add_canaries(tree, required) if getattr(grader, "wants_canaries", False) else None
        changes = {p: f for p, f in tree.items() if base.get(p) != f}
        changes.update({p: None for p in base if p not in tree})
        _write(sandbox, changes, timeout)
        return grader(task, sandbox, timeout, Prepared(canaries, base_pytest_config(base), base))
    except EvaluationError as err:
        return Evaluation(False, f"evaluation failed: {err}")


# -- the harness graders ("swebench", "r2e") -----------------------------------------------------


def run_harness(task: Task, sandbox, timeout: float, prepared: Prepared) -> Evaluation:
    """Grades with the task's own harness: ``grading.run_tests`` (eval script, then the log judge).

    The sandbox holds the agent's diff (applied by ``evaluate``); the eval
    script resets the test files of the test patch to ``base_commit``,
    applies the test patch, appends fresh canaries to the test files where the
    log format allows (``grading.draw_canaries``), runs the repository's test
    command and ``grading.resolved`` judges the log (FAIL_TO_PASS /
    PASS_TO_PASS, or R2E-Gym's expected status map; a self-contradicting log
    or a canary with the wrong outcome fails).  ``Evaluation.canaries`` says
    whether canaries were placed.
    """
    from aem_jax.envs.swe import grading  # needs the swebench package for "swebench"

    try:
        verdict, log = grading.run_tests(task, sandbox, timeout)
    except (ImportError, ValueError) as err:  # no swebench / no specification for the record
        return Evaluation(False, f"evaluation failed: {err}")
    return Evaluation(verdict.resolved, verdict.reason, dict(verdict.tests), None, log[-20_000:],
                      verdict.tampered, verdict.canaries)


run_harness.applies_test_patch = True
register_grader("swebench", run_harness)
register_grader("r2e", run_harness)


# -- the pytest grader ---------------------------------------------------------------------------


def _stage_generic(sandbox, files: Mapping[str, bytes], timeout: float) -> str:
    directory = f"/tmp/aem_eval_{secrets.token_hex(8)}"
    result = sandbox.execute(f"mkdir -m 755 {directory} {directory}/out", timeout=timeout)
    if result.returncode != 0:
        raise EvaluationError(f"staging the runner failed: {result.output.strip()[-300:]}")
    for name, data in files.items():
        _write_generic_file(sandbox, f"{directory}/{name}", data, timeout)
    return directory


def run_pytest(task: Task, sandbox, timeout: float, prepared: Prepared) -> Evaluation:
    """The default grader: the evaluator's runner, judged by ``judge_report``."""
    ini_name, ini_data = prepared.config
    required = [*task.FAIL_TO_PASS, *task.PASS_TO_PASS]
    canaries = prepared.canaries or Canaries((), ())
    test_ids = sorted(set(required) | set(canaries.passing) | set(canaries.failing))
    with open(_RUNNER_SOURCE, "rb") as f:
        runner = f.read()
    local = hasattr(sandbox, "stage_evaluator")
    if hasattr(sandbox, "seal_workspace"):
        sandbox.seal_workspace()  # code under test cannot rewrite tests or configuration on disk
    # The copy keeps its name: pytest picks the format (and section) from the file name.
    files = {"runner.py": runner, ini_name: ini_data}
    directory = sandbox.stage_evaluator(files) if local else _stage_generic(sandbox, files, timeout)
    args = shlex.split(str(task.extra.get("pytest_args", "")))
    config = {"rootdir": sandbox.workdir, "ini": f"{directory}/{ini_name}",
              "report_path": f"{directory}/out/report.json", "test_ids": test_ids, "args": args}
    config_data = json.dumps(config).encode()
    if local:
        sandbox.stage_evaluator({"config.json": config_data})
        config_arg = f"{directory}/config.json"
    else:
        config_arg = f"{directory}/config.json"
        _write_generic_file(sandbox, config_arg, config_data, timeout)
    python = getattr(sandbox, "python", None) or str(task.extra.get("python") or "python")
    command = (f"cd {shlex.quote(sandbox.workdir)} && PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "
               f"{shlex.quote(python)} -I {directory}/runner.py {config_arg}; status=$?; ")
    if getattr(sandbox, "own_pid_namespace", False):
        # Each command has its own PID namespace and uid: end every process the
        # code under test left behind before the report is read.
        command += "kill -KILL -1 2>/dev/null; "
    command += "exit $status"
    result = sandbox.execute(command, timeout=timeout)
    raw = sandbox.read_evaluator_report() if local else _read_generic_report(sandbox, directory, timeout)
    return judge_report(task, raw, result, canaries)


def _write_generic_file(sandbox, path: str, data: bytes, timeout: float) -> None:
    _put_bytes(sandbox, path, data, timeout)
    result = sandbox.execute(f"chmod 444 {shlex.quote(path)}", timeout=timeout)
    if result.returncode != 0:
        raise EvaluationError(f"staging the runner failed: {result.output.strip()[-300:]}")


def _read_generic_report(sandbox, directory: str, timeout: float) -> bytes | None:
    result = sandbox.execute(f"base64 < {directory}/out/report.json | tr -d '\\n'", timeout=timeout)
    if result.returncode != 0 or result.timed_out:
        return None
    try:
        return base64.b64decode(result.output.strip(), validate=True)
    except ValueError:
        return None


def _category(when: str, outcome: str, wasxfail: bool) -> str:
    """pytest's terminal-summary category of one report (runner + skipping plugins)."""
    if wasxfail:
        return "xfailed" if outcome == "skipped" else ("xpassed" if outcome == "passed" else outcome)
    if when != "call":
        return {"failed": "error", "skipped": "skipped"}.get(outcome, "")
    return outcome


def judge_report(task: Task, raw: bytes | None, result: ExecResult, canaries: Canaries) -> Evaluation:
    """Resolution from the runner's report (see module docstring, step 4)."""
    output = result.output[-20_000:]

    def fail(reason: str, tests=None, tampered=False) -> Evaluation:
        return Evaluation(False, reason, tests or {}, result.returncode, output, tampered)

    if result.timed_out:
        return fail("the tests timed out")
    if raw is None:
        return fail("no test report was written (the run crashed, exited early or was cut short)")
    if len(raw) > MAX_REPORT_BYTES:
        return fail("tampering: the test report is too large", tampered=True)
    try:
        report = json.loads(raw)
        phases = [(str(n), str(w), k if k is None else str(k), bool(s)) for n, w, k, s in report["phases"]]
        reports = [(str(n), str(w), str(o), bool(x)) for n, w, o, x in report["reports"]]
        tampering = [str(t) for t in report["tampering"]]
        stats = {str(k): int(v) for k, v in report["stats"].items()}
        collect = [(str(n), str(o)) for n, o in report.get("collect_reports", [])]
        exit_status = report["exit_status"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return fail("tampering: the test report is malformed", tampered=True)
    if tampering:
        return fail(f"tampering: pytest internals were replaced during the run ({tampering[:5]})",
                    tampered=True)
    # Reported outcomes must agree with the exceptions seen in each phase.
    observed: dict[tuple[str, str], list[tuple[str | None, bool]]] = {}
    for nodeid, when, kind, skipped in phases:
        observed.setdefault((nodeid, when), []).append((kind, skipped))
    seen: dict[tuple[str, str], list[tuple[str, bool]]] = {}
    for nodeid, when, outcome, wasxfail in reports:
        seen.setdefault((nodeid, when), []).append((outcome, wasxfail))
    if sorted((k, len(v)) for k, v in observed.items()) != sorted((k, len(v)) for k, v in seen.items()):
        return fail("tampering: the reported test phases differ from the phases that ran", tampered=True)
    for key, outcomes in seen.items():
        for (outcome, wasxfail), (kind, skipped) in zip(outcomes, observed[key]):
            if outcome == "passed" and kind is not None and not wasxfail:
                return fail(f"tampering: {key[0]} ({key[1]}) raised {kind} but was reported passed",
                            tampered=True)
            if outcome == "skipped" and not wasxfail and not skipped:
                return fail(f"tampering: {key[0]} ({key[1]}) was reported skipped but did not skip",
                            tampered=True)
    # pytest's summary counts must agree with the per-test reports.
    derived: dict[str, int] = {}
    for _, when, outcome, wasxfail in reports:
        category = _category(when, outcome, wasxfail)
        if category:
            derived[category] = derived.get(category, 0) + 1
    for _, outcome in collect:
        category = "error" if outcome == "failed" else "skipped"
        derived[category] = derived.get(category, 0) + 1
    keys = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
    if any(stats.get(k, 0) != derived.get(k, 0) for k in keys):
        return fail(f"tampering: the summary counts { {k: stats.get(k, 0) for k in keys} } contradict "
                    f"the per-test reports { {k: derived.get(k, 0) for k in keys} }", tampered=True)
    # Per test: passed iff every phase ran without an exception and was reported passed.
    tests: dict[str, str] = {}
    by_test: dict[str, list[tuple[str, str | None, str]]] = {}
    for (nodeid, when), items in observed.items():
        for (kind, skipped), (outcome, _) in zip(items, seen[(nodeid, when)]):
            by_test.setdefault(nodeid, []).append((when, kind, outcome))
    for nodeid, items in by_test.items():
        whens = [w for w, _, _ in items]
        clean = all(kind is None and outcome == "passed" for _, kind, outcome in items)
        tests[nodeid] = "PASSED" if clean and "call" in whens else (
            "SKIPPED" if any(o == "skipped" for _, _, o in items) else "FAILED")
    for nodeid in canaries.passing:
        if tests.get(nodeid) != "PASSED":
            return fail(f"tampering: an evaluator canary test that must pass did not ({tests.get(nodeid)})",
                        tests, tampered=True)
    for nodeid in canaries.failing:
        calls = [(kind, outcome) for when, kind, outcome in by_test.get(nodeid, []) if when == "call"]
        if calls != [("builtins.AssertionError", "failed")]:
            return fail("tampering: an evaluator canary test that must fail did not", tests, tampered=True)
    expected_status = 1 if canaries.failing else 0
    if exit_status != result.returncode:
        return fail(f"tampering: the process exited with status {result.returncode}, the report "
                    f"says {exit_status}", tests, tampered=True)
    required = [*task.FAIL_TO_PASS, *task.PASS_TO_PASS]
    not_passed = sorted(t for t in required if tests.get(t) != "PASSED")
    public = {t: o for t, o in tests.items() if t not in canaries.passing and t not in canaries.failing}
    if not_passed:
        return fail(f"tests not passed: {not_passed[:10]} ({len(not_passed)} of {len(required)} "
                    "required tests)", public)
    if exit_status != expected_status:
        if canaries.failing and exit_status == 0:
            return fail("tampering: pytest exited with status 0 although a canary failed",
                        public, tampered=True)
        return fail(f"pytest exited with status {exit_status}", public)
    return Evaluation(True, f"resolved: all {len(required)} tests pass", public, result.returncode, output)


run_pytest.wants_canaries = True
register_grader("pytest", run_pytest)
