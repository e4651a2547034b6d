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


def setup_commands(args: argparse.Namespace) -> list[list[str]]:
    """Puts the code on every worker and installs it with JAX for TPU.

    With ``--repo-url`` every worker clones the repository; otherwise the
    committed tree of the local checkout (``git archive HEAD``) is copied.
    """
    install = (
        f"python3 -m venv {VENV} && {VENV}/bin/pip install -q -U pip && "
        f"cd {REMOTE_DIR} && {VENV}/bin/pip install -q -e '.[tpu,swe]'"
    )
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
