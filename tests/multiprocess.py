"""Helpers for tests that start several cooperating processes (jax.distributed over gloo)."""
import json
import subprocess


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[str | None]:
    """Waits for every process (collecting piped output, if any); kills those still running
    when one fails to finish in ``timeout`` seconds, so no test leaves a worker behind."""
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


def results(procs: list[subprocess.Popen], outputs: list[str]) -> list[dict]:
    """The JSON after ``RESULT `` that each (successful) worker printed."""
    found = []
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
        found.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    return found
