"""How checkpoint trees are stored: typed PRNG keys as key data, empty host
arrays as stand-ins, and the bytes one process writes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def is_key(x: Any) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key
    )


def keys_to_data(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def abstract_keys_to_data(tree: Any) -> Any:
    def one(x: Any) -> Any:
        if not is_key(x):
            return x
        data = jax.eval_shape(jax.random.key_data, x)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


def data_to_keys(restored: Any, target: Any) -> Any:
    def one(value: Any, abstract: Any) -> Any:
        if not is_key(abstract):
            return value
        if isinstance(abstract, jax.Array):
            impl = jax.random.key_impl(abstract)
        else:  # a ShapeDtypeStruct: the key dtype carries its implementation
            impl = abstract.dtype._impl
        return jax.random.wrap_key_data(value, impl=impl)

    return jax.tree.map(one, restored, target)


EMPTY_KEY = "_host_empty_leaves"


def encode_host(host: Any) -> tuple[Any, dict[str, list]]:
    """Numpy pytree -> savable pytree: orbax rejects zero-size arrays (an
    empty replay buffer), so they become one-element stand-ins and their
    real shape and dtype go to the JSON metadata."""
    empty: dict[str, list] = {}

    def one(path: Any, leaf: Any) -> Any:
        array = np.asarray(leaf)
        if array.size:
            return array
        empty[jax.tree_util.keystr(path)] = [list(array.shape), array.dtype.str]
        return np.zeros((1,), array.dtype)

    return jax.tree_util.tree_map_with_path(one, host), empty


def decode_host(host: Any, empty: Mapping[str, list]) -> Any:
    def one(path: Any, leaf: Any) -> Any:
        spec = empty.get(jax.tree_util.keystr(path))
        return leaf if spec is None else np.zeros(spec[0], np.dtype(spec[1]))

    return jax.tree_util.tree_map_with_path(one, host)


def process_bytes(tree: Any) -> int:
    """Bytes this process writes for ``tree`` (one replica of each shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shards = getattr(leaf, "addressable_shards", None)
        if shards is None:
            total += np.asarray(leaf).nbytes
        else:
            total += sum(s.data.nbytes for s in shards if s.replica_id == 0)
    return total
