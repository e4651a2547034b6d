"""GRPO + AEM on TextWorld games (the engine under ALFWorld), generated locally with tw-make.

Run:
  python -m aem_jax.train --config=configs/textworld.py --workdir=runs/textworld
  python -m aem_jax.train --config=configs/textworld.py:smoke --workdir=/tmp/tw_smoke
  python -m aem_jax.train --config=configs/textworld.py --config.model.source=Qwen/Qwen2.5-1.5B-Instruct

Games are generated on first use into ~/.cache/aem_jax/textworld (no download).
The environment, tokenizer and model sizes are ``textworld()`` of
aem_jax/trainer/defaults.py; every other algorithm's config takes them with
its ``:textworld`` variant (``configs/ppo.py:textworld``).
"""
from aem_jax.trainer.defaults import base, smoke, textworld, variants


def get_config(arg: str | None = None):
    names = variants(arg, "configs/textworld.py")
    c = textworld(base())
    c.algorithm = "grpo"
    c.total_steps = 100
    if "smoke" in names:
        smoke(c)
    return c
