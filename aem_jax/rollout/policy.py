"""Policies the rollout engine plays: a model through the sampler, or a script.

The engine asks a policy for one action per active episode per turn:

    policy.generate(prompts, key=key, contexts=contexts) -> list[Generation]

``prompts`` are token ids (the chat so far, ending with the assistant
header); a `Generation` holds the tokens the policy produced -- ending with
the end-of-turn token when it stopped by itself -- and each token's log-prob
and entropy under the behaviour policy. ``contexts`` give scripted policies
what a model does not need (the environment's last observation and info,
the environment itself); model-backed policies ignore them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import jax
import numpy as np


class Generation(NamedTuple):
    """The policy's output for one prompt."""

    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]


@dataclasses.dataclass(frozen=True)
class TurnContext:
    """What the engine knows about an episode when it asks for an action.

    Attributes:
      episode: episode index in the batch (task index * G + rollout index).
      turn: turn index inside the episode.
      observation: the latest observation text.
      info: the latest ``info`` dict from the environment.
      env: the environment object (scripted players may query it).
    """

    episode: int
    turn: int
    observation: str
    info: dict[str, Any]
    env: Any


class Policy(Protocol):
    """Anything that maps prompts to generations."""

    def generate(self, prompts: list[list[int]], *, key: jax.Array,
                 contexts: Sequence[TurnContext] | None = None) -> list[Generation]:
        ...


class ScriptedPolicy:
    """A policy from a Python function, for tests and baselines.

    Args:
      act: ``act(context) -> action text``.
      tokenizer: encodes the action (no special tokens added).
      end_of_turn_id: appended after the action, as a model stopping by itself
        would; use ``ChatFormat(tokenizer).end_of_turn_id``.

    Every token gets log-prob 0 and entropy 0 (a deterministic policy).
    """

    def __init__(self, act: Callable[[TurnContext], str], tokenizer: Any, end_of_turn_id: int):
        self._act = act
        self._tokenizer = tokenizer
        self._eot = int(end_of_turn_id)

    def generate(self, prompts: list[list[int]], *, key: jax.Array,
                 contexts: Sequence[TurnContext] | None = None) -> list[Generation]:
        del key
        if contexts is None or len(contexts) != len(prompts):
            raise ValueError(
                f"ScriptedPolicy needs one TurnContext per prompt; got {len(prompts)} prompts "
                f"and {None if contexts is None else len(contexts)} contexts")
        out = []
        for context in contexts:
            text = self._act(context)
            ids = list(self._tokenizer.encode(text, add_special_tokens=False)) + [self._eot]
            out.append(Generation(ids, [0.0] * len(ids), [0.0] * len(ids)))
        return out


class SamplerPolicy:
    """A model played through `aem_jax.models.sampler.generate`.

    Args:
      model: the decoder (an `nnx.Module`) whose current weights act.
      params: `aem_jax.models.sampler.SamplingParams` (max_new_tokens,
        temperature, top_k, top_p, stop_token_ids -- include the chat's
        end-of-turn id).
      pad_id: padding token id.
      max_cache_len: KV-cache length; a fixed value (e.g. the rollout's
        ``max_context_tokens``) compiles the sampler once for all turns.
    """

    def __init__(self, model: Any, params: Any, pad_id: int, max_cache_len: int | None = None):
        self.model = model
        self.params = params
        self.pad_id = int(pad_id)
        self.max_cache_len = max_cache_len

    @classmethod
    def for_rollout(cls, model: Any, tokenizer: Any, config: Any, *, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0) -> "SamplerPolicy":
        """A policy whose sampling limits match a `RolloutConfig`.

        ``max_new_tokens = config.max_action_tokens``, the stop tokens are the
        chat's end-of-turn (and eos) ids, and the KV cache is
        ``config.max_context_tokens`` long, so every turn fits one cache size.
        """
        from aem_jax.models import sampler
        from aem_jax.rollout.chat import ChatFormat

        chat = ChatFormat(tokenizer, config.system_prompt,
                          enable_thinking=getattr(config, "enable_thinking", None))
        params = sampler.SamplingParams(
            max_new_tokens=config.max_action_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, stop_token_ids=chat.stop_token_ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else chat.end_of_turn_id
        return cls(model, params, pad, max_cache_len=config.max_context_tokens)

    def generate(self, prompts: list[list[int]], *, key: jax.Array,
                 contexts: Sequence[TurnContext] | None = None) -> list[Generation]:
        del contexts
        from aem_jax.models import sampler  # imported late: models may load lazily

        out = sampler.generate(self.model, prompts, key=key, params=self.params,
                               pad_id=self.pad_id, max_cache_len=self.max_cache_len)
        tokens = np.asarray(out.tokens)
        logprobs = np.asarray(out.logprobs, np.float32)
        entropy = np.asarray(out.entropy, np.float32)
        lengths = np.asarray(out.lengths)
        return [Generation(tokens[i, :n].tolist(), logprobs[i, :n].tolist(),
                           entropy[i, :n].tolist())
                for i, n in enumerate(lengths.tolist())]


def slot_policy(policy: Any) -> tuple[SamplerPolicy, int] | None:
    """(sampler policy, episode offset) when `policy` can be played with kept KV caches.

    The continuous engine samples episode e's turn k with
    ``fold_in(fold_in(key, k), offset + e)``. A bare `SamplerPolicy` gets
    offset 0 (the simple engine would draw its rows from one turn key
    instead, so its episodes differ from the continuous engine's). A
    wrapper with ``policy`` (a `SamplerPolicy`) and ``first_episode``
    attributes (the trainer's ``EpisodeKeys``) samples episode e with
    ``fold_in(turn key, first_episode + e)`` in either engine: offset
    first_episode. Anything else (scripted, remote): None.
    """
    if isinstance(policy, SamplerPolicy):
        return policy, 0
    inner, first = getattr(policy, "policy", None), getattr(policy, "first_episode", None)
    if isinstance(inner, SamplerPolicy) and isinstance(first, int):
        return inner, first
    return None
