"""The evaluator's pytest runner; runs *inside* the evaluation sandbox.

Staged by ``reward.py`` into the evaluator directory (outside the
workspace, files owned by the host, read-only for the sandbox user) and
started as

    cd WORKSPACE && python -I RUNNER CONFIG_JSON

so nothing in the workspace can shadow it: ``-I`` keeps the current
directory, ``PYTHONPATH`` and the user site off ``sys.path`` (the workspace
cannot provide ``pytest.py``, ``sitecustomize.py`` or ``.pth`` files), and
pytest, pluggy and this runner are imported before the workspace is put
on ``sys.path`` (position 0, as ``python -m pytest`` would).  pytest gets an
explicit ``-c`` (a copy of the base commit's configuration written by the
evaluator; its ``pythonpath`` entries resolved against the repository),
``--rootdir`` and ``--confcutdir`` (conftest files from the repository only),
``-p no:cacheprovider`` and ``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``.

The ``Recorder`` plugin records every test phase as it happens, from the
exception the phase raised (``call.excinfo``), not from the report other
plugins may rewrite, and writes one JSON report to ``report_path`` (a
directory the evaluator mounts outside the workspace).  Code under test runs
in this process and could still tamper; the report therefore carries what
the evaluator needs to detect it: the reported outcomes next to the
observed exceptions, pytest's summary counts, identity checks of the pytest
and pluggy functions that produce results (captured before any workspace
code ran), and the exit status.  After writing, the process leaves with
``os._exit`` so that ``atexit`` hooks of the code under test do not run.
"""
import json
import os
import sys

import _pytest.main
import _pytest.outcomes
import _pytest.python
import _pytest.reports
import _pytest.runner
import _pytest.skipping
import pluggy
import pluggy._callers
import pluggy._hooks
import pluggy._manager
import pytest

# Functions whose replacement (or whose code's replacement) would let code
# under test change outcomes: checked at the end of the session.
_GUARDED = [
    (_pytest.runner, "call_and_report"), (_pytest.runner, "call_runtest_hook"),
    (_pytest.runner, "runtestprotocol"), (_pytest.runner, "pytest_runtest_protocol"),
    (_pytest.runner, "pytest_runtest_makereport"), (_pytest.runner, "check_interactive_exception"),
    (_pytest.runner.CallInfo, "from_call"), (_pytest.reports.TestReport, "from_item_and_call"),
    (_pytest.reports.TestReport, "__init__"), (_pytest.reports.BaseReport, "passed"),
    (_pytest.reports.BaseReport, "failed"), (_pytest.reports.BaseReport, "skipped"),
    (_pytest.python.Function, "runtest"), (_pytest.python, "pytest_pyfunc_call"),
    (_pytest.main, "pytest_runtestloop"), (_pytest.skipping, "pytest_runtest_makereport"),
    (pluggy._callers, "_multicall"), (pluggy._hooks.HookCaller, "__call__"),
    (pluggy._manager.PluginManager, "_hookexec"), (pluggy._manager.PluginManager, "unregister"),
    (os, "_exit"),
]


def _code_of(obj):
    target = obj.fget if isinstance(obj, property) else getattr(obj, "__func__", obj)
    return getattr(target, "__code__", None)


def _snapshot():
    state = {}
    for owner, name in _GUARDED:
        obj = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        state[f"{getattr(owner, '__name__', owner)}.{name}"] = (owner, name, obj, _code_of(obj))
    return state


class Recorder:
    """pytest plugin: observes every phase of every test (see module docstring)."""

    def __init__(self, report_path, rootdir):
        self.report_path, self.rootdir = report_path, rootdir
        self.guard = _snapshot()
        self.phases = []  # [nodeid, when, raised exception type or None, skip?]
        self.reports = []  # [nodeid, when, reported outcome, wasxfail?]
        self.collected = []
        self.collect_reports = []  # [nodeid, outcome] of collectors that failed or skipped
        self.stats = {}
        self.written = False

    @pytest.hookimpl(tryfirst=True)
    def pytest_load_initial_conftests(self, early_config):
        # ``pythonpath`` entries are relative to the configuration file, which is
        # the evaluator's copy: resolve them against the repository instead.
        inipath = early_config.inipath
        if inipath is not None:
            for path in reversed(early_config.getini("pythonpath")):
                relative = os.path.relpath(str(path), str(inipath.parent))
                sys.path.insert(0, os.path.normpath(os.path.join(self.rootdir, relative)))

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item, call):
        excinfo = call.excinfo
        kind = None if excinfo is None else f"{excinfo.type.__module__}.{excinfo.type.__qualname__}"
        skipped = excinfo is not None and isinstance(excinfo.value, _pytest.outcomes.Skipped)
        self.phases.append([item.nodeid, call.when, kind, skipped])
        return (yield)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report):
        self.reports.append([report.nodeid, report.when, report.outcome, hasattr(report, "wasxfail")])

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items):
        self.collected = [item.nodeid for item in items]

    @pytest.hookimpl(tryfirst=True)
    def pytest_collectreport(self, report):
        if report.failed or report.skipped:
            self.collect_reports.append([report.nodeid, report.outcome])

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session):
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            self.stats = {key: len(value) for key, value in reporter.stats.items() if key}

    def tampering(self):
        """Guarded functions that changed since this plugin was imported."""
        changed = []
        for key, (owner, name, obj, code) in self.guard.items():
            now = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
            if now is not obj or _code_of(now) is not code:
                changed.append(key)
        if sys.gettrace() is not None or sys.getprofile() is not None:
            changed.append("sys.settrace/setprofile")
        return changed

    def write(self, exit_status, error=None):
        if self.written:
            return
        self.written = True
        report = {"version": 1, "exit_status": exit_status, "error": error,
                  "phases": self.phases, "reports": self.reports, "collected": self.collected,
                  "collect_reports": self.collect_reports, "stats": self.stats,
                  "tampering": self.tampering(), "pid": os.getpid()}
        # O_EXCL: a report that already exists was not written by this run.
        fd = os.open(self.report_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(report, f)


def main():
    with open(sys.argv[1]) as f:
        config = json.load(f)
    exit_now = os._exit
    recorder = Recorder(config["report_path"], config["rootdir"])
    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    for name in ("PYTHONPATH", "PYTHONSTARTUP", "PYTEST_ADDOPTS", "PYTEST_PLUGINS"):
        os.environ.pop(name, None)
    os.chdir(config["rootdir"])
    sys.path.insert(0, config["rootdir"])
    args = ["-c", config["ini"], "--rootdir", config["rootdir"], "--confcutdir", config["rootdir"],
            "-p", "no:cacheprovider",
            "-rA", "--tb=short", "-q", *config["args"], "--", *config["test_ids"]]
    status, error = None, None
    try:
        status = int(pytest.main(args, plugins=[recorder]))
    except BaseException as err:  # SystemExit / KeyboardInterrupt raised by code under test
        error = f"{type(err).__name__}: {err}"[:500]
    try:
        recorder.write(status, error)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        exit_now(status if status is not None else 3)


if __name__ == "__main__":
    main()
