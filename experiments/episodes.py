"""Plays a trained run's latest checkpoint and prints what its policy does.

  python experiments/episodes.py --config configs/archer.py --workdir runs/compare_treasure/archer_s0 \\
      --set aem.enabled=False --episodes 64 --show 4

Builds the run's trainer from its config file and overrides (give the same
``--set`` overrides as the run, without the ``--config.`` prefix), restores
the latest checkpoint in WORKDIR/checkpoints, samples ``--episodes`` episodes
on held-out task seeds and prints the success rate, the most frequent action
sequences and the first ``--show`` transcripts. Nothing is written.
"""
from __future__ import annotations

import argparse
import collections
import os

import numpy as np

from aem_jax import sharding
from aem_jax.rollout import collect
from aem_jax.trainer import checkpoint, loop, rng, rollouts, setup


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file[:variants] the run used")
    p.add_argument("--workdir", required=True, help="the run's workdir (with checkpoints/)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="the run's config overrides")
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--show", type=int, default=4, help="transcripts to print")
    p.add_argument("--temperature", type=float, default=None, help="default: the run's rollout temperature")
    args = p.parse_args()

    config = setup.load_config(args.config, args.set)
    ckpt_dir = os.path.join(os.path.abspath(args.workdir), "checkpoints")
    if not os.path.isdir(ckpt_dir):
        p.error(f"--workdir {args.workdir!r} has no checkpoints/ directory")
    algorithm = loop.check_config(config)
    ctx = loop.build_context(config, sharding.make_mesh(dict(config.mesh)))
    with sharding.use_mesh(ctx.mesh):
        ckpt = checkpoint.Checkpointer(ckpt_dir)
        step, _, state = loop.restore(ctx, algorithm, algorithm.init(ctx), ckpt, args.workdir)
        ckpt.close()
        if step == 0:
            p.error(f"no checkpoint could be restored from {ckpt_dir}")
        cfg = setup.rollout_config(config, num_tasks=args.episodes, group_size=1)
        policy = rollouts.sampler(ctx, algorithm.policy_params(state), temperature=args.temperature)
        _, records, _ = collect(config.env.name, policy, ctx.tokenizer, cfg, key=ctx.keys.key("eval"),
                                task_seeds=rng.eval_seeds(args.episodes), env_kwargs=dict(config.env.kwargs))
    actions = collections.Counter(
        " | ".join(m["content"] for m in r.transcript if m["role"] == "assistant") for r in records)
    print(f"step {step}: success {np.mean([r.success for r in records]):.3f} over {len(records)} episodes, "
          f"invalid actions per episode {np.mean([r.invalid_actions for r in records]):.2f}")
    print("most frequent action sequences:")
    for seq, n in actions.most_common(8):
        print(f"  {n:4d}  {seq!r}")
    for r in records[:args.show]:
        print(f"--- episode seed {r.seed}: success {r.success}, rewards {r.turn_rewards}")
        for m in r.transcript:
            print(f"[{m['role']}] {m['content']}")


if __name__ == "__main__":
    main()
