"""ETPO (2402.06700) on the built-in treasure game: token-level soft Q learning, CPU.

Run:
  python -m aem_jax.train --config=configs/etpo.py --workdir=runs/etpo
  python -m aem_jax.train --config=configs/etpo.py:smoke --workdir=/tmp/etpo_smoke

Starts from ``base()`` of aem_jax/trainer/defaults.py (every shared field
is documented there) and adds the ``etpo`` block. ETPO materialises [B,T,V]
logits (see aem_jax/trainer/etpo.py): fine for the word-level vocabulary
here, keep minibatches small with LLM vocabularies.
"""
from ml_collections import ConfigDict

from aem_jax.trainer.defaults import base, smoke, textworld, variants


def get_config(arg: str | None = None) -> ConfigDict:
    """The etpo config; variant smoke: 2 steps of a tiny policy and Q network on CPU."""
    names = variants(arg, "configs/etpo.py")
    c = base()
    if "textworld" in names:
        textworld(c)
    c.algorithm = "etpo"             # trainer: aem_jax.trainer.etpo.EtpoTrainer
    c.aem.enabled = False            # ETPO has no advantages for AEM to rescale (required False)
    c.rollout.history = "concatenated"  # each turn bootstraps from the next turn of its row (required)
    c.optim.learning_rate = 1e-3     # policy AdamW learning rate
    c.learner.epochs = 1             # passes over each batch; every minibatch: one Q step, one policy step

    c.etpo = ConfigDict()
    c.etpo.beta = 0.01               # KL(pi || reference) weight; pi* is proportional to rho exp(Q / beta)
    c.etpo.gamma = 0.95              # discount between turns (none inside a response)
    c.etpo.tau = 0.005               # Polyak weight of the online Q in each target-Q update
    c.etpo.huber_delta = 10.0        # Huber threshold of the Q loss
    c.etpo.q_learning_rate = 1e-3    # Q-network AdamW learning rate (schedule etc. from c.optim)

    c.etpo.q = ConfigDict()          # the Q network: its own decoder, logits = Q over the vocabulary
    c.etpo.q.from_policy = False     # True: Q starts as a copy of the initial policy (its sizes; below ignored)
    c.etpo.q.hidden_size = 64        # D of the Q network
    c.etpo.q.intermediate_size = 128  # MLP width of the Q network
    c.etpo.q.num_layers = 2          # decoder blocks of the Q network
    c.etpo.q.num_heads = 4           # attention heads of the Q network
    c.etpo.q.num_kv_heads = 2        # key/value heads of the Q network
    c.etpo.q.head_dim = 16           # per-head size of the Q network

    if "smoke" in names:
        smoke(c)
        c.etpo.q.hidden_size = 32
        c.etpo.q.intermediate_size = 64
        c.etpo.q.num_layers = 1
    return c
