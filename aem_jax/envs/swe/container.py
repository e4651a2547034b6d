"""Container sandbox: the same interface as ``LocalSandbox``, on a task image.

For SWE-bench / R2E-Gym images (the repository at ``/testbed``, its
environment installed): one long-lived container per episode started from
``image`` with

  docker|podman [CLI OPTIONS] run -d --network none --cap-drop ALL
    --security-opt no-new-privileges --pids-limit N --memory M
    --ulimit nofile/nproc/fsize/cpu ... IMAGE sleep infinity

Two ways to run a command in it:

* ``execute(command, timeout)``: a fresh ``exec ... timeout -s KILL T sh -c
  COMMAND`` (``bash -c`` after the task's ``shell_init``), for the
  environment's own work (file tools, the diff, the evaluation), unaffected by
  anything the agent did to its shell;
* ``shell(command, timeout)``: the agent's persistent bash session
  (``shell.PersistentShell`` over ``exec -i ... bash``): ``cd`` and exported
  variables carry over, a hung command is killed without ending the session.

Per task (``ContainerSandbox.for_task``): image, workdir, user, env (PATH ...)
and ``shell_init`` (e.g. ``source /opt/miniconda3/bin/activate && conda
activate testbed`` for SWE-bench images).  ``cli_options`` go before the
subcommand (default: ``$AEM_JAX_CONTAINER_CLI_OPTIONS``, e.g.
``--runtime=runc --cgroup-manager=cgroupfs`` for podman without systemd).
``check_image()`` fails, naming the image, if it is not available locally.
``close()`` removes the container.  The commands are built by pure methods so
they can be checked without a container runtime.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import shlex
import shutil
import subprocess
import time

from aem_jax.envs.swe import shell as shell_lib
from aem_jax.envs.swe.sandbox import ExecResult, Limits, _kill_tree, _read_limited, _normalise_returncode

CLIS = ("docker", "podman")
CLI_OPTIONS_ENV = "AEM_JAX_CONTAINER_CLI_OPTIONS"
_COUNTER = itertools.count()


class ContainerSandbox:
    """Runs commands in a container of ``image`` (see module docstring).

    Args:
      image: container image holding the repository (e.g. a SWE-bench image).
      cli: "docker" or "podman".
      workdir: the repository inside the image.
      user: user to run commands as (default: the image's user).
      env: extra environment variables (PATH included).
      shell_init: shell lines run (by bash) before every command.
      cli_options: options before the CLI's subcommand (default from
        ``$AEM_JAX_CONTAINER_CLI_OPTIONS``).
      **limits: ``Limits`` fields (cpu_seconds, memory_bytes, max_processes, ...).
    """

    def __init__(self, image: str, *, cli: str = "docker", workdir: str = "/testbed",
                 user: str | None = None, env: dict[str, str] | None = None, shell_init: str = "",
                 cli_options: list[str] | None = None, **limits: int):
        if cli not in CLIS:
            raise ValueError(f"cli must be one of {CLIS}, got {cli!r}")
        if not image:
            raise ValueError("image must be a non-empty image name")
        self.image, self.cli, self.workdir, self.user = image, cli, workdir, user
        self.env, self.shell_init = dict(env or {}), shell_init
        self.cli_options = (shlex.split(os.environ.get(CLI_OPTIONS_ENV, "")) if cli_options is None
                            else list(cli_options))
        self.limits = Limits(**limits)
        self.name = f"aem-swe-{os.getpid()}-{next(_COUNTER)}-{int(time.time() * 1000) % 10**8}"
        self._started = False
        self._shell: shell_lib.PersistentShell | None = None

    @classmethod
    def for_task(cls, task, *, cli: str = "docker", env: dict[str, str] | None = None,
                 **kwargs) -> "ContainerSandbox":
        """A sandbox configured by ``task`` (image, workdir, user, env, shell_init).

        ``env`` entries (the environment's own settings) win over the task's.
        """
        if not task.image:
            raise ValueError(f"task {task.instance_id!r} has no 'image' for the container sandbox")
        return cls(task.image, cli=cli, workdir=task.workdir or "/testbed", user=task.user or None,
                   env={**task.env, **(env or {})}, shell_init=task.shell_init, **kwargs)

    def _cli(self) -> list[str]:
        return [self.cli, *self.cli_options]

    def check_image(self) -> None:
        """Raises ``RuntimeError`` naming the image unless it is available locally."""
        if shutil.which(self.cli) is None:
            raise RuntimeError(f"container CLI {self.cli!r} not found: install docker or podman")
        done = subprocess.run([*self._cli(), "image", "inspect", "--format", "{{.Id}}", self.image],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"image {self.image!r} is not available to {self.cli} (pull or build "
                               f"it first): {done.stderr.strip()[-300:]}")

    def run_argv(self) -> list[str]:
        """The command that starts the container."""
        lim = self.limits
        argv = [*self._cli(), "run", "-d", "--rm", "--name", self.name, "--network", "none",
                "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                "--pids-limit", str(lim.max_processes), "--memory", str(lim.memory_bytes),
                "--memory-swap", str(lim.memory_bytes),
                "--ulimit", f"nofile={lim.max_open_files}:{lim.max_open_files}",
                "--ulimit", f"nproc={lim.max_processes}:{lim.max_processes}",
                "--ulimit", f"fsize={lim.max_file_bytes}:{lim.max_file_bytes}",
                "--ulimit", f"cpu={lim.cpu_seconds}:{lim.cpu_seconds}",
                "--tmpfs", f"/tmp:rw,size={lim.tmp_bytes}", "--workdir", self.workdir]
        if self.user:
            argv += ["--user", self.user]
        return [*argv, "--entrypoint", "sleep", self.image, "infinity"]

    def _exec_prefix(self, *, interactive: bool = False) -> list[str]:
        argv = [*self._cli(), "exec"] + (["-i"] if interactive else []) + ["-w", self.workdir]
        if self.user:
            argv += ["--user", self.user]
        for key, value in sorted(self.env.items()):
            argv += ["-e", f"{key}={value}"]
        return [*argv, self.name]

    def exec_argv(self, command: str, timeout: float, *, interactive: bool = False,
                  init: bool = True) -> list[str]:
        """The command that runs ``command`` (after ``shell_init`` when ``init``) in the container."""
        shell = ["sh", "-c", command]
        if init and self.shell_init:
            shell = ["bash", "-c", f"{{ {self.shell_init}\n}} >/dev/null 2>&1\n{command}"]
        return [*self._exec_prefix(interactive=interactive), "timeout", "-s", "KILL",
                f"{max(1, int(timeout + 0.999))}", *shell]

    def shell_argv(self) -> list[str]:
        """The command starting the agent's persistent bash."""
        return [*self._exec_prefix(interactive=True), "bash", "--noprofile", "--norc"]

    def kill_argv(self, pid: int, keep_file: str) -> list[str]:
        """The command killing the session's bash ``pid`` and its command (``shell.KILL_TREE``)."""
        user = ["--user", self.user] if self.user else []
        return [*self._cli(), "exec", *user, self.name, "bash", "-c", shell_lib.KILL_TREE, "kill",
                str(pid), keep_file]

    def remove_argv(self) -> list[str]:
        """The command that removes the container (podman: without waiting for a stop)."""
        return [*self._cli(), "rm", "-f", *(["-t", "0"] if self.cli == "podman" else []), self.name]

    def _start(self) -> None:
        if self._started:
            return
        if shutil.which(self.cli) is None:
            raise RuntimeError(f"container CLI {self.cli!r} not found: install docker or podman")
        done = subprocess.run(self.run_argv(), capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{self.cli} run {self.image} failed: {done.stderr.strip()[-500:]}")
        self._started = True

    def execute(self, command: str, timeout: float = 60.0) -> ExecResult:
        """Runs ``command`` with ``sh -c`` in the container (never raises for the command)."""
        try:
            self._start()
            proc = subprocess.Popen(self.exec_argv(command, timeout), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    process_group=0)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as err:
            return ExecResult(f"sandbox error: {err}", 126, False)
        with proc:
            # One second of grace for the in-container timeout to fire first.
            data, timed_out, capped = _read_limited(proc, time.monotonic() + timeout + 1.0,
                                                    self.limits.max_output_bytes)
            if timed_out or capped:
                _kill_tree(proc)
            code = _normalise_returncode(proc.wait())
        text = data.decode("utf-8", errors="replace")
        # `timeout -s KILL` makes the command exit with 137 when the deadline passes.
        timed_out = timed_out or code == 137
        if timed_out:
            text += f"\n[command timed out after {timeout:g} s; all its processes were killed]"
        if capped:
            text += f"\n[output exceeded {self.limits.max_output_bytes} bytes; the command was killed]"
        return ExecResult(text, code, timed_out)

    def put_file(self, name: str, text: str) -> None:
        """Writes file ``name`` in the working directory through ``exec -i``."""
        if not name or "/" in name:
            raise ValueError(f"name must be a plain file name, got {name!r}")
        self._start()
        argv = self.exec_argv(f"cat > {shlex.quote(name)}", 60, interactive=True, init=False)
        done = subprocess.run(argv, input=text.encode(), capture_output=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"writing {name} in the container failed: {done.stderr[-300:]!r}")

    def shell(self, command: str, timeout: float = 60.0) -> ExecResult:
        """Runs ``command`` in the episode's persistent bash (see module docstring)."""
        try:
            self._start()
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as err:
            return ExecResult(f"sandbox error: {err}", 126, False)
        if self._shell is None:
            self._shell = shell_lib.PersistentShell(
                self.shell_argv(), kill_argv=self.kill_argv, init=self.shell_init,
                max_output_bytes=self.limits.max_output_bytes)
        return self._shell.run(command, timeout)

    def close(self) -> None:
        """Ends the shell session and removes the container (if it was started)."""
        if self._shell is not None:
            self._shell.close()
            self._shell = None
        if self._started:
            subprocess.run(self.remove_argv(), capture_output=True, timeout=120)
            self._started = False

    def __repr__(self) -> str:
        return f"ContainerSandbox(image={self.image!r}, cli={self.cli!r}, limits={dataclasses.asdict(self.limits)})"
