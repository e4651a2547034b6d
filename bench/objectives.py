"""Benchmarks of aem_jax.objectives: AEM overhead and chunked log-prob memory.

  python bench/objectives.py            # CPU-sized timing, spec-sized memory
  python bench/objectives.py --full     # spec-sized timing too (accelerators)

(a) Time of the AEM coefficient computation (entropy signal + alpha + token
    broadcast) as a fraction of a full PPO loss + gradient step (chunked
    log-probs from hidden states, PPO-clip, backward to hidden and
    unembedding) on the same B, T. Target: under 1%.
(b) Compiled peak memory (``memory_analysis()``: arguments + outputs +
    temporaries) of chunked vs naive log-prob + entropy + gradient at
    V=151936, D=1024, B=4, T=4096. Target: chunked at most 1/8 of naive, and
    chunked fits where naive does not.

Prints a table, then one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from aem_jax import objectives as obj


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _turn_ids(B, T, K):
    """K equal agent spans per row, separated by environment tokens."""
    span = T // K
    pos = np.arange(T)
    ids = np.where(pos % span < span * 3 // 4, pos // span, -1)
    return jnp.asarray(np.broadcast_to(np.minimum(ids, K - 1), (B, T)), jnp.int32)


def aem_step(old_entropy_BT, turn_ids_BT, adv_B, group_ids_B, *, num_turns, num_groups):
    hbar_BK = obj.response_entropy(old_entropy_BT, turn_ids_BT, num_turns=num_turns, length_normalize=True)
    valid_BK = obj.turn_count(turn_ids_BT, num_turns=num_turns) > 0
    alpha_BK = obj.aem_coefficients(hbar_BK, group_ids_B, valid_BK, num_groups=num_groups)
    return obj.turn_broadcast(alpha_BK * adv_B[:, None], turn_ids_BT)


def ppo_step(hidden_BTD, unembedding_DV, tokens_BT, old_logp_BT, adv_BT, mask_BT, *, chunk_size):
    def loss_fn(h, u):
        logp, _ = obj.logprobs_and_entropy_from_hidden(h, u, tokens_BT, chunk_size=chunk_size)
        return obj.ppo_policy_loss(logp, old_logp_BT, adv_BT, mask_BT, clip_low=0.2, clip_high=0.28)[0]
    return jax.value_and_grad(loss_fn, argnums=(0, 1))(hidden_BTD, unembedding_DV)


def bench_aem_fraction(B, T, V, D, K, G, chunk_size, repeats):
    key = jax.random.key(0)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    hidden = jax.random.normal(k1, (B, T, D), jnp.float32)
    unemb = jax.random.normal(k2, (D, V), jnp.float32) / np.sqrt(D)
    tokens = jax.random.randint(k3, (B, T), 0, V)
    turn_ids = _turn_ids(B, T, K)
    mask = (turn_ids >= 0).astype(jnp.float32)
    old_logp = -jax.random.uniform(k4, (B, T)) * 5
    entropy = jax.random.uniform(k4, (B, T)) * 3
    group_ids = jnp.arange(B, dtype=jnp.int32) // G
    adv_B = jax.random.normal(k1, (B,))
    aem = jax.jit(lambda e, t, a, g: aem_step(e, t, a, g, num_turns=K, num_groups=B // G))
    t_aem = _time(aem, entropy, turn_ids, adv_B, group_ids, repeats=repeats)
    adv_BT = aem(entropy, turn_ids, adv_B, group_ids)
    ppo = jax.jit(lambda *a: ppo_step(*a, chunk_size=chunk_size))
    t_ppo = _time(ppo, hidden, unemb, tokens, old_logp, adv_BT, mask, repeats=max(1, repeats // 5))
    return t_aem, t_ppo


def _peak_bytes(fn, *shapes) -> int:
    m = jax.jit(fn).lower(*shapes).compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def bench_memory(B, T, V, D, chunk_size):
    hidden = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
    unemb = jax.ShapeDtypeStruct((D, V), jnp.float32)
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def chunked(h, u, y):
        def f(h, u):
            lp, en = obj.logprobs_and_entropy_from_hidden(h, u, y, chunk_size=chunk_size)
            return jnp.sum(lp) + 0.01 * jnp.sum(en)
        return jax.value_and_grad(f, argnums=(0, 1))(h, u)

    def naive(h, u, y):
        def f(h, u):
            logits = jnp.einsum("btd,dv->btv", h, u)
            return jnp.sum(obj.token_logprobs(logits, y)) + 0.01 * jnp.sum(obj.token_entropy(logits))
        return jax.value_and_grad(f, argnums=(0, 1))(h, u)

    return _peak_bytes(chunked, hidden, unemb, tokens), _peak_bytes(naive, hidden, unemb, tokens)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="time at the spec size B=256, T=2048")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    V, K, G = 32000, 8, 8
    B, T, D = (256, 2048, 1024) if args.full else (16, 512, 128)
    t_aem, t_ppo = bench_aem_fraction(B, T, V, D, K, G, chunk_size=1024, repeats=args.repeats)
    # AEM alone at the spec size (it only touches [B,T] arrays, so it runs anywhere)
    t_aem_full, _ = (t_aem, None) if args.full else (None, None)
    if not args.full:
        e = jnp.ones((256, 2048)) * 0.5
        aem = jax.jit(lambda e, t, a, g: aem_step(e, t, a, g, num_turns=K, num_groups=256 // G))
        t_aem_full = _time(aem, e, _turn_ids(256, 2048, K), jnp.ones(256), jnp.arange(256, dtype=jnp.int32) // G,
                           repeats=args.repeats)
    mem_chunked, mem_naive = bench_memory(4, 4096, 151936, 1024, chunk_size=512)
    host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    device = jax.devices()[0]
    rows = [
        ("device", f"{device.platform} ({device.device_kind}), {jax.device_count()} device(s)"),
        (f"(a) AEM coefficients, B={B} T={T} K={K} G={G}", f"{t_aem * 1e3:.3f} ms"),
        (f"(a) PPO loss + grad, B={B} T={T} V={V} D={D}", f"{t_ppo * 1e3:.1f} ms"),
        ("(a) AEM / PPO step (target < 1%)", f"{100 * t_aem / t_ppo:.3f} %"),
        ("(a) AEM coefficients at B=256 T=2048", f"{t_aem_full * 1e3:.3f} ms"),
        ("(b) chunked peak, V=151936 D=1024 B=4 T=4096", f"{mem_chunked / 2**30:.2f} GiB"),
        ("(b) naive peak, same shapes", f"{mem_naive / 2**30:.2f} GiB"),
        ("(b) chunked / naive (target <= 1/8 = 12.5%)", f"{100 * mem_chunked / mem_naive:.1f} %"),
        ("(b) this host's memory", f"{host_bytes / 2**30:.1f} GiB: naive {'fits' if mem_naive < host_bytes else 'does not fit'}, chunked {'fits' if mem_chunked < host_bytes else 'does not fit'}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  value")
    print("-" * (width + 30))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(json.dumps({
        "bench": "objectives", "device": device.platform, "B": B, "T": T, "V": V, "D": D,
        "aem_ms": t_aem * 1e3, "ppo_step_ms": t_ppo * 1e3, "aem_fraction": t_aem / t_ppo,
        "aem_ms_B256_T2048": t_aem_full * 1e3, "chunked_peak_bytes": mem_chunked,
        "naive_peak_bytes": mem_naive, "chunked_over_naive": mem_chunked / mem_naive,
        "host_bytes": host_bytes,
    }))


if __name__ == "__main__":
    main()
