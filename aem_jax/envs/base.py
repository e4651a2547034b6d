"""The environment protocol and the registry of environments.

An environment is a host-side Python object (never traced by jax): the rollout
engine runs many of them at once in a thread pool. ``info`` dictionaries carry
at least these keys after every ``step``:

  success         bool, the episode was solved
  invalid_action  bool, the action could not be parsed or executed
  truncated       bool, the episode was cut short (turn or time limit)
  anchor          str, the environment state text before the *next* turn
                  (GiGPO groups turns whose anchors are identical)

and ``reset`` returns an ``Observation`` whose ``info["anchor"]`` is the state
before the first turn.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True)
class Observation:
    """What the agent sees at the start of an episode."""

    text: str
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Step:
    """The environment's answer to one action."""

    observation: str
    reward: float
    done: bool
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


OUT_OF_TURNS = " you are out of turns . you lose ."


def turn_limited_step(text: str, reward: float, done: bool, *, turn: int, max_turns: int,
                      info: Callable[..., dict[str, Any]], success: bool, invalid: bool) -> Step:
    """The step of a word game whose turn ``turn`` may be its last: past
    ``max_turns`` an unfinished episode ends, truncated, with the loss line."""
    truncated = not done and turn >= max_turns
    if truncated:
        text, done = text + OUT_OF_TURNS, True
    return Step(text, reward, done, info(success=success, invalid=invalid, truncated=truncated))


@runtime_checkable
class Env(Protocol):
    """A multi-turn text environment."""

    def reset(self, *, seed: int) -> Observation:
        ...

    def step(self, action: str) -> Step:
        ...


# name -> factory, or "module:attribute" resolved on first use so that heavy
# optional dependencies (textworld, sandboxes) are imported only when needed.
_REGISTRY: dict[str, Callable[..., Env] | str] = {}


def register(name: str, factory: Callable[..., Env] | str) -> None:
    """Registers an environment factory under ``name``.

    ``factory`` is a callable returning an ``Env`` or a lazy "module:attr" path.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"environment name must be a non-empty string, got {name!r}")
    _REGISTRY[name] = factory


def registered() -> list[str]:
    """Names of all registered environments, sorted."""
    return sorted(_REGISTRY)


def resolve(name: str) -> Callable[..., Env]:
    """The factory registered as ``name``, importing a lazy "module:attr" on first use.

    Config validation reads its signature to check ``env.kwargs`` without
    creating an environment.
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown environment {name!r}; registered environments: {', '.join(registered())}"
        )
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module_name, attr = factory.split(":")
        factory = getattr(importlib.import_module(module_name), attr)
        _REGISTRY[name] = factory
    return factory


def make(name: str, **kwargs: Any) -> Env:
    """Creates the environment registered as ``name`` with ``kwargs``."""
    return resolve(name)(**kwargs)
