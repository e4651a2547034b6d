"""GSPO (2507.18071) + AEM on the built-in game: sequence-level ratio and clipping per response.

Run:
  python -m aem_jax.train --config=configs/gspo.py --workdir=runs/gspo
  python -m aem_jax.train --config=configs/gspo.py:smoke --workdir=/tmp/gspo_smoke
"""
from aem_jax.trainer.defaults import base, smoke


def get_config(arg: str | None = None):
    c = base()
    c.algorithm = "gspo"
    c.loss.clip_low = 3e-4           # GSPO clips the length-normalised sequence ratio tightly
    c.loss.clip_high = 4e-4
    if arg == "smoke":
        smoke(c)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/gspo.py; known: smoke")
    return c
