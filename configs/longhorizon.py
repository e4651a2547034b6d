"""GRPO + AEM on the long-horizon dungeon (issue 18 item 2), small model from scratch, CPU.

Run:
  python -m aem_jax.train --config=configs/longhorizon.py --workdir=runs/longhorizon
  python -m aem_jax.train --config=configs/longhorizon.py:smoke --workdir=/tmp/lh_smoke
  python -m aem_jax.train --config=configs/longhorizon.py --config.model.source=runs/sft/export/final

The game (aem_jax/envs/dungeon.py): 6 rooms, a trail of 3 notes, 2 keys; the
scripted expert escapes in 9 turns, a uniformly random player almost never
(0 of 1000 seeds, 0.04 % of 100,000), and the episode is cut at 12 turns.
Every turn's observation is appended to one row ("concatenated" history, so
ppo, archer and etpo can use this config too): an expert episode (9 turns)
is 245 word-level tokens with the chat markup, one that wastes 3 turns on
the game's longest message (an invalid room) 353, hence
``max_context_tokens`` 512 (rows are padded only to the next multiple of
``seq_bucket`` above the longest). From random weights a policy sees almost no
successes (the floor is ~0), so expect this config to stay near the floor
unless the model starts from a supervised warm start (``model.source``, see
issue 18 item 1); it is the long-horizon task of the warm-started
comparison. The rest are the default job's settings (configs/default.py),
with fewer tasks per step (episodes are 4-6 times longer). The game's settings
are ``defaults.longhorizon``, which every algorithm's config applies with
its ``:longhorizon`` variant (``configs/archer.py:longhorizon`` etc.).
"""
from aem_jax.trainer.defaults import base, longhorizon, smoke, variants


def get_config(arg: str | None = None):
    names = variants(arg, "configs/longhorizon.py")
    if names - {"smoke", "longhorizon"}:
        raise ValueError(f"configs/longhorizon.py is the dungeon; its variants: smoke (got {arg!r})")
    c = longhorizon(base())                  # the game, rows and batch sizes (aem_jax/trainer/defaults.py)
    c.loss.dual_clip = 3.0                   # as configs/default.py
    c.total_steps = 300                      # for warm starts; from scratch success stays ~0 (docs/results_scratch.md)
    if "smoke" in names:
        smoke(c)
    return c
