#!/usr/bin/env python3
"""Create a Cloud TPU VM or slice, set it up, run one command on every worker.

    python launch/tpu.py create NAME --zone=us-east5-a --accelerator-type=v5p-16
    python launch/tpu.py setup  NAME --zone=us-east5-a
    python launch/tpu.py run    NAME --zone=us-east5-a -- \\
        python -m aem_jax.train --config=configs/swe.py --workdir=gs://BUCKET/runs/swe
    python launch/tpu.py logs   NAME --zone=us-east5-a
    python launch/tpu.py delete NAME --zone=us-east5-a

Every subcommand takes ``--dry-run``, which prints the ``gcloud`` commands
(one per line, shell-quoted) instead of running them. A multi-host slice runs
the same program on every host (``--worker=all``); the program connects the
hosts itself through ``jax.distributed.initialize()``, which ``run`` requests
by exporting ``AEM_JAX_DISTRIBUTED=1``.

Only the standard library is used, so the script runs on any machine with
``gcloud`` installed and authenticated.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence

# Runtime (software) versions for JAX by TPU generation: the prefix of the
# accelerator type picks one unless --version is given.
DEFAULT_RUNTIME = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
REMOTE_DIR = "~/aem_jax"
VENV = "~/aem_jax_venv"
LOG_FILE = "~/aem_jax_run.log"
ARCHIVE = "aem_jax_src.tar.gz"


def _scope(args: argparse.Namespace) -> list[str]:
    """Flags every gcloud command of this TPU shares."""
    flags = [f"--zone={args.zone}"]
    if args.project:
        flags.append(f"--project={args.project}")
    return flags


def runtime_version(accelerator_type: str, version: str | None) -> str:
    """The --version to use: given, or the default of the TPU generation."""
    if version:
        return version
    generation = accelerator_type.split("-")[0]
    if generation not in DEFAULT_RUNTIME:
        raise SystemExit(
            f"--accelerator-type={accelerator_type!r}: no default runtime for generation {generation!r} "
            f"(known: {sorted(DEFAULT_RUNTIME)}); pass --version explicitly"
        )
    return DEFAULT_RUNTIME[generation]


def _ssh(args: argparse.Namespace, remote: str, *, worker: str = "all") -> list[str]:
    return [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_scope(args),
        f"--worker={worker}", f"--command={remote}",
    ]  # fmt: skip


def create_commands(args: argparse.Namespace) -> list[list[str]]:
    """``tpu-vm create`` (or a queued resource, which waits for capacity)."""
    version = runtime_version(args.accelerator_type, args.version)
    extra = ["--spot"] if args.spot else []
    if args.queued:
        return [[
            "gcloud", "compute", "tpus", "queued-resources", "create", args.name,
            f"--node-id={args.name}", *_scope(args), f"--accelerator-type={args.accelerator_type}",
            f"--runtime-version={version}", *extra,
        ]]  # fmt: skip
    return [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_scope(args),
        f"--accelerator-type={args.accelerator_type}", f"--version={version}", *extra,
    ]]  # fmt: skip


# System packages each --sandbox needs (aem_jax.envs.swe): bubblewrap for the
# local sandbox (prlimit comes with util-linux, on every image); a container
# runtime for SWE-bench images.
SANDBOX_PACKAGES = {"local": ["bubblewrap"], "container": ["docker.io"], "none": []}


def install_line(python: str, sandbox: str) -> str:
    """The shell line that installs the project on a stock TPU VM image.

    The images' own python3 is older than the project's 3.11 (Ubuntu
    22.04's is 3.10), so ``uv`` (from PyPI
    with the image's pip, else its standalone installer) creates the virtual
    environment with a managed CPython ``python`` and installs
    ``.[tpu,swe]`` into it. ``sandbox`` adds the system packages of the SWE
    environment's sandbox (``SANDBOX_PACKAGES``).
    """
    if sandbox not in SANDBOX_PACKAGES:
        raise SystemExit(f"--sandbox={sandbox!r}; allowed: {', '.join(SANDBOX_PACKAGES)}")
    parts = python.split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts) or (int(parts[0]), int(parts[1])) < (3, 11):
        raise SystemExit(f"--python={python!r}: the project needs Python >= 3.11, e.g. 3.11 or 3.12")
    packages = " ".join(["git", *SANDBOX_PACKAGES[sandbox]])
    steps = [
        f"sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {packages}",
        'export PATH="$HOME/.local/bin:$HOME/.cargo/bin:$PATH"',
        "(command -v uv >/dev/null || python3 -m pip install -q --user uv "
        "|| curl -LsSf https://astral.sh/uv/install.sh | sh)",
        f"rm -rf {VENV} && uv venv -q --python {shlex.quote(python)} {VENV}",
        f"cd {REMOTE_DIR} && uv pip install -q --python {VENV}/bin/python -e '.[tpu,swe]'",
        f"{VENV}/bin/python -c 'import sys, jax, aem_jax; print(sys.version.split()[0], jax.__version__)'",
    ]
    if sandbox == "container":
        steps.append('sudo usermod -aG docker "$USER"')
    if sandbox == "local":  # the sandbox runs unprivileged in a user namespace: check that it can
        steps.append("(bwrap --unshare-all --ro-bind / / true || echo 'warning: bubblewrap cannot create "
                     "a user namespace here; the SWE sandbox will fail (see docs/swe.md)' >&2)")
    return " && ".join(steps)


def setup_commands(args: argparse.Namespace) -> list[list[str]]:
    """Puts the code on every worker and installs it with JAX for TPU.

    With ``--repo-url`` every worker clones the repository; otherwise the
    committed tree of the local checkout (``git archive HEAD``) is copied.
    Then :func:`install_line`.
    """
    install = install_line(args.python, args.sandbox)
    if args.repo_url:
        fetch = (
            f"(test -d {REMOTE_DIR}/.git || git clone {shlex.quote(args.repo_url)} {REMOTE_DIR}) && "
            f"cd {REMOTE_DIR} && git fetch -q origin && git checkout -q {shlex.quote(args.branch)} && "
            f"git pull -q --ff-only origin {shlex.quote(args.branch)} && cd ~"
        )
        return [_ssh(args, f"set -e; {fetch} && {install}")]
    local_archive = os.path.join(args.tmp_dir, ARCHIVE)
    unpack = f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar -xzf ~/{ARCHIVE} -C {REMOTE_DIR}"
    return [
        ["git", "-C", args.source, "archive", "--format=tar.gz", f"--output={local_archive}", "HEAD"],
        [
            "gcloud", "compute", "tpus", "tpu-vm", "scp", local_archive, f"{args.name}:~/{ARCHIVE}",
            *_scope(args), "--worker=all",
        ],  # fmt: skip
        _ssh(args, f"set -e; {unpack} && {install}"),
    ]


def remote_command(command: Sequence[str], env: Sequence[str], *, detach: bool) -> str:
    """The shell line each worker runs: venv, env vars, the command."""
    if not command:
        raise SystemExit("run: give the command to run after '--', e.g. -- python -m aem_jax.train ...")
    for item in env:
        if "=" not in item or not item.split("=", 1)[0].isidentifier():
            raise SystemExit(f"--env={item!r} must look like NAME=VALUE")
    exports = " ".join(shlex.quote(e) for e in ["AEM_JAX_DISTRIBUTED=1", *env])
    line = f"cd {REMOTE_DIR} && . {VENV}/bin/activate && export {exports} && {shlex.join(command)}"
    if detach:
        # Keeps training alive when the ssh session ends; output goes to a log.
        return f"nohup bash -c {shlex.quote(line)} > {LOG_FILE} 2>&1 < /dev/null &"
    return line


def run_commands(args: argparse.Namespace) -> list[list[str]]:
    """The same command on all workers at once (``--worker=all``)."""
    return [_ssh(args, remote_command(args.command, args.env, detach=args.detach))]


def logs_commands(args: argparse.Namespace) -> list[list[str]]:
    """The tail of a detached run's log on one worker."""
    return [_ssh(args, f"tail -n {args.lines} {LOG_FILE}", worker=args.worker)]


def delete_commands(args: argparse.Namespace) -> list[list[str]]:
    if args.queued:
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *_scope(args), "--force", "--quiet"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_scope(args), "--quiet"]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)

    def common(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("name", help="TPU VM / slice name")
        p.add_argument("--zone", required=True, help="e.g. us-east5-a")
        p.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
        p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
        return p

    p = common("create", "create the TPU VM or slice")
    p.add_argument("--accelerator-type", required=True, help="e.g. v4-8, v5p-16, v5litepod-16, v6e-8")
    p.add_argument("--version", default=None, help="runtime version (default by generation)")
    p.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
    p.add_argument("--queued", action="store_true", help="use a queued resource (waits for capacity)")
    p.set_defaults(build=create_commands)

    p = common("setup", "copy the code to every worker and pip install it")
    p.add_argument("--repo-url", default=None, help="clone this repository instead of copying the local one")
    p.add_argument("--branch", default="main", help="branch to check out with --repo-url")
    p.add_argument("--source", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), help="local checkout to copy")
    p.add_argument("--tmp-dir", default="/tmp", help="where the local source archive is written")
    p.add_argument("--python", default="3.11", help="Python version uv installs for the venv (>= 3.11)")
    p.add_argument("--sandbox", default="local", choices=sorted(SANDBOX_PACKAGES),
                   help="SWE sandbox to install: local (bubblewrap, configs/swe.py's), container (docker), none")
    p.set_defaults(build=setup_commands)

    p = common("run", "run the command given after '--' on all workers")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE exported on every worker (repeatable)")
    p.add_argument("--detach", action="store_true", help=f"run in the background, output to {LOG_FILE}")
    p.set_defaults(build=run_commands)

    p = common("logs", "show the end of a detached run's log")
    p.add_argument("--worker", default="0", help="worker index (default 0)")
    p.add_argument("--lines", type=int, default=100)
    p.set_defaults(build=logs_commands)

    p = common("delete", "delete the TPU VM or slice")
    p.add_argument("--queued", action="store_true", help="it was created as a queued resource")
    p.set_defaults(build=delete_commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" is the remote command, passed through untouched
    # (argparse would otherwise try to read its flags as ours).
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    args = build_parser().parse_args(argv)
    if command and args.action != "run":
        raise SystemExit(f"{args.action}: unexpected command after '--': {shlex.join(command)}")
    args.command = command
    commands = args.build(args)
    for command in commands:
        if args.dry_run:
            print(shlex.join(command))
            continue
        print("+ " + shlex.join(command), file=sys.stderr, flush=True)
        result = subprocess.run(command, check=False)
        if result.returncode:
            print(f"command failed with exit status {result.returncode}: {shlex.join(command)}", file=sys.stderr)
            return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
