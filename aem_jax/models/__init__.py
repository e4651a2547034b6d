"""Decoder models, Hugging Face loading, tokenizers and the KV-cache sampler."""
from aem_jax.models.tokenizer import build_tokenizer, save_tokenizer

__all__ = ["build_tokenizer", "save_tokenizer"]
