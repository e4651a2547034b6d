"""``python -m aem_jax.train --config=configs/X.py[:variant] --config.a.b=v --workdir=DIR``.

With no arguments it trains ``configs/default.py`` (GRPO + AEM on the built-in
game, a small model from scratch, CPU) into ``runs/default``.

A config that is not allowed (an unknown ``--config.KEY``, a value the
trainer's checks reject, a flag that does not parse) ends the command with
one line, ``error: ...`` naming the key, and exit status 2, before anything
is built.
"""
from __future__ import annotations

import logging
import os
import pathlib
import re
import sys
from typing import NoReturn, Sequence

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
USAGE_ERROR = 2  # the exit status of a command line that is not allowed (as argparse's)


def _exit_usage(error: BaseException) -> NoReturn:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def check_override_keys(argv: Sequence[str]) -> None:
    """Raises ConfigError for a ``--config.KEY`` override whose KEY the chosen config lacks.

    config_flags reports one with a bare ``AttributeError`` traceback, and
    without ``--config`` it does so while the flag is being defined, so this
    reads the command line (as config_flags does) before that.
    """
    argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
    spec, keys = str(_DEFAULT_CONFIG), []
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "--":
            break
        if re.fullmatch(r"--?config", arg) and i + 1 < len(argv):
            spec = argv[i + 1]
        elif match := re.fullmatch(r"--?config=(.*)", arg):
            spec = match.group(1)
        elif match := re.match(r"--?(?:no)?config\.([^=]+)", arg):
            keys.append(match.group(1))
    if not keys:
        return
    from aem_jax.trainer import setup, validate

    config = setup.load_config(spec)
    for key in keys:
        validate.check_override_key(config, key)


def _check_command_line(argv: Sequence[str]) -> None:
    from aem_jax.trainer.validate import ConfigError

    try:
        check_override_keys(argv)
    except (ConfigError, FileNotFoundError, flags.Error) as e:
        _exit_usage(e)


if __name__ == "__main__":
    _check_command_line(sys.argv)  # before the flags below read the overrides

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG), "Training config file (configs/X.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, metrics and plots.")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a value that does not parse reported as a usage error."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _exit_usage(e)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    # after flags: jax flags may be set by configs
    from aem_jax.trainer import integrity, validate
    from aem_jax.trainer.loop import train

    try:
        validate.check(_CONFIG.value)  # also done by the trainer; here before jax starts
        summary = train(_CONFIG.value, os.path.expanduser(_WORKDIR.value))
    except validate.ConfigError as e:
        _exit_usage(e)
    except (integrity.ConfigMismatchError, integrity.WorkdirLockedError) as e:
        # a run refused to start: one line, no traceback (exit 1: the command line itself was fine)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    outputs = "metrics.jsonl, tb/, checkpoints/, curves.png" + (", eval.json" if "success_after" in summary else "")
    print(f"workdir: {_WORKDIR.value} ({outputs})")
    return 0 if summary else 1


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
