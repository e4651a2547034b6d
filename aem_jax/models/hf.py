"""Loading and saving Hugging Face checkpoints (config.json + safetensors + tokenizer).

Loading never holds the model twice in host memory: safetensors files are
memory-mapped, each tensor is viewed in our layout (transposes and reshapes
of the mapping, no copy) and `jax.make_array_from_callback` copies only each
device's shard of it straight into its target sharding. The per-layer tensors
`model.layers.{i}.*` of Hugging Face become slices of our stacked [L, ...]
parameters: the callback of a stacked parameter reads, for the index a
device asks for, the requested part of each requested layer's mapped tensor,
so no process ever builds a whole stack (or anything its devices do not
hold). The model skeleton is built with `nnx.eval_shape`, so no random
initialisation is materialised.

Saving gathers one tensor (one layer's slice of a stacked parameter) at a
time and writes shards of at most `max_shard_bytes`, with a
`model.safetensors.index.json` when there is more than one.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy
import transformers
from flax import nnx

from aem_jax import sharding
from aem_jax.models.config import ModelConfig, from_hf_config, to_hf_config
from aem_jax.models.decoder import Decoder

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32}
Rules = Sequence[tuple[str, Any]]


# --- the name and layout map ------------------------------------------------

def _entries(config: ModelConfig) -> Iterator[tuple[str, tuple, int | None, Callable, Callable]]:
    """(HF name, our state path, layer, HF->ours view, ours->HF) for every HF tensor.

    `layer` is the index into the leading axis of our stacked parameter at
    `path` (None for parameters outside the layers).
    """
    n, k, h, d = config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size
    ident = (lambda a: a, lambda a: a)
    transpose = (lambda a: a.T, lambda a: a.T)

    def qkv(heads):  # HF [heads*H, D] <-> ours [D, heads, H]
        return (lambda a: a.reshape(heads, h, d).transpose(2, 0, 1),
                lambda a: a.transpose(1, 2, 0).reshape(heads * h, d))

    def bias(heads):  # HF [heads*H] <-> ours [heads, H]
        return (lambda a: a.reshape(heads, h), lambda a: a.reshape(heads * h))

    o = (lambda a: a.reshape(d, n, h).transpose(1, 2, 0),  # HF [D, N*H] <-> ours [N, H, D]
         lambda a: a.transpose(2, 0, 1).reshape(d, n * h))
    yield ("model.embed_tokens.weight", ("embed",), None, *ident)
    for i in range(config.num_layers):
        p, ours = f"model.layers.{i}.", ("layers",)
        yield (p + "input_layernorm.weight", (*ours, "input_norm", "scale"), i, *ident)
        yield (p + "post_attention_layernorm.weight", (*ours, "post_attn_norm", "scale"), i, *ident)
        for name, heads in (("q", n), ("k", k), ("v", k)):
            yield (p + f"self_attn.{name}_proj.weight", (*ours, "attn", name), i, *qkv(heads))
            if config.qkv_bias:
                yield (p + f"self_attn.{name}_proj.bias", (*ours, "attn", f"{name}_bias"), i, *bias(heads))
        yield (p + "self_attn.o_proj.weight", (*ours, "attn", "o"), i, *o)
        if config.qk_norm:
            yield (p + "self_attn.q_norm.weight", (*ours, "attn", "q_norm", "scale"), i, *ident)
            yield (p + "self_attn.k_norm.weight", (*ours, "attn", "k_norm", "scale"), i, *ident)
        for name in ("gate", "up", "down"):
            yield (p + f"mlp.{name}_proj.weight", (*ours, "mlp", name), i, *transpose)
    yield ("model.norm.weight", ("final_norm", "scale"), None, *ident)
    if not config.tie_embeddings:
        yield ("lm_head.weight", ("lm_head",), None, *transpose)


# --- reading ----------------------------------------------------------------

def _mmap_safetensors(path: str) -> dict[str, np.ndarray]:
    """Zero-copy views of every tensor of a safetensors file."""
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    header_len = int(np.frombuffer(buf[:8].tobytes(), "<u8")[0])
    header = json.loads(buf[8:8 + header_len].tobytes())
    base, out = 8 + header_len, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']!r}; "
                             f"supported: {sorted(_DTYPES)}")
        start, end = info["data_offsets"]
        out[name] = buf[base + start:base + end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def _weight_files(directory: str) -> dict[str, str]:
    """HF tensor name -> safetensors file, checking that every file exists."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: field 'weight_map' is missing or not an object")
        for file in sorted(set(weight_map.values())):
            if not os.path.exists(os.path.join(directory, file)):
                raise FileNotFoundError(f"{index_path} lists shard {file!r}, which is missing "
                                        f"from {directory}")
        return dict(weight_map)
    single = os.path.join(directory, SINGLE_FILE)
    if not os.path.exists(single):
        raise FileNotFoundError(f"{directory}: neither {INDEX_FILE} nor {SINGLE_FILE} exists")
    return {name: SINGLE_FILE for name in _mmap_safetensors(single)}


def _resolve(path_or_hub_id: str) -> str:
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    if os.path.exists(path_or_hub_id):
        raise ValueError(f"path_or_hub_id={path_or_hub_id!r} is a file; expected a checkpoint "
                         "directory or a hub id")
    import huggingface_hub  # only for hub ids

    return huggingface_hub.snapshot_download(
        path_or_hub_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"])


# What AutoTokenizer reads from a checkpoint directory: the tokenizer's class,
# special tokens and chat template, and a vocabulary (a fast tokenizer's
# tokenizer.json, or one of the slow tokenizers' own files). Without them it
# may still "load" a tokenizer, built from config.json's model_type with a
# handful of tokens, so their absence is an error here.
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
VOCABULARY_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",), ("vocab.txt",))


def _check_tokenizer_files(directory: str) -> None:
    """Raises FileNotFoundError naming `directory` and the tokenizer file it lacks."""
    if not os.path.exists(os.path.join(directory, TOKENIZER_CONFIG_FILE)):
        raise FileNotFoundError(f"{directory}: {TOKENIZER_CONFIG_FILE} is missing (the tokenizer's class, "
                                "special tokens and chat template); save the tokenizer there with "
                                "save_pretrained")
    if not any(all(os.path.exists(os.path.join(directory, f)) for f in group) for group in VOCABULARY_FILES):
        alternatives = ", ".join(" + ".join(group) for group in VOCABULARY_FILES[1:])
        raise FileNotFoundError(f"{directory}: tokenizer.json is missing, and so is a slow tokenizer's "
                                f"vocabulary ({alternatives}); save the tokenizer there with save_pretrained")


_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _saved_tokenizer_class(directory: str) -> str | None:
    path = os.path.join(directory, "tokenizer_config.json")
    try:
        with open(path) as f:
            return json.load(f).get("tokenizer_class")
    except (OSError, ValueError):
        return None


def load_tokenizer(directory: str, *, require_chat_template: bool = True):
    """`transformers.AutoTokenizer` of `directory`, checking its files and chat template."""
    _check_tokenizer_files(directory)
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    saved_class = _saved_tokenizer_class(directory)
    if saved_class in _GENERIC_TOKENIZER_CLASSES and type(tok).__name__ != saved_class:
        # transformers 5 maps a generic tokenizer.json to the class of the
        # config's model type (qwen2 -> Qwen2Tokenizer), which rebuilds a
        # byte-level pre-tokenizer over this project's word-level or BPE
        # vocabularies and mis-encodes text; load the file as it was saved.
        tok = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    if require_chat_template and not tok.chat_template:
        raise ValueError(
            f"{os.path.join(directory, 'tokenizer_config.json')}: the tokenizer has no "
            "'chat_template' (nor chat_template.jinja); add one, or pass "
            "require_chat_template=False")
    return tok


def load_model(directory: str, *, dtype: str = "float32", param_dtype: str | None = None,
               remat: str | None = None, attention: str | None = None,
               mesh: jax.sharding.Mesh | None = None,
               rules: Rules = sharding.DEFAULT_RULES) -> Decoder:
    """Builds a `Decoder` from `directory`'s config.json and safetensors.

    `dtype` is the compute dtype, `param_dtype` the parameter dtype (default
    `dtype`); `remat` and `attention` set those `ModelConfig` fields (default:
    the `ModelConfig` defaults).

    With a `mesh`, each parameter is placed with the sharding its logical axis
    names map to under `rules` ((logical name, mesh axes) pairs, by
    `aem_jax.sharding.logical_to_spec`, so exactly where `create_sharded`
    would put it); otherwise on the default device.
    """
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{directory}: config.json is missing")
    with open(config_path) as f:
        config = from_hf_config(json.load(f), dtype=dtype, param_dtype=param_dtype, source=config_path)
    config = config.replace(**{k: v for k, v in (("remat", remat), ("attention", attention))
                               if v is not None})
    files = _weight_files(directory)
    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    opened: dict[str, dict[str, np.ndarray]] = {}
    sources: dict[tuple, list[np.ndarray | None]] = {}  # our path -> per-layer views (or [view])
    for hf_name, path, layer, to_ours, _ in _entries(config):
        if hf_name not in files:
            raise ValueError(f"{directory}: tensor {hf_name!r} is missing from the checkpoint")
        file = files[hf_name]
        if file not in opened:
            opened[file] = _mmap_safetensors(os.path.join(directory, file))
        if hf_name not in opened[file]:
            raise ValueError(f"{os.path.join(directory, file)}: tensor {hf_name!r} is missing")
        shape = tuple(flat[path].shape)[0 if layer is None else 1:]
        raw = opened[file][hf_name]
        try:
            view = to_ours(raw)
        except ValueError:
            view = None
        if view is None or view.shape != shape:
            raise ValueError(f"{os.path.join(directory, file)}: tensor {hf_name!r} has shape "
                             f"{list(raw.shape)}, which does not fit {config_path} (expected a "
                             f"tensor that maps to {list(shape)})")
        if layer is None:
            sources[path] = [view]
        else:
            sources.setdefault(path, [None] * config.num_layers)[layer] = view
    for path, views in sources.items():
        variable = flat[path]
        if mesh is None:
            placement = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
            spec = sharding.logical_to_spec(names, rules, shape=variable.shape, mesh=mesh)
            placement = jax.sharding.NamedSharding(mesh, spec)
        stacked = path[0] == "layers"
        value = jax.make_array_from_callback(
            tuple(variable.shape), placement,
            lambda index, p=path, v=views, t=variable.dtype, st=stacked: _read_shard(p, v, index, t, stacked=st))
        variable.set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _read_shard(path: tuple, views: list[np.ndarray], index: tuple[slice, ...], dtype,
                *, stacked: bool) -> np.ndarray:
    """One device's part `index` of the parameter at `path`, read from the mapped tensors.

    For a stacked parameter, `views[l]` is layer l's tensor and index[0]
    selects layers; only the requested layers, and in each only the
    requested part, are read from disk.
    """
    if not stacked:
        return np.ascontiguousarray(views[0][index]).astype(dtype)
    layers, rest = index[0], tuple(index[1:])
    return np.stack([np.asarray(views[l][rest]).astype(dtype) for l in range(len(views))[layers]])


def from_pretrained(path_or_hub_id: str, *, dtype: str = "float32", param_dtype: str | None = None,
                    remat: str | None = None, attention: str | None = None,
                    mesh: jax.sharding.Mesh | None = None, rules: Rules = sharding.DEFAULT_RULES,
                    require_chat_template: bool = True):
    """Loads (model, tokenizer) from a Hugging Face directory or hub id.

    Args:
      path_or_hub_id: a local checkpoint directory or a hub id.
      dtype: "float32" or "bfloat16": the compute dtype, and the parameter
        dtype unless `param_dtype` is given.
      param_dtype: "float32" or "bfloat16" parameter storage; training uses
        `dtype="bfloat16", param_dtype="float32"` (float32 master weights).
      remat, attention: `ModelConfig.remat` / `.attention` (default: the
        `ModelConfig` defaults).
      mesh, rules: optional target mesh and logical-axis rules (default
        `aem_jax.sharding.DEFAULT_RULES`); each tensor is loaded straight
        into its sharding.
      require_chat_template: raise if the tokenizer has no chat template.
    """
    directory = _resolve(path_or_hub_id)
    # The tokenizer first: its problems show before any weight is read.
    tokenizer = load_tokenizer(directory, require_chat_template=require_chat_template)
    _check_vocabulary_fits(directory, tokenizer)
    model = load_model(directory, dtype=dtype, param_dtype=param_dtype, remat=remat,
                       attention=attention, mesh=mesh, rules=rules)
    return model, tokenizer


def _check_vocabulary_fits(directory: str, tokenizer) -> None:
    """Every token id has an embedding row: a larger id would be clamped inside
    jit (jax gathers do not fail), reading another token's embedding."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        return  # load_model names the missing file
    with open(config_path) as f:
        vocab_size = from_hf_config(json.load(f), source=config_path).vocab_size
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{directory}: the tokenizer has {len(tokenizer)} tokens but the model's "
                         f"vocab_size is {vocab_size} ({config_path}); ids from {vocab_size} on would "
                         "have no embedding. Use the tokenizer the model was trained with")


# --- writing ----------------------------------------------------------------

def _to_host(value: jax.Array) -> np.ndarray:
    if not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(jax.device_get(value))


_layer_slice = jax.jit(lambda a, i: jax.lax.dynamic_index_in_dim(a, i, keepdims=False))


def _tensor(state, path: tuple, layer: int | None) -> np.ndarray:
    """Our parameter at `path` (its `layer` slice if stacked) on the host."""
    value = state[path][...]
    if layer is not None:  # one layer at a time: never the whole stack on the host
        value = _layer_slice(value, jnp.int32(layer))
    return _to_host(value)


def save_pretrained(model: Decoder, tokenizer, path: str | os.PathLike, *,
                    max_shard_bytes: int = 2 * 1024 ** 3) -> None:
    """Writes `model` (config.json + safetensors) and `tokenizer` to `path`.

    The directory loads with `transformers.AutoModelForCausalLM` and
    `AutoTokenizer`. Only process 0 writes; all processes must call it (the
    gathers of sharded parameters are collective).
    """
    path = str(path)
    config: ModelConfig = model.config
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    entries = list(_entries(config))

    def nbytes(entry) -> int:
        value = state[entry[1]]
        return value.size * value.dtype.itemsize // (1 if entry[2] is None else config.num_layers)

    # Plan shards from sizes first, then hold only one shard in host memory.
    shards: list[list[tuple]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + nbytes(entry) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes(entry)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {hf: np.ascontiguousarray(to_hf(_tensor(state, p, layer)))
                   for hf, p, layer, _, to_hf in shard}
        if writer:
            safetensors.numpy.save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({hf: file for hf in tensors})
        del tensors
    if not writer:
        return
    if len(shards) > 1:
        total = sum(nbytes(entry) for entry in entries)
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": int(total)}, "weight_map": weight_map}, f, indent=2)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(to_hf_config(config, pad_token_id=pad), f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
