"""Issue 6: the trainer on two local processes (gloo CPU collectives, 2 devices
each) matches one process with the same 4 devices: same metrics and the same
parameters after 2 steps of the smoke config.

The two processes are launched as several hosts would be (the ``JAX_*``
variables that ``aem_jax.trainer.distributed`` reads) on 127.0.0.1 with a
port from the OS. They share one workdir, as the hosts of a slice share a
bucket: orbax writes each checkpoint from all processes together, and only
process 0 writes metrics and the plot.
"""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess

from tests import multiprocess
from tests.trainer.resume_test import (
    REPO, assert_same_metrics, assert_same_state, deterministic_metrics, load_state, shared_cache_dir, train_cmd,
    train_env,
)

STEPS = 2
# The entropy bonus gives the updates a non-zero gradient (see resume_test.COMMON).
OVERRIDES = (f"--config.total_steps={STEPS}", "--config.eval.num_tasks=0", "--config.loss.entropy_coef=0.05",
             "--config.checkpoint.every=1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _devices(n: int) -> str:
    return f"--xla_force_host_platform_device_count={n}"


def test_two_processes_train_like_one_process_with_the_same_devices(tmp_path, tmp_path_factory):
    cache = shared_cache_dir(tmp_path_factory)
    single, multi = tmp_path / "single", tmp_path / "multi"
    port = _free_port()
    procs, logs = [], [tmp_path / f"process_{pid}.log" for pid in range(2)]
    for pid, log in enumerate(logs):
        env = train_env(cache, XLA_FLAGS=_devices(2), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                        JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        env.pop("AEM_JAX_DISTRIBUTED", None)
        # Files, not pipes: a process blocked on a full pipe would stall the other one's collectives.
        with open(log, "w") as out:
            procs.append(subprocess.Popen(train_cmd(multi, *OVERRIDES), env=env, cwd=REPO, stdout=out,
                                          stderr=subprocess.STDOUT))
    multiprocess.wait_all(procs, timeout=300)
    outputs = [log.read_text() for log in logs]
    for pid, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {pid}:\n{out[-4000:]}"
        assert f"process {pid} of 2, 2 local / 4 global devices" in out, out[-2000:]

    env = train_env(cache, XLA_FLAGS=_devices(4))
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    proc = subprocess.run(train_cmd(single, *OVERRIDES), env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    reference = deterministic_metrics(single)
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert all(r["grad_norm"] > 0 for r in reference)  # the updates did something to agree on
    assert_same_metrics(reference, deterministic_metrics(multi))
    assert (multi / "curves.png").exists()
    # Checkpoints are written by both processes into one step directory.
    ckpt = multi / "checkpoints" / str(STEPS)
    assert {p.name for p in (ckpt / "state").iterdir() if p.name.startswith("ocdbt.process_")} == {
        "ocdbt.process_0", "ocdbt.process_1"}
    assert_same_state(load_state(single / "checkpoints" / str(STEPS)), load_state(ckpt))
    assert not [p for p in os.listdir(multi / "checkpoints") if "tmp" in p]
    assert pathlib.Path(multi / "metrics.jsonl").read_text().count("\n") == STEPS  # process 0 only
