"""Rollout throughput: where the time of a batch goes.

Plays 64 concurrent episodes (8 tasks x 8 rollouts) with the bench model --
a Qwen2 config with vocab 32000, hidden 512, intermediate 1536, 8 layers,
8 heads, 2 KV heads, tied embeddings, random weights -- on the built-in
treasure game and on TextWorld, and reports the time spent in generation,
in environments and in batching, and episodes per second. Target:
environment time at most 20% of the total.

    python bench/rollout.py [--envs treasure,textworld] [--tasks 8] [--group 8]

A first, untimed batch compiles the sampler and generates the TextWorld games
(cached under ~/.cache/aem_jax/textworld). Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import re
import time

import jax

from aem_jax import envs, models
from aem_jax.envs.treasure import vocabulary
from aem_jax.rollout import EnvGroup, RolloutConfig, SamplerPolicy, collect

BENCH_MODEL = models.ModelConfig(
    vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
    num_kv_heads=2, head_dim=64, tie_embeddings=True, qkv_bias=True, model_type="qwen2")

SETTINGS = {
    "treasure": dict(env_kwargs=dict(num_boxes=6, num_clues=2), max_turns=4,
                     max_context_tokens=256),
    "textworld": dict(env_kwargs=dict(challenge="tw-coin_collector", level=5, max_steps=50),
                      max_turns=3, max_context_tokens=1024),
}


def _words(texts):
    return [w for t in texts for w in re.findall(r"[A-Za-z0-9']+", t)]


def bench_tokenizer(textworld_seeds):
    """Word-level tokenizer filled to the model's 32000 ids (every id decodes)."""
    words = list(vocabulary())
    if textworld_seeds:
        env = envs.make("textworld", **SETTINGS["textworld"]["env_kwargs"],
                        admissible_commands=True)
        for seed in textworld_seeds:
            obs = env.reset(seed=seed)
            words += _words([obs.text, obs.info["anchor"]])
    words = list(dict.fromkeys(words))
    tok = models.build_tokenizer(words)
    filler = [f"w{i}" for i in range(BENCH_MODEL.vocab_size - len(tok))]
    return models.build_tokenizer(words + filler)


def run(name, model, tok, args):
    setting = SETTINGS[name]
    config = RolloutConfig(num_tasks=args.tasks, group_size=args.group,
                           max_turns=setting["max_turns"], history=args.history,
                           max_context_tokens=setting["max_context_tokens"],
                           max_action_tokens=args.max_action_tokens, num_threads=args.threads,
                           seq_bucket=128)
    policy = SamplerPolicy.for_rollout(model, tok, config)
    group = EnvGroup(name, **setting["env_kwargs"])
    seeds = list(range(args.tasks))
    t0 = time.perf_counter()
    collect(group, policy, tok, config, key=jax.random.key(0), task_seeds=seeds)  # compile
    warmup = time.perf_counter() - t0
    _, records, m = collect(group, policy, tok, config, key=jax.random.key(1), task_seeds=seeds)
    total = m["time_total_s"]
    return {
        "env": name, "episodes": m["episodes"], "turns_mean": m["turns_mean"],
        "agent_tokens": m["agent_tokens"], "seq_len": m["seq_len"],
        "generate_s": m["time_generate_s"], "env_s": m["time_env_s"],
        "batch_s": m["time_batch_s"], "total_s": total,
        "env_frac": m["time_env_s"] / total, "episodes_per_s": m["episodes_per_s"],
        "warmup_s": warmup,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="treasure,textworld")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--history", default="concatenated")
    parser.add_argument("--max-action-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    names = args.envs.split(",")
    for name in names:
        if name not in SETTINGS:
            raise SystemExit(f"--envs: {name!r} unknown; allowed: {', '.join(SETTINGS)}")
    tok = bench_tokenizer(range(args.tasks) if "textworld" in names else ())
    model = models.init_model(BENCH_MODEL, seed=0)
    rows = [run(name, model, tok, args) for name in names]
    print(f"rollout bench: {args.tasks * args.group} concurrent episodes, "
          f"{args.max_action_tokens} max action tokens, {args.history} history, "
          f"backend {jax.default_backend()} x{jax.device_count()}")
    header = ("env", "turns", "gen s", "env s", "batch s", "total s", "env %", "episodes/s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['env']} | {r['turns_mean']:.2f} | {r['generate_s']:.2f} | {r['env_s']:.2f} "
              f"| {r['batch_s']:.3f} | {r['total_s']:.2f} | {100 * r['env_frac']:.1f} "
              f"| {r['episodes_per_s']:.2f} |")
    print(json.dumps({"bench": "rollout", "episodes": args.tasks * args.group,
                      "backend": jax.default_backend(), "results": rows}))


if __name__ == "__main__":
    main()
