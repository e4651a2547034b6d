"""GSPO (2507.18071) + AEM on the built-in game: sequence-level ratio and clipping per response.

Run:
  python -m aem_jax.train --config=configs/gspo.py --workdir=runs/gspo
  python -m aem_jax.train --config=configs/gspo.py:smoke --workdir=/tmp/gspo_smoke
"""
from aem_jax.trainer.defaults import base, environment, smoke, variants


def get_config(arg: str | None = None):
    names = variants(arg, "configs/gspo.py")
    c = base()
    environment(c, names)           # :textworld or :longhorizon
    c.algorithm = "gspo"
    c.loss.clip_low = 3e-4           # GSPO clips the length-normalised sequence ratio tightly
    c.loss.clip_high = 4e-4
    if "smoke" in names:
        smoke(c)
    return c
