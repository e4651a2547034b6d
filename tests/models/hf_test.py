"""Loading, matching and saving Hugging Face checkpoints."""
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import aem_jax.models as M
from aem_jax import sharding
from models_testlib import WORDS, max_rel_err, padded_batch, torch_logits

ARCHS = ("qwen2", "qwen3", "llama")
logits_fn = jax.jit(M.logits)  # one compile instead of one per eager op


@pytest.mark.parametrize("arch", ARCHS)
def test_float32_logits_match_transformers(checkpoints, arch):
    ckpt = checkpoints[arch]
    model, tok = M.from_pretrained(ckpt.path)
    tokens, mask = padded_batch(len(tok))
    ours = logits_fn(model, jnp.asarray(tokens), jnp.asarray(mask))
    assert ours.shape == (3, 12, len(tok)) and ours.dtype == jnp.float32
    assert max_rel_err(ours, torch_logits(ckpt.torch_model, tokens, mask), mask) < 1e-4


def test_config_features_are_read(checkpoints):
    q2, q3, ll = (M.from_pretrained(checkpoints[a].path)[0].config for a in ARCHS)
    assert q2.qkv_bias and q2.tie_embeddings and not q2.qk_norm
    assert q3.qk_norm and not q3.qkv_bias and not q3.tie_embeddings and q3.head_dim == 24
    assert ll.rope_scaling == M.RopeScaling(8.0, 1.0, 4.0, 16) and ll.rope_theta == 500000.0
    assert all(c.num_kv_heads == 2 and c.num_heads == 4 for c in (q2, q3, ll))


def test_padding_side_and_hidden_states(checkpoints):
    model, tok = M.from_pretrained(checkpoints["qwen3"].path)
    tokens, mask = padded_batch(len(tok))
    full = logits_fn(model, jnp.asarray(tokens), jnp.asarray(mask))
    # The left-padded row equals the same tokens without padding.
    alone = logits_fn(model, jnp.asarray(tokens[1:2, 4:]), jnp.ones((1, 8), jnp.int32))
    np.testing.assert_allclose(full[1, 4:], alone[0], rtol=1e-5, atol=1e-5)
    hidden = jax.jit(M.hidden_states)(model, jnp.asarray(tokens), jnp.asarray(mask))
    via_hidden = jnp.einsum("btd,dv->btv", hidden, M.unembedding(model))
    np.testing.assert_allclose(via_hidden, full, rtol=1e-5, atol=1e-5)
    assert M.unembedding(model).shape == (model.config.hidden_size, len(tok))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_save_then_transformers_load_same_logits(checkpoints, arch, tmp_path):
    model, tok = M.from_pretrained(checkpoints[arch].path)
    M.save_pretrained(model, tok, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    assert type(reloaded).__name__ == type(checkpoints[arch].torch_model).__name__
    tokens, mask = padded_batch(len(tok), seed=1)
    np.testing.assert_allclose(torch_logits(reloaded, tokens, mask),
                               torch_logits(checkpoints[arch].torch_model, tokens, mask), atol=1e-6)
    tok2 = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok2.chat_template == tok.chat_template


def test_sharded_save_and_load_onto_a_mesh(checkpoints, tmp_path):
    model, tok = M.from_pretrained(checkpoints["qwen3"].path)
    M.save_pretrained(model, tok, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = [("batch", "fsdp"), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
             ("kv_heads", "tensor"), ("vocab", "tensor")]
    sharded, _ = M.from_pretrained(str(tmp_path), mesh=mesh, rules=rules)
    up = sharded.layers.mlp.up[...]  # [L, D, F]: the layer axis is never split
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert up.addressable_shards[0].data.shape == (2, 32, 24)
    # kv_heads=2 does not divide tensor=4: replicated on that axis.
    assert sharded.layers.attn.k[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
    # Loading places every tensor exactly where aem_jax.sharding would create it.
    state = nnx.state(sharded)
    expected = sharding.state_shardings(state, mesh, rules)
    for (path, var), (_, want) in zip(nnx.to_flat_state(state), nnx.to_flat_state(expected)):
        assert var.get_value().sharding.spec == want.get_value().spec, path
    default, _ = M.from_pretrained(str(tmp_path), mesh=sharding.make_mesh({"fsdp": 2, "tensor": 4}))
    assert default.layers.mlp.up[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    tokens, mask = padded_batch(len(tok), seed=2)
    tokens, mask = np.concatenate([tokens, tokens[:1]]), np.concatenate([mask, mask[:1]])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        out = jax.jit(M.logits)(sharded, jnp.asarray(tokens), jnp.asarray(mask))
    np.testing.assert_allclose(out, logits_fn(model, jnp.asarray(tokens), jnp.asarray(mask)), atol=1e-5)


def test_bfloat16_load(checkpoints):
    ckpt = checkpoints["qwen2"]
    model, tok = M.from_pretrained(ckpt.path, dtype="bfloat16")
    assert model.layers.mlp.up[...].dtype == jnp.bfloat16
    tokens, mask = padded_batch(len(tok))
    ours = logits_fn(model, jnp.asarray(tokens), jnp.asarray(mask))
    assert max_rel_err(ours, torch_logits(ckpt.torch_model, tokens, mask), mask) < 0.05


def test_tiny_model_from_scratch_round_trip(tokenizer, tmp_path):
    config = M.ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                           num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                           model_type="qwen3", qkv_bias=False, qk_norm=True, tie_embeddings=True)
    model = M.init_model(config, seed=3)
    M.save_pretrained(model, tokenizer, tmp_path)
    loaded, tok = M.from_pretrained(str(tmp_path))
    assert loaded.config == config
    ids = tok.apply_chat_template([{"role": "user", "content": "w1 w2"}], add_generation_prompt=True,
                                  tokenize=False)
    tokens = jnp.asarray([tok(ids)["input_ids"]])
    mask = jnp.ones_like(tokens)
    np.testing.assert_array_equal(logits_fn(loaded, tokens, mask), logits_fn(model, tokens, mask))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert max_rel_err(logits_fn(model, tokens, mask), torch_logits(hf, np.asarray(tokens), np.asarray(mask)),
                       np.asarray(mask)) < 1e-4


def test_parameters_carry_logical_axis_names(tokenizer):
    config = M.ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                           num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, tie_embeddings=False)
    state = nnx.state(M.init_model(config), nnx.Param)
    names = {p: v.get_metadata()["out_sharding"] for p, v in nnx.to_flat_state(state)}
    assert names[("embed",)] == ("vocab", "embed") and names[("lm_head",)] == ("embed", "vocab")
    assert names[("layers", "attn", "k")] == ("layers", "embed", "kv_heads", "head_dim")
    assert names[("layers", "mlp", "down")] == ("layers", "mlp", "embed")
    assert all(len(n) == v.ndim for (p, v), n in zip(nnx.to_flat_state(state), names.values()))


# --- bad input ----------------------------------------------------------------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_shard_names_the_file(checkpoints, tmp_path):
    model, tok = M.from_pretrained(checkpoints["qwen2"].path)
    M.save_pretrained(model, tok, tmp_path, max_shard_bytes=40_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    os.remove(tmp_path / shards[0])
    with pytest.raises(FileNotFoundError, match=shards[0]):
        M.from_pretrained(str(tmp_path))


def test_mismatched_shape_names_the_tensor(checkpoints, tmp_path):
    path = _copy(checkpoints["qwen2"].path, tmp_path / "c")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight.*shape"):
        M.from_pretrained(str(path))


def test_unsupported_architecture_lists_supported(checkpoints, tmp_path):
    path = _copy(checkpoints["llama"].path, tmp_path / "c")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*\['llama', 'qwen2', 'qwen3'\]"):
        M.from_pretrained(str(path))


def test_tokenizer_without_chat_template(checkpoints, tmp_path):
    path = _copy(checkpoints["qwen2"].path, tmp_path / "c")
    os.remove(path / "chat_template.jinja")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tokenizer_config.json.*chat_template"):
        M.from_pretrained(str(path))
    model, tok = M.from_pretrained(str(path), require_chat_template=False)
    assert tok.chat_template is None


@pytest.mark.parametrize("missing", ["tokenizer.json", "tokenizer_config.json"])
def test_missing_tokenizer_file_names_the_directory_and_the_file(checkpoints, tmp_path, missing):
    # Without either, AutoTokenizer "loads" anyway: from config.json's model_type
    # (a tokenizer of 5 tokens) or without the saved special tokens.
    path = _copy(checkpoints["qwen2"].path, tmp_path / "c")
    os.remove(path / missing)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{path}: {missing} is missing")):
        M.from_pretrained(str(path))


def test_tokenizer_larger_than_the_model_vocabulary_names_both_sizes(checkpoints, tmp_path):
    path = _copy(checkpoints["qwen2"].path, tmp_path / "c")
    vocab_size = json.loads((path / "config.json").read_text())["vocab_size"]
    bigger = M.build_tokenizer(WORDS + [f"extra{i}" for i in range(7)])
    bigger.save_pretrained(str(path))
    assert len(bigger) == vocab_size + 7
    with pytest.raises(ValueError, match=re.escape(
            f"{path}: the tokenizer has {vocab_size + 7} tokens but the model's vocab_size is {vocab_size}")):
        M.from_pretrained(str(path))


def test_causal_blocks_match_transformers(checkpoints, monkeypatch):
    """Long inputs run attention in query blocks; force small blocks to check them."""
    from aem_jax.models import attention

    monkeypatch.setattr(attention, "CAUSAL_BLOCK", 5)
    ckpt = checkpoints["llama"]
    model, tok = M.from_pretrained(ckpt.path)
    tokens, mask = padded_batch(len(tok), seed=3)
    ours = jax.jit(M.logits)(model, jnp.asarray(tokens), jnp.asarray(mask))
    assert max_rel_err(ours, torch_logits(ckpt.torch_model, tokens, mask), mask) < 1e-4
