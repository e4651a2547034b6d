"""Container sandbox: the same interface as ``LocalSandbox``, on a task image.

For SWE-bench images (the repository at ``/testbed``, its environment
installed): one long-lived container per episode started from ``image`` with

  docker|podman run -d --network none --cap-drop ALL --security-opt
    no-new-privileges --pids-limit N --memory M --ulimit nofile/fsize/cpu ...
    IMAGE sleep infinity

and every command run with ``exec ... timeout -s KILL T sh -c COMMAND``
(``timeout`` signals its whole process group; the host also kills the CLI at
the deadline).  ``close()`` removes the container.  The commands are built by
pure methods so they can be checked without a container runtime.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import shlex
import shutil
import subprocess
import time

from aem_jax.envs.swe.sandbox import ExecResult, Limits, _kill_tree, _read_limited, _normalise_returncode

CLIS = ("docker", "podman")
_COUNTER = itertools.count()


class ContainerSandbox:
    """Runs commands in a container of ``image`` (see module docstring).

    Args:
      image: container image holding the repository (e.g. a SWE-bench image).
      cli: "docker" or "podman".
      workdir: the repository inside the image.
      user: user to run commands as (default: the image's user).
      env: extra environment variables.
      **limits: ``Limits`` fields (cpu_seconds, memory_bytes, max_processes, ...).
    """

    def __init__(self, image: str, *, cli: str = "docker", workdir: str = "/testbed",
                 user: str | None = None, env: dict[str, str] | None = None, **limits: int):
        if cli not in CLIS:
            raise ValueError(f"cli must be one of {CLIS}, got {cli!r}")
        if not image:
            raise ValueError("image must be a non-empty image name")
        self.image, self.cli, self.workdir, self.user = image, cli, workdir, user
        self.env = dict(env or {})
        self.limits = Limits(**limits)
        self.name = f"aem-swe-{os.getpid()}-{next(_COUNTER)}-{int(time.time() * 1000) % 10**8}"
        self._started = False

    def run_argv(self) -> list[str]:
        """The command that starts the container."""
        lim = self.limits
        argv = [self.cli, "run", "-d", "--rm", "--name", self.name, "--network", "none",
                "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                "--pids-limit", str(lim.max_processes), "--memory", str(lim.memory_bytes),
                "--memory-swap", str(lim.memory_bytes),
                "--ulimit", f"nofile={lim.max_open_files}:{lim.max_open_files}",
                "--ulimit", f"fsize={lim.max_file_bytes}:{lim.max_file_bytes}",
                "--ulimit", f"cpu={lim.cpu_seconds}:{lim.cpu_seconds}",
                "--tmpfs", f"/tmp:rw,size={lim.tmp_bytes}", "--workdir", self.workdir]
        if self.user:
            argv += ["--user", self.user]
        return [*argv, "--entrypoint", "sleep", self.image, "infinity"]

    def exec_argv(self, command: str, timeout: float, *, interactive: bool = False) -> list[str]:
        """The command that runs ``command`` in the container."""
        argv = [self.cli, "exec"] + (["-i"] if interactive else []) + ["-w", self.workdir]
        if self.user:
            argv += ["--user", self.user]
        for key, value in sorted(self.env.items()):
            argv += ["-e", f"{key}={value}"]
        return [*argv, self.name, "timeout", "-s", "KILL", f"{max(1, int(timeout + 0.999))}",
                "sh", "-c", command]

    def remove_argv(self) -> list[str]:
        """The command that removes the container."""
        return [self.cli, "rm", "-f", self.name]

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
        argv = self.exec_argv(f"cat > {shlex.quote(name)}", 60, interactive=True)
        done = subprocess.run(argv, input=text.encode(), capture_output=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"writing {name} in the container failed: {done.stderr[-300:]!r}")

    def close(self) -> None:
        """Removes the container (if it was started)."""
        if self._started:
            subprocess.run(self.remove_argv(), capture_output=True, timeout=120)
            self._started = False

    def __repr__(self) -> str:
        return f"ContainerSandbox(image={self.image!r}, cli={self.cli!r}, limits={dataclasses.asdict(self.limits)})"
