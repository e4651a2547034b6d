"""Tiny random Hugging Face checkpoints made with transformers + torch.

Each architecture the decoder claims is covered with GQA (4 query heads, 2
key/value heads): Qwen2 with q/k/v bias and tied embeddings, Qwen3 with q/k
RMSNorm, a head_dim unrelated to hidden_size and untied embeddings, Llama 3
with llama3 RoPE scaling. Weights are redrawn at a larger scale (and norm
scales / biases away from 1 / 0) so that logits are well spread and every
parameter's mapping matters.
"""
import dataclasses

import numpy as np
import torch
import transformers


WORDS = [f"w{i}" for i in range(90)]


@dataclasses.dataclass
class Checkpoint:
    path: str
    torch_model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase


def _hf_configs(vocab: int) -> dict[str, transformers.PretrainedConfig]:
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6)
    return {
        "qwen2": transformers.Qwen2Config(**common, tie_word_embeddings=True),
        "qwen3": transformers.Qwen3Config(**common, head_dim=24, tie_word_embeddings=False),
        "llama": transformers.LlamaConfig(
            **common, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
            rope_theta=500000.0),
    }


def _redraw(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            else:
                p.copy_(0.15 * noise)


def make_checkpoints(root, tokenizer) -> dict[str, Checkpoint]:
    torch.manual_seed(0)
    out = {}
    for i, (name, config) in enumerate(_hf_configs(len(tokenizer)).items()):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        _redraw(model, seed=i)
        path = str(root / f"ckpt_{name}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[name] = Checkpoint(path, model, tokenizer)
    return out


def padded_batch(vocab: int, seed: int = 0):
    """A [3,12] batch: one full row, one left-padded and one right-padded row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, vocab, (3, 12)).astype(np.int32)
    mask = np.ones((3, 12), np.int32)
    mask[1, :4] = 0
    mask[2, 9:] = 0
    tokens[mask == 0] = 0
    return tokens, mask


def torch_logits(model, tokens, mask) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).logits.float().numpy()


def max_rel_err(a, b, mask) -> float:
    m = np.asarray(mask).astype(bool)
    a, b = np.asarray(a)[m], np.asarray(b)[m]
    return float(np.abs(a - b).max() / np.abs(b).max())
