"""Generates the local SWE task set: bug-injected variants of the project's repos.

    python -m aem_jax.envs.swe.generate --seed 0 --out aem_jax/envs/swe/data/local_tasks.jsonl

For each small repository under ``repos/`` every mutation site
(``mutations.OPERATORS``) of every non-test module is listed, the list is
shuffled with ``random.Random(f"{seed}:{repo}")`` and candidates are tried in
that order until ``--per-repo`` tasks are kept.  A candidate is kept only if,
in two separate pytest runs of the mutated repository (against flakiness),

  * the outcomes of both runs agree, nothing times out or fails to collect,
  * FAIL_TO_PASS (fails with the bug, passes on the original) has >= 1 test,
  * PASS_TO_PASS (passes both ways) has >= 1 test.

The task's repository snapshot is the mutated repo with the FAIL_TO_PASS test
functions removed; ``test_patch`` restores them and ``patch`` (the gold fix)
undoes the mutation.  The problem statement quotes the first failing check
and its error.  Output is byte-identical for the same seed and repos.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import hashlib
import os
import random
import re
import subprocess
import sys
import tempfile
import textwrap
from typing import Iterator

from aem_jax.envs.swe import diffs, mutations, reward, tasks as tasks_lib

REPOS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "repos")
REPOS = ("textkit", "numkit", "shopcart", "gridlib", "intervals")
_RUN_TIMEOUT_S = 8.0
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")  # object reprs differ between runs


def load_repo(name: str) -> dict[str, str]:
    """The files of repository ``name`` as {relative posix path: text}."""
    root = os.path.join(REPOS_DIR, name)
    if not os.path.isdir(root):
        raise ValueError(f"repo must be one of {sorted(os.listdir(REPOS_DIR))}, got {name!r}")
    files = {}
    for directory, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        for file_name in sorted(names):
            if file_name.endswith((".py", ".md", ".txt", ".cfg", ".toml")):
                path = os.path.join(directory, file_name)
                with open(path, encoding="utf-8") as f:
                    files[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
    return files


def run_tests(snapshot: dict[str, str]) -> tuple[dict[str, str], str]:
    """Runs the whole pytest suite of a snapshot (unsandboxed: project code only)."""
    with tempfile.TemporaryDirectory(prefix="aem_swe_gen_") as directory:
        tasks_lib.materialize(snapshot, directory)
        # A fixed hash seed orders sets in assertion messages: same output every run.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONHASHSEED": "0",
               "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "LANG": "C.UTF-8"}
        command = [sys.executable, "-m", "pytest", "-rA", "-q", "-p", "no:cacheprovider", "--tb=short"]
        try:
            done = subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True,
                                  timeout=_RUN_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return {}, "timeout"
    return reward.parse_pytest_outcomes(done.stdout), done.stdout


def _candidates(repo: dict[str, str], seed: int, name: str) -> list[tuple[str, str, int]]:
    sites = []
    for path, text in sorted(repo.items()):
        if not path.endswith(".py") or diffs.is_test_path(path) or path.endswith("__init__.py"):
            continue
        for operator in mutations.OPERATORS:
            sites += [(path, operator, i) for i in range(mutations.count_sites(text, operator))]
    random.Random(f"{seed}:{name}").shuffle(sites)
    return sites


def _failure_section(output: str, test_name: str) -> list[str]:
    """The ``--tb=short`` lines pytest printed for one failing test function."""
    lines = output.splitlines()
    for start, line in enumerate(lines):
        if line.startswith("_") and line.strip("_").strip() == test_name:
            section = []
            for body in lines[start + 1:]:
                if body.startswith(("_____", "=====")):
                    break
                section.append(body)
            return section
    return []


def _test_source(snapshot: dict[str, str], test_id: str) -> str:
    path, _, function = test_id.partition("::")
    module = ast.parse(snapshot[path])
    for node in module.body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            body = "\n".join(ast.get_source_segment(snapshot[path], s) for s in node.body)
            return textwrap.dedent(body)
    raise ValueError(f"test {test_id!r} not found")


def problem_statement(name: str, original: dict[str, str], fail: list[str], output: str) -> str:
    """An issue-style report written from the failing behaviour."""
    first = fail[0]
    errors = [_ADDRESS.sub(" at 0x...", line[1:].strip())
              for line in _failure_section(output, first.partition("::")[2])
              if line.startswith("E ") and line[1:].strip() and "-v to get" not in line][:6]
    package = sorted({p.split("/")[0] for p in original if p.endswith("__init__.py")})
    imports = [line for line in original[first.partition("::")[0]].splitlines()
               if line.startswith(("from ", "import ")) and "pytest" not in line]
    snippet = "\n".join([*imports, "", _test_source(original, first)]).strip()
    text = [f"Bug report for `{name}`", "",
            "The following check, which should pass, fails on the current code:", "",
            "```python", snippet, "```", "", "Observed:", "", "```",
            *(errors or ["(the check fails)"]), "```", ""]
    if len(fail) > 1:
        text += [f"{len(fail) - 1} other check(s) of the same area fail as well.", ""]
    text += [f"Please fix the library code in `{'`, `'.join(package)}` so that the check passes. "
             "Do not edit or add tests."]
    return "\n".join(text) + "\n"


def _evaluate(repo: dict[str, str], baseline: dict[str, str], path: str, operator: str, site: int):
    mutated_text, description = mutations.mutate(repo[path], operator, site)
    if mutated_text == repo[path]:
        return None
    mutant = dict(repo, **{path: mutated_text})
    outcomes, output = run_tests(mutant)
    if set(outcomes) != set(baseline):
        return None  # timed out, failed to collect or errored
    fail = sorted(t for t, o in outcomes.items() if o == "FAILED" and baseline[t] == "PASSED")
    keep = sorted(t for t, o in outcomes.items() if o == "PASSED" and baseline[t] == "PASSED")
    if not fail or not keep or any(o not in ("PASSED", "FAILED") for o in outcomes.values()):
        return None
    if run_tests(mutant)[0] != outcomes:
        return None  # flaky: the second run disagrees
    return mutant, description, fail, keep, output


def _make_task(name, index, repo, mutant, path, operator, site, description, fail, keep, output):
    hidden: dict[str, set[str]] = {}
    for test_id in fail:
        test_path, _, function = test_id.partition("::")
        hidden.setdefault(test_path, set()).add(function)
    visible = dict(mutant)
    for test_path, functions in hidden.items():
        visible[test_path] = mutations.remove_functions(mutant[test_path], functions)
    instance_id = f"aem-jax-local__{name}-{index:03d}"
    digest = int(hashlib.sha256(instance_id.encode()).hexdigest(), 16)
    return tasks_lib.Task(
        instance_id=instance_id, repo=f"aem-jax-local/{name}",
        problem_statement=problem_statement(name, repo, fail, output),
        patch=diffs.file_diff(path, mutant[path], repo[path]),
        test_patch=diffs.snapshot_diff({p: visible[p] for p in hidden}, {p: repo[p] for p in hidden}),
        FAIL_TO_PASS=tuple(fail), PASS_TO_PASS=tuple(keep), repo_snapshot=visible,
        extra={"split": "test" if digest % 5 == 0 else "train",
               "mutation": {"file": path, "operator": operator, "site": site,
                            "description": description}})


def generate_repo(name: str, seed: int, per_repo: int, jobs: int = 2) -> Iterator[tasks_lib.Task]:
    """Yields up to ``per_repo`` validated tasks of repository ``name``."""
    repo = load_repo(name)
    baselines = [run_tests(repo)[0] for _ in range(2)]
    if baselines[0] != baselines[1] or not baselines[0] or set(baselines[0].values()) != {"PASSED"}:
        raise RuntimeError(f"repo {name!r}: the unmodified test suite must pass reliably")
    candidates = _candidates(repo, seed, name)
    kept = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for start in range(0, len(candidates), jobs):
            batch = candidates[start:start + jobs]
            # Results are consumed in candidate order, so output does not depend on jobs.
            results = pool.map(lambda c: _evaluate(repo, baselines[0], *c), batch)
            for (path, operator, site), result in zip(batch, results):
                if result is None or kept >= per_repo:
                    continue
                mutant, description, fail, keep, output = result
                yield _make_task(name, kept, repo, mutant, path, operator, site, description,
                                 fail, keep, output)
                kept += 1
            if kept >= per_repo:
                return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="shuffles the mutation sites")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(REPOS_DIR), "data",
                                                       "local_tasks.jsonl"), help="JSONL output path")
    parser.add_argument("--repos", default=",".join(REPOS), help="comma-separated repo names")
    parser.add_argument("--per-repo", type=int, default=24, help="tasks kept per repository")
    parser.add_argument("--jobs", type=int, default=2, help="candidates validated in parallel")
    args = parser.parse_args(argv)
    if args.per_repo < 1 or args.jobs < 1:
        parser.error(f"--per-repo and --jobs must be >= 1, got {args.per_repo}, {args.jobs}")
    generated = []
    for name in args.repos.split(","):
        repo_tasks = list(generate_repo(name, args.seed, args.per_repo, args.jobs))
        print(f"{name}: {len(repo_tasks)} tasks", flush=True)
        generated += repo_tasks
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tasks_lib.write_jsonl(generated, args.out)
    print(f"wrote {len(generated)} tasks to {args.out}")


if __name__ == "__main__":
    main()
