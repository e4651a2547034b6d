"""Default job: GRPO + AEM on the built-in treasure game, small model from scratch, CPU.

Run:
  python -m aem_jax.train                                   # this config
  python -m aem_jax.train --config=configs/default.py:smoke --workdir=/tmp/smoke
  python -m aem_jax.train --config.aem.enabled=False        # plain GRPO

Every field is listed, with its meaning, in ``aem_jax/trainer/defaults.py``;
this file keeps those defaults.
"""
from aem_jax.trainer.defaults import base, smoke, textworld, variants


def get_config(arg: str | None = None):
    names = variants(arg, "configs/default.py")
    c = base()
    if "textworld" in names:
        textworld(c)
    if "smoke" in names:
        smoke(c)
    return c
