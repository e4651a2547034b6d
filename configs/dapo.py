"""DAPO (2503.14476) + AEM on the built-in game: asymmetric clip, token-mean, dynamic sampling.

Run:
  python -m aem_jax.train --config=configs/dapo.py --workdir=runs/dapo
  python -m aem_jax.train --config=configs/dapo.py:smoke --workdir=/tmp/dapo_smoke
"""
from aem_jax.trainer.defaults import base, environment, smoke, variants


def get_config(arg: str | None = None):
    names = variants(arg, "configs/dapo.py")
    c = base()
    environment(c, names)           # :textworld or :longhorizon
    c.algorithm = "dapo"
    c.loss.clip_low = 0.2            # DAPO's clip-lower
    c.loss.clip_high = 0.28          # DAPO's clip-higher: room for low-probability tokens to rise
    c.loss.agg = "token-mean"        # DAPO aggregates over all tokens of the batch
    c.dapo.max_resample = 2          # extra rollout batches to refill all-equal groups
    if "smoke" in names:
        smoke(c)
    return c
