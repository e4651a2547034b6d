"""Success rate of a uniformly random player (a floor for results).

  python experiments/random_player.py --num-boxes 4 --max-turns 2 --episodes 20000
  python experiments/random_player.py --env textworld --max-turns 4 --episodes 640

Each turn picks uniformly among the valid actions, with a fixed seed, and
prints the success rate. On the built-in game those are "read note" and
"open box k"; on TextWorld, the admissible commands of the coin-collector
games the TextWorld configs train on (``textworld()`` of
aem_jax/trainer/defaults.py: level 2, a pool of 32 games, task seed s plays
game s % 32).
"""
import argparse

import numpy as np

from aem_jax.envs import make


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="treasure", choices=["treasure", "textworld"])
    p.add_argument("--num-boxes", type=int, default=4, help="treasure only")
    p.add_argument("--num-clues", type=int, default=1, help="treasure only")
    p.add_argument("--max-turns", type=int, default=2)
    p.add_argument("--episodes", type=int, default=20000)
    args = p.parse_args()
    if args.env == "treasure":
        env = make("treasure", num_boxes=args.num_boxes, num_clues=args.num_clues, max_turns=args.max_turns)
        valid = lambda info: env.valid_actions()  # noqa: E731
    else:
        from aem_jax.trainer.defaults import base, textworld
        kwargs = dict(textworld(base()).env.kwargs)
        kwargs.update(max_steps=args.max_turns, numbered_commands=False)
        env = make("textworld", **kwargs)
        valid = lambda info: info["admissible_commands"]  # noqa: E731
    rng = np.random.default_rng(0)
    wins = 0
    for seed in range(args.episodes):
        info = env.reset(seed=seed).info
        for _ in range(args.max_turns):
            step = env.step(str(rng.choice(valid(info))))
            info = step.info
            if step.done:
                break
        wins += bool(step.info["success"])
    print(f"random player ({args.env}): {wins / args.episodes:.4f} success over {args.episodes} episodes")


if __name__ == "__main__":
    main()
