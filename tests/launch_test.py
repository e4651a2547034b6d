"""Tests for launch/tpu.py: the gcloud commands its --dry-run prints."""

import os
import shlex
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "tpu.py")


def _dry_run(*args: str) -> list[list[str]]:
    result = subprocess.run(
        [sys.executable, SCRIPT, *args[:2], "--dry-run", *args[2:]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def _remote(command: list[str]) -> str:
    (flag,) = [a for a in command if a.startswith("--command=")]
    return flag[len("--command=") :]


def test_create_slice_and_queued_spot_resource():
    (cmd,) = _dry_run("create", "my-tpu", "--zone=us-east5-a", "--accelerator-type=v5p-16", "--project=proj")
    assert cmd == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-east5-a", "--project=proj",
        "--accelerator-type=v5p-16", "--version=v2-alpha-tpuv5",
    ]  # fmt: skip
    (cmd,) = _dry_run("create", "q", "--zone=z", "--accelerator-type=v4-8", "--queued", "--spot")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "q"]
    assert "--node-id=q" in cmd and "--runtime-version=tpu-ubuntu2204-base" in cmd and "--spot" in cmd
    (cmd,) = _dry_run("create", "c", "--zone=z", "--accelerator-type=v6e-8", "--version=custom-rt")
    assert "--version=custom-rt" in cmd


def test_setup_copies_committed_tree_and_installs_on_all_workers(tmp_path):
    archive, scp, ssh = _dry_run("setup", "my-tpu", "--zone=z", f"--tmp-dir={tmp_path}")
    assert archive[:2] == ["git", "-C"] and archive[3:5] == ["archive", "--format=tar.gz"] and archive[-1] == "HEAD"
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5] == str(tmp_path / "aem_jax_src.tar.gz") and "--worker=all" in scp
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"] and "--worker=all" in ssh
    remote = _remote(ssh)
    steps = remote.split(" && ")
    assert "tar -xzf" in remote and "uv pip install -q --python ~/aem_jax_venv/bin/python -e '.[tpu,swe]'" in remote
    # A Python >= 3.11 from uv, not the image's older python3 -m venv; bubblewrap for configs/swe.py's sandbox.
    assert "python3 -m venv" not in remote and "uv venv -q --python 3.11 ~/aem_jax_venv" in steps
    assert any(s.startswith("sudo apt-get update") for s in steps) and "apt-get install -y -qq git bubblewrap" in remote
    assert steps.index("uv venv -q --python 3.11 ~/aem_jax_venv") < [
        i for i, s in enumerate(steps) if "uv pip install" in s][0]
    assert "python3 -m pip install -q --user uv" in remote and "astral.sh/uv/install.sh" in remote
    assert "bwrap --unshare-all" in remote
    assert not (tmp_path / "aem_jax_src.tar.gz").exists()  # dry run: nothing executed
    (clone,) = _dry_run("setup", "my-tpu", "--zone=z", "--repo-url=https://example.org/aem_jax.git", "--branch=dev")
    assert "git clone https://example.org/aem_jax.git ~/aem_jax" in _remote(clone)
    assert "git checkout -q dev" in _remote(clone)
    assert "uv venv -q --python 3.11 ~/aem_jax_venv" in _remote(clone)


def test_setup_python_version_and_sandbox_choice():
    (*_, ssh) = _dry_run("setup", "t", "--zone=z", "--python=3.12", "--sandbox=container")
    remote = _remote(ssh)
    assert "uv venv -q --python 3.12 ~/aem_jax_venv" in remote
    assert "apt-get install -y -qq git docker.io" in remote and 'usermod -aG docker "$USER"' in remote
    assert "bubblewrap" not in remote
    (*_, ssh) = _dry_run("setup", "t", "--zone=z", "--sandbox=none")
    assert "apt-get install -y -qq git &&" in _remote(ssh) and "bwrap" not in _remote(ssh)


def test_run_same_command_on_all_workers_with_env_and_quoting():
    (cmd,) = _dry_run(
        "run", "my-tpu", "--zone=z", "--env=HF_HOME=/mnt/hf", "--",
        "python", "-m", "aem_jax.train", "--config=configs/swe.py", "--workdir=gs://bucket/runs/swe",
        "--config.notes=two words",
    )  # fmt: skip
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in cmd and "--zone=z" in cmd
    remote = _remote(cmd)
    assert remote.startswith("cd ~/aem_jax && . ~/aem_jax_venv/bin/activate && export AEM_JAX_DISTRIBUTED=1 HF_HOME=/mnt/hf")
    # The remote shell sees the original argv back.
    assert shlex.split(remote.split(" && ")[-1]) == [
        "python", "-m", "aem_jax.train", "--config=configs/swe.py", "--workdir=gs://bucket/runs/swe",
        "--config.notes=two words",
    ]  # fmt: skip
    (detached,) = _dry_run("run", "my-tpu", "--zone=z", "--detach", "--", "python", "-V")
    assert _remote(detached).startswith("nohup bash -c ") and "> ~/aem_jax_run.log 2>&1" in _remote(detached)


def test_logs_and_delete():
    (logs,) = _dry_run("logs", "my-tpu", "--zone=z", "--worker=1", "--lines=5")
    assert "--worker=1" in logs and _remote(logs) == "tail -n 5 ~/aem_jax_run.log"
    (delete,) = _dry_run("delete", "my-tpu", "--zone=z")
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone=z", "--quiet"]
    (delete,) = _dry_run("delete", "my-tpu", "--zone=z", "--queued")
    assert delete[3:5] == ["queued-resources", "delete"] and "--force" in delete


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "t", "--zone=z", "--dry-run"], "give the command to run after '--'"),
        (["run", "t", "--zone=z", "--env=1BAD=x", "--dry-run", "--", "ls"], "must look like NAME=VALUE"),
        (["create", "t", "--zone=z", "--accelerator-type=v9-8", "--dry-run"], "no default runtime"),
        (["create", "t", "--accelerator-type=v4-8", "--dry-run"], "--zone"),
        (["setup", "t", "--zone=z", "--python=3.10", "--dry-run"], "needs Python >= 3.11"),
        (["setup", "t", "--zone=z", "--sandbox=vm", "--dry-run"], "invalid choice"),
    ],
)
def test_bad_arguments_are_reported(args, message):
    result = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and message in result.stderr
