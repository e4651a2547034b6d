"""Argument checks shared by the objectives.

Shape and dtype checks run at trace time (they only read static shapes), so
they cost nothing inside a jitted step. Value checks (ids in range) need
concrete values and run only when the argument is not a tracer; under jit
out-of-range ids are dropped by the segment reductions instead.
"""
from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np


def check_rank(name: str, x, rank: int) -> None:
    """Raises ValueError unless ``x`` has ``rank`` dimensions."""
    ndim = np.ndim(x)
    if ndim != rank:
        raise ValueError(
            f"{name} must have rank {rank}, got rank {ndim} with shape {np.shape(x)}"
        )


def check_same_shape(**arrays) -> None:
    """Raises ValueError unless all keyword arrays share one shape."""
    shapes = {name: tuple(np.shape(a)) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{n}{s}" for n, s in shapes.items())
        raise ValueError(f"arrays must have the same shape, got {desc}")


def check_leading(name: str, x, expected: tuple[int, ...], what: str) -> None:
    """Raises ValueError unless the leading dimensions of ``x`` are ``expected``."""
    got = tuple(np.shape(x)[: len(expected)])
    if got != tuple(expected):
        raise ValueError(
            f"{name} must have leading shape {tuple(expected)} ({what}), got shape {np.shape(x)}"
        )


def check_integer(name: str, x) -> None:
    """Raises TypeError unless ``x`` has an integer dtype."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {jnp.result_type(x)}")


def check_floating(name: str, x) -> None:
    """Raises TypeError unless ``x`` has a floating dtype."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {jnp.result_type(x)}")


def check_choice(name: str, value, allowed: Iterable[str]) -> None:
    """Raises ValueError unless ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_positive_int(name: str, value) -> None:
    """Raises ValueError unless ``value`` is a positive Python int."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_ids_below(name: str, ids, upper: int, upper_name: str, *, allow_negative: bool) -> None:
    """Raises ValueError if concrete ``ids`` reach ``upper`` (or are negative).

    Tracers are skipped: their values are unknown at trace time.
    """
    if isinstance(ids, jax.core.Tracer):
        return
    ids = np.asarray(ids)
    if ids.size == 0:
        return
    hi = int(ids.max())
    if hi >= upper:
        raise ValueError(
            f"{name} contains {hi}, which is not below {upper_name}={upper}; "
            f"allowed values are {'-1 (none) and ' if allow_negative else ''}0..{upper - 1}"
        )
    lo = int(ids.min())
    if lo < (-1 if allow_negative else 0):
        allowed = "-1 or" if allow_negative else ""
        raise ValueError(f"{name} contains {lo}; allowed values are {allowed} 0..{upper - 1}")
