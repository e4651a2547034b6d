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
with fewer tasks per step (episodes are 4-6 times longer).
"""
from aem_jax.trainer.defaults import base, smoke, variants


def get_config(arg: str | None = None):
    names = variants(arg, "configs/longhorizon.py")
    if "textworld" in names:
        raise ValueError("configs/longhorizon.py has no textworld variant; known: smoke")
    c = base()
    c.env.name = "dungeon"
    c.env.kwargs = {"num_rooms": 6, "num_notes": 3, "num_keys": 2, "max_turns": 12}
    c.rollout.max_turns = 12                 # = env max_turns: expert 9 turns + 3 spare
    c.rollout.max_context_tokens = 512       # intro + 12 observation/action turns with chat markup
    c.rollout.seq_bucket = 64
    c.rollout.max_action_tokens = 6          # "go to room 4" + end of turn is 5 word-level tokens
    c.rollout.num_tasks = 16                 # x 8 rollouts = 128 episodes, ~1500 turns per step
    c.learner.minibatch_size = 32
    c.eval.num_tasks = 32
    c.loss.dual_clip = 3.0                   # as configs/default.py
    c.total_steps = 300                      # for warm starts; from scratch success stays ~0 (docs/results.md)
    if "smoke" in names:
        smoke(c)
    return c
