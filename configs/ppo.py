"""PPO with a value head and bi-level (turn + token) GAE on the built-in game.

Run:
  python -m aem_jax.train --config=configs/ppo.py --workdir=runs/ppo
  python -m aem_jax.train --config=configs/ppo.py:smoke --workdir=/tmp/ppo_smoke
"""
from aem_jax.trainer.defaults import base, smoke


def get_config(arg: str | None = None):
    c = base()
    c.algorithm = "ppo"
    c.aem.enabled = False            # plain PPO; set True to modulate its GAE advantages by AEM
    c.rollout.group_size = 1         # PPO needs no groups: more distinct tasks instead
    c.rollout.num_tasks = 128
    c.ppo.value_coef = 0.5           # value-loss weight
    c.ppo.gamma = 0.95               # discount between turns
    c.ppo.lam = 0.95                 # turn-level GAE lambda
    c.ppo.token_lam = 1.0            # token-level GAE lambda inside a turn
    c.learner.epochs = 2             # PPO reuses each batch
    if arg == "smoke":
        smoke(c)
        c.rollout.group_size = 1
        c.rollout.num_tasks = 4
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/ppo.py; known: smoke")
    return c
