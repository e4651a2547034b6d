"""Decoder models (Qwen2/2.5, Qwen3, Llama 3), Hugging Face I/O, tokenizers, sampler.

Entry points:
  from_pretrained(path_or_hub_id, *, dtype="float32") -> (model, tokenizer)
  logits(model, tokens_BT, attention_mask_BT) -> logits_BTV
  save_pretrained(model, tokenizer, path)
See `aem_jax.models.decoder` for the logical axis names of parameters and
activations (mapped to mesh axes by `aem_jax.sharding`), and
`aem_jax.models.sampler` for generation.
"""
from aem_jax.models.config import MODEL_TYPES, ModelConfig, RopeScaling, from_hf_config, to_hf_config
from aem_jax.models.decoder import (
    Decoder,
    KVCache,
    hidden_states,
    init_model,
    logits,
    positions_from_mask,
    unembedding,
)
from aem_jax.models.hf import from_pretrained, load_model, load_tokenizer, save_pretrained
from aem_jax.models.tokenizer import build_tokenizer, save_tokenizer

__all__ = [
    "MODEL_TYPES", "ModelConfig", "RopeScaling", "from_hf_config", "to_hf_config",
    "Decoder", "KVCache", "hidden_states", "init_model", "logits",
    "positions_from_mask", "unembedding",
    "from_pretrained", "load_model", "load_tokenizer", "save_pretrained",
    "build_tokenizer", "save_tokenizer",
]
