"""Default job: GRPO + AEM on the built-in treasure game, small model from scratch, CPU.

Run:
  python -m aem_jax.train                                   # this config
  python -m aem_jax.train --config=configs/default.py:smoke --workdir=/tmp/smoke
  python -m aem_jax.train --config.aem.enabled=False        # plain GRPO

Every field is listed, with its meaning, in ``aem_jax/trainer/defaults.py``;
this file keeps those defaults.
"""
from aem_jax.trainer.defaults import base, smoke


def get_config(arg: str | None = None):
    c = base()
    if arg == "smoke":
        smoke(c)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/default.py; known: smoke")
    return c
