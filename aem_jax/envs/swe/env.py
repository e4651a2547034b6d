"""``SWEEnv``: repository repair over many turns, rewarded by hidden tests.

An episode (DeepSWE-style, Luo et al. 2025; tasks as in SWE-bench):

1. ``reset(seed=s)`` takes task ``s mod len(tasks)``, builds a workspace with
   the repository at its base state (a snapshot written to a fresh directory,
   committed to git inside the sandbox; or a container from the task's image)
   and returns the problem statement with the tool documentation.
2. Each ``step(action)`` parses one XML tool call (``tools.py``) and runs it in
   the sandbox.  Reward is 0 on every step but the last.
3. ``submit`` (or reaching ``max_turns`` / ``episode_time_s``, which marks the
   episode truncated) takes the workspace diff (``git diff`` inside the
   sandbox) and evaluates it in a *fresh* sandbox (``reward.evaluate``):
   reward 1.0 iff the task is resolved.

Nothing the agent does raises: failed tools, timeouts and sandboxes that cannot
be created become observations, and an environment error ends the episode as
failed with ``info["env_error"]``.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any, Sequence

from aem_jax.envs.base import Observation, Step
from aem_jax.envs.swe import dataset, reward, tools
from aem_jax.envs.swe.container import ContainerSandbox
from aem_jax.envs.swe.sandbox import LocalSandbox, resolve_backend
from aem_jax.envs.swe.tasks import Task, materialize

SANDBOXES = ("local", "container")
_INIT_GIT = ("git init -q && printf '__pycache__/\\n*.pyc\\n.pytest_cache/\\n' >> .git/info/exclude"
             " && git add -A && git -c user.name=aem -c user.email=aem@localhost"
             " -c commit.gpgsign=false commit -q -m base")
_DIFF = "git add -A >/dev/null 2>&1; git diff --cached --no-color --binary HEAD"
_SANDBOX_ENV = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "GIT_CONFIG_NOSYSTEM": "1"}


class SWEEnv:
    """Software-engineering environment (see module docstring).

    Args:
      tasks: "local" (the shipped generated set), a SWE-bench JSONL path, or a
        sequence of ``Task``.
      split: TFDS split when ``tasks`` names a file ("train", "test", ...).
      sandbox: "local" (bubblewrap / unshare) or "container" (docker / podman).
      backend: local backend ("auto", "bwrap", "unshare") or container CLI
        ("docker", "podman").
      max_turns, episode_time_s: per-episode limits (then truncated and scored).
      command_timeout_s, eval_timeout_s: wall-clock limits of one tool call /
        of the hidden-test evaluation.
      max_observation_chars: tool output past this keeps its head and tail.
      workspace_root: where local workspaces are created (default: tmp).
      **limits: ``sandbox.Limits`` fields for the local sandbox.
    """

    def __init__(self, *, tasks: str | Sequence[Task] = "local", split: str = "train",
                 sandbox: str = "local", backend: str | None = None, max_turns: int = 30,
                 episode_time_s: float = 1800.0, command_timeout_s: float = 60.0,
                 eval_timeout_s: float = 300.0, max_observation_chars: int = 10_000,
                 workspace_root: str | None = None, data_dir: str | None = None, **limits: int):
        if sandbox not in SANDBOXES:
            raise ValueError(f"sandbox must be one of {SANDBOXES}, got {sandbox!r}")
        for name, value in (("max_turns", max_turns), ("episode_time_s", episode_time_s),
                            ("command_timeout_s", command_timeout_s),
                            ("eval_timeout_s", eval_timeout_s),
                            ("max_observation_chars", max_observation_chars)):
            if not value or value <= 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        self.tasks = (dataset.load_tasks(tasks, split=split, data_dir=data_dir)
                      if isinstance(tasks, str) else list(tasks))
        if not self.tasks:
            raise ValueError(f"no tasks in {tasks!r} split {split!r}")
        self.sandbox_kind = sandbox
        # Fails now, naming the package to install, rather than in every episode.
        self.backend = resolve_backend(backend or "auto") if sandbox == "local" else (backend or "docker")
        self.limits = limits
        self.max_turns, self.episode_time_s = max_turns, episode_time_s
        self.command_timeout_s, self.eval_timeout_s = command_timeout_s, eval_timeout_s
        self.max_observation_chars = max_observation_chars
        self.workspace_root = workspace_root
        self.task: Task | None = None
        self._sandbox = None
        self._workspace: str | None = None
        self._done, self._turn, self._start = True, 0, 0.0
        self._env_error: str | None = None
        self.last_evaluation: reward.Evaluation | None = None

    # -- sandboxes ---------------------------------------------------------------
    def _new_sandbox(self, task: Task) -> tuple[Any, str | None]:
        """A sandbox holding the task's repository at its base state."""
        if self.sandbox_kind == "container":
            if not task.image:
                raise ValueError(f"task {task.instance_id!r} has no 'image' for the container sandbox")
            return ContainerSandbox(task.image, cli=self.backend, env=_SANDBOX_ENV, **self.limits), None
        if task.repo_snapshot is None:
            raise ValueError(f"task {task.instance_id!r} has no 'repo_snapshot' for the local sandbox")
        workspace = tempfile.mkdtemp(prefix="aem_swe_", dir=self.workspace_root)
        try:
            materialize(task.repo_snapshot, workspace)
            return LocalSandbox(workspace, backend=self.backend, env=_SANDBOX_ENV, **self.limits), workspace
        except BaseException:
            shutil.rmtree(workspace, ignore_errors=True)
            raise

    def _release(self, sandbox, workspace: str | None) -> None:
        if isinstance(sandbox, ContainerSandbox):
            sandbox.close()
        if workspace:
            shutil.rmtree(workspace, ignore_errors=True)

    def close(self) -> None:
        """Deletes the current workspace (also done by the next ``reset``)."""
        self._release(self._sandbox, self._workspace)
        self._sandbox, self._workspace = None, None

    # -- protocol ----------------------------------------------------------------
    def reset(self, *, seed: int) -> Observation:
        self.close()
        self.task = self.tasks[int(seed) % len(self.tasks)]
        self._done, self._turn, self._start = False, 0, time.monotonic()
        self._env_error, self.last_evaluation = None, None
        try:
            self._sandbox, self._workspace = self._new_sandbox(self.task)
            if self.sandbox_kind == "local":
                result = self._sandbox.execute(_INIT_GIT, timeout=self.command_timeout_s)
                if result.returncode != 0:
                    raise RuntimeError(f"git set-up failed: {result.output.strip()[-300:]}")
        except Exception as err:  # an episode fails, the run goes on
            self._env_error = f"sandbox could not be created: {type(err).__name__}: {err}"
        text = self._intro(self.task)
        info = {"instance_id": self.task.instance_id, "anchor": text,
                "env_error": self._env_error}
        return Observation(text, info)

    def _intro(self, task: Task) -> str:
        workdir = self._sandbox.workdir if self._sandbox else "the repository"
        return (f"You are a software engineer working in the repository {task.repo} at {workdir} "
                f"(the current directory of every command).\n\n<issue>\n"
                f"{task.problem_statement.strip()}\n</issue>\n\n"
                "Change the non-test source files so that the issue is resolved; hidden tests "
                "decide. Do not modify tests or test configuration (a diff touching them is "
                f"rejected). You have at most {self.max_turns} turns.\n\n{tools.TOOL_DOC}")

    def step(self, action: str) -> Step:
        if self._done:
            return self._final("the episode is over; call reset", 0.0, invalid=True)
        if self._env_error:
            self._done = True
            return self._final(f"environment error: {self._env_error}", 0.0)
        self._turn += 1
        invalid, observation = False, ""
        try:
            call = tools.parse_action(action)
        except tools.ActionError as err:
            invalid, call = True, None
            observation = f"invalid action: {err}"
        if call is not None and call.name == "submit":
            return self._score("submitted", truncated=False)
        if call is not None:
            try:
                observation = self._run_tool(call)
            except Exception as err:  # a broken tool run is an observation, not a crash
                observation = f"tool error: {type(err).__name__}: {err}"
        if self._turn >= self.max_turns or time.monotonic() - self._start > self.episode_time_s:
            return self._score(f"{observation}\n\nlimit reached (turns or time); scoring the "
                               "current changes", truncated=True, invalid=invalid)
        info = self._info(success=False, invalid=invalid, truncated=False, anchor=observation)
        return Step(observation, 0.0, False, info)

    def _run_tool(self, call: tools.ToolCall) -> str:
        timeout = max(1.0, min(self.command_timeout_s,
                               self.episode_time_s - (time.monotonic() - self._start)))
        if call.name == "bash":
            result = self._sandbox.execute(call.params["command"], timeout=timeout)
        else:
            result = self._sandbox.execute(tools.file_tool_command(call.name, call.params),
                                           timeout=timeout)
        return tools.format_result(result, self.max_observation_chars)

    def _score(self, prefix: str, *, truncated: bool, invalid: bool = False) -> Step:
        self._done = True
        evaluation = self.evaluate_workspace()
        self.last_evaluation = evaluation
        verdict = "resolved" if evaluation.resolved else "not resolved"
        text = f"{prefix}\n\nevaluation: {verdict} ({evaluation.reason})"
        value = 1.0 if evaluation.resolved else 0.0
        info = self._info(success=evaluation.resolved, invalid=invalid, truncated=truncated,
                          anchor=text)
        info["evaluation"] = evaluation.reason
        return Step(text, value, True, info)

    def _final(self, text: str, value: float, invalid: bool = False) -> Step:
        return Step(text, value, True, self._info(success=False, invalid=invalid, truncated=False,
                                                  anchor=text))

    def _info(self, *, success: bool, invalid: bool, truncated: bool, anchor: str) -> dict:
        return {"success": success, "invalid_action": invalid, "truncated": truncated,
                "anchor": anchor, "turn": self._turn, "env_error": self._env_error,
                "instance_id": self.task.instance_id if self.task else None}

    # -- evaluation --------------------------------------------------------------
    def current_diff(self) -> tuple[str | None, str]:
        """(the workspace diff, or None with the reason it could not be taken)."""
        result = self._sandbox.execute(_DIFF, timeout=self.command_timeout_s)
        if result.returncode != 0 or result.timed_out or "[output exceeded" in result.output:
            return None, f"could not take the diff of the workspace: {result.output.strip()[-300:]}"
        return result.output, ""

    def evaluate_workspace(self) -> reward.Evaluation:
        """Scores the current workspace diff in a fresh sandbox (never raises)."""
        try:
            diff, problem = self.current_diff()
            if diff is None:
                return reward.Evaluation(False, problem)
            return self.evaluate_diff(self.task, diff)
        except Exception as err:
            return reward.Evaluation(False, f"evaluation failed: {type(err).__name__}: {err}")

    def evaluate_diff(self, task: Task, diff: str) -> reward.Evaluation:
        """Applies ``diff`` to a fresh copy of the task's repository and runs its tests."""
        sandbox, workspace = self._new_sandbox(task)
        try:
            return reward.evaluate(task, diff, sandbox, timeout=self.eval_timeout_s)
        finally:
            self._release(sandbox, workspace)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
