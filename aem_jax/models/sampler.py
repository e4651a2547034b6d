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
from aem_jax.models import attention
from aem_jax.models.decoder import (Block, Decoder, KVCache, apply_rope, dense, rope_inverse_frequencies,
                                    rope_tables, unembedding)


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


def _entropy(logp_BV: jax.Array, p_BV: jax.Array | None = None) -> jax.Array:
    p = jnp.exp(logp_BV) if p_BV is None else p_BV
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


def inverse_cdf_sample(logp_BV: jax.Array, key: jax.Array, block: int = 256,
                       p_BV: jax.Array | None = None) -> jax.Array:
    """Draws one index per row from exp(logp) with a single uniform per row.

    Inverse-CDF sampling: the smallest i with sum_{j<=i} p_j > u * sum_j p_j.
    The prefix sums are taken in two levels (over blocks of `block` entries,
    then inside the chosen block), which on CPU is ~40x cheaper than the
    Gumbel-max trick of `jax.random.categorical` (one uniform and two logs per
    vocabulary entry). Zero-probability entries are never chosen. `p_BV`:
    exp(logp_BV) if the caller has it already.
    """
    b, v = logp_BV.shape
    nb = -(-v // block)
    p_BV = jnp.exp(logp_BV) if p_BV is None else p_BV
    if nb * block != v:
        p_BV = jnp.pad(p_BV, ((0, 0), (0, nb * block - v)))
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
    # Rounding can put u at the very end of the last block: fall back to the mode (computed only
    # then: a pass over the whole vocabulary).
    ok_B = (choice_B < v) & (_pick(p_BV, choice_B) > 0)
    return jax.lax.cond(jnp.all(ok_B), lambda: choice_B,
                        lambda: jnp.where(ok_B, choice_B, argmax(logp_BV))).astype(jnp.int32)


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
    p = jnp.exp(logp)
    choice_B = jax.lax.cond(greedy, lambda: argmax(scaled),
                            lambda: inverse_cdf_sample(logp, key, p_BV=p))
    logp_B, ent_B = _pick(logp, choice_B), _entropy(logp, p)
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


# ------------------------------------------------------------------------------------------------
# Slot caches: one KV-cache row per live episode, kept across calls (the continuous rollout engine,
# `aem_jax.rollout.engine`). Row b holds its sequence contiguously at columns [0, length_b): token
# i sits at column i and has RoPE position i, so a row's cache is exactly what a forward pass over
# its sequence alone would compute. New tokens are appended at column length_b (a prefill chunk or
# one decode token); rows advance independently (`_slot_forward`).


class SlotState(NamedTuple):
    """The caches of B slots: one [B,K,W,H] key and value array per layer.

    Row b's columns [0, length_b) hold its tokens; columns past that hold
    stale keys that no query reads (see `_slot_forward`). W, the allocated
    width, grows by buckets as the rows get longer (`grow_slots`).

    One array per layer rather than a stacked [L,B,K,W,H] cache, and a
    Python loop over layers rather than a scan: XLA:CPU reads a layer's
    cache slice inside a scan (a dynamic slice) through a copy that made the
    attention of a decode step 5-9x slower than on a plain buffer
    (docs/performance.md, "Decode attention").
    """

    keys: tuple[jax.Array, ...]    # L x [B,K,W,H]
    values: tuple[jax.Array, ...]  # L x [B,K,W,H]
    length_B: jax.Array   # [B] int32 tokens held = next write column = next RoPE position
    logits_BV: jax.Array  # [B,V] float32 next-token logits after the row's last token

    @property
    def width(self) -> int:
        return self.keys[0].shape[2]


def init_slots(config, num_slots: int, length: int) -> SlotState:
    """Empty caches for `num_slots` rows of `length` columns (all rows hold 0 tokens)."""
    if num_slots < 1 or length < 1:
        raise ValueError(f"init_slots(num_slots={num_slots}, length={length}); both must be >= 1")
    shape = (num_slots, config.num_kv_heads, length, config.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, config.compute_dtype) for _ in range(config.num_layers))
    return SlotState(zeros(), zeros(), jnp.zeros((num_slots,), jnp.int32),
                     jnp.zeros((num_slots, config.vocab_size), jnp.float32))


@functools.partial(jax.jit, static_argnames=("width",))  # new shapes: nothing to donate
def grow_slots(slots: SlotState, *, width: int) -> SlotState:
    """The same slots with `width` columns (>= the current width; new columns are zero)."""
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, width - x.shape[2]), (0, 0)))
    return slots._replace(keys=tuple(map(pad, slots.keys)), values=tuple(map(pad, slots.values)))


def _attend_columns(q_PNTH, k_PKWH, v_PKWH, allowed_PTW) -> jax.Array:
    """`attention._attend` with the scores laid out column-major ([P,K,W,Q]).

    Same maths (float32 scores, max shift, normalised after the value
    product). For a few queries against a long cache, XLA:CPU runs the
    [W,H] x [H,Q] product about 6x faster than the [Q,H] x [H,W] one.
    """
    p, n, t, h = q_PNTH.shape
    k, g = k_PKWH.shape[1], n // k_PKWH.shape[1]
    q_PKQH = (q_PNTH * (h ** -0.5)).reshape(p, k, g * t, h)  # Q = G*T queries per kv head
    scores_PKWQ = jnp.einsum("pkwh,pkqh->pkwq", k_PKWH, q_PKQH, preferred_element_type=jnp.float32)
    allowed_PWQ = jnp.tile(jnp.swapaxes(allowed_PTW, 1, 2), (1, 1, g))  # query q = g*T + t
    scores_PKWQ = jnp.where(allowed_PWQ[:, None], scores_PKWQ, attention._MASKED)
    shift = jnp.max(scores_PKWQ, axis=2, keepdims=True)
    weights_PKWQ = jnp.exp(scores_PKWQ - shift)
    total_PKQ1 = jnp.swapaxes(jnp.sum(weights_PKWQ, axis=2, keepdims=True), 2, 3)
    out_PKQH = jnp.einsum("pkwq,pkwh->pkqh", weights_PKWQ.astype(v_PKWH.dtype), v_PKWH,
                          preferred_element_type=jnp.float32)
    return (out_PKQH / total_PKQ1).astype(q_PNTH.dtype).reshape(p, n, t, h)


def _slot_forward(model: Decoder, tokens_PT, slot_P, start_P, keys, values, *, all_rows: bool):
    """The decoder on P rows of the slot cache, row p's T tokens at columns [start_p, start_p + T).

    Returns (final-norm hidden [P,T,D], keys, values). The same layers as
    `Decoder.hidden` (shared modules: norms, projections, RoPE, MLP), with
    two differences that make a decode step cost what it reads:

    * each row writes its new keys/values at its own columns, as one scatter
      per layer into that layer's cache array -- updated in place (the
      cache is donated), nothing else copied;
    * attention reads the allocated width W of the cache (the caller grows
      it by buckets as rows get longer). Query i of row p (column c =
      start_p + i) attends to the columns j <= c: the row's earlier tokens
      and its own, every one of them written by a real token, so the stale
      columns past a row's length are never read and need no mask.

    Rows whose `slot_P` is out of range (>= B) are padding: their writes are
    dropped and their outputs are unspecified. `all_rows` promises slot_P ==
    arange(B) (a decode step): attention then reads the cache rows in place
    instead of gathering them.
    """
    c = model.config
    t = tokens_PT.shape[1]
    width = keys[0].shape[2]
    x_PTD = jnp.take(model.embed[...], tokens_PT, axis=0).astype(c.compute_dtype)
    cols_PT = start_P[:, None] + jnp.arange(t, dtype=jnp.int32)
    rope = rope_tables(cols_PT, rope_inverse_frequencies(c), c.compute_dtype)
    allowed_PTW = jnp.arange(width, dtype=jnp.int32)[None, None, :] <= cols_PT[:, :, None]
    graphdef, stacked = nnx.split(model.layers)
    rows_P1 = slot_P[:, None]
    keys, values = list(keys), list(values)
    for l in range(c.num_layers):
        block: Block = nnx.merge(graphdef, jax.tree.map(lambda a: a[l], stacked))
        attn = block.attn
        h_PTD = block.input_norm(x_PTD)
        q_PNTH, k_PKTH, v_PKTH = (attn._project(h_PTD, n) for n in ("q", "k", "v"))
        if c.qk_norm:
            q_PNTH, k_PKTH = attn.q_norm(q_PNTH), attn.k_norm(k_PKTH)
        q_PNTH, k_PKTH = apply_rope(q_PNTH, rope), apply_rope(k_PKTH, rope)
        # keys[l][slot_p, :, cols_pt, :] = k[p, :, t, :]: the indexed dims (P,T) lead the update.
        keys[l] = keys[l].at[rows_P1, :, cols_PT].set(
            k_PKTH.transpose(0, 2, 1, 3).astype(keys[l].dtype), mode="drop")
        values[l] = values[l].at[rows_P1, :, cols_PT].set(
            v_PKTH.transpose(0, 2, 1, 3).astype(values[l].dtype), mode="drop")
        k_PKWH, v_PKWH = keys[l], values[l]
        if not all_rows:
            k_PKWH = jnp.take(k_PKWH, slot_P, axis=0, mode="clip")
            v_PKWH = jnp.take(v_PKWH, slot_P, axis=0, mode="clip")
        out_PNTH = _attend_columns(q_PNTH, k_PKWH, v_PKWH, allowed_PTW)
        y_PTD = dense(out_PNTH.transpose(0, 2, 1, 3), attn.o[...].astype(c.compute_dtype), in_dims=2)
        x_PTD = x_PTD + y_PTD
        x_PTD = x_PTD + block.mlp(block.post_attn_norm(x_PTD))
    return model.final_norm(x_PTD), tuple(keys), tuple(values)


@functools.partial(jax.jit, static_argnames=("graphdef", "all_rows"), donate_argnames=("slots",))
def _slot_prefill(graphdef, state, slots: SlotState, slot_ids_P, tokens_PC, counts_P, reset_P, *,
                  all_rows: bool = False):
    """Appends counts_p tokens to slot slot_ids_p (after emptying it where reset_p).

    Padding entries of `slot_ids_P` are out of range: their gathers clip and
    their scatters are dropped. Rows with a count of 0 keep their logits.
    The slots' width must cover every row's new length. `all_rows` promises
    slot_ids_P == arange(B) (attention then reads the cache rows in place).
    """
    model: Decoder = nnx.merge(graphdef, state)
    take = lambda x: jnp.take(x, slot_ids_P, axis=0, mode="clip")
    length_P = jnp.where(reset_P, 0, take(slots.length_B))
    hidden_PCD, keys, values = _slot_forward(model, tokens_PC, slot_ids_P, length_P, slots.keys,
                                             slots.values, all_rows=all_rows)
    last_PD = jnp.take_along_axis(hidden_PCD, jnp.maximum(counts_P - 1, 0)[:, None, None], 1)[:, 0]
    logits_PV = jnp.where((counts_P > 0)[:, None], _decode_unembedding(model)(last_PD),
                          take(slots.logits_BV))
    return SlotState(keys, values, slots.length_B.at[slot_ids_P].set(length_P + counts_P, mode="drop"),
                     slots.logits_BV.at[slot_ids_P].set(logits_PV, mode="drop"))


class _SlotLoop(NamedTuple):
    step: jax.Array
    slots: SlotState
    active_B: jax.Array
    count_B: jax.Array
    finished: jax.Array
    tokens_BN: jax.Array
    logp_BN: jax.Array
    ent_BN: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "num_steps", "top_k", "use_top_p",
                                             "stop_ids", "pad_id"), donate_argnames=("slots",))
def _slot_decode(graphdef, state, slots: SlotState, active_B, step_B, keys_B, max_new, exit_after,
                 temperature, top_p, *, num_steps, top_k, use_top_p, stop_ids, pad_id):
    """Up to `num_steps` decode steps of the active rows; see `SlotSampler.decode`."""
    model: Decoder = nnx.merge(graphdef, state)
    unembed = _decode_unembedding(model)
    b = active_B.shape[0]
    rows = jnp.arange(b, dtype=jnp.int32)
    stops = jnp.asarray(stop_ids, jnp.int32)

    def body(c: _SlotLoop) -> _SlotLoop:
        sl, live = c.slots, c.active_B
        n_B = step_B + c.count_B  # tokens of the current action sampled so far
        step_keys = jax.vmap(jax.random.fold_in)(keys_B, n_B)
        tok, logp, ent = sample_token(sl.logits_BV, step_keys, temperature, top_p, top_k=top_k,
                                      use_top_p=use_top_p)
        tok = jnp.where(live, tok, pad_id)
        tokens = c.tokens_BN.at[:, c.step].set(tok)
        logp_BN = c.logp_BN.at[:, c.step].set(jnp.where(live, logp, 0.0))
        ent_BN = c.ent_BN.at[:, c.step].set(jnp.where(live, ent, 0.0))
        ended = live & ((jnp.isin(tok, stops) if stop_ids else False) | (n_B + 1 >= max_new))
        # Every sampled token enters the cache (the next turn continues after it); rows not
        # generating write nothing (out-of-range slot: the scatter drops them).
        h, keys, values = _slot_forward(model, tok[:, None], jnp.where(live, rows, b), sl.length_B,
                                        sl.keys, sl.values, all_rows=True)
        logits = jnp.where(live[:, None], unembed(h[:, 0]), sl.logits_BV)
        slots = SlotState(keys, values, sl.length_B + live.astype(jnp.int32), logits)
        return _SlotLoop(c.step + 1, slots, live & ~ended, c.count_B + live.astype(jnp.int32),
                         c.finished + jnp.sum(ended.astype(jnp.int32)), tokens, logp_BN, ent_BN)

    def cond(c: _SlotLoop) -> jax.Array:
        return (c.step < num_steps) & jnp.any(c.active_B) & (c.finished < exit_after)

    init = _SlotLoop(jnp.zeros((), jnp.int32), slots, active_B, jnp.zeros((b,), jnp.int32),
                     jnp.zeros((), jnp.int32), jnp.full((b, num_steps), pad_id, jnp.int32),
                     jnp.zeros((b, num_steps), jnp.float32), jnp.zeros((b, num_steps), jnp.float32))
    out = jax.lax.while_loop(cond, body, init)
    return out.slots, out.active_B, out.count_B, out.tokens_BN, out.logp_BN, out.ent_BN


class SlotDecode(NamedTuple):
    """What one `slot_decode` call sampled: row b's new tokens are columns [0, count_b)."""

    active: np.ndarray    # [B] bool, still generating (no stop token, under max_new)
    count: np.ndarray     # [B] int32 tokens sampled by this call
    tokens: np.ndarray    # [B,num_steps] int32
    logprobs: np.ndarray  # [B,num_steps] float32
    entropy: np.ndarray   # [B,num_steps] float32


def decode_width(need: int, limit: int) -> int:
    """Allocated cache columns for rows that reach column `need`: min(limit, bucket).

    Buckets 64 * 2^(i/2) rounded up to multiples of 32 (64, 96, 128, 192,
    256, 384, 512, 736, 1024, ...): attention reads at most ~1.4x the columns
    it needs, against 2x for powers of two, for twice as many shapes to compile.
    """
    i = 0
    while (width := (int(64 * 2 ** (i / 2)) + 31) // 32 * 32) < need:
        i += 1
    return min(width, limit)


class SlotSampler:
    """Prefill and decode calls on slot caches kept across calls, for one model.

    Args:
      model: the decoder.
      params: sampling parameters (`max_new_tokens` is the action limit).
      pad_id: id written where a row sampled nothing.
      num_slots: B, the rows (live episodes) decoded together.
      max_len: the longest sequence a slot holds.
      chunk: longest prefill chunk; longer appends are split. Chunks are
        bucketed to powers of two (>= 16) and the rows of one prefill to
        powers of four (or all B), so a run compiles a few prefill shapes and
        one decode shape per attention width (`decode_steps` steps over all
        B rows, inactive ones masked).

    Columns: a row holds at most ``max_len + chunk`` columns (a chunk is
    written whole at a row's end even where only part of it is real
    tokens). The cache starts narrow and is widened by buckets
    (`decode_width`, `grow_slots`) when a call's rows would reach past it,
    so attention reads about the columns the current lengths need, not
    what the longest turn will.

    Sampling matches `generate` with one key per row: the n-th token of a
    row's current action is drawn with ``fold_in(row key, n)`` from the
    row's own logits, so a row's draws do not depend on the other rows, on
    when it joined the batch or on how its decoding was split into calls.
    """

    def __init__(self, model: Decoder, params: SamplingParams, pad_id: int, *, num_slots: int,
                 max_len: int, chunk: int = 64, decode_steps: int = 8):
        self.chunk = bucket(chunk, minimum=16)
        if not 1 <= decode_steps <= self.chunk:
            raise ValueError(f"decode_steps={decode_steps}; must be in [1, chunk={self.chunk}]")
        self.graphdef, self.state = nnx.split(model)
        self.config = model.config
        self.params = params
        self.pad_id = int(pad_id)
        self.num_slots, self.max_len = int(num_slots), int(max_len)
        self.decode_steps = int(decode_steps)
        self.lengths = np.zeros((self.num_slots,), np.int64)  # host copy of slots.length_B
        self.columns = self.max_len + self.chunk
        self.slots = init_slots(model.config, self.num_slots, decode_width(1, self.columns))

    def _widen(self, need: int) -> None:
        """Grows the cache to the bucket of `need` columns if it is narrower."""
        if need > self.slots.width:
            self.slots = grow_slots(self.slots, width=decode_width(need, self.columns))

    def _rows_bucket(self, n: int) -> int:
        """Rows of a prefill call for n slots: a power of four, or all slots (few shapes to compile)."""
        p = 1
        while p < n:
            p *= 4
        return p if 2 * p <= self.num_slots else max(self.num_slots, n)

    def prefill(self, appends: dict[int, tuple[Sequence[int], bool]]) -> None:
        """Appends tokens to slots: ``{slot: (token ids, reset first)}``.

        A reset empties the slot first (a new episode, or a windowed prompt
        that is not an extension of what the slot holds). Every slot named
        must end up holding <= max_len tokens.
        """
        todo = {s: [list(ids), bool(reset)] for s, (ids, reset) in appends.items() if ids or reset}
        for s, (ids, reset) in todo.items():
            if not 0 <= s < self.num_slots:
                raise ValueError(f"slot {s} out of range [0, {self.num_slots})")
            total = len(ids) + (0 if reset else int(self.lengths[s]))
            if total > self.max_len:
                raise ValueError(f"slot {s} would hold {total} tokens; max_len is {self.max_len}")
            if reset:
                self.lengths[s] = 0
        while todo:
            rows = sorted(todo)
            longest = max(len(todo[s][0]) for s in rows)
            c = min(self.chunk, bucket(longest, minimum=16))
            p = self._rows_bucket(len(rows))
            ids = np.full((p,), self.num_slots, np.int32)  # padding rows: out of range
            tokens = np.full((p, c), self.pad_id, np.int32)
            counts = np.zeros((p,), np.int32)
            reset = np.zeros((p,), bool)
            for i, s in enumerate(rows):
                part = todo[s][0][:c]
                ids[i], counts[i], reset[i] = s, len(part), todo[s][1]
                tokens[i, :len(part)] = part
                todo[s] = [todo[s][0][c:], False]
            self._widen(max(int(self.lengths[s]) for s in rows) + c)
            self.lengths[rows] += counts[:len(rows)]
            self.slots = _slot_prefill(self.graphdef, self.state, self.slots, jnp.asarray(ids),
                                       jnp.asarray(tokens), jnp.asarray(counts), jnp.asarray(reset),
                                       all_rows=rows == list(range(self.num_slots)))
            todo = {s: v for s, v in todo.items() if v[0]}

    def decode(self, active: np.ndarray, steps: np.ndarray, keys: jax.Array, *,
               max_new: int | None = None, exit_after: int = 1) -> SlotDecode:
        """Decodes the active rows until `exit_after` of them end or `decode_steps` steps pass.

        Args:
          active: [B] bool, rows generating an action.
          steps: [B] int32, tokens of that action already sampled.
          keys: [B] keys, each row's key for its current action.
          max_new: action length limit (default ``params.max_new_tokens``).
          exit_after: return once this many rows ended their action.
        """
        p = self.params
        active = np.asarray(active, bool)
        need = int(self.lengths[active].max(initial=0)) + self.decode_steps
        if need > self.columns:
            raise ValueError(f"decoding {self.decode_steps} more tokens needs {need} cache columns; "
                             f"the slots have {self.columns} (max_len + chunk)")
        self._widen(need)
        out = _slot_decode(
            self.graphdef, self.state, self.slots, jnp.asarray(active),
            jnp.asarray(steps, jnp.int32), keys, jnp.int32(max_new or p.max_new_tokens),
            jnp.int32(exit_after), jnp.float32(p.temperature), jnp.float32(p.top_p),
            num_steps=self.decode_steps, top_k=p.top_k,
            use_top_p=p.top_p < 1.0, stop_ids=tuple(int(t) for t in p.stop_token_ids),
            pad_id=self.pad_id)
        self.slots = out[0]
        result = SlotDecode(*(_to_host(x) for x in out[1:]))
        self.lengths += result.count
        return result
