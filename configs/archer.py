"""ArCHer (2402.19446) on the built-in treasure game: utterance critic + token actor, CPU.

Run:
  python -m aem_jax.train --config=configs/archer.py --workdir=runs/archer
  python -m aem_jax.train --config=configs/archer.py:smoke --workdir=/tmp/archer_smoke
  python -m aem_jax.train --config=configs/archer.py --config.aem.enabled=False   # plain ArCHer

Starts from ``base()`` of aem_jax/trainer/defaults.py (every shared field
is documented there) and adds the ``archer`` block.
"""
from ml_collections import ConfigDict

from aem_jax.trainer.defaults import base, smoke, textworld, variants


def get_config(arg: str | None = None) -> ConfigDict:
    """The archer config; variant smoke: 2 steps of a tiny model and critic on CPU."""
    names = variants(arg, "configs/archer.py")
    c = base()
    if "textworld" in names:
        textworld(c)
    c.algorithm = "archer"           # trainer: aem_jax.trainer.archer.ArcherTrainer
    c.aem.enabled = True             # scale the actor's utterance advantages by AEM's alpha (False: plain ArCHer)
    c.rollout.history = "concatenated"  # ArCHer replays whole episodes (required)
    c.rollout.seq_bucket = 0         # the replay buffer stores fixed-length rows (required)
    c.optim.learning_rate = 1e-3     # actor (policy) AdamW learning rate

    c.archer = ConfigDict()
    c.archer.gamma = 0.95            # discount between utterances in the critic's TD targets
    c.archer.tau = 0.1               # Polyak weight of the online critic in each target update
    c.archer.critic_steps = 10       # critic updates per iteration (paper: 50; fewer keeps CPU iterations short)
    c.archer.actor_steps = 3         # actor updates per iteration (paper: 3)
    c.archer.actor_warmup = 5        # first iterations train only the critic (paper: 10-20)
    c.archer.buffer_episodes = 4096  # replay buffer capacity in episodes (FIFO)
    c.archer.critic_minibatch_size = 32  # replayed episodes (and as many fresh ones) per critic step
    c.archer.critic_learning_rate = 1e-3  # critic AdamW learning rate (schedule etc. from c.optim)

    c.archer.critic = ConfigDict()   # the critic's own decoder trunk (same vocabulary and family)
    c.archer.critic.from_policy = False  # True: trunk = a copy of the initial policy (its sizes; below ignored)
    c.archer.critic.hidden_size = 64     # D of the critic trunk
    c.archer.critic.intermediate_size = 128  # MLP width of the critic trunk
    c.archer.critic.num_layers = 2       # decoder blocks of the critic trunk
    c.archer.critic.num_heads = 4        # attention heads of the critic trunk
    c.archer.critic.num_kv_heads = 2     # key/value heads of the critic trunk
    c.archer.critic.head_dim = 16        # per-head size of the critic trunk
    c.archer.critic.head_width = 64      # hidden width of each Q_k / V_k MLP head

    if "smoke" in names:
        smoke(c)
        c.archer.critic.hidden_size = 32
        c.archer.critic.intermediate_size = 64
        c.archer.critic.num_layers = 1
        c.archer.critic.head_width = 16
        c.archer.critic_steps = 2
        c.archer.actor_steps = 1
        c.archer.actor_warmup = 1
        c.archer.buffer_episodes = 16
        c.archer.critic_minibatch_size = 4
    return c
