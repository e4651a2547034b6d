"""Model configuration and its translation to and from Hugging Face `config.json`.

`ModelConfig` is the single description of a decoder; `from_hf_config` and
`to_hf_config` are the only places that know Hugging Face field names. The
supported architectures (the model registry) are the keys of `MODEL_TYPES`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ArchDefaults:
    """What a Hugging Face `model_type` fixes about the architecture."""

    qkv_bias: bool
    qk_norm: bool
    architecture: str  # the `architectures` entry written to config.json


# The model registry: `model_type` -> what that family fixes.
MODEL_TYPES: dict[str, ArchDefaults] = {
    "qwen2": ArchDefaults(qkv_bias=True, qk_norm=False, architecture="Qwen2ForCausalLM"),
    "qwen3": ArchDefaults(qkv_bias=False, qk_norm=True, architecture="Qwen3ForCausalLM"),
    "llama": ArchDefaults(qkv_bias=False, qk_norm=False, architecture="LlamaForCausalLM"),
}
DTYPES = ("float32", "bfloat16")
# Activation checkpointing of each scanned layer (see aem_jax.models.decoder):
# none = keep every activation; dots = keep the outputs of the weight matmuls,
# recompute the rest; full = keep only the layer input, recompute the layer;
# offload = like dots, but the kept matmul outputs go to pinned host memory.
REMATS = ("none", "dots", "full", "offload")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 RoPE frequency scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer (Qwen2/2.5, Qwen3 or Llama 3 family).

    `dtype` is the compute (activation) dtype, `param_dtype` the storage dtype
    of parameters; both are "float32" or "bfloat16". Training keeps float32
    master parameters with bfloat16 compute (each matmul casts its weight
    down): a bfloat16 parameter has an 8-bit mantissa, so an update smaller
    than 2^-9 of its magnitude rounds away (AdamW at lr 1e-6 then changes
    almost no weight). Norms, softmax and RoPE run in float32 whatever the
    compute dtype. `remat` is the checkpointing policy of the scanned layers
    (one of `REMATS`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True
    qkv_bias: bool = True
    qk_norm: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"  # activation checkpointing of each layer, one of REMATS
    attention: str = "auto"  # kernel of aem_jax.models.attention.attend (see its IMPLS)
    model_type: str = "qwen2"
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not supported; "
                             f"supported: {sorted(MODEL_TYPES)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; allowed: {DTYPES}")
        if self.remat not in REMATS:
            raise ValueError(f"remat={self.remat!r}; allowed: {REMATS}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _require(hf: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in hf:
        raise ValueError(f"{source}: required field {key!r} is missing")
    return hf[key]


def _rope(hf: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """Reads RoPE theta and scaling from v5 `rope_parameters` or v4 `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    params.update({k: v for k, v in (hf.get("rope_scaling") or {}).items()})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"{source}: rope type {kind!r} (field rope_parameters/rope_scaling) "
                         "is not supported; supported: 'default', 'llama3'")
    return theta, RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]))


def from_hf_config(hf: Mapping[str, Any], *, dtype: str = "float32", param_dtype: str | None = None,
                   source: str = "config.json") -> ModelConfig:
    """Translates a Hugging Face `config.json` dict into a `ModelConfig`.

    `dtype` is the compute dtype; `param_dtype` the parameter storage dtype
    (default: `dtype`).

    Raises ValueError naming `source` and the field for an unknown
    `model_type` (listing the supported ones) or an unsupported feature.
    """
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{source}: model_type={model_type!r} is not supported; "
                         f"supported: {sorted(MODEL_TYPES)}")
    arch = MODEL_TYPES[model_type]
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r}; only 'silu' is supported")
    if model_type != "qwen2" and hf.get("attention_bias", False):
        raise ValueError(f"{source}: attention_bias=true is not supported for {model_type}")
    if hf.get("mlp_bias", False):
        raise ValueError(f"{source}: mlp_bias=true is not supported")
    if hf.get("use_sliding_window", False):
        raise ValueError(f"{source}: use_sliding_window=true is not supported")
    hidden = int(_require(hf, "hidden_size", source))
    heads = int(_require(hf, "num_attention_heads", source))
    theta, scaling = _rope(hf, source)
    return ModelConfig(
        vocab_size=int(_require(hf, "vocab_size", source)),
        hidden_size=hidden,
        intermediate_size=int(_require(hf, "intermediate_size", source)),
        num_layers=int(_require(hf, "num_hidden_layers", source)),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch.qkv_bias,
        qk_norm=arch.qk_norm,
        dtype=dtype,
        param_dtype=dtype if param_dtype is None else param_dtype,
        model_type=model_type,
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=(tuple(hf["eos_token_id"]) if isinstance(hf.get("eos_token_id"), list)
                      else hf.get("eos_token_id")),
    )


def to_hf_config(config: ModelConfig, *, pad_token_id: int | None = None) -> dict[str, Any]:
    """Translates a `ModelConfig` into a Hugging Face `config.json` dict."""
    arch = MODEL_TYPES[config.model_type]
    if (config.qkv_bias, config.qk_norm) != (arch.qkv_bias, arch.qk_norm):
        raise ValueError(
            f"config: qkv_bias={config.qkv_bias}, qk_norm={config.qk_norm} cannot be expressed "
            f"as model_type={config.model_type!r} (which has qkv_bias={arch.qkv_bias}, "
            f"qk_norm={arch.qk_norm})")
    rope: dict[str, Any] = {"rope_theta": config.rope_theta, "rope_type": "default"}
    if config.rope_scaling is not None:
        rope = {"rope_theta": config.rope_theta, "rope_type": "llama3",
                **dataclasses.asdict(config.rope_scaling)}
    eos = config.eos_token_id
    return {
        "architectures": [arch.architecture],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": rope if config.rope_scaling is not None else None,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": config.qkv_bias,
        "use_sliding_window": False,
        "torch_dtype": config.param_dtype,
        "dtype": config.param_dtype,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
        "pad_token_id": pad_token_id,
        "use_cache": True,
    }
