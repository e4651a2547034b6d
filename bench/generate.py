"""Generation and training throughput of aem_jax models against transformers.

  python bench/generate.py               # the full benchmark (a few minutes on 2 CPU cores)
  python bench/generate.py --no-torch    # aem_jax only
  python bench/generate.py --only=train  # the training rows only (aem_jax and transformers)

Setting: a Qwen2 config (vocab 32000, hidden 512, intermediate 1536, 8 layers,
8 heads, 2 kv heads, tied embeddings) with random weights, float32. One
Hugging Face checkpoint is written by transformers and loaded by both
implementations, so both generate from the same weights.

* Generation: B=32 prompts of 256 tokens, 128 new tokens, temperature 1
  (no top-k / top-p, no stop tokens, so every row generates 128 tokens).
  aem_jax: `aem_jax.models.sampler.generate` (compile time reported apart,
  best of --runs timed calls); transformers: `generate(do_sample=True)`.
* Training: one forward + backward of the mean token log-likelihood at B=8,
  T=1024 (hidden states, then the chunked log-probs of
  `aem_jax.objectives.logprobs_and_entropy_from_hidden`), jit-compiled,
  with the config's remat policy (default "none"). transformers: the same
  loss on the same weights (the model's hidden states, logits, log-softmax,
  `backward()`), best of --runs, in the same run, so the ratio of the two
  shares the machine's load at that moment.

Model FLOPs (MFU = achieved model FLOP/s over the matmul peak measured in
this run with a 2048^3 float32 matmul):
  generation = 2 * P * (prefill + generated tokens) + attention,
  training   = 6 * P * tokens + 3 * attention,
  attention  = 4 * layers * heads * head_dim * (attended keys, causal),
with P all parameters (tied embedding counted once). Neither implementation
computes logits for prompt tokens, so "MFU (work)" also reports the FLOPs
actually needed: non-embedding parameters for every token plus the
unembedding only for the B * (new tokens) sampled positions.

The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import aem_jax.models as M
from aem_jax.models import sampler
from aem_jax.models.config import REMATS

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 32000, 512, 1536, 8, 8, 2
HEAD_DIM = HIDDEN // HEADS
BATCH, PROMPT, NEW = 32, 256, 128
TRAIN_B, TRAIN_T = 8, 1024


def _best(fn, runs: int) -> float:
    """Best wall time of `runs` calls of `fn` (which must block)."""
    return _best_with_cpu(fn, runs)[0]


def _best_with_cpu(fn, runs: int) -> tuple[float, float]:
    """(wall, process CPU) seconds of the fastest of `runs` calls of `fn`."""
    best = (float("inf"), float("inf"))
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


_PEAKS: list[float] = []  # every peak measured in this run


def matmul_peak(n: int = 2048, runs: int = 10) -> float:
    """FLOP/s of the best float32 n^3 matmul (jax) on this machine now."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    _PEAKS.append(2 * n ** 3 / _best(lambda: f(a, a).block_until_ready(), runs))
    return _PEAKS[-1]


def with_concurrent_peak(fn):
    """(fn(), the mean matmul peak measured just before and just after it).

    On a machine shared with other jobs the CPU share available changes from
    minute to minute; MFU against this concurrent peak estimates the model's
    efficiency on the share it actually had.
    """
    before = matmul_peak(runs=3)
    out = fn()
    return out, (before + matmul_peak(runs=3)) / 2


def attention_flops(batch: int, query_starts_and_counts) -> float:
    """4 * L * N * H * sum of attended keys, for queries at given positions."""
    keys = sum(count * (start + 1) + count * (count - 1) / 2
               for start, count in query_starts_and_counts)
    return 4.0 * LAYERS * HEADS * HEAD_DIM * keys * batch


def write_checkpoint(path: str) -> int:
    """A random transformers Qwen2 checkpoint; returns its parameter count."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=True,
        max_position_embeddings=4096)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    M.build_tokenizer([f"w{i}" for i in range(100)]).save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def bench_aem_generate(model, prompts: np.ndarray, runs: int) -> dict:
    params = sampler.SamplingParams(max_new_tokens=NEW, temperature=1.0)
    rows = [list(r) for r in prompts]
    call = lambda i: sampler.generate(model, rows, key=jax.random.key(i), params=params, pad_id=0)
    start = time.perf_counter()
    out = call(0)
    first = time.perf_counter() - start
    seconds, cpu = _best_with_cpu(lambda: call(1), runs)
    assert int(out.lengths.sum()) == BATCH * NEW
    return {"seconds": seconds, "cpu_s": cpu, "compile_and_first_s": first}


def bench_torch_generate(path: str, prompts: np.ndarray) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts, dtype=torch.long)
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=NEW,
                  min_new_tokens=NEW, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids[:2, :16], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2,
                                        "attention_mask": torch.ones_like(ids[:2, :16])})
        start, cpu = time.perf_counter(), time.process_time()
        out = model.generate(ids, **kwargs)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert out.shape == (BATCH, PROMPT + NEW)
    return {"seconds": seconds, "cpu_s": cpu, "threads": torch.get_num_threads()}


def bench_train(model, runs: int) -> dict:
    from aem_jax.objectives import logprobs_and_entropy_from_hidden

    graphdef, state = nnx.split(model)

    def loss_fn(state, tokens, mask):
        m = nnx.merge(graphdef, state)
        hidden = M.hidden_states(m, tokens[:, :-1], mask[:, :-1])
        logp, _ = logprobs_and_entropy_from_hidden(hidden, M.unembedding(m), tokens[:, 1:],
                                                   chunk_size=1024)
        return -jnp.mean(logp)

    step = jax.jit(jax.value_and_grad(loss_fn))
    tokens = jax.random.randint(jax.random.key(1), (TRAIN_B, TRAIN_T + 1), 0, VOCAB)
    mask = jnp.ones_like(tokens)
    start = time.perf_counter()
    jax.block_until_ready(step(state, tokens, mask))
    first = time.perf_counter() - start
    seconds, cpu = _best_with_cpu(lambda: jax.block_until_ready(step(state, tokens, mask)), runs)
    return {"seconds": seconds, "cpu_s": cpu, "compile_and_first_s": first}


def bench_torch_train(path: str, runs: int) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (TRAIN_B, TRAIN_T + 1), generator=gen)
    mask = torch.ones_like(tokens)

    def step():
        model.zero_grad(set_to_none=True)
        hidden = model.model(input_ids=tokens[:, :-1], attention_mask=mask[:, :-1]).last_hidden_state
        logp = torch.log_softmax(model.lm_head(hidden).float(), dim=-1)
        loss = -logp.gather(-1, tokens[:, 1:, None]).mean()
        loss.backward()
        return float(loss)

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    seconds, cpu = _best_with_cpu(step, runs)
    return {"seconds": seconds, "cpu_s": cpu, "first_s": first, "threads": torch.get_num_threads(),
            "attention": model.config._attn_implementation}


def main() -> None:
    global TRAIN_B, TRAIN_T  # --train-batch / --train-length override the defaults
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="timed aem_jax calls (best is kept)")
    parser.add_argument("--no-torch", action="store_true", help="skip transformers")
    parser.add_argument("--only", choices=("all", "generate", "train"), default="all",
                        help="which rows to run")
    parser.add_argument("--remat", default="none", choices=REMATS,
                        help="ModelConfig.remat of the training step")
    parser.add_argument("--train-batch", type=int, default=TRAIN_B, help="training rows B")
    parser.add_argument("--train-length", type=int, default=TRAIN_T, help="training tokens per row T")
    args = parser.parse_args()
    TRAIN_B, TRAIN_T = args.train_batch, args.train_length

    matmul_peak()
    ours = theirs = train = torch_train = None
    with tempfile.TemporaryDirectory() as path:
        n_params = write_checkpoint(path)
        model, _ = M.from_pretrained(path, remat=args.remat)
        prompts = np.random.default_rng(0).integers(3, VOCAB, (BATCH, PROMPT)).astype(np.int32)
        if args.only in ("all", "generate"):
            ours, ours_peak = with_concurrent_peak(lambda: bench_aem_generate(model, prompts, args.runs))
            if not args.no_torch:
                theirs, theirs_peak = with_concurrent_peak(lambda: bench_torch_generate(path, prompts))
        if args.only in ("all", "train"):
            train, train_peak = with_concurrent_peak(lambda: bench_train(model, args.runs))
            if not args.no_torch:
                torch_train, torch_train_peak = with_concurrent_peak(lambda: bench_torch_train(path, args.runs))
    matmul_peak()
    peak = max(_PEAKS)  # the best of every measurement: contention only lowers it

    embed = VOCAB * HIDDEN
    gen_attn = attention_flops(BATCH, [(0, PROMPT), (PROMPT, NEW)])
    gen_flops = 2.0 * n_params * BATCH * (PROMPT + NEW) + gen_attn
    gen_work = (2.0 * (n_params - embed) * BATCH * (PROMPT + NEW) + 2.0 * embed * BATCH * NEW
                + gen_attn)
    train_flops = 6.0 * n_params * TRAIN_B * TRAIN_T + 3 * attention_flops(TRAIN_B, [(0, TRAIN_T)])
    result = {
        "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(), "params": n_params,
        "matmul_peak_gflops": peak / 1e9,
        "load_average_1min": os.getloadavg()[0],
    }
    if ours is not None:
        result.update({
            "aem_generate_tokens_per_s": BATCH * NEW / ours["seconds"], "aem_generate_s": ours["seconds"],
            "aem_generate_cpu_s": ours["cpu_s"],
            "aem_generate_compile_and_first_s": ours["compile_and_first_s"],
            "aem_generate_mfu": gen_flops / ours["seconds"] / peak,
            "aem_generate_mfu_work": gen_work / ours["seconds"] / peak,
            "aem_generate_concurrent_peak_gflops": ours_peak / 1e9,
            "aem_generate_mfu_concurrent": gen_flops / ours["seconds"] / ours_peak,
        })
    if train is not None:
        result.update({
            "train_remat": args.remat,
            "train_step_s": train["seconds"], "train_cpu_s": train["cpu_s"],
            "train_compile_and_first_s": train["compile_and_first_s"],
            "train_tokens_per_s": TRAIN_B * TRAIN_T / train["seconds"],
            "train_mfu": train_flops / train["seconds"] / peak,
            "train_concurrent_peak_gflops": train_peak / 1e9,
            "train_mfu_concurrent": train_flops / train["seconds"] / train_peak,
        })
    if torch_train is not None:
        result.update({
            "torch_train_step_s": torch_train["seconds"], "torch_train_cpu_s": torch_train["cpu_s"],
            "torch_train_tokens_per_s": TRAIN_B * TRAIN_T / torch_train["seconds"],
            "torch_train_attention": torch_train["attention"],
            "torch_train_mfu": train_flops / torch_train["seconds"] / peak,
            "torch_train_concurrent_peak_gflops": torch_train_peak / 1e9,
            "torch_train_mfu_concurrent": train_flops / torch_train["seconds"] / torch_train_peak,
            "train_speedup_vs_torch": torch_train["seconds"] / train["seconds"],
        })
    if theirs is not None:
        result.update({
            "torch_generate_tokens_per_s": BATCH * NEW / theirs["seconds"],
            "torch_generate_s": theirs["seconds"], "torch_threads": theirs["threads"],
            "torch_generate_cpu_s": theirs["cpu_s"],
            "torch_generate_mfu": gen_flops / theirs["seconds"] / peak,
            "torch_generate_concurrent_peak_gflops": theirs_peak / 1e9,
            "torch_generate_mfu_concurrent": gen_flops / theirs["seconds"] / theirs_peak,
            "speedup_vs_torch": theirs["seconds"] / ours["seconds"],
        })
    print_table(result)
    print(json.dumps(result))


def print_table(r: dict) -> None:
    print(f"device: {r['device']} ({r['cpu_count']} CPUs, load average {r['load_average_1min']:.1f}), "
          f"params {r['params'] / 1e6:.1f}M, float32, best matmul peak "
          f"{r['matmul_peak_gflops']:.0f} GFLOP/s")
    print("Seconds are wall time. 'MFU' divides by the best peak of the run; 'MFU (conc.)' by the\n"
          "peak measured just before and after that row (the CPU share it really had on a shared\n"
          "machine); 'MFU (work)' counts only FLOPs the generation needs (no prompt unembedding).")
    if "aem_generate_s" in r:
        print_generation(r)
    if "train_step_s" in r:
        print_training(r)


def print_generation(r: dict) -> None:
    print(f"\ngeneration: B={BATCH}, prompt {PROMPT}, {NEW} new tokens, temperature 1")
    print("| implementation | tokens/s | seconds | MFU | MFU (conc.) | MFU (work) | peak (conc.) |")
    print("|---|---|---|---|---|---|---|")
    work = r["aem_generate_mfu_work"] / r["aem_generate_mfu"]
    print(f"| aem_jax | {r['aem_generate_tokens_per_s']:.0f} | {r['aem_generate_s']:.2f} | "
          f"{r['aem_generate_mfu']:.0%} | {r['aem_generate_mfu_concurrent']:.0%} | "
          f"{r['aem_generate_mfu_work']:.0%} | {r['aem_generate_concurrent_peak_gflops']:.0f} |")
    if "torch_generate_tokens_per_s" in r:
        print(f"| transformers (torch, {r['torch_threads']} threads) | "
              f"{r['torch_generate_tokens_per_s']:.0f} | {r['torch_generate_s']:.2f} | "
              f"{r['torch_generate_mfu']:.0%} | {r['torch_generate_mfu_concurrent']:.0%} | "
              f"{r['torch_generate_mfu'] * work:.0%} | "
              f"{r['torch_generate_concurrent_peak_gflops']:.0f} |")
        print(f"| ratio aem_jax / transformers | {r['speedup_vs_torch']:.2f}x | | | | | |")
    print(f"(aem_jax compile + first call: {r['aem_generate_compile_and_first_s']:.1f} s)")


def print_training(r: dict) -> None:
    print(f"\ntraining forward+backward: B={TRAIN_B}, T={TRAIN_T}, aem_jax remat={r['train_remat']}")
    print("| implementation | tokens/s | seconds | MFU | MFU (conc.) | peak (conc.) |")
    print("|---|---|---|---|---|---|")
    print(f"| aem_jax | {r['train_tokens_per_s']:.0f} | {r['train_step_s']:.2f} | "
          f"{r['train_mfu']:.0%} | {r['train_mfu_concurrent']:.0%} | "
          f"{r['train_concurrent_peak_gflops']:.0f} |")
    if "torch_train_step_s" in r:
        print(f"| transformers (torch, {r['torch_train_attention']} attention) | "
              f"{r['torch_train_tokens_per_s']:.0f} | {r['torch_train_step_s']:.2f} | "
              f"{r['torch_train_mfu']:.0%} | {r['torch_train_mfu_concurrent']:.0%} | "
              f"{r['torch_train_concurrent_peak_gflops']:.0f} |")
        print(f"| ratio aem_jax / transformers | {r['train_speedup_vs_torch']:.2f}x | | | | |")
    print(f"(compile + first step: {r['train_compile_and_first_s']:.1f} s)\n")


if __name__ == "__main__":
    main()
