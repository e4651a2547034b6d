"""Supervised warm start: behaviour cloning of the environment's scripted expert (``algorithm="sft"``).

Run:
  python -m aem_jax.train --config=configs/sft.py --workdir=runs/sft
  python -m aem_jax.train --config=configs/sft.py --config.total_steps=40 --config.sft.noise=0.5 \\
      --workdir=runs/sft_weak                              # a weaker, higher-entropy start
  python -m aem_jax.train --config=configs/default.py --config.model.source=runs/sft/export/final \\
      --workdir=runs/grpo_warm                             # any RL config from the warm start
  python -m aem_jax.train --config=configs/sft.py:textworld --workdir=runs/sft_tw
  python -m aem_jax.train --config=configs/sft.py:longhorizon --workdir=runs/sft_lh   # the dungeon
  python -m aem_jax.train --config=configs/sft.py:smoke --workdir=/tmp/sft_smoke

Strength is ``total_steps`` (training steps, one optimiser step each: 64
demonstrations per step, minibatches of 64) and ``sft.noise`` (the share
of the expert's actions replaced by a random valid action): docs/results.md,
"Supervised warm start", has held-out success and response entropy for a
grid of both. The model, tokenizer and environment are ``base()``'s (those of
configs/default.py) so the default job and every other config on the
built-in game start from it. ``:longhorizon`` takes the environment and
rollout settings of configs/longhorizon.py (the dungeon), ``:textworld``
those of the TextWorld configs, so that their RL configs can load the result.
The policy is exported at the end to WORKDIR/export/final (config.json,
safetensors, tokenizer with its chat template). The last step logs
``heldout_success`` and ``heldout_response_entropy`` in metrics.jsonl.
"""

from aem_jax.trainer.defaults import base, environment, smoke, variants


def get_config(arg: str | None = None):
    names = variants(arg, "configs/sft.py")
    c = base()
    c.algorithm = "sft"
    c.total_steps = 100              # training steps = optimiser steps (64 demonstrations, one minibatch)
    c.sft.noise = 0.0                # an exact imitator of the expert
    c.rollout.num_tasks = 64         # demonstrations per step: 64 tasks ...
    c.rollout.group_size = 1         # ... one episode each (the loop's rollouts of the policy too)
    c.learner.minibatch_size = 64
    c.export.enabled = True          # the warm start: WORKDIR/export/final
    environment(c, names)            # :textworld or :longhorizon, as the RL configs that load the result
    if names & {"textworld", "longhorizon"}:
        # TextWorld: longer observations; the dungeon: episodes of 9-12 turns
        c.rollout.num_tasks = 32     # 32 demonstrations per step, one episode each
        c.rollout.group_size = 1
        c.learner.minibatch_size = 32
    if "textworld" in names:
        c.env.kwargs["policy_commands"] = True  # the expert plays the game's walkthrough
    if "smoke" in names:
        smoke(c)
    return c
