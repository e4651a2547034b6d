"""ETPO (2402.06700) on the built-in treasure game: token-level soft Q learning, CPU.

Run:
  python -m aem_jax.train --config=configs/etpo.py --workdir=runs/etpo
  python -m aem_jax.train --config=configs/etpo.py:smoke --workdir=/tmp/etpo_smoke

Starts from ``base()`` of aem_jax/trainer/defaults.py (every shared field
is documented there, the ``etpo`` block included) and sets what etpo needs. ETPO materialises [B,T,V]
logits (see aem_jax/trainer/etpo.py): fine for the word-level vocabulary
here, keep minibatches small with LLM vocabularies.
"""
from ml_collections import ConfigDict

from aem_jax.trainer.defaults import base, environment, smoke, variants


def get_config(arg: str | None = None) -> ConfigDict:
    """The etpo config; variant smoke: 2 steps of a tiny policy and Q network on CPU."""
    names = variants(arg, "configs/etpo.py")
    c = base()
    environment(c, names)           # :textworld or :longhorizon
    c.algorithm = "etpo"             # aem_jax/trainer/etpo.py
    c.aem.enabled = False            # plain ETPO (True: weight each response's policy-loss tokens by AEM's alpha)
    c.rollout.history = "concatenated"  # each turn bootstraps from the next turn of its row (required)
    c.optim.learning_rate = 1e-3     # policy AdamW learning rate
    c.learner.epochs = 1             # passes over each batch; every minibatch: one Q step, one policy step
    c.loss.entropy_coef = 0.0        # no entropy bonus: ETPO's KL to rho is its regulariser. With a bonus c
                                     # and Q = 0 the policy's optimum is rho^(beta / (beta + c)), a flattened
                                     # reference (c = beta = 0.01 took a 0.30 warm start to 0.03 in 60 steps)

    if "smoke" in names:
        smoke(c)
    return c
