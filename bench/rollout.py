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

Long-horizon workload (issue 17): 64 episodes x 16 turns of a synthetic
environment whose observations are 64 tokens, 32-token actions (the random
bench model almost never samples end-of-turn, so every action runs to the
limit and is played: ``overlong_actions="play"``), on the bench model:

    python bench/rollout.py --workload long [--episodes 64] [--turns 16] [--no-torch]
                            [--torch-threads N] [--engines continuous,simple,transformers]

It prints generated tokens/s of the continuous engine, of ``engine="simple"``
(every turn re-prefills the whole history) and of transformers' `generate`
re-prefilling each turn on the same weights (the same chat rows, left-padded,
sampled at temperature 1), each engine's share of time spent waiting for the
environment, the ratios, and the machine's load average. Each engine's
CPU seconds (``time.process_time``, all of the process's threads) are
printed too, with tokens per CPU second: on a machine shared with other
jobs, engines measured one after the other see different loads, and the
wall-clock ratio then measures the load as much as the engine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time

import jax
import numpy as np

from aem_jax import envs, models
from aem_jax.envs.treasure import vocabulary
from aem_jax.models import sampler
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


class Babble:
    """Synthetic long-horizon environment: every observation is `length` random filler words.

    Word-level tokenizer: one word is one token, so an observation is exactly
    `length` tokens. Never ends by itself (the rollout's max_turns truncates).
    """

    def __init__(self, length: int = 64, vocab: int = 30000):
        self.length, self.vocab = length, vocab
        self.rng = None

    def _text(self):
        return " ".join(f"w{i}" for i in self.rng.integers(0, self.vocab, self.length))

    def reset(self, *, seed):
        self.rng = np.random.default_rng(seed)
        return envs.Observation(self._text(), {})

    def step(self, action):
        return envs.Step(self._text(), 0.0, False, {})


def long_config(args, engine):
    # prompt (64 + glue) + turns x (action 32 + end-of-turn + 64 + glue) fits 2048 at 16 turns
    context = 128 + args.turns * (args.action_tokens + args.obs_tokens + 8)
    return RolloutConfig(num_tasks=args.episodes, group_size=1, max_turns=args.turns,
                         max_context_tokens=context, max_action_tokens=args.action_tokens,
                         overlong_actions="play", num_threads=args.threads, seq_bucket=128,
                         engine=engine)


def run_long(engine, model, tok, args):
    """(tokens/s, metrics) of one engine on the long-horizon workload (after a compile run)."""
    config = long_config(args, engine)
    policy = SamplerPolicy.for_rollout(model, tok, config)
    env = lambda: Babble(args.obs_tokens)
    # Compile first, untimed: the continuous engine's shapes (prefill rows, chunk and cache
    # width buckets) depend on how episodes interleave, so it plays the whole workload once;
    # the simple engine's are one per prompt-length bucket, compiled directly.
    warm = config if engine == "continuous" else dataclasses.replace(config, max_turns=2)
    collect(env, policy, tok, warm, key=jax.random.key(0))
    if engine == "simple":  # compile the longer prompt buckets of later turns too
        p = 256
        while p // 2 + config.max_action_tokens < config.max_context_tokens:
            prompts = [[1] * min(p, config.max_context_tokens - config.max_action_tokens)] * args.episodes
            sampler.generate(model, prompts, key=jax.random.key(0), params=policy.params,
                             pad_id=policy.pad_id, max_cache_len=config.max_context_tokens)
            p *= 2
    cpu0 = time.process_time()
    _, records, m = collect(env, policy, tok, config, key=jax.random.key(1))
    cpu = time.process_time() - cpu0
    assert all(r.turns == args.turns and not r.failed for r in records), records[0]
    return {"engine": engine, "tokens": m["agent_tokens"], "total_s": m["time_total_s"],
            "tokens_per_s": m["agent_tokens"] / m["time_total_s"],
            "env_frac": m["time_env_s"] / m["time_total_s"], "generate_s": m["time_generate_s"],
            "cpu_s": cpu, "tokens_per_cpu_s": m["agent_tokens"] / cpu}


def run_long_torch(model, tok, args):
    """transformers `generate` on the same weights, re-prefilling each turn's whole history."""
    import tempfile

    import torch
    import transformers

    from aem_jax.rollout import ChatFormat

    chat = ChatFormat(tok)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as path:
        models.save_pretrained(model, tok, path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pad = tok.pad_token_id
    n, new = args.episodes, args.action_tokens
    envs_ = [Babble(args.obs_tokens) for _ in range(n)]
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                  min_new_tokens=new, pad_token_id=pad)
    torch.manual_seed(0)
    env_s = 0.0
    cpu0 = time.process_time()
    start = time.perf_counter()
    t0 = time.perf_counter()
    rows = [chat.prompt_ids(e.reset(seed=i).text) for i, e in enumerate(envs_)]
    env_s += time.perf_counter() - t0
    generated = 0
    with torch.no_grad():
        for _ in range(args.turns):
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            out = hf.generate(ids, attention_mask=mask, **kwargs)[:, width:].tolist()
            generated += sum(len(a) for a in out)
            t0 = time.perf_counter()
            obs = [e.step(chat.decode_action(a)).observation for e, a in zip(envs_, out)]
            env_s += time.perf_counter() - t0
            rows = [r + a + chat.env_ids(o, closed=False) for r, a, o in zip(rows, out, obs)]
    total = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    return {"engine": "transformers", "tokens": float(generated), "total_s": total,
            "tokens_per_s": generated / total, "env_frac": env_s / total,
            "generate_s": total - env_s, "torch_threads": torch.get_num_threads(),
            "cpu_s": cpu, "tokens_per_cpu_s": generated / cpu}


def main_long(args):
    tok = bench_tokenizer(())
    model = models.init_model(BENCH_MODEL, seed=0)
    load0 = os.getloadavg()
    rows = []
    engines = [e for e in args.engines.split(",") if e and not (args.no_torch and e == "transformers")]
    for engine in engines:
        rows.append(run_long_torch(model, tok, args) if engine == "transformers"
                    else run_long(engine, model, tok, args))
        # One line per engine as it ends (a long run on a busy machine shows progress).
        print(f"done: {json.dumps(rows[-1])}; load average {os.getloadavg()[0]:.1f}", flush=True)
    load1 = os.getloadavg()
    by = {r["engine"]: r for r in rows}
    base = by.get("continuous")
    ratios = {f"continuous_vs_{k}": base["tokens_per_s"] / by[k]["tokens_per_s"]
              for k in by if base and k != "continuous"}
    ratios.update({f"continuous_vs_{k}_per_cpu_s": base["tokens_per_cpu_s"] / by[k]["tokens_per_cpu_s"]
                   for k in by if base and k != "continuous"})
    print(f"long-horizon rollout bench: {args.episodes} episodes x {args.turns} turns, "
          f"{args.obs_tokens}-token observations, {args.action_tokens}-token actions, bench model, "
          f"backend {jax.default_backend()}; load average {load0[0]:.1f} -> {load1[0]:.1f}")
    print("| engine | generated tokens | total s | tokens/s | CPU s | tokens per CPU s | env % "
          "| continuous is x faster (wall, CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = (f"{base['tokens_per_s'] / r['tokens_per_s']:.2f}, "
                 f"{base['tokens_per_cpu_s'] / r['tokens_per_cpu_s']:.2f}") if base else "-"
        print(f"| {r['engine']} | {r['tokens']:.0f} | {r['total_s']:.1f} | {r['tokens_per_s']:.1f} "
              f"| {r['cpu_s']:.1f} | {r['tokens_per_cpu_s']:.2f} | {100 * r['env_frac']:.1f} | {ratio} |")
    print(json.dumps({"bench": "rollout_long", "episodes": args.episodes, "turns": args.turns,
                      "obs_tokens": args.obs_tokens, "action_tokens": args.action_tokens,
                      "loadavg_start": load0[0], "loadavg_end": load1[0],
                      "backend": jax.default_backend(), "results": rows, **ratios}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="envs", choices=("envs", "long"))
    parser.add_argument("--episodes", type=int, default=64, help="long workload: episodes")
    parser.add_argument("--turns", type=int, default=16, help="long workload: turns")
    parser.add_argument("--obs-tokens", type=int, default=64, help="long workload")
    parser.add_argument("--action-tokens", type=int, default=32, help="long workload")
    parser.add_argument("--no-torch", action="store_true", help="long workload: skip transformers")
    parser.add_argument("--engines", default="continuous,simple,transformers",
                        help="long workload: which engines, in this order (comma-separated)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="long workload: torch intra-op threads (0: torch's default)")
    parser.add_argument("--envs", default="treasure,textworld")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--history", default="concatenated")
    parser.add_argument("--max-action-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    if args.workload == "long":
        unknown = sorted(set(args.engines.split(",")) - {"continuous", "simple", "transformers"})
        if unknown:
            raise SystemExit(f"--engines: {unknown[0]!r} unknown; allowed: continuous, simple, transformers")
        return main_long(args)
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
