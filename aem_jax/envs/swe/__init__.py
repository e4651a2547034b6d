"""SWE environment: repository repair with tools, rewarded by hidden tests.

``aem_jax.envs.make("swe", tasks="local", split="train", **limits)`` creates a
``SWEEnv``; see ``docs/swe.md`` for the task format, the action format, the
reward (graders chosen by ``Task.grading``), the sandboxes (with the agent's
persistent shell) and the task generator.
"""
from aem_jax.envs.swe.container import ContainerSandbox
from aem_jax.envs.swe.dataset import LOCAL_TASKS, load_tasks
from aem_jax.envs.swe.env import SWEEnv
from aem_jax.envs.swe.reward import Evaluation, evaluate, grader_name, register_grader, run_harness
from aem_jax.envs.swe.sandbox import ExecResult, LocalSandbox, SandboxUnavailableError, resolve_backend
from aem_jax.envs.swe.shell import PersistentShell
from aem_jax.envs.swe.tasks import Task, TaskFormatError, from_record, read_jsonl, write_jsonl

__all__ = [
    "ContainerSandbox", "Evaluation", "ExecResult", "LOCAL_TASKS", "LocalSandbox",
    "PersistentShell", "SWEEnv", "SandboxUnavailableError", "Task", "TaskFormatError", "evaluate",
    "from_record", "grader_name", "load_tasks", "read_jsonl", "register_grader", "resolve_backend",
    "run_harness", "write_jsonl",
]
