"""Success rate of a uniformly random player (a floor for results).

  python experiments/random_player.py --num-boxes 4 --max-turns 2 --episodes 20000
  python experiments/random_player.py --env textworld --max-turns 4 --episodes 640
  python experiments/random_player.py --env dungeon --episodes 1000

Each turn picks uniformly among the valid actions, with a fixed seed, and
prints the success rate. On the built-in game those are "read note" and
"open box k"; on TextWorld, the admissible commands of the coin-collector
games the TextWorld configs train on (``textworld()`` of
aem_jax/trainer/defaults.py: level 2, a pool of 32 games, task seed s plays
game s % 32); on the long-horizon dungeon (aem_jax/envs/dungeon.py, sizes as
in configs/longhorizon.py by default) "read note", "take key", "unlock door"
and "go to room k". For the games with a scripted expert (treasure,
dungeon) it also prints the expert's success and mean episode length on the
same seeds.
"""
import argparse

import numpy as np

from aem_jax.envs import make


def play(env, seed, choose, valid, max_turns):
    """(success, turns) of one episode where ``choose(actions, env)`` picks each action."""
    info = env.reset(seed=seed).info
    for turn in range(1, max_turns + 1):
        step = env.step(choose(valid(info), env))
        info = step.info
        if step.done:
            return bool(info["success"]), turn
    return False, max_turns


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="treasure", choices=["treasure", "textworld", "dungeon"])
    p.add_argument("--num-boxes", type=int, default=4, help="treasure only")
    p.add_argument("--num-clues", type=int, default=1, help="treasure only")
    p.add_argument("--num-rooms", type=int, default=6, help="dungeon only")
    p.add_argument("--num-notes", type=int, default=3, help="dungeon only")
    p.add_argument("--num-keys", type=int, default=2, help="dungeon only")
    p.add_argument("--max-turns", type=int, default=None,
                   help="turn limit (default: 2 for treasure and textworld, the game's own for dungeon)")
    p.add_argument("--episodes", type=int, default=20000)
    args = p.parse_args()
    expert = args.env != "textworld"
    if args.env == "treasure":
        max_turns = 2 if args.max_turns is None else args.max_turns
        env = make("treasure", num_boxes=args.num_boxes, num_clues=args.num_clues, max_turns=max_turns)
        valid = lambda info: env.valid_actions()  # noqa: E731
    elif args.env == "dungeon":
        env = make("dungeon", num_rooms=args.num_rooms, num_notes=args.num_notes,
                   num_keys=args.num_keys, max_turns=args.max_turns)
        max_turns = env.max_turns
        valid = lambda info: env.valid_actions()  # noqa: E731
    else:
        from aem_jax.trainer.defaults import base, textworld
        max_turns = 2 if args.max_turns is None else args.max_turns
        kwargs = dict(textworld(base()).env.kwargs)
        kwargs.update(max_steps=max_turns, numbered_commands=False)
        env = make("textworld", **kwargs)
        valid = lambda info: info["admissible_commands"]  # noqa: E731
    rng = np.random.default_rng(0)
    wins = sum(play(env, seed, lambda actions, e: str(rng.choice(actions)), valid, max_turns)[0]
               for seed in range(args.episodes))
    print(f"random player ({args.env}): {wins / args.episodes:.4f} success over {args.episodes} episodes")
    if expert:
        runs = [play(env, seed, lambda actions, e: e.optimal_action(), valid, max_turns)
                for seed in range(args.episodes)]
        print(f"expert ({args.env}): {np.mean([s for s, _ in runs]):.4f} success, "
              f"{np.mean([t for _, t in runs]):.2f} turns per episode over {args.episodes} episodes")


if __name__ == "__main__":
    main()
