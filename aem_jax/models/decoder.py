"""A Flax NNX decoder covering Qwen2/Qwen2.5, Qwen3 and Llama 3.

Architecture (pre-norm, as in the Hugging Face reference implementations):

  h_0 = E[tokens]
  a_l = h_l + Attn(RMSNorm(h_l))       GQA, RoPE, optional q/k/v bias, optional q/k RMSNorm
  h_{l+1} = a_l + W_down(silu(W_gate x) * W_up x),  x = RMSNorm(a_l)
  logits = RMSNorm(h_L) @ U,  U = E^T (tied) or a separate lm_head

RMSNorm(x) = w * x / sqrt(mean(x^2) + eps) (Zhang & Sennrich, 2019); RoPE
(Su et al., 2021) in the "rotate half" layout with optional Llama 3 frequency
scaling; attention softmax(q k^T / sqrt(head_dim)) in float32.

Scanned layers. The L layers are one `Block` whose parameters are stacked
along a leading layer axis (`model.layers.attn.q[...]` is [L, D, N, H]); the
forward pass runs them with `jax.lax.scan`, so XLA compiles one layer body
whatever the depth. Each layer can be rematerialised (`ModelConfig.remat`,
see `REMAT_POLICIES`): the backward pass then recomputes what the policy did
not save instead of holding every activation of every layer. The KV cache
is likewise stacked ([L,B,K,S,H]) and carried through the scan.

Logical axis names. Every parameter carries them as the `out_sharding`
metadata of its `nnx.Param` (not applied eagerly); `aem_jax.sharding` maps
them to mesh axes with its rule table (`create_sharded`, `state_shardings`).
Per-layer parameters have the extra leading name `layers` (kept whole on
every device: the scan reads one layer at a time):

  parameter              shape             names
  embed                  [V, D]            (vocab, embed)
  lm_head (untied)       [D, V]            (embed, vocab)
  final_norm scale       [D]               (norm,)
  q / k / v kernels      [L, D, N|K, H]    (layers, embed, heads|kv_heads, head_dim)
  q / k / v biases       [L, N|K, H]       (layers, heads|kv_heads, head_dim)
  o kernel               [L, N, H, D]      (layers, heads, head_dim, embed)
  gate / up kernels      [L, D, F]         (layers, embed, mlp)
  down kernel            [L, F, D]         (layers, mlp, embed)
  RMSNorm scales         [L, D] or [L, H]  (layers, norm) or (layers, head_dim)

Activations are constrained with the names batch, length, embed, heads,
kv_heads, head_dim, mlp, vocab through `aem_jax.sharding.constrain` (only when
a mesh is set), the same mapping and divisibility fallback as the parameters.

Dimension letters: B batch, T query length, S key/cache length, D hidden,
N query heads, K key/value heads, G = N/K heads per group, H head_dim,
F intermediate, V vocabulary, L layers.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aem_jax import sharding
from aem_jax.models import attention
from aem_jax.models.config import ModelConfig

# Memory kinds that hold offloaded residuals, by backend; a backend missing
# here (CPU: XLA:CPU accepts the policy but keeps everything in place) has
# no host offload, and remat="offload" is refused on it.
_OFFLOAD_PLATFORMS = ("tpu", "gpu", "cuda", "rocm")


def remat_policy(remat: str):
    """The `jax.checkpoint` policy of `ModelConfig.remat` (None: no checkpointing).

    dots: save the outputs of matmuls without batch dimensions (the weight
    projections, all done by `dense`), recompute norms, RoPE, attention and
    the SwiGLU product. full: save nothing; the backward pass reruns the
    layer from its input. offload: as dots, with the saved values moved to
    pinned host memory between the forward and the backward pass.
    """
    if remat == "none":
        return None
    if remat == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if remat == "full":
        return jax.checkpoint_policies.nothing_saveable
    if remat == "offload":
        backend = jax.default_backend()
        if backend not in _OFFLOAD_PLATFORMS:
            raise ValueError(f"remat='offload' needs host-offload support, which backend "
                             f"{backend!r} lacks (supported on: {_OFFLOAD_PLATFORMS}); use "
                             "remat='dots' or 'full'")
        return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    raise ValueError(f"remat={remat!r}; allowed: ('none', 'dots', 'full', 'offload')")


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], dtype,
           init: str = "normal", layers: int | None = None) -> nnx.Param:
    """A parameter; with `layers`, `layers` stacked copies (leading axis named "layers")."""
    if layers is not None:
        shape, names = (layers, *shape), ("layers", *names)
    if init == "normal":  # HF initializer_range = 0.02
        value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
    else:
        value = jnp.full(shape, 1.0 if init == "ones" else 0.0, jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=names, eager_sharding=False)


def dense(x: jax.Array, w: jax.Array, in_dims: int = 1, **kwargs) -> jax.Array:
    """Contracts the last `in_dims` axes of x with the first `in_dims` of w.

    Done as one 2-D matmul ([rows, in] @ [in, out]): XLA:CPU runs the 2-D form,
    and above all its backward pass, about twice as fast as the equivalent
    multi-dimensional einsum.
    """
    lead, k = x.shape[:x.ndim - in_dims], int(np.prod(w.shape[:in_dims]))
    y = jnp.matmul(x.reshape(-1, k), w.reshape(k, -1), **kwargs)
    return y.reshape(*lead, *w.shape[in_dims:])


class KVCache(NamedTuple):
    """A preallocated key/value cache: keys and values [L,B,K,S,H], all layers stacked.

    `index` is the cache slot where the next call's first token is written.
    """

    keys: jax.Array
    values: jax.Array
    index: jax.Array

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, length: int) -> "KVCache":
        shape = (config.num_layers, batch, config.num_kv_heads, length, config.head_dim)
        return cls(keys=jnp.zeros(shape, config.compute_dtype),
                   values=jnp.zeros(shape, config.compute_dtype), index=jnp.zeros((), jnp.int32))


class RMSNorm(nnx.Module):
    """y = w * x / sqrt(mean(x^2) + eps), statistics in float32."""

    def __init__(self, size: int, config: ModelConfig, *, names: tuple[str, ...], rngs: nnx.Rngs,
                 layers: int | None = None):
        self.eps = config.rms_norm_eps
        self.scale = _param(rngs, (size,), names, config.params_dtype, init="ones", layers=layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """theta^(-2i/H) in float32 (as the reference), with optional Llama 3 scaling."""
    h = config.head_dim
    inv = (1.0 / (np.float32(config.rope_theta) ** (np.arange(0, h, 2).astype(np.float32) / h)))
    inv = inv.astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv
    # Llama 3: long wavelengths are slowed down by `factor`, short ones kept,
    # and a smooth interpolation in between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions_BT: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B,1,T,H] of the angles position * inv_freq, computed once per forward."""
    angles = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, None]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x_BNTH: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates pairs (x_i, x_{i+H/2}) by their angles (the "rotate half" layout)."""
    cos, sin = rope
    x1, x2 = jnp.split(x_BNTH, 2, axis=-1)
    return x_BNTH * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nnx.Module):
    """Grouped-query attention with RoPE and an optional KV cache.

    With `layers`, every parameter is stacked `layers` times (see `Block`).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, layers: int | None = None):
        c, pd, lay = config, config.params_dtype, dict(layers=layers)
        self.config = config
        self.q = _param(rngs, (c.hidden_size, c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), pd, **lay)
        self.k = _param(rngs, (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), pd,
                        **lay)
        self.v = _param(rngs, (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), pd,
                        **lay)
        self.o = _param(rngs, (c.num_heads, c.head_dim, c.hidden_size), ("heads", "head_dim", "embed"), pd, **lay)
        if c.qkv_bias:
            self.q_bias = _param(rngs, (c.num_heads, c.head_dim), ("heads", "head_dim"), pd, "zeros", **lay)
            self.k_bias = _param(rngs, (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), pd, "zeros", **lay)
            self.v_bias = _param(rngs, (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), pd, "zeros", **lay)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c, names=("head_dim",), rngs=rngs, layers=layers)
            self.k_norm = RMSNorm(c.head_dim, c, names=("head_dim",), rngs=rngs, layers=layers)

    def _project(self, x_BTD: jax.Array, name: str) -> jax.Array:
        """x W (+ b) in the head-major layout [B, heads, T, H]."""
        dt = self.config.compute_dtype
        y_BTNH = dense(x_BTD, getattr(self, name)[...].astype(dt))
        if self.config.qkv_bias:
            y_BTNH = y_BTNH + getattr(self, f"{name}_bias")[...].astype(dt)
        return y_BTNH.transpose(0, 2, 1, 3)

    def __call__(self, x_BTD, rope, segments, kv=None, index=None,
                 prefill=False):
        """Returns the attention output [B,T,D] and the updated cache (or None).

        `segments` is (query segment ids [B,T], key segment ids [B,S]); see
        `aem_jax.models.attention`. `kv` is None or (keys [L,B,K,S,H], values
        [L,B,K,S,H], l): the stacked cache of all layers and this layer's
        index. The new keys/values are written into layer l at slots
        [index, index + T) first, and layer l is read back after: written in
        place and read once, where reading first would make XLA copy the
        whole stack to keep the read apart from the write.

        Keys and values are kept head-major ([B,K,S,H]) so that a decode step
        reads the cache without a transpose.
        """
        c = self.config
        q_BNTH, k_BKTH, v_BKTH = (self._project(x_BTD, n) for n in ("q", "k", "v"))
        if c.qk_norm:
            q_BNTH, k_BKTH = self.q_norm(q_BNTH), self.k_norm(k_BKTH)
        q_BNTH = sharding.constrain(apply_rope(q_BNTH, rope), ("batch", "heads", "length", "head_dim"))
        k_BKTH = sharding.constrain(apply_rope(k_BKTH, rope), ("batch", "kv_heads", "length", "head_dim"))
        q_seg_BT, kv_seg_BS = segments
        if kv is not None:  # write the new keys/values at slots [index, index + T) of layer l
            keys, values, l = kv
            start = (l, 0, 0, index, 0)
            keys = jax.lax.dynamic_update_slice(keys, k_BKTH[None].astype(keys.dtype), start)
            values = jax.lax.dynamic_update_slice(values, v_BKTH[None].astype(values.dtype), start)
            kv = (keys, values)
        if kv is None or prefill:  # keys are the T new tokens at slots [0, T): causal blocks
            t = q_BNTH.shape[2]
            out_BNTH = attention.attend(q_BNTH, k_BKTH, v_BKTH, q_seg_BT, kv_seg_BS[:, :t],
                                        impl=c.attention)
        else:  # the whole cache of layer l, the new keys included
            k_BKSH = jax.lax.dynamic_index_in_dim(keys, l, keepdims=False)
            v_BKSH = jax.lax.dynamic_index_in_dim(values, l, keepdims=False)
            out_BNTH = attention.attend(q_BNTH, k_BKSH, v_BKSH, q_seg_BT, kv_seg_BS,
                                        q_offset=index, impl=c.attention)
        y = dense(out_BNTH.transpose(0, 2, 1, 3), self.o[...].astype(c.compute_dtype), in_dims=2)
        return y, kv


class MLP(nnx.Module):
    """SwiGLU: W_down(silu(W_gate x) * W_up x)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, layers: int | None = None):
        c, pd = config, config.params_dtype
        self.dtype = c.compute_dtype
        self.gate = _param(rngs, (c.hidden_size, c.intermediate_size), ("embed", "mlp"), pd, layers=layers)
        self.up = _param(rngs, (c.hidden_size, c.intermediate_size), ("embed", "mlp"), pd, layers=layers)
        self.down = _param(rngs, (c.intermediate_size, c.hidden_size), ("mlp", "embed"), pd, layers=layers)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        dt = self.dtype
        gate = dense(x_BTD, self.gate[...].astype(dt))
        up = dense(x_BTD, self.up[...].astype(dt))
        h_BTF = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return dense(h_BTF, self.down[...].astype(dt))


class Block(nnx.Module):
    """One pre-norm transformer layer, or with `layers` that many stacked.

    A stacked Block holds every parameter with a leading layer axis and is
    not called directly: `Decoder.hidden` scans over it, calling the Block
    rebuilt from one layer's slice of the parameters.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, layers: int | None = None):
        self.input_norm = RMSNorm(config.hidden_size, config, names=("norm",), rngs=rngs, layers=layers)
        self.attn = Attention(config, rngs=rngs, layers=layers)
        self.post_attn_norm = RMSNorm(config.hidden_size, config, names=("norm",), rngs=rngs, layers=layers)
        self.mlp = MLP(config, rngs=rngs, layers=layers)

    def __call__(self, x_BTD, rope, segments, kv=None, index=None,
                 prefill=False):
        y, kv = self.attn(self.input_norm(x_BTD), rope, segments, kv, index,
                          prefill)
        x_BTD = sharding.constrain(x_BTD + y, ("batch", "length", "embed"))
        x_BTD = x_BTD + self.mlp(self.post_attn_norm(x_BTD))
        return sharding.constrain(x_BTD, ("batch", "length", "embed")), kv


class Decoder(nnx.Module):
    """The decoder: embedding, `num_layers` stacked blocks, final norm, unembedding."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        pd = config.params_dtype
        self.embed = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), pd)
        self.layers = Block(config, rngs=rngs, layers=config.num_layers)
        self.final_norm = RMSNorm(config.hidden_size, config, names=("norm",), rngs=rngs)
        if not config.tie_embeddings:
            self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), pd)

    def hidden(self, tokens_BT, positions_BT, attention_mask, cache: KVCache | None = None,
               *, prefill: bool = False):
        """Final-norm hidden states [B,T,D] and the updated cache.

        Without a cache, `attention_mask` is [B,T] (1 = real token) and
        attention is causal over the T tokens. With a cache, the T tokens are
        written at slots [cache.index, cache.index + T) and `attention_mask`
        is [B,S] over all cache slots (1 = slot holds a real token); a query
        at slot i attends to valid slots <= i. `prefill=True` promises that the
        cache is empty (index 0): attention then reads the T new keys directly
        instead of all S cache slots.
        """
        c = self.config
        x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(c.compute_dtype)
        x_BTD = sharding.constrain(x_BTD, ("batch", "length", "embed"))
        t = tokens_BT.shape[1]
        kv_seg_BS = attention_mask.astype(jnp.int32)  # 1 = real token, 0 = padding
        index = jnp.zeros((), jnp.int32) if cache is None else cache.index
        q_seg_BT = kv_seg_BS if cache is None else jax.lax.dynamic_slice_in_dim(kv_seg_BS, index, t, axis=1)
        segments = (q_seg_BT, kv_seg_BS)
        rope = rope_tables(positions_BT, rope_inverse_frequencies(c), c.compute_dtype)
        graphdef, stacked = nnx.split(self.layers)

        def layer(x_BTD, params, kv=None):
            return nnx.merge(graphdef, params)(x_BTD, rope, segments, kv, index, prefill)

        if cache is None:  # training / scoring: the layers under remat, no cache
            policy = remat_policy(c.remat)
            if policy is not None:
                layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
            x_BTD, _ = jax.lax.scan(lambda x, params: (layer(x, params)[0], None), x_BTD, stacked)
            return self.final_norm(x_BTD), None

        def body(carry, xs):
            # The cache rides in the carry and only the T new slots of layer l
            # are written: an in-place update, where scanning the cache as
            # xs -> ys would copy all of it every call.
            x_BTD, keys, values = carry
            params, l = xs
            x_BTD, (keys, values) = layer(x_BTD, params, (keys, values, l))
            return (x_BTD, keys, values), None

        layer_ids = jnp.arange(c.num_layers, dtype=jnp.int32)
        (x_BTD, keys, values), _ = jax.lax.scan(body, (x_BTD, cache.keys, cache.values), (stacked, layer_ids))
        return self.final_norm(x_BTD), KVCache(keys, values, index + t)

    def unembed(self, hidden_BTD: jax.Array) -> jax.Array:
        """Float32 logits [B,T,V] from hidden states."""
        dt, (b, t, d) = self.config.compute_dtype, hidden_BTD.shape
        if self.config.tie_embeddings:  # contract with E [V,D] directly: no transposed copy
            out = jnp.einsum("nd,vd->nv", hidden_BTD.reshape(b * t, d), self.embed[...].astype(dt),
                             preferred_element_type=jnp.float32).reshape(b, t, -1)
        else:
            out = dense(hidden_BTD, self.lm_head[...].astype(dt), preferred_element_type=jnp.float32)
        return sharding.constrain(out, ("batch", "length", "vocab"))

    def __call__(self, tokens_BT, positions_BT, attention_mask, cache: KVCache | None = None):
        """Returns (logits [B,T,V] float32, updated cache or None); see `hidden`."""
        hidden_BTD, cache = self.hidden(tokens_BT, positions_BT, attention_mask, cache)
        return self.unembed(hidden_BTD), cache


def unembedding(model: Decoder) -> jax.Array:
    """The unembedding matrix U [D,V] (the transposed embedding when tied)."""
    if model.config.tie_embeddings:
        return model.embed[...].T
    return model.lm_head[...]


def positions_from_mask(attention_mask_BT: jax.Array) -> jax.Array:
    """Token positions that ignore padding on either side: cumsum(mask) - 1, >= 0."""
    m = attention_mask_BT.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)


def hidden_states(model: Decoder, tokens_BT: jax.Array, attention_mask_BT: jax.Array) -> jax.Array:
    """Final-norm hidden states [B,T,D] of a padded batch (left or right padding)."""
    hidden, _ = model.hidden(tokens_BT, positions_from_mask(attention_mask_BT), attention_mask_BT)
    return hidden


def logits(model: Decoder, tokens_BT: jax.Array, attention_mask_BT: jax.Array) -> jax.Array:
    """Float32 next-token logits [B,T,V] of a padded batch (left or right padding)."""
    return model.unembed(hidden_states(model, tokens_BT, attention_mask_BT))


def init_model(config: ModelConfig, *, seed: int = 0, dtype: str | None = None,
               param_dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
               rules=sharding.DEFAULT_RULES) -> Decoder:
    """A randomly initialised decoder.

    Args:
      config: the architecture.
      seed: seed of the initialisation.
      dtype: if given, the compute dtype (and the parameter dtype too, unless
        `param_dtype` is given).
      param_dtype: if given, the parameter storage dtype, e.g. "float32"
        master weights under `dtype="bfloat16"` compute.
      mesh, rules: with a mesh, every parameter is created already in the
        sharding its logical names map to under `rules`
        (`aem_jax.sharding.create_sharded`); otherwise on the default device.

    The initialisation runs as one compiled function (eager initialisation
    would compile every random op separately).
    """
    if dtype is not None:
        config = config.replace(dtype=dtype, param_dtype=dtype)
    if param_dtype is not None:
        config = config.replace(param_dtype=param_dtype)
    if mesh is not None:
        return sharding.create_sharded(lambda: Decoder(config, rngs=nnx.Rngs(seed)), mesh, rules)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(seed))))
    state = jax.jit(lambda: nnx.split(Decoder(config, rngs=nnx.Rngs(seed)))[1])()
    return nnx.merge(graphdef, state)
