"""GiGPO (2505.10978) on the built-in game: episode GRPO + anchor-state step advantages.

Run:
  python -m aem_jax.train --config=configs/gigpo.py --workdir=runs/gigpo
  python -m aem_jax.train --config=configs/gigpo.py:smoke --workdir=/tmp/gigpo_smoke
"""
from aem_jax.trainer.defaults import base, environment, smoke, variants


def get_config(arg: str | None = None):
    names = variants(arg, "configs/gigpo.py")
    c = base()
    environment(c, names)           # :textworld or :longhorizon
    c.algorithm = "gigpo"
    c.aem.enabled = False            # the paper's GiGPO; set True for GiGPO + AEM
    c.advantage.gamma = 0.95         # discount of step returns
    c.advantage.gigpo_step_weight = 1.0  # A = A_episode + w * A_step
    if "smoke" in names:
        smoke(c)
    return c
