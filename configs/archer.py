"""ArCHer (2402.19446) on the built-in treasure game: utterance critic + token actor, CPU.

Run:
  python -m aem_jax.train --config=configs/archer.py --workdir=runs/archer
  python -m aem_jax.train --config=configs/archer.py:smoke --workdir=/tmp/archer_smoke
  python -m aem_jax.train --config=configs/archer.py --config.aem.enabled=False   # plain ArCHer

Starts from ``base()`` of aem_jax/trainer/defaults.py (every shared field
is documented there, the ``archer`` block included) and sets what archer needs.
"""
from ml_collections import ConfigDict

from aem_jax.trainer.defaults import base, environment, smoke, variants


def get_config(arg: str | None = None) -> ConfigDict:
    """The archer config; variant smoke: 2 steps of a tiny model and critic on CPU."""
    names = variants(arg, "configs/archer.py")
    c = base()
    environment(c, names)           # :textworld or :longhorizon
    c.algorithm = "archer"           # aem_jax/trainer/archer.py (critic.py, replay.py)
    c.aem.enabled = True             # scale the actor's utterance advantages by AEM's alpha (False: plain ArCHer)
    c.rollout.history = "concatenated"  # ArCHer replays whole episodes (required)
    c.rollout.seq_bucket = 0         # the replay buffer stores fixed-length rows (required)
    c.optim.learning_rate = 1e-3     # actor (policy) AdamW learning rate
    c.optim.b2 = 0.999               # Adam's second-moment decay, as the reference code's (torch's default):
                                     # a converged actor's tiny gradients are not rescaled to full steps

    if "smoke" in names:
        smoke(c)
    return c
