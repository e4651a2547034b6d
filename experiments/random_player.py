"""Success rate of a uniformly random player of the built-in game (a floor for results).

  python experiments/random_player.py --num-boxes 4 --max-turns 2 --episodes 20000

Each turn picks uniformly among the game's valid actions ("read note" and
"open box k"), with a fixed seed; prints the success rate.
"""
import argparse

import numpy as np

from aem_jax.envs.treasure import TreasureHunt


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-boxes", type=int, default=4)
    p.add_argument("--num-clues", type=int, default=1)
    p.add_argument("--max-turns", type=int, default=2)
    p.add_argument("--episodes", type=int, default=20000)
    args = p.parse_args()
    env = TreasureHunt(num_boxes=args.num_boxes, num_clues=args.num_clues, max_turns=args.max_turns)
    rng = np.random.default_rng(0)
    wins = 0
    for seed in range(args.episodes):
        env.reset(seed=seed)
        while True:
            step = env.step(str(rng.choice(env.valid_actions())))
            if step.done:
                break
        wins += bool(step.info["success"])
    print(f"random player: {wins / args.episodes:.4f} success over {args.episodes} episodes")


if __name__ == "__main__":
    main()
