"""Benchmarks of the SWE environment on the local task set (CPU, no network).

  python bench/swe.py                     # all local tasks, 8 parallel sandboxes
  python bench/swe.py --tasks 40 --parallel 4 --commands 50

(a) Episode throughput: tasks/s for reset (workspace + git commit in the
    sandbox) + the gold patch applied through the str_replace tool + submit
    (diff, fresh sandbox, git apply, hidden tests), with ``--parallel``
    environments in threads, each with its own sandboxes.  Also the fraction
    resolved (must be 1.0: the gold patch resolves every task).
(b) Sandbox start-up overhead per command: median wall time of ``true`` in
    each working local backend minus that of ``sh -c true`` without a sandbox.
(c) The reward-hacking suite (tests/envs/swe/hacks_test.py, run with pytest):
    hack attempts made through the env's tools on a still-buggy task, and how
    many scored 0 (must be all); skipped with ``--no-hacks``.

Prints a table, then one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

from aem_jax.envs.swe import SWEEnv, read_jsonl, scripted
from aem_jax.envs.swe import sandbox as sandbox_lib
from aem_jax.envs.swe.dataset import LOCAL_TASKS


def run_episodes(tasks, parallel: int) -> dict:
    """Plays the gold agent on every task with ``parallel`` environments."""
    envs = [SWEEnv(tasks=tasks, max_turns=50) for _ in range(parallel)]

    def play(worker: int) -> list[tuple[bool, float]]:
        env, results = envs[worker], []
        for seed in range(worker, len(tasks), parallel):
            start = time.perf_counter()
            env.reset(seed=seed)
            for action in scripted.gold_actions(env.task):
                step = env.step(action)
                if step.done:
                    break
            results.append((bool(step.info["success"]), time.perf_counter() - start))
            if not step.info["success"]:
                print(f"not resolved: {env.task.instance_id}: {step.info.get('evaluation')}", file=sys.stderr)
        env.close()
        return results

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        results = [r for rs in pool.map(play, range(parallel)) for r in rs]
    wall = time.perf_counter() - start
    return {"tasks": len(results), "parallel": parallel, "wall_s": wall,
            "tasks_per_s": len(results) / wall,
            "resolved_fraction": sum(ok for ok, _ in results) / len(results),
            "episode_s_median": statistics.median(t for _, t in results)}


def _median_time(fn, repeats: int) -> float:
    fn()  # warm up caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def command_overhead(repeats: int) -> dict:
    """Median seconds per ``true`` command, bare and per sandbox backend."""
    figures = {"bare_s": _median_time(lambda: subprocess.run(["sh", "-c", "true"], check=True), repeats)}
    with tempfile.TemporaryDirectory() as workspace:
        for backend in ("bwrap", "unshare"):
            if sandbox_lib.backend_available(backend):
                box = sandbox_lib.LocalSandbox(workspace, backend=backend)
                figures[f"{backend}_s"] = _median_time(lambda: box.execute("true", timeout=30), repeats)
                figures[f"{backend}_overhead_s"] = figures[f"{backend}_s"] - figures["bare_s"]
                box.close()
    return figures


def hack_suite() -> dict:
    """Runs tests/envs/swe/hacks_test.py; counts the hack attempts and those that scored 0."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as scratch:
        report = os.path.join(scratch, "hacks.xml")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        os.path.join(root, "tests", "envs", "swe", "hacks_test.py")],
                       cwd=root, capture_output=True, check=False)
        wall = time.perf_counter() - start
        cases = ET.parse(report).getroot().iter("testcase")
        hacks = [c for c in cases if "hack" in c.get("name", "") and "at_least" not in c.get("name", "")]
    blocked = sum(1 for c in hacks if c.find("failure") is None and c.find("error") is None
                  and c.find("skipped") is None)
    return {"hack_attempts": len(hacks), "hacks_scoring_zero": blocked, "hack_suite_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=0, help="number of local tasks (0: all)")
    parser.add_argument("--parallel", type=int, default=8, help="environments run at once")
    parser.add_argument("--commands", type=int, default=100, help="repeats of the overhead timing")
    parser.add_argument("--no-hacks", action="store_true", help="skip the reward-hacking suite")
    args = parser.parse_args()
    tasks = read_jsonl(LOCAL_TASKS)
    tasks = tasks[: args.tasks] if args.tasks else tasks
    overhead = command_overhead(args.commands)
    episodes = run_episodes(tasks, args.parallel)
    hacks = {} if args.no_hacks else hack_suite()
    print(f"SWE environment benchmark ({os.cpu_count()} CPUs)")
    print(f"{'figure':<44}{'value':>12}")
    print(f"{'episodes (reset + gold patch + reward)':<44}{episodes['tasks']:>12d}")
    print(f"{'parallel sandboxes':<44}{episodes['parallel']:>12d}")
    print(f"{'tasks/s':<44}{episodes['tasks_per_s']:>12.2f}")
    print(f"{'median episode time (s)':<44}{episodes['episode_s_median']:>12.2f}")
    print(f"{'resolved fraction (gold patch)':<44}{episodes['resolved_fraction']:>12.3f}")
    print(f"{'bare `sh -c true` (ms)':<44}{overhead['bare_s'] * 1e3:>12.1f}")
    for backend in ("bwrap", "unshare"):
        if f"{backend}_s" in overhead:
            print(f"{backend + ' command (ms)':<44}{overhead[backend + '_s'] * 1e3:>12.1f}")
            print(f"{backend + ' start-up overhead per command (ms)':<44}"
                  f"{overhead[backend + '_overhead_s'] * 1e3:>12.1f}")
    if hacks:
        print(f"{'hack attempts (hacks_test.py)':<44}{hacks['hack_attempts']:>12d}")
        print(f"{'hack attempts scoring 0':<44}{hacks['hacks_scoring_zero']:>12d}")
    print(json.dumps({"bench": "swe", **episodes, **overhead, **hacks}, sort_keys=True))


if __name__ == "__main__":
    main()
