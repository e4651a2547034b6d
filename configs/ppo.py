"""PPO with a value head and bi-level (turn + token) GAE on the built-in game.

Run:
  python -m aem_jax.train --config=configs/ppo.py --workdir=runs/ppo
  python -m aem_jax.train --config=configs/ppo.py:smoke --workdir=/tmp/ppo_smoke
"""
from aem_jax.trainer.defaults import base, environment, smoke, variants


def get_config(arg: str | None = None):
    names = variants(arg, "configs/ppo.py")
    c = base()
    environment(c, names)           # :textworld or :longhorizon
    c.algorithm = "ppo"
    c.aem.enabled = False            # plain PPO; set True to modulate its GAE advantages by AEM
    # PPO needs no groups: as many distinct tasks as the others' episodes per step
    c.rollout.num_tasks = c.rollout.num_tasks * c.rollout.group_size
    c.rollout.group_size = 1
    c.rollout.history = "concatenated"  # bi-level GAE reads every turn's value from one row (required)
    c.ppo.value_coef = 0.5           # value-loss weight
    c.ppo.gamma = 0.95               # discount between turns
    c.ppo.lam = 0.95                 # turn-level GAE lambda
    c.ppo.token_lam = 1.0            # token-level GAE lambda inside a turn
    c.learner.epochs = 2             # PPO reuses each batch
    if "smoke" in names:
        smoke(c)
        c.rollout.group_size = 1
        c.rollout.num_tasks = 4
    return c
