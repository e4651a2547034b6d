"""``SWEEnv``: repository repair over many turns, rewarded by hidden tests.

An episode (DeepSWE-style, Luo et al. 2025; tasks as in SWE-bench):

1. ``reset(seed=s)`` takes task ``s mod len(tasks)``, builds a workspace with
   the repository at its base state (a snapshot written to a fresh directory,
   committed to git inside the sandbox; or a container from the task's image)
   and returns the problem statement; the tool documentation is the system
   prompt (``self.system_prompt``), which the rollout puts before it.
   Containers are configured per task (``ContainerSandbox.for_task``: image,
   workdir, user, env, ``shell_init``); every distinct image is checked when
   the env is constructed, so a missing one fails before training starts.
2. Each ``step(action)`` parses one tool call (XML or JSON, ``tools.py``) and
   runs it in the sandbox: ``bash`` in the episode's persistent shell
   (``sandbox.shell``: ``cd`` and exported variables carry over, a command
   past ``command_timeout_s`` is killed and the session goes on), the file
   tools as fresh commands (``sandbox.execute``); every observation is cut in
   the middle past ``max_observation_chars``.  Reward is 0 on every step but
   the last.
3. ``submit`` (or reaching ``max_turns`` / ``episode_time_s``, which marks the
   episode truncated) takes the workspace diff and evaluates it in a *fresh*
   sandbox (``reward.evaluate``, graded as ``task.grading`` says): reward 1.0
   iff the task is resolved; the agent's shell is ended first.  The
   diff is computed by the evaluator, never by the agent's tools or git
   configuration: for local sandboxes it compares the workspace's regular
   files (read from the host, links not followed) with the task's snapshot;
   for containers it runs git with no system, global or external-diff
   configuration.  Either way the result is only text the strict parser of
   ``reward.evaluate`` reads.

Nothing the agent does raises: failed tools, timeouts and sandboxes that cannot
be created become observations, and an environment error ends the episode as
failed with ``info["env_error"]``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Sequence

from aem_jax.envs.base import Observation, Step
from aem_jax.envs.swe import dataset, diffs, reward, tools
from aem_jax.envs.swe.container import ContainerSandbox
from aem_jax.envs.swe.sandbox import LocalSandbox, WorkspaceError, resolve_backend
from aem_jax.envs.swe.tasks import Task, materialize

SANDBOXES = ("local", "container")
_INIT_GIT = ("git init -q && printf '__pycache__/\\n*.pyc\\n.pytest_cache/\\n' >> .git/info/exclude"
             " && git add -A && git -c user.name=aem -c user.email=aem@localhost"
             " -c commit.gpgsign=false commit -q -m base")
# Containers only: git with no system / global configuration, no pager, no external
# diff or textconv drivers, fixed a/ b/ prefixes (the output is parsed strictly anyway).
_CONTAINER_DIFF = (
    "export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null HOME=$(mktemp -d) GIT_PAGER=cat "
    "GIT_EXTERNAL_DIFF= GIT_DIFF_OPTS=; "
    "G='git -c core.pager=cat -c diff.external= -c core.hooksPath=/dev/null -c core.fsmonitor=false "
    "-c core.quotePath=true -c diff.noprefix=false -c diff.mnemonicPrefix=false -c color.ui=false'; "
    "$G add -A >/dev/null 2>&1; $G diff --cached --no-color --binary --full-index --no-ext-diff "
    "--no-textconv --src-prefix=a/ --dst-prefix=b/ --no-renames HEAD")
OVERFLOW_MODES = ("score", "mask")
_STEP_MARGIN_S = 30.0  # bookkeeping around the timed commands of one step
_SANDBOX_ENV = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "GIT_CONFIG_NOSYSTEM": "1"}
# Tasks graded by their own harness ("swebench", "r2e") run their test command as
# published: the agent sees the plugins the grading run loads.
_HARNESS_ENV = {"GIT_CONFIG_NOSYSTEM": "1"}


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
      max_observation_chars: every observation (tool output, parse error) past this
        keeps its head and tail, with a note of how many characters were cut.
      workspace_root: where local workspaces are created (default: tmp).
      uid_range: (low, high) uids the local sandboxes lease theirs from (root only;
        default ``sandbox.DEFAULT_UID_RANGE``).
      overflow: what an episode cut short becomes -- by the rollout (its context
        is full or its turns ran out: the rollout calls ``finish``) or by this
        env's ``max_turns`` / ``episode_time_s``: "score" (default) evaluates
        the diff so far and rewards it; "mask" evaluates it too (for success
        metrics) but sets ``info["exclude_from_loss"]``, so the rollout leaves
        the episode out of the loss and the group statistics ("compact
        filtering", DeepSWE).
      system_prompt: the system message the rollout puts before the task
        (``self.system_prompt``); default ``tools.SYSTEM_PROMPT``, the tool
        documentation. The first observation holds only the task.
      sandbox_start_s: time allowed for starting a sandbox (default 30 s local,
        120 s container); part of ``step_time_bound_s``.
      step_timeout_s: the rollout's limit on one reset / step, if known: it must
        exceed ``step_time_bound_s`` (a ValueError names both). The rollout
        itself raises its limit to ``step_time_bound_s`` when it is lower.
      check_images: with the container sandbox, check at construction that every
        distinct task image is available (``ContainerSandbox.check_image``: a
        RuntimeError naming the first missing one); default True.
      **limits: ``sandbox.Limits`` fields (both sandboxes).
    """

    def __init__(self, *, tasks: str | Sequence[Task] = "local", split: str = "train",
                 sandbox: str = "local", backend: str | None = None, max_turns: int = 30,
                 episode_time_s: float = 1800.0, command_timeout_s: float = 60.0,
                 eval_timeout_s: float = 300.0, max_observation_chars: int = 10_000,
                 workspace_root: str | None = None, data_dir: str | None = None,
                 uid_range: tuple[int, int] | None = None, overflow: str = "score",
                 system_prompt: str | None = None, sandbox_start_s: float | None = None,
                 step_timeout_s: float | None = None, check_images: bool = True, **limits: int):
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
        self.uid_range = tuple(uid_range) if uid_range is not None else None
        self.max_turns, self.episode_time_s = max_turns, episode_time_s
        self.command_timeout_s, self.eval_timeout_s = command_timeout_s, eval_timeout_s
        self.max_observation_chars = max_observation_chars
        self.workspace_root = workspace_root
        if isinstance(max_observation_chars, bool) or not isinstance(max_observation_chars, int):
            raise ValueError(f"max_observation_chars must be an int, got {max_observation_chars!r}")
        if overflow not in OVERFLOW_MODES:
            raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ValueError(f"system_prompt must be a str or None, got {system_prompt!r}")
        self.overflow = overflow
        self.system_prompt = tools.SYSTEM_PROMPT if system_prompt is None else system_prompt
        if sandbox_start_s is None:
            sandbox_start_s = 30.0 if sandbox == "local" else 120.0
        if not sandbox_start_s or sandbox_start_s <= 0:
            raise ValueError(f"sandbox_start_s must be positive, got {sandbox_start_s!r}")
        self.sandbox_start_s = float(sandbox_start_s)
        if step_timeout_s is not None and not step_timeout_s > self.step_time_bound_s:
            raise ValueError(
                f"step_timeout_s={step_timeout_s!r} (the rollout's limit on one step) must exceed "
                f"step_time_bound_s={self.step_time_bound_s:g}, the longest a step may take: "
                f"command_timeout_s={command_timeout_s:g} + taking the diff "
                f"{command_timeout_s:g} + sandbox_start_s={self.sandbox_start_s:g} + "
                f"eval_timeout_s={eval_timeout_s:g} + {_STEP_MARGIN_S:g} s; raise it or lower those")
        if sandbox == "container" and check_images:
            self.check_images()
        self.task: Task | None = None
        self._sandbox = None
        self._workspace: str | None = None
        self._done, self._turn, self._start = True, 0, 0.0
        self._env_error: str | None = None
        self.last_evaluation: reward.Evaluation | None = None

    # -- sandboxes ---------------------------------------------------------------
    def _container(self, task: Task) -> ContainerSandbox:
        env = _SANDBOX_ENV if task.grading == "pytest" else _HARNESS_ENV
        return ContainerSandbox.for_task(task, cli=self.backend, env=env, **self.limits)

    def check_images(self) -> list[str]:
        """Checks that every distinct task image is available; returns them (sorted).

        Raises ``ValueError`` naming a task without an image and
        ``RuntimeError`` naming the first image the container CLI lacks (see
        ``ContainerSandbox.check_image``) -- before any episode runs.
        """
        first: dict[str, Task] = {}
        for task in self.tasks:
            if not task.image:
                raise ValueError(f"task {task.instance_id!r} has no 'image' for the container sandbox")
            first.setdefault(task.image, task)
        for image in sorted(first):
            self._container(first[image]).check_image()
        return sorted(first)

    def _new_sandbox(self, task: Task) -> tuple[Any, str | None]:
        """A sandbox holding the task's repository at its base state."""
        if self.sandbox_kind == "container":
            return self._container(task), None
        if task.repo_snapshot is None:
            raise ValueError(f"task {task.instance_id!r} has no 'repo_snapshot' for the local sandbox")
        workspace = tempfile.mkdtemp(prefix="aem_swe_", dir=self.workspace_root)
        try:
            materialize(task.repo_snapshot, workspace)
            extra = {"uid_range": self.uid_range} if self.uid_range else {}
            return LocalSandbox(workspace, backend=self.backend, env=_SANDBOX_ENV, **extra,
                                **self.limits), workspace
        except BaseException:
            shutil.rmtree(workspace, ignore_errors=True)
            raise

    def _release(self, sandbox, workspace: str | None) -> None:
        if sandbox is not None:
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
        """The first user message: the task (the tools are in ``self.system_prompt``)."""
        workdir = self._sandbox.workdir if self._sandbox else "the repository"
        return (f"The repository {task.repo} is at {workdir} (where commands start).\n\n<issue>\n"
                f"{task.problem_statement.strip()}\n</issue>\n\n"
                "Change the non-test source files so that the issue is resolved; hidden tests "
                "decide. Do not modify tests or test configuration (a diff touching them is "
                f"rejected). You have at most {self.max_turns} turns.")

    def corpus(self) -> list[str]:
        """Text besides the observations that the model reads (a BPE tokenizer's corpus)."""
        return [self.system_prompt]

    @property
    def step_time_bound_s(self) -> float:
        """The longest one ``reset`` / ``step`` may take, in seconds.

        A step that ends the episode runs the tool (``command_timeout_s``),
        takes the diff (``command_timeout_s``), starts a fresh sandbox
        (``sandbox_start_s``) and evaluates (``eval_timeout_s``); a reset only
        starts a sandbox and sets up git. A rollout's per-step limit below
        this would turn slow evaluations into failed episodes.
        """
        return (2 * self.command_timeout_s + self.sandbox_start_s + self.eval_timeout_s
                + _STEP_MARGIN_S)

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
            observation = tools.truncate_middle(f"invalid action: {err}", self.max_observation_chars)
        if call is not None and call.name == "submit":
            return self._score("submitted", truncated=False)
        if call is not None:
            try:
                observation = self._run_tool(call)
            except Exception as err:  # a broken tool run is an observation, not a crash
                observation = tools.truncate_middle(f"tool error: {type(err).__name__}: {err}",
                                                    self.max_observation_chars)
        if self._turn >= self.max_turns or time.monotonic() - self._start > self.episode_time_s:
            return self._score(f"{observation}\n\nlimit reached (turns or time); scoring the "
                               "current changes", truncated=True, invalid=invalid)
        info = self._info(success=False, invalid=invalid, truncated=False, anchor=observation)
        return Step(observation, 0.0, False, info)

    def _run_tool(self, call: tools.ToolCall) -> str:
        timeout = max(1.0, min(self.command_timeout_s,
                               self.episode_time_s - (time.monotonic() - self._start)))
        if call.name == "bash":  # the episode's persistent shell
            result = self._sandbox.shell(call.params["command"], timeout=timeout)
            return tools.format_result(result, self.max_observation_chars)
        # The editor and search run as fresh commands, from the repository root.
        try:
            command = tools.file_tool_command(call.name, call.params, root=self._sandbox.workdir)
        except tools.ToolInputError as err:
            return f"error: {err}"
        result = self._sandbox.execute(command, timeout=timeout)
        return tools.format_result(result, self.max_observation_chars)

    def finish(self, reason: str = "the context is full") -> Step:
        """Ends an episode the rollout cut short (context or turn limit), as ``overflow`` says.

        The diff so far is evaluated as at this env's own turn limit
        (``truncated``); with ``overflow="mask"`` the info also carries
        ``exclude_from_loss``. An episode already over gives reward 0.
        """
        if self._done:
            return self._final("the episode is over; call reset", 0.0)
        if self._env_error:
            self._done = True
            return self._final(f"environment error: {self._env_error}", 0.0)
        return self._score(f"the episode was cut short ({reason}); scoring the current changes",
                           truncated=True)

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
        info["tampered"] = evaluation.tampered  # a sign of reward tampering (monitor it in training)
        if evaluation.canaries is not None:  # harness graders: whether this evaluation had canaries
            info["canaries"] = evaluation.canaries
        if truncated and self.overflow == "mask":
            info["exclude_from_loss"] = True  # compact filtering: the rollout masks it
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
        if isinstance(self._sandbox, LocalSandbox):
            if not os.path.isdir(self._sandbox.workspace):
                return None, "could not take the diff of the workspace: it no longer exists"
            try:
                tree = self._sandbox.read_tree()
            except WorkspaceError as err:
                return None, f"rejected: {err}"
            if not tree:
                return None, "could not take the diff of the workspace: it is empty"
            base = {p: diffs.File(t.encode("utf-8")) for p, t in self.task.repo_snapshot.items()}
            return diffs.snapshot_diff(base, tree), ""
        result = self._sandbox.execute(_CONTAINER_DIFF, timeout=self.command_timeout_s)
        if result.returncode != 0 or result.timed_out or "[output exceeded" in result.output:
            return None, f"could not take the diff of the workspace: {result.output.strip()[-300:]}"
        return result.output, ""

    def evaluate_workspace(self) -> reward.Evaluation:
        """Scores the current workspace diff in a fresh sandbox (never raises).

        The agent's shell is ended first (local sandboxes: with every process it
        started), so nothing changes the workspace while its diff is taken.
        """
        try:
            if hasattr(self._sandbox, "close_shell"):
                self._sandbox.close_shell()
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
