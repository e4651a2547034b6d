"""GRPO + AEM on TextWorld games (the engine under ALFWorld), generated locally with tw-make.

Run:
  python -m aem_jax.train --config=configs/textworld.py --workdir=runs/textworld
  python -m aem_jax.train --config=configs/textworld.py:smoke --workdir=/tmp/tw_smoke
  # a pretrained chat model instead of a scratch one (local dir or hub id):
  python -m aem_jax.train --config=configs/textworld.py --config.model.source=Qwen/Qwen2.5-1.5B-Instruct

Games are generated on first use into ~/.cache/aem_jax/textworld (no download).
"""
from aem_jax.trainer.defaults import base, smoke


def get_config(arg: str | None = None):
    c = base()
    c.algorithm = "grpo"
    c.total_steps = 100
    c.env.name = "textworld"
    c.env.kwargs = {
        "challenge": "tw-coin_collector",  # tw-simple | tw-coin_collector | tw-treasure_hunter | tw-cooking
        "level": 1,                        # difficulty of the generated game
        "admissible_commands": True,       # list valid commands in each observation
        "max_steps": 8,                    # game steps before the engine ends the episode
    }
    c.model.tokenizer = "bpe"              # open vocabulary: byte-level BPE trained on observations
    c.model.bpe_vocab_size = 768
    c.model.hidden_size = 96
    c.model.intermediate_size = 288
    c.model.num_layers = 2
    c.rollout.num_tasks = 8
    c.rollout.group_size = 8
    c.rollout.max_turns = 6
    c.rollout.history = "windowed"         # observations are long: keep the last h turns
    c.rollout.window = 2
    c.rollout.max_context_tokens = 512
    c.rollout.max_action_tokens = 12
    c.rollout.invalid_penalty = 0.05
    c.learner.minibatch_size = 32
    c.eval.num_tasks = 16
    if arg == "smoke":
        smoke(c)
        c.env.kwargs["max_steps"] = 2
        c.rollout.max_turns = 2
        c.model.bpe_vocab_size = 300
        c.model.tokenizer_corpus_tasks = 2
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/textworld.py; known: smoke")
    return c
