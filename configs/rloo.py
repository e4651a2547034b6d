"""RLOO (2402.14740) + AEM on the built-in game: leave-one-out baseline, no std division.

Run:
  python -m aem_jax.train --config=configs/rloo.py --workdir=runs/rloo
  python -m aem_jax.train --config=configs/rloo.py:smoke --workdir=/tmp/rloo_smoke
"""
from aem_jax.trainer.defaults import base, environment, smoke, variants


def get_config(arg: str | None = None):
    names = variants(arg, "configs/rloo.py")
    c = base()
    environment(c, names)           # :textworld or :longhorizon
    c.algorithm = "rloo"
    if "smoke" in names:
        smoke(c)
    return c
