"""Array checksums and finiteness, computed where the arrays live.

A checkpoint's arrays get a checksum each (saved in its metadata and
compared after restoring: bit rot or a torn copy that still decodes would
otherwise restore as wrong numbers), and non-finite leaves are found before
a save so that NaN or inf never reaches a checkpoint. Sharded arrays are
summed on their devices (no gather), so every process of a multi-host run
computes the same global value; numpy leaves use the same formula on the host.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


# Array checksums and finiteness ---------------------------------------------

def _odd_multiplier(position: Any, xp: Any) -> Any:
    """A well-mixed odd uint32 per position (``xp`` is jnp or np).

    The multiplier must not be linear in the position: with ``a * i`` moving
    equal values by equal offsets (two rows swapped) would cancel out. This
    is the "lowbias32" integer hash (C. Wellons, hash-prospector).
    """
    h = position ^ (position >> xp.uint32(16))
    h = h * xp.uint32(0x7FEB352D)
    h = h ^ (h >> xp.uint32(15))
    h = h * xp.uint32(0x846CA68B)
    h = h ^ (h >> xp.uint32(16))
    return h | xp.uint32(1)


def _words(x: jax.Array) -> jax.Array:
    """An array as uint32 words: one per element of <= 32 bits, two per 64-bit one."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag], axis=-1)
    bits = jax.dtypes.itemsize_bits(x.dtype)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if bits < 8:  # int4, float4...: exact in a wider type of the same kind
        x = x.astype(jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else jnp.int32)
        bits = 32
    if bits < 32:
        return jax.lax.bitcast_convert_type(x, {8: jnp.uint8, 16: jnp.uint16}[bits]).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _device_checksum(x: jax.Array) -> jax.Array:
    """sum_i word_i * m(i) mod 2**32, i the row-major word position, m(i) odd.

    The multiplier of every position is odd, hence invertible mod 2**32, so a
    change of any single word always changes the sum. The sum is taken in the
    array's own sharding: wraparound addition does not depend on order, so
    every process gets the same global value without gathering the array.
    """
    words = _words(x)
    position = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        position = position + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    return jnp.sum(words * _odd_multiplier(position, jnp), dtype=jnp.uint32)


@jax.jit
def _device_report(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    sums = jnp.stack([_device_checksum(x) for x in leaves])
    finite = jnp.stack([
        jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.asarray(True) for x in leaves
    ])
    return sums, finite


def _host_words(a: np.ndarray) -> np.ndarray:
    """numpy twin of :func:`_words`, flattened row-major; 64-bit elements
    give their low word first, as XLA's bitcast does."""
    if np.iscomplexobj(a):
        a = np.stack([a.real, a.imag], axis=-1)
    flat = np.ascontiguousarray(a).reshape(-1)
    bits = jax.dtypes.itemsize_bits(flat.dtype)
    if flat.dtype == np.bool_:
        return flat.astype(np.uint32)
    if bits < 8:
        flat = flat.astype(np.float32 if jnp.issubdtype(flat.dtype, jnp.floating) else np.int32)
        bits = 32
    if bits < 32:
        return flat.view({8: np.uint8, 16: np.uint16}[bits]).astype(np.uint32)
    return flat.astype(flat.dtype.newbyteorder("<"), copy=False).view(np.uint32)


def _host_checksum(a: np.ndarray, block: int = 1 << 22) -> int:
    """numpy twin of :func:`_device_checksum`, in blocks to bound memory."""
    flat = _host_words(a)
    total = np.uint32(0)
    for start in range(0, flat.size, block):
        words = flat[start : start + block]
        position = np.arange(start, start + words.size, dtype=np.uint64).astype(np.uint32)
        total = np.uint32(total + np.sum(words * _odd_multiplier(position, np), dtype=np.uint32))
    return int(total)


class ArrayReport(NamedTuple):
    """What :func:`inspect_arrays` returns."""

    checksums: dict[str, int]  # jax.tree_util.keystr(path) -> uint32 checksum
    nonfinite: list[str]  # paths of floating leaves holding NaN or inf, in tree order


def _device_groups(leaves: list[tuple[str, jax.Array]]) -> list[list[tuple[str, jax.Array]]]:
    """Leaves grouped by device set: one jit cannot mix committed device sets."""
    groups: dict[Any, list[tuple[str, jax.Array]]] = {}
    for name, x in leaves:
        key = frozenset(x.sharding.device_set) if x.committed else None
        groups.setdefault(key, []).append((name, x))
    loose = groups.pop(None, [])
    if not groups:
        return [loose] if loose else []
    grouped = list(groups.values())
    grouped[0] = grouped[0] + loose  # uncommitted arrays follow the others' devices
    return grouped


def inspect_arrays(tree: Any) -> ArrayReport:
    """Checksums of every array leaf of ``tree`` and the paths of non-finite ones.

    ``jax.Array`` leaves (sharded or not, typed PRNG keys included) are
    reduced on their devices in one jitted call per device set, so every
    process of a multi-host run computes the same global values; other leaves
    (numpy arrays, Python scalars) are reduced on the host with the same
    formula, so a leaf saved from numpy and restored as a jax array matches.
    All processes must call this together when leaves span processes.
    """
    device, host, order = [], [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        order.append(jax.tree_util.keystr(path))
        (device if isinstance(leaf, jax.Array) else host).append((order[-1], leaf))
    checksums: dict[str, int] = {}
    bad: set[str] = set()
    for group in _device_groups(device):
        sums, finite = jax.device_get(_device_report([x for _, x in group]))
        for (name, _), value, ok in zip(group, sums, finite):
            checksums[name] = int(value)
            if not ok:
                bad.add(name)
    for name, leaf in host:
        array = np.asarray(leaf)
        # jnp.issubdtype also knows ml_dtypes (bfloat16, int4...); strings have no words
        if not (array.dtype == np.bool_ or jnp.issubdtype(array.dtype, jnp.number)):
            continue
        checksums[name] = _host_checksum(array)
        if jnp.issubdtype(array.dtype, jnp.inexact) and not np.all(np.isfinite(array)):
            bad.add(name)
    return ArrayReport(checksums, [name for name in order if name in bad])


def checksum_mismatches(saved: Mapping[str, int], actual: Mapping[str, int]) -> list[str]:
    """``"<path> (saved X, read Y)"`` for every leaf present in both whose checksum differs."""
    return [
        f"{name} (saved {saved[name]}, read {actual[name]})"
        for name in sorted(set(saved) & set(actual))
        if int(saved[name]) != int(actual[name])
    ]
