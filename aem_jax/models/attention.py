"""Grouped-query attention kernels behind one function, `attend`.

    out = softmax(q k^T / sqrt(H) + mask) v,  scores and softmax in float32

Masking is given by segment ids and slots, the form every backend kernel
accepts (Pallas splash attention on TPU, cuDNN on GPU, the XLA paths here):
a query at slot `q_offset + i` with segment id `s > 0` attends to the keys at
slots `j <= q_offset + i` whose segment id is also `s`. Segment id 0 marks
padding; the outputs of padding queries are finite but unspecified. A padded
batch uses `segments = attention_mask` (1 real, 0 pad); several episodes
packed in one row use ids 1, 2, 3, ...

Implementations (`impl`, see IMPLS):

* "xla": the [T,S] scores in one piece (query blocks of 128 against their
  causal key prefix when T == S). Fastest for short T and for decode steps;
  training memory is quadratic in T (the softmax weights are kept for the
  backward pass).
* "blockwise": flash attention in pure JAX (Dao et al. 2022, FlashAttention-2
  2023): a loop over key blocks with an online softmax, key blocks above the
  causal diagonal never visited, and a custom VJP that recomputes the scores
  block by block from the output and its log-sum-exp. Memory is linear in T.
* "splash": the TPU Pallas splash-attention kernel, inside `jax.shard_map`
  over the current mesh (batch over the batch axes, heads over the tensor
  axis). Training and prefill only (T == S, q_offset the int 0); otherwise xla.
* "cudnn": cuDNN flash attention (`jax.nn.dot_product_attention`) on GPU for
  bfloat16/float16; other cases fall back to xla (see `_cudnn`).
* "auto": by the platform of the current mesh (else `jax.default_backend()`): TPU splash, GPU cudnn, CPU blockwise for
  T >= AUTO_BLOCKWISE_MIN_T; xla otherwise and for decode steps.

Dimension letters: B batch, T query length, S key length, N query heads,
K key/value heads, G = N/K, H head_dim.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_MASKED = -1e30  # finite, so fully masked (padding) query rows give no NaNs
CAUSAL_BLOCK = 128  # query block of the causal path (see `_causal_blocks`)
IMPLS = ("auto", "xla", "blockwise", "splash", "cudnn")
BLOCK_Q = 256  # query / key block of "blockwise" (fastest of 64-1024 on CPU, bench/attention.py --block)
BLOCK_K = 256
AUTO_BLOCKWISE_MIN_T = 1024  # CPU "auto": blockwise from here on (as fast as xla at 1k, faster above)
_PAD_Q, _PAD_K = -1, -2  # segment ids of block-padding slots: never equal to each other or to real ids


def _attend(q_BNTH, k_BKSH, v_BKSH, allowed_BTS) -> jax.Array:
    """softmax(q k^T / sqrt(H) + mask) v for grouped heads, float32 scores.

    The softmax is normalised after the value product (divide [..,H] rather
    than [..,S]) and its max shift carries no gradient (softmax is shift
    invariant): on CPU this is ~30% faster forward+backward than
    `jax.nn.softmax` on the masked scores.
    """
    b, n, t, h = q_BNTH.shape
    k, g = k_BKSH.shape[1], n // k_BKSH.shape[1]
    q_BKQH = (q_BNTH * (h ** -0.5)).reshape(b, k, g * t, h)  # Q = G*T queries per kv head
    scores_BKQS = jnp.einsum("bkqh,bksh->bkqs", q_BKQH, k_BKSH, preferred_element_type=jnp.float32)
    scores_BKGTS = jnp.where(allowed_BTS[:, None, None], scores_BKQS.reshape(b, k, g, t, -1), _MASKED)
    shift = jax.lax.stop_gradient(jnp.max(scores_BKGTS, axis=-1, keepdims=True))
    weights_BKGTS = jnp.exp(scores_BKGTS - shift)
    total_BKGT1 = jnp.sum(weights_BKGTS, axis=-1, keepdims=True)
    out_BKQH = jnp.einsum("bkqs,bksh->bkqh", weights_BKGTS.astype(v_BKSH.dtype).reshape(b, k, g * t, -1),
                          v_BKSH, preferred_element_type=jnp.float32)
    out_BKGTH = out_BKQH.reshape(b, k, g, t, h) / total_BKGT1
    return out_BKGTH.astype(q_BNTH.dtype).reshape(b, n, t, h)


def allowed_mask(q_segments_BT, kv_segments_BS, q_offset) -> jax.Array:
    """[B,T,S] bool: same segment and key slot <= query slot."""
    t, s = q_segments_BT.shape[1], kv_segments_BS.shape[1]
    causal_TS = jnp.arange(s)[None, :] <= (q_offset + jnp.arange(t))[:, None]
    same_BTS = q_segments_BT[:, :, None] == kv_segments_BS[:, None, :]
    return same_BTS & causal_TS[None]


def _causal_blocks(q_BNTH, k_BKTH, v_BKTH, allowed_BTT) -> jax.Array:
    """`_attend` for queries at slots 0..T-1, skipping key blocks above the diagonal.

    Queries in [a, a + block) can only see keys < a + block, so computing
    them against that prefix alone gives the same result with about half the
    score FLOPs and memory for long T.
    """
    t, block = q_BNTH.shape[2], CAUSAL_BLOCK
    if t <= block:
        return _attend(q_BNTH, k_BKTH, v_BKTH, allowed_BTT)
    outs = []
    for a in range(0, t, block):
        e = min(a + block, t)
        outs.append(_attend(q_BNTH[:, :, a:e], k_BKTH[:, :, :e], v_BKTH[:, :, :e],
                            allowed_BTT[:, a:e, :e]))
    return jnp.concatenate(outs, axis=2)


def _xla(q_BNTH, k_BKSH, v_BKSH, q_segments_BT, kv_segments_BS, q_offset) -> jax.Array:
    allowed_BTS = allowed_mask(q_segments_BT, kv_segments_BS, q_offset)
    if _is_self_attention(q_BNTH, k_BKSH, q_offset):
        return _causal_blocks(q_BNTH, k_BKSH, v_BKSH, allowed_BTS)
    return _attend(q_BNTH, k_BKSH, v_BKSH, allowed_BTS)


def _is_self_attention(q_BNTH, k_BKSH, q_offset) -> bool:
    """Training / prefill: queries and keys are the same slots 0..T-1."""
    return isinstance(q_offset, int) and q_offset == 0 and k_BKSH.shape[2] == q_BNTH.shape[2]


# ----------------------------------------------------------------------------------------------
# "blockwise": flash attention in pure JAX.
#
# Queries are laid out [B,K,G,T,H] (the G query heads of one kv head side by side), padded to
# nq * bq slots, keys [B,K,S,H] to nk * bk. Query block i holds slots q_offset + [i bq, (i+1) bq);
# key block j, slots [j bk, (j+1) bk). Key block j is needed by query block i iff
# j bk <= q_offset + (i+1) bq - 1, so the loops below run over that triangle only.


def _block_mask(q_seg_Bq, kv_seg_Bk, q_offset, i, j, bq, bk) -> jax.Array:
    """[B,1,1,bq,bk] allowed pairs of query block i and key block j."""
    q_slot = q_offset + i * bq + jnp.arange(bq)
    k_slot = j * bk + jnp.arange(bk)
    ok_Bqk = (q_seg_Bq[:, :, None] == kv_seg_Bk[:, None, :]) & (k_slot[None, None, :] <= q_slot[None, :, None])
    return ok_Bqk[:, None, None]


def _key_blocks(i, q_offset, bq, bk, nk):
    """Number of key blocks query block i sees (those left of the diagonal)."""
    return jnp.minimum(nk, (q_offset + (i + 1) * bq - 1) // bk + 1)


def _first_query_block(j, q_offset, bq, bk):
    """First query block that sees key block j."""
    return jnp.maximum(0, (j * bk - q_offset) // bq)


def _flash_forward(q_BKGTH, k_BKSH, v_BKSH, q_seg_BT, kv_seg_BS, q_offset, bq, bk):
    """(out [B,K,G,T,H] in q's dtype, lse [B,K,G,T] float32); q is pre-scaled.

    Online softmax over key blocks: with m the running row max, l the running
    sum of exp(s - m) and acc the running sum of exp(s - m) v, a new block of
    scores s' gives m' = max(m, max s'), l' = e^{m - m'} l + sum e^{s' - m'},
    acc' = e^{m - m'} acc + e^{s' - m'} v'. out = acc / l, lse = m + log l.
    Masked pairs get weight exactly 0, so a fully masked row ends with l = 0:
    its output is 0 (and its gradient, see `_flash_backward`).
    """
    b, kh, g, tp, h = q_BKGTH.shape
    nq, nk = tp // bq, k_BKSH.shape[2] // bk

    def q_step(i, carry):
        out, lse = carry
        q_i = jax.lax.dynamic_slice_in_dim(q_BKGTH, i * bq, bq, axis=3)
        seg_i = jax.lax.dynamic_slice_in_dim(q_seg_BT, i * bq, bq, axis=1)

        def k_step(j, state):
            acc, m, l = state
            k_j = jax.lax.dynamic_slice_in_dim(k_BKSH, j * bk, bk, axis=2)
            v_j = jax.lax.dynamic_slice_in_dim(v_BKSH, j * bk, bk, axis=2)
            ok = _block_mask(seg_i, jax.lax.dynamic_slice_in_dim(kv_seg_BS, j * bk, bk, axis=1),
                             q_offset, i, j, bq, bk)
            s = jnp.einsum("bkgqh,bksh->bkgqs", q_i, k_j, preferred_element_type=jnp.float32)
            m_new = jnp.maximum(m, jnp.max(jnp.where(ok, s, _MASKED), axis=-1))
            p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v_BKSH.dtype), v_j,
                            preferred_element_type=jnp.float32)
            return alpha[..., None] * acc + pv, m_new, alpha * l + jnp.sum(p, axis=-1)

        init = (jnp.zeros((b, kh, g, bq, h), jnp.float32), jnp.full((b, kh, g, bq), _MASKED, jnp.float32),
                jnp.zeros((b, kh, g, bq), jnp.float32))
        acc, m, l = jax.lax.fori_loop(0, _key_blocks(i, q_offset, bq, bk, nk), k_step, init)
        seen = l > 0
        out_i = acc / jnp.where(seen, l, 1.0)[..., None]
        lse_i = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        out = jax.lax.dynamic_update_slice_in_dim(out, out_i.astype(out.dtype), i * bq, axis=3)
        return out, jax.lax.dynamic_update_slice_in_dim(lse, lse_i, i * bq, axis=3)

    init = (jnp.zeros(q_BKGTH.shape, q_BKGTH.dtype), jnp.zeros(q_BKGTH.shape[:4], jnp.float32))
    return jax.lax.fori_loop(0, nq, q_step, init)


def _flash_backward(bq, bk, residuals, dout_BKGTH):
    """Cotangents of (q, k, v) by FlashAttention-2's backward pass.

    With P = exp(S - lse) recomputed per block and D = rowsum(dO * O):
    dV = P^T dO, dS = P * (dO V^T - D), dQ = dS K, dK = dS^T Q.
    Outer loop over key blocks (dK, dV of a block accumulate locally), inner
    loop over the query blocks that see it; dQ accumulates into a [B,K,G,T,H]
    float32 buffer. Only [bq,bk] score blocks are ever live.
    """
    q_BKGTH, k_BKSH, v_BKSH, q_seg_BT, kv_seg_BS, q_offset, out_BKGTH, lse_BKGT = residuals
    b, kh, g, tp, h = q_BKGTH.shape
    nq, nk = tp // bq, k_BKSH.shape[2] // bk
    d_BKGT = jnp.sum(dout_BKGTH.astype(jnp.float32) * out_BKGTH.astype(jnp.float32), axis=-1)

    def k_step(j, carry):
        dq, dk, dv = carry
        k_j = jax.lax.dynamic_slice_in_dim(k_BKSH, j * bk, bk, axis=2)
        v_j = jax.lax.dynamic_slice_in_dim(v_BKSH, j * bk, bk, axis=2)
        seg_j = jax.lax.dynamic_slice_in_dim(kv_seg_BS, j * bk, bk, axis=1)

        def q_step(i, state):
            dq, dk_j, dv_j = state
            sl = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=i * bq, slice_size=bq, axis=3)
            q_i, do_i, lse_i, d_i = sl(q_BKGTH), sl(dout_BKGTH), sl(lse_BKGT), sl(d_BKGT)
            ok = _block_mask(jax.lax.dynamic_slice_in_dim(q_seg_BT, i * bq, bq, axis=1), seg_j,
                             q_offset, i, j, bq, bk)
            s = jnp.einsum("bkgqh,bksh->bkgqs", q_i, k_j, preferred_element_type=jnp.float32)
            p = jnp.where(ok, jnp.exp(jnp.where(ok, s - lse_i[..., None], 0.0)), 0.0)
            dv_j = dv_j + jnp.einsum("bkgqs,bkgqh->bksh", p.astype(do_i.dtype), do_i,
                                     preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgqh,bksh->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
            ds = p * (dp - d_i[..., None])
            dk_j = dk_j + jnp.einsum("bkgqs,bkgqh->bksh", ds.astype(q_i.dtype), q_i,
                                     preferred_element_type=jnp.float32)
            dq_i = jnp.einsum("bkgqs,bksh->bkgqh", ds.astype(k_j.dtype), k_j, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, sl(dq) + dq_i, i * bq, axis=3)
            return dq, dk_j, dv_j

        zeros = jnp.zeros((b, kh, bk, h), jnp.float32)
        dq, dk_j, dv_j = jax.lax.fori_loop(_first_query_block(j, q_offset, bq, bk), nq, q_step,
                                           (dq, zeros, zeros))
        dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_j.astype(dk.dtype), j * bk, axis=2)
        return dq, dk, jax.lax.dynamic_update_slice_in_dim(dv, dv_j.astype(dv.dtype), j * bk, axis=2)

    init = (jnp.zeros(q_BKGTH.shape, jnp.float32), jnp.zeros_like(k_BKSH), jnp.zeros_like(v_BKSH))
    dq, dk, dv = jax.lax.fori_loop(0, nk, k_step, init)
    return dq.astype(q_BKGTH.dtype), dk, dv, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(q_BKGTH, k_BKSH, v_BKSH, q_seg_BT, kv_seg_BS, q_offset, bq, bk):
    return _flash_forward(q_BKGTH, k_BKSH, v_BKSH, q_seg_BT, kv_seg_BS, q_offset, bq, bk)[0]


def _flash_fwd(q_BKGTH, k_BKSH, v_BKSH, q_seg_BT, kv_seg_BS, q_offset, bq, bk):
    out, lse = _flash_forward(q_BKGTH, k_BKSH, v_BKSH, q_seg_BT, kv_seg_BS, q_offset, bq, bk)
    return out, (q_BKGTH, k_BKSH, v_BKSH, q_seg_BT, kv_seg_BS, q_offset, out, lse)


_flash.defvjp(_flash_fwd, _flash_backward)


def _pad_to(x, axis, size, value=0):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _blockwise(q_BNTH, k_BKSH, v_BKSH, q_segments_BT, kv_segments_BS, q_offset, *,
               block_q=None, block_k=None) -> jax.Array:
    """Flash attention in pure JAX; T and S need not be multiples of the blocks
    (default BLOCK_Q, BLOCK_K, read at call time)."""
    b, n, t, h = q_BNTH.shape
    kh, s = k_BKSH.shape[1], k_BKSH.shape[2]
    bq, bk = min(block_q or BLOCK_Q, t), min(block_k or BLOCK_K, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    q_BKGTH = _pad_to((q_BNTH * (h ** -0.5)).reshape(b, kh, n // kh, t, h), 3, tp)
    q_seg = _pad_to(q_segments_BT.astype(jnp.int32), 1, tp, _PAD_Q)
    kv_seg = _pad_to(kv_segments_BS.astype(jnp.int32), 1, sp, _PAD_K)
    out = _flash(q_BKGTH, _pad_to(k_BKSH, 2, sp), _pad_to(v_BKSH, 2, sp), q_seg, kv_seg,
                 jnp.asarray(q_offset, jnp.int32), bq, bk)
    return out[:, :, :, :t].reshape(b, n, t, h)


# ----------------------------------------------------------------------------------------------
# "splash": TPU Pallas kernel.


def _splash_block(t: int) -> int:
    """Largest of 512, 256, 128 dividing t (t is a multiple of 128)."""
    return next(b for b in (512, 256, 128) if t % b == 0)


def _splash_local(q_BNTH, k_BKTH, v_BKTH, q_seg_BT, kv_seg_BT, *, interpret=False):
    """Splash attention on the arrays one device holds; q pre-scaled, T a multiple of 128."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    n, t = q_BNTH.shape[1], q_BNTH.shape[2]
    blk = _splash_block(t)
    sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                          block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    mask = sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(n)])
    kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    return jax.vmap(kernel)(q_BNTH, k_BKTH, v_BKTH, sa.SegmentIds(q_seg_BT, kv_seg_BT))


def _splash(q_BNTH, k_BKTH, v_BKTH, q_segments_BT, kv_segments_BT, *, interpret=False) -> jax.Array:
    """Splash attention for T == S, q_offset 0, sharded by the current mesh.

    Mosaic kernels are opaque to XLA's partitioner, so the kernel runs under
    `jax.shard_map`: batch split like the "batch" rule, query heads like the
    "heads" rule (key/value heads must split the same way; when the tensor
    axis does not divide K, k and v are repeated to N heads first), the
    sequence whole. T is padded to a multiple of 128 with slots of their own
    segment (-1), which real queries never see (they lie in the future), so
    no query row is ever fully masked.
    """
    from aem_jax import sharding

    b, n, t, h = q_BNTH.shape
    tp = -(-t // 128) * 128
    q = _pad_to(q_BNTH * (h ** -0.5), 2, tp)
    k, v = _pad_to(k_BKTH, 2, tp), _pad_to(v_BKTH, 2, tp)
    q_seg = _pad_to(q_segments_BT.astype(jnp.int32), 1, tp, _PAD_Q)
    kv_seg = _pad_to(kv_segments_BT.astype(jnp.int32), 1, tp, _PAD_Q)
    local = functools.partial(_splash_local, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        out = local(q, k, v, q_seg, kv_seg)
    else:
        rules = sharding._current_rules()
        q_spec = sharding.logical_to_spec(("batch", "heads", None, None), rules, shape=q.shape, mesh=mesh)
        kv_spec = sharding.logical_to_spec(("batch", "kv_heads", None, None), rules, shape=k.shape, mesh=mesh)
        if kv_spec[1] != q_spec[1]:  # heads split differently: give every query head its own kv head
            k, v = (jnp.repeat(x, n // k.shape[1], axis=1) for x in (k, v))
            kv_spec = q_spec
        seg_spec = jax.sharding.PartitionSpec(q_spec[0], None)
        out = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                            out_specs=q_spec, check_vma=False)(q, k, v, q_seg, kv_seg)
    return out[:, :, :t]


# ----------------------------------------------------------------------------------------------
# "cudnn": GPU kernel.


def _cudnn_supported(q_BNTH, k_BKSH, q_offset) -> bool:
    """cuDNN flash attention here: float16/bfloat16, H a multiple of 8 up to 128, T == S, q_offset 0."""
    h = q_BNTH.shape[-1]
    return (q_BNTH.dtype in (jnp.bfloat16, jnp.float16) and h % 8 == 0 and h <= 128
            and _is_self_attention(q_BNTH, k_BKSH, q_offset))


def _cudnn(q_BNTH, k_BKTH, v_BKTH, q_segments_BT, kv_segments_BT, *, implementation="cudnn") -> jax.Array:
    """cuDNN flash attention for T == S, q_offset 0.

    cuDNN's causal mask skips the blocks above the diagonal; the segment mask
    (padding, packed episodes) has no cuDNN form in `jax.nn.dot_product_attention`
    except a bias, so it goes in as a [B,1,T,T] boolean mask (turned into an
    additive bias of q's dtype: B T^2 bytes x2, not per head). Decode steps
    (q_offset > 0), float32 and unsupported head sizes use "xla" instead (see
    `_cudnn_supported`). `implementation="xla"` runs the same call through
    XLA, which is how the CPU tests check the arguments.
    """
    same_B1TT = (q_segments_BT[:, :, None] == kv_segments_BT[:, None, :])[:, None]
    out_BTNH = jax.nn.dot_product_attention(
        q_BNTH.transpose(0, 2, 1, 3), k_BKTH.transpose(0, 2, 1, 3), v_BKTH.transpose(0, 2, 1, 3),
        mask=same_B1TT, is_causal=True, implementation=implementation)
    return out_BTNH.transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------------------------


def platform() -> str:
    """The platform attention will run on: the current mesh's devices, else the default backend.

    Reading the mesh matters for ahead-of-time compilation: a CPU host that
    compiles for a TPU topology (``python -m aem_jax.plan``) sets a mesh of
    TPU devices, and "auto" must then pick the TPU kernel.
    """
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def resolve_impl(impl: str, q_BNTH, k_BKSH, q_offset) -> str:
    """The implementation `attend` runs for `impl` and these shapes (never "auto")."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r}; allowed: {IMPLS}")
    self_attention = _is_self_attention(q_BNTH, k_BKSH, q_offset)
    if impl == "auto":
        backend = platform()
        if backend == "tpu":
            impl = "splash"
        elif backend == "gpu":
            impl = "cudnn"
        else:
            impl = "blockwise" if q_BNTH.shape[2] >= AUTO_BLOCKWISE_MIN_T else "xla"
    if impl == "splash" and not self_attention:
        return "xla"
    if impl == "cudnn" and not _cudnn_supported(q_BNTH, k_BKSH, q_offset):
        return "xla"
    return impl


def attend(q_BNTH, k_BKSH, v_BKSH, q_segments_BT, kv_segments_BS, *, q_offset=0,
           impl: str = "auto") -> jax.Array:
    """Causal, segment-masked grouped-query attention; returns [B,N,T,H] in q's dtype.

    `q_offset` is the slot of the first query (an int or a traced scalar: the
    KV-cache index during decoding). When it is the Python int 0 and S == T
    (training and prefill), blocks above the diagonal are skipped; "blockwise"
    skips them for any q_offset. `impl` is one of IMPLS (module docstring).
    """
    impl = resolve_impl(impl, q_BNTH, k_BKSH, q_offset)
    if impl == "blockwise":
        return _blockwise(q_BNTH, k_BKSH, v_BKSH, q_segments_BT, kv_segments_BS, q_offset)
    if impl == "splash":
        return _splash(q_BNTH, k_BKSH, v_BKSH, q_segments_BT, kv_segments_BS)
    if impl == "cudnn":
        return _cudnn(q_BNTH, k_BKSH, v_BKSH, q_segments_BT, kv_segments_BS)
    return _xla(q_BNTH, k_BKSH, v_BKSH, q_segments_BT, kv_segments_BS, q_offset)
