"""A persistent bash session per episode: ``cd`` and exported variables carry over.

``PersistentShell(start_argv, kill_argv=...)`` keeps one ``bash`` process
alive (e.g. ``podman exec -i CONTAINER bash``; anything whose stdin / stdout
is a bash in the sandbox) and runs each command in that shell's own process,
so ``cd``, ``export``, functions, aliases and ``source``-d environments (conda)
persist, as in a terminal.  The protocol, one command at a time:

* the command text goes in as an ANSI-C quoted string (``$'...'``: any bytes
  but NUL, no quoting pitfalls) and runs as ``{ eval "$cmd"; } </dev/null
  2>&1`` - stdin is /dev/null so the command cannot eat the next commands;
* after it, the shell writes its working directory and ``export -p`` to a
  state directory and prints a marker with a fresh random nonce and the exit
  status; everything before the marker is the command's output.

A command still running at its deadline (or past the output cap) is killed
as a whole from outside: ``kill_argv(pid, keep_file)`` runs ``KILL_TREE`` in
the same sandbox, which stops and kills every process below the session's
bash (found through ``/proc``) except the background jobs started by earlier
commands (listed in ``keep_file`` before each command), then the bash itself
- so the rest of the command line does not run on, and a loop of shell
builtins dies too.  The next command starts a new bash in the saved working
directory with the saved exported variables (and ``init`` run again): the
session goes on, as of the end of the last command that finished.  The same
happens after ``exit``.
"""
from __future__ import annotations

import os
import secrets
import selectors
import subprocess
import time
from typing import Callable, Sequence

from aem_jax.envs.swe.sandbox import ExecResult

# Kills every descendant of the shell $1 except the background jobs listed (one pid a
# line) in file $2, then the shell itself; bash >= 4, /proc and `tr` only.  Processes
# are stopped before they are killed so that a fork bomb cannot outrun the walk.
KILL_TREE = r"""
root=$1; keep=" $(cat "${2:-/dev/null}" 2>/dev/null | tr '\n' ' ') "
kill -STOP "$root" 2>/dev/null  # first: the shell must not run on (and save its state)
for round in 1 2 3 4 5; do
  declare -A kids=()
  for s in /proc/[0-9]*/stat; do
    read -r line < "$s" 2>/dev/null || continue
    pid=${s#/proc/}; pid=${pid%/stat}
    rest=${line##*) }; set -- $rest
    kids[$2]+=" $pid"
  done
  all=""; queue="${kids[$root]:-}"
  while [ -n "${queue// /}" ]; do
    set -- $queue; p=$1; shift; queue="$*"
    case "$keep" in *" $p "*) continue ;; esac
    queue="$queue ${kids[$p]:-}"; all="$all $p"
  done
  [ -z "${all// /}" ] && break
  kill -STOP $all 2>/dev/null; kill -KILL $all 2>/dev/null
  unset kids
done
kill -KILL "$root" 2>/dev/null
exit 0
"""


def ansi_c_quote(text: str) -> str:
    """``text`` as a bash ``$'...'`` word (bash decodes it back byte for byte)."""
    if "\0" in text:
        raise ValueError("a shell command cannot contain NUL bytes")
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in "\\'":
            out.append("\\" + char)
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return "$'" + "".join(out) + "'"


class ShellError(RuntimeError):
    """The session could not be (re)started."""


class PersistentShell:
    """One long-lived bash per episode (see module docstring).

    Args:
      start_argv: command whose stdin / stdout is a fresh ``bash`` in the sandbox.
      kill_argv: ``kill_argv(pid, keep_file)`` -> a command, run next to the
        session, that kills ``pid`` and its descendants but the background jobs
        listed in ``keep_file``: ``KILL_TREE`` is a bash script doing this.
      init: shell lines run once when the session starts (e.g. conda activation).
      max_output_bytes: more output than this kills the command.
      state_dir: directory (in the sandbox) for the saved working directory and
        exports, created if missing; default a fresh one under ``/tmp`` (set it
        where a restarted shell finds it again, e.g. a sandbox whose ``/tmp``
        does not outlive its shell).
    """

    def __init__(self, start_argv: Sequence[str], *, kill_argv: Callable[[int, bool], list[str]],
                 init: str = "", max_output_bytes: int = 4 << 20, start_timeout: float = 120.0,
                 state_dir: str | None = None):
        self.start_argv, self.kill_argv = list(start_argv), kill_argv
        self.init, self.max_output_bytes, self.start_timeout = init, max_output_bytes, start_timeout
        self._proc: subprocess.Popen | None = None
        self._pid: int | None = None
        self._state: str | None = None
        self.state_dir = state_dir
        self._buffer = b""

    # -- process plumbing ----------------------------------------------------------
    def _send(self, text: str) -> None:
        self._proc.stdin.write(text.encode())
        self._proc.stdin.flush()

    def _read_until(self, marker: bytes, deadline: float, cap: int) -> tuple[bytes, bytes | None, str]:
        """(output before the marker, the marker's line, why it stopped).

        Why: "marker", "cap" (more than ``cap`` bytes), "deadline" or "eof" (the shell exited).
        """
        selector = selectors.DefaultSelector()
        selector.register(self._proc.stdout, selectors.EVENT_READ)
        try:
            while True:
                at = self._buffer.find(marker)
                end = self._buffer.find(b"\n", at) if at >= 0 else -1
                if end >= 0:
                    out, line = self._buffer[:at], self._buffer[at:end]
                    self._buffer = self._buffer[end + 1:]
                    return out, line, "marker"
                if len(self._buffer) > cap + len(marker) + 64:
                    return self._buffer, None, "cap"
                left = deadline - time.monotonic()
                if left <= 0:
                    return self._buffer, None, "deadline"
                if not selector.select(min(left, 1.0)):
                    continue
                try:
                    chunk = os.read(self._proc.stdout.fileno(), 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    return self._buffer, None, "eof"
                self._buffer += chunk
        finally:
            selector.close()

    def _start(self) -> None:
        self._proc = subprocess.Popen(self.start_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, process_group=0)
        os.set_blocking(self._proc.stdout.fileno(), False)
        self._buffer = b""
        nonce, first = secrets.token_hex(8), self._state is None
        script = ["exec 2>&1", "shopt -s expand_aliases"]  # as in a terminal
        if self.init:
            script.append(f"{{ {self.init}\n}} </dev/null >/dev/null 2>&1")
        if first and self.state_dir:
            script.append(f"__aem_state={ansi_c_quote(self.state_dir)}; mkdir -p \"$__aem_state\"")
        elif first:
            script.append('__aem_state=$(mktemp -d /tmp/.aem_shell.XXXXXX 2>/dev/null || '
                          '{ mkdir -p /tmp/.aem_shell_$$ && echo /tmp/.aem_shell_$$; })')
        else:  # a restart: back to the saved directory and exported variables
            script.append(f'__aem_state={self._state}; [ -f "$__aem_state/env" ] && '
                          '. "$__aem_state/env" 2>/dev/null; '
                          'cd "$(cat "$__aem_state/cwd" 2>/dev/null)" 2>/dev/null')
        script.append(f"printf '\\n__AEM_READY_{nonce} %s %s\\n' \"$$\" \"$__aem_state\"")
        self._send("\n".join(script) + "\n")
        out, line, _ = self._read_until(f"__AEM_READY_{nonce}".encode(),
                                        time.monotonic() + self.start_timeout, 1 << 20)
        if line is None:
            self._terminate()
            raise ShellError(f"the shell did not start ({' '.join(self.start_argv[:3])} ...): "
                             f"{out.decode(errors='replace').strip()[-300:]}")
        _, pid, state = line.decode().split(" ", 2)
        self._pid, self._state = int(pid), state
        if first:
            self.run("true", self.start_timeout)  # saves the initial directory and exports

    def _terminate(self) -> None:
        # Not communicate(): background jobs of the session may hold the pipe open.
        if self._proc is not None:
            for close in (self._proc.stdin.close, self._proc.stdout.close, self._proc.kill):
                try:
                    close()
                except OSError:
                    pass
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._proc, self._pid, self._buffer = None, None, b""

    def _kill(self) -> None:
        if self._pid is not None:
            try:
                subprocess.run(self.kill_argv(self._pid, f"{self._state}/bg"), capture_output=True,
                               timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                pass

    # -- the interface -------------------------------------------------------------
    def run(self, command: str, timeout: float = 60.0) -> ExecResult:
        """Runs ``command`` in the session (never raises for the command itself)."""
        try:
            if self._proc is None or self._proc.poll() is not None:
                self._terminate()
                self._start()
            marker = f"__AEM_DONE_{secrets.token_hex(8)}_"
            self._send(f"__aem_c={ansi_c_quote(command)}\n"
                       'jobs -p > "$__aem_state/bg" 2>/dev/null\n'
                       '{ eval "$__aem_c"\n} </dev/null 2>&1\n__aem_s=$?\n'
                       'pwd > "$__aem_state/cwd" 2>/dev/null; export -p > "$__aem_state/env" 2>/dev/null\n'
                       f"printf '\\n{marker}%s\\n' \"$__aem_s\"\n")
        except (OSError, ValueError, ShellError) as err:
            self._terminate()
            return ExecResult(f"sandbox error: {err}", 126, False)
        cap = self.max_output_bytes
        out, line, why = self._read_until(marker.encode(), time.monotonic() + timeout, cap)
        note, status = "", None
        if why == "marker":
            out = out[:-1] if out.endswith(b"\n") else out  # the newline printed before the marker
            status = int(line.decode().rsplit("_", 1)[1])
        else:
            status = None
            if why == "eof":  # `exit 3` gives 3
                try:
                    status = self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            self._kill()
            self._terminate()
            note = {"deadline": f"\n[command timed out after {timeout:g} s; it was killed]",
                    "cap": f"\n[output exceeded {cap} bytes; the command was killed]",
                    "eof": "\n[the shell exited]"}[why]
            note += ("\n[the next command runs in a new shell, in the last working directory with "
                     "the last exported variables]")
        text = out[:cap].decode("utf-8", errors="replace") + note
        return ExecResult(text, 137 if status is None else status, why == "deadline")

    def close(self) -> None:
        """Ends the session (its background jobs die with the sandbox)."""
        if self._proc is not None and self._proc.poll() is None:
            self._kill()
        self._terminate()
