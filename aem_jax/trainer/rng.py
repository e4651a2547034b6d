"""Named random streams: every random choice of a run comes from one ``key(seed)``.

``Streams(seed).at(name, step)`` is ``fold_in(fold_in(key(seed), index of
name), step)``: each use (parameter init, sampling, advantage noise, minibatch
shuffles, evaluation, each algorithm's own parts) has its own stream, so no
two uses share a key, no seed's stream equals another seed's (seed 1's
rollout keys are not seed 0's advantage keys), and a resumed run draws the
same keys as an uninterrupted one because they depend only on (seed, name,
step). ``numpy(name, step)`` gives a ``numpy.random.Generator`` from the same
key, for host-side choices (replay sampling).
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

# The order is part of the run's identity: append, never reorder.
STREAMS = (
    "init",            # policy parameters of a scratch model
    "rollout",         # token sampling during training rollouts
    "dapo_rollout",    # DAPO's extra rollouts (sampling and task seeds)
    "advantage",       # advantage noise (AEM's shuffled-alpha ablation)
    "shuffle",         # minibatch order of the policy-gradient family and ETPO
    "eval",            # token sampling on held-out tasks
    "critic_init",     # ArCHer's critic
    "critic_replay",   # ArCHer's replay and fresh-row sampling
    "actor_shuffle",   # ArCHer's actor minibatches
    "q_init",          # ETPO's Q network
    "demonstration",   # SFT: the expert's noisy actions (and the key its collect call gets)
)


@dataclasses.dataclass(frozen=True)
class Streams:
    """The named random streams of one run."""

    seed: int

    def key(self, name: str) -> jax.Array:
        """The root key of stream ``name``."""
        if name not in STREAMS:
            raise ValueError(f"unknown random stream {name!r}; streams: {', '.join(STREAMS)}")
        return jax.random.fold_in(jax.random.key(self.seed), STREAMS.index(name))

    def at(self, name: str, step: int) -> jax.Array:
        """The key of stream ``name`` at training step ``step``."""
        return jax.random.fold_in(self.key(name), step)

    def numpy(self, name: str, step: int) -> np.random.Generator:
        """A numpy generator seeded from the key of ``name`` at ``step``."""
        words = np.asarray(jax.random.key_data(self.at(name, step))).astype(np.uint64)
        return np.random.default_rng([int(w) for w in words.ravel()])

    def int_seed(self, name: str, step: int = 0) -> int:
        """A 31-bit integer from the stream (for APIs that take an int seed, e.g. ``nnx.Rngs``)."""
        return int(self.numpy(name, step).integers(0, 2**31 - 1))


def task_seeds(seed: int, step: int, num_tasks: int) -> list[int]:
    """Environment seeds of the tasks of one training step, in [0, 2**30) (eval uses 2**30 + n)."""
    return [(seed * 1_000_003 + step * num_tasks + n) % (2**30) for n in range(num_tasks)]


def eval_seeds(num_tasks: int) -> list[int]:
    """Held-out task seeds: disjoint from every training seed."""
    return [2**30 + n for n in range(num_tasks)]
