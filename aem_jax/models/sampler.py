"""Batched autoregressive sampling with a preallocated KV cache.

`generate` left-pads a batch of prompts of different lengths into a fixed
shape bucket, runs one jit-compiled function (prefill of all prompt tokens,
then a `lax.while_loop` of single-token decode steps over a preallocated
cache) and returns, for every sampled token, its log-prob and the entropy of
the distribution it was drawn from, so that rollouts need no second forward
pass:

  logp_t = log pi'(y_t | y_<t),   H_t = -sum_v pi'(v | y_<t) log pi'(v | y_<t)

where pi' is the model distribution after temperature, top-k and top-p
(nucleus; Holtzman et al., 2020). With temperature 1 and no top-k/top-p, pi'
is the model distribution itself, so logp_t equals the log-softmax of a full
forward pass at that position. Greedy decoding (temperature 0) takes the
argmax and reports the temperature-1 distribution's log-prob and entropy.
Temperature is a traced value (changing it does not recompile); top-k, whether
top-p is on, the stop ids and the bucket shapes are compile-time constants.

Shapes are bucketed (batch, prompt length and number of new tokens rounded
up to powers of two), so a rollout loop with varying prompts compiles once
per bucket. Sampling is deterministic for a given key: step s uses
fold_in(key, s).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aem_jax import sharding
from aem_jax.models.decoder import Decoder, KVCache, unembedding


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0.0 means greedy; top_k 0 and top_p 1.0 are off."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}; must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}; must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}; must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}; must be in (0, 1]")


class SampleOutput(NamedTuple):
    """Generated tokens and, for each, its log-prob and its distribution's entropy."""

    tokens: np.ndarray    # [B,N] int32, pad_id after the stop token
    logprobs: np.ndarray  # [B,N] float32, 0 after the stop token
    entropy: np.ndarray   # [B,N] float32, 0 after the stop token
    lengths: np.ndarray   # [B] int32, generated tokens including the stop token


def bucket(n: int, minimum: int = 8) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _entropy(logp_BV: jax.Array) -> jax.Array:
    p = jnp.exp(logp_BV)
    return -jnp.sum(jnp.where(p > 0, p * logp_BV, 0.0), axis=-1)


def argmax(x_BV: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` (the first maximal index, NaN counting as maximal) as int32.

    Written as a max and a masked min of the indices: XLA:CPU vectorises those
    two plain reductions, while its variadic (value, index) reduction behind
    `jnp.argmax` is about 8x slower over a 32k vocabulary.
    """
    m_B1 = jnp.max(x_BV, axis=-1, keepdims=True)
    hit_BV = (x_BV == m_B1) | jnp.isnan(x_BV)
    index_V = jnp.arange(x_BV.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit_BV, index_V, x_BV.shape[-1] - 1), axis=-1)


def _pick(logp_BV: jax.Array, token_B: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]


def inverse_cdf_sample(logp_BV: jax.Array, key: jax.Array, block: int = 256) -> jax.Array:
    """Draws one index per row from exp(logp) with a single uniform per row.

    Inverse-CDF sampling: the smallest i with sum_{j<=i} p_j > u * sum_j p_j.
    The prefix sums are taken in two levels (over blocks of `block` entries,
    then inside the chosen block), which on CPU is ~40x cheaper than the
    Gumbel-max trick of `jax.random.categorical` (one uniform and two logs per
    vocabulary entry). Zero-probability entries are never chosen.
    """
    b, v = logp_BV.shape
    nb = -(-v // block)
    p_BV = jnp.pad(jnp.exp(logp_BV), ((0, 0), (0, nb * block - v)))
    blocks_BNK = p_BV.reshape(b, nb, block)
    cum_BN = jnp.cumsum(blocks_BNK.sum(-1), axis=-1)
    if key.ndim:  # one key per row: a row's draw does not depend on the rest of the batch
        u_B1 = jax.vmap(lambda k: jax.random.uniform(k, (1,)))(key) * cum_BN[:, -1:]
    else:
        u_B1 = jax.random.uniform(key, (b, 1)) * cum_BN[:, -1:]
    j_B = jnp.minimum(jnp.sum(cum_BN <= u_B1, axis=-1), nb - 1)
    before_B1 = jnp.where(j_B[:, None] > 0, jnp.take_along_axis(cum_BN, jnp.maximum(j_B - 1, 0)[:, None], -1), 0.0)
    inner_BK = jnp.take_along_axis(blocks_BNK, j_B[:, None, None], axis=1)[:, 0]
    i_B = jnp.minimum(jnp.sum(jnp.cumsum(inner_BK, -1) + before_B1 <= u_B1, axis=-1), block - 1)
    choice_B = j_B * block + i_B
    # Rounding can put u at the very end of the last block: fall back to the mode.
    ok_B = (choice_B < v) & (_pick(p_BV, choice_B) > 0)
    return jnp.where(ok_B, choice_B, argmax(logp_BV)).astype(jnp.int32)


def sample_token(logits_BV, key, temperature, top_p, *, top_k: int, use_top_p: bool):
    """Samples one token per row; returns (token [B], logp [B], entropy [B]).

    `temperature` is traced: 0 means greedy, which takes the argmax and reports
    log-prob and entropy at temperature 1 (after top-k/top-p, if set).
    """
    greedy = temperature == 0.0
    scaled = logits_BV.astype(jnp.float32) / jnp.where(greedy, 1.0, temperature)
    if top_k:  # restrict to the k largest first: later steps then work on [B,k]
        scaled, index_BK = jax.lax.top_k(scaled, top_k)
    if use_top_p:
        # Keep the smallest prefix (by decreasing probability) whose mass reaches top_p.
        sorted_desc = scaled if top_k else -jnp.sort(-scaled, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
    logp = jax.nn.log_softmax(scaled)
    choice_B = jnp.where(greedy, argmax(scaled),
                         inverse_cdf_sample(logp, key))
    logp_B, ent_B = _pick(logp, choice_B), _entropy(logp)
    token_B = _pick(index_BK, choice_B).astype(jnp.int32) if top_k else choice_B
    return token_B, logp_B, ent_B


def _decode_unembedding(model: Decoder):
    """A function hidden [B,D] -> float32 logits [B,V] for the decode loop.

    With tied embeddings the unembedding is E^T; contracting with E [V,D]
    directly (as `Decoder.unembed` does) makes XLA:CPU run a transposed-operand
    matmul about 1.7x slower than the plain [B,D] @ [D,V] one. The decode loop
    runs that matmul once per step, so E^T is materialised once before the
    loop; the optimisation barrier keeps XLA from folding the transpose back
    into the matmul.
    """
    dt = model.config.compute_dtype
    u_DV = jax.lax.optimization_barrier(unembedding(model).astype(dt))

    def unembed(hidden_BD: jax.Array) -> jax.Array:
        out = jnp.matmul(hidden_BD, u_DV, preferred_element_type=jnp.float32)
        return sharding.constrain(out, ("batch", "vocab"))

    return unembed


class _Loop(NamedTuple):
    step: jax.Array
    cache: KVCache
    mask_BS: jax.Array
    logits_BV: jax.Array
    tokens_BN: jax.Array
    logp_BN: jax.Array
    ent_BN: jax.Array
    done_B: jax.Array
    lengths_B: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "num_out", "top_k", "use_top_p",
                                             "stop_ids", "pad_id"))
def _generate(graphdef, state, prompts_BP, mask_BS, done_B, key, temperature, top_p, max_new,
              *, num_out, top_k, use_top_p, stop_ids, pad_id):
    """Prefill + decode loop; everything static except the arrays and scalars."""
    model: Decoder = nnx.merge(graphdef, state)
    b, p = prompts_BP.shape
    s = mask_BS.shape[1]
    prompt_len_B = jnp.sum(mask_BS, axis=1)
    positions = jnp.maximum(jnp.cumsum(mask_BS[:, :p], axis=1) - 1, 0)
    cache = KVCache.zeros(model.config, b, s)
    hidden, cache = model.hidden(prompts_BP, positions, mask_BS, cache, prefill=True)
    unembed = _decode_unembedding(model)
    logits_BV = unembed(hidden[:, -1])  # only the last prompt slot is needed
    stops = jnp.asarray(stop_ids, jnp.int32)

    def body(c: _Loop) -> _Loop:
        step_key = (jax.vmap(jax.random.fold_in, (0, None))(key, c.step) if key.ndim
                    else jax.random.fold_in(key, c.step))
        tok, logp, ent = sample_token(c.logits_BV, step_key, temperature,
                                      top_p, top_k=top_k, use_top_p=use_top_p)
        live = ~c.done_B
        tok = jnp.where(live, tok, pad_id)
        tokens = c.tokens_BN.at[:, c.step].set(tok)
        logp_BN = c.logp_BN.at[:, c.step].set(jnp.where(live, logp, 0.0))
        ent_BN = c.ent_BN.at[:, c.step].set(jnp.where(live, ent, 0.0))
        lengths = c.lengths_B + live.astype(jnp.int32)
        done = c.done_B | (jnp.isin(tok, stops) if stop_ids else False)
        slot = p + c.step
        mask = jax.lax.dynamic_update_slice(c.mask_BS, live.astype(c.mask_BS.dtype)[:, None], (0, slot))
        pos = (prompt_len_B + c.step)[:, None]
        h, cache = model.hidden(tok[:, None], pos, mask, c.cache)
        return _Loop(c.step + 1, cache, mask, unembed(h[:, 0]), tokens, logp_BN, ent_BN,
                     done, lengths)

    def cond(c: _Loop) -> jax.Array:
        return (c.step < max_new) & ~jnp.all(c.done_B)

    init = _Loop(jnp.zeros((), jnp.int32), cache, mask_BS, logits_BV,
                 jnp.full((b, num_out), pad_id, jnp.int32), jnp.zeros((b, num_out), jnp.float32),
                 jnp.zeros((b, num_out), jnp.float32), done_B, jnp.zeros((b,), jnp.int32))
    out = jax.lax.while_loop(cond, body, init)
    return out.tokens_BN, out.logp_BN, out.ent_BN, out.lengths_B


def _layout(prompts: Sequence[Sequence[int]], params: SamplingParams, pad_id: int,
            vocab_size: int, max_cache_len: int | None):
    """Left-pads prompts into bucketed arrays; validates lengths and ids on the host."""
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one prompt")
    lengths = [len(q) for q in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty; every prompt needs >= 1 token")
    longest, new = max(lengths), params.max_new_tokens
    cache_len = max_cache_len if max_cache_len is not None else bucket(longest) + bucket(new)
    if longest + new > cache_len:
        raise ValueError(
            f"max_cache_len={cache_len} is too small for the longest prompt ({longest} tokens, "
            f"prompt {lengths.index(longest)}) plus max_new_tokens={new}; need >= {longest + new}")
    p = min(bucket(longest), cache_len - new)
    b = bucket(len(prompts), minimum=1)
    tokens = np.full((b, p), pad_id, np.int32)
    mask = np.zeros((b, cache_len), np.int32)
    for i, q in enumerate(prompts):
        row = np.asarray(q, np.int64)
        if row.min() < 0 or row.max() >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size})")
        tokens[i, p - len(row):] = row
        mask[i, p - len(row):p] = 1
    mask[len(prompts):, p - 1] = 1  # batch-padding rows: one token, done from the start
    done = np.arange(b) >= len(prompts)
    return tokens, mask, done


def generate(model: Decoder, prompts: Sequence[Sequence[int]], *, key: jax.Array,
             params: SamplingParams, pad_id: int, max_cache_len: int | None = None) -> SampleOutput:
    """Samples continuations of `prompts` (lists of token ids) from `model`.

    Args:
      model: the decoder.
      prompts: B prompts of any lengths >= 1.
      key: a `jax.random.key`; the result is a deterministic function of it.
        Or one key per prompt ([B] keys): each row then samples from its own
        stream, whatever else is in the batch (multi-host rollouts split a
        step's episodes over processes and still draw what one process would).
      params: sampling parameters.
      pad_id: the id written after a row's stop token (and used for padding).
      max_cache_len: the KV-cache length S (default: bucketed longest prompt +
        bucketed max_new_tokens). Prompts that do not fit with max_new_tokens
        raise ValueError before anything is compiled.

    Returns:
      A `SampleOutput` with arrays of N = params.max_new_tokens columns.
    """
    tokens, mask, done = _layout(prompts, params, pad_id, model.config.vocab_size, max_cache_len)
    if key.ndim:
        if key.shape != (len(prompts),):
            raise ValueError(f"key has shape {key.shape}; pass one key or one per prompt ({len(prompts)},)")
        # bucket-padding rows (done from the start) reuse the first key
        key = jnp.concatenate([key, jnp.broadcast_to(key[:1], (tokens.shape[0] - len(prompts),))])
    graphdef, state = nnx.split(model)
    out = _generate(
        graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(done), key,
        jnp.float32(params.temperature), jnp.float32(params.top_p),
        jnp.int32(params.max_new_tokens),
        num_out=bucket(params.max_new_tokens),
        top_k=params.top_k, use_top_p=params.top_p < 1.0,
        stop_ids=tuple(int(t) for t in params.stop_token_ids), pad_id=int(pad_id))
    b, n = len(prompts), params.max_new_tokens
    toks, logp, ent, lengths = (_to_host(x) for x in out)
    return SampleOutput(tokens=toks[:b, :n], logprobs=logp[:b, :n], entropy=ent[:b, :n],
                        lengths=lengths[:b])


def _to_host(x: jax.Array) -> np.ndarray:
    """The global value of ``x`` as numpy on every process.

    With parameters on a mesh spanning several processes (multi-host), the
    outputs are split over devices this process cannot read; every process
    calls `generate` with the same prompts and key, so gathering gives each
    the same full result.
    """
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def compiled_cache_size() -> int:
    """How many shape/parameter buckets `generate` has compiled so far."""
    return _generate._cache_size()
