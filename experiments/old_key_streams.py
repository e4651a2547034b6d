"""Runs the trainer with the key derivations it had before the named streams (commit 4cf3bc1).

The reshape of 2026-11-30 changed where every random key comes from; this
script puts the old derivations back (scratch init from ``seed``, rollout
keys ``fold_in(key(seed), step)``, advantage keys ``fold_in(key(seed + 1),
step)``, the minibatch permutation from ``fold_in(key(seed + 2), step *
1000 + epoch)``), so its metrics can be compared with the old commit's:

  git worktree add /tmp/old 4cf3bc1
  (cd /tmp/old && PYTHONPATH=. python -m aem_jax.train --config.total_steps=6 \\
       --config.eval.num_tasks=0 --workdir=/tmp/old_run)
  python experiments/old_key_streams.py --workdir /tmp/new_run --set total_steps=6 eval.num_tasks=0
  # then compare the two metrics.jsonl files (loss, grad_norm, token_entropy, success)

For one epoch per batch (``learner.epochs=1``), as in the default config.
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

from aem_jax.trainer import loop, rng, setup


class _OldPermutation:
    """Stands in for the numpy generator of the "shuffle" stream."""

    def __init__(self, seed: int, step: int):
        self.seed, self.step = seed, step

    def permutation(self, n: int) -> np.ndarray:
        key = jax.random.fold_in(jax.random.key(self.seed + 2), self.step * 1000)
        return np.asarray(jax.random.permutation(key, n))


def use_old_key_streams() -> None:
    at, numpy, int_seed = rng.Streams.at, rng.Streams.numpy, rng.Streams.int_seed

    def old_at(self, name, step):
        offsets = {"rollout": 0, "advantage": 1}
        if name in offsets:
            return jax.random.fold_in(jax.random.key(self.seed + offsets[name]), step)
        return at(self, name, step)

    rng.Streams.at = old_at
    rng.Streams.numpy = lambda self, name, step: (
        _OldPermutation(self.seed, step) if name == "shuffle" else numpy(self, name, step))
    rng.Streams.int_seed = lambda self, name, step=0: self.seed if name == "init" else int_seed(self, name, step)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/default.py")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--workdir", required=True)
    args = p.parse_args()
    config = setup.load_config(args.config, args.set)
    if config.learner.epochs != 1:
        p.error("the old permutation is reproduced for learner.epochs=1 only")
    use_old_key_streams()
    loop.train(config, args.workdir)


if __name__ == "__main__":
    main()
