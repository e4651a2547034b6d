"""``python -m aem_jax.train --config=configs/X.py[:variant] --config.a.b=v --workdir=DIR``.

With no arguments it trains ``configs/default.py`` (GRPO + AEM on the built-in
game, a small model from scratch, CPU) into ``runs/default``.
"""
from __future__ import annotations

import logging
import os
import pathlib

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG), "Training config file (configs/X.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, metrics and plots.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from aem_jax.trainer.loop import train  # after flags: jax flags may be set by configs

    summary = train(_CONFIG.value, os.path.expanduser(_WORKDIR.value))
    outputs = "metrics.jsonl, tb/, checkpoints/, curves.png" + (", eval.json" if "success_after" in summary else "")
    print(f"workdir: {_WORKDIR.value} ({outputs})")
    return 0 if summary else 1


if __name__ == "__main__":
    app.run(main)
