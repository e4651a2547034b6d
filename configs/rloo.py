"""RLOO (2402.14740) + AEM on the built-in game: leave-one-out baseline, no std division.

Run:
  python -m aem_jax.train --config=configs/rloo.py --workdir=runs/rloo
  python -m aem_jax.train --config=configs/rloo.py:smoke --workdir=/tmp/rloo_smoke
"""
from aem_jax.trainer.defaults import base, smoke


def get_config(arg: str | None = None):
    c = base()
    c.algorithm = "rloo"
    if arg == "smoke":
        smoke(c)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/rloo.py; known: smoke")
    return c
