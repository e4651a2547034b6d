"""Rollout settings and per-episode records."""
from __future__ import annotations

import dataclasses
import re
from typing import Any

HISTORY_MODES = ("concatenated", "windowed")
ENGINES = ("continuous", "simple")
OVERLONG_ACTIONS = ("invalid", "play")

# Why the engine rejects an action (shown to the policy through
# `RolloutConfig.invalid_message`).
REASONS = {
    "over-long": "over-long : no end of turn",
    "empty": "empty",
    "unparsable": "no parsable action",
}


def message_words(config: "RolloutConfig | None" = None) -> list[str]:
    """Words of the engine's own observations (invalid-action messages).

    Add them to a word-level tokenizer's vocabulary so that these messages
    never become unknown tokens:
    ``build_tokenizer(env.vocabulary() + message_words(config))``.
    """
    template = (config or RolloutConfig()).invalid_message
    texts = [template.replace("{reason}", reason) for reason in REASONS.values()]
    words = re.findall(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]", " ".join(texts))
    return list(dict.fromkeys(words))


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How `collect` plays a batch of episodes.

    Attributes:
      num_tasks: N, distinct tasks (environment seeds) per batch.
      group_size: G, rollouts per task; B = N * G episodes.
      max_turns: turns per episode before it is cut short (truncated).
      history: "concatenated" (one row per episode, the whole chat) or
        "windowed" (one row per turn: the task, the last `window`
        (observation, action) pairs and the new observation).
      window: h >= 0, past (observation, action) pairs kept in windowed mode.
      max_context_tokens: longest prompt + action a turn may need; an episode
        whose next prompt would not fit is truncated.
      max_action_tokens: tokens one action may take; a generation cut at this
        limit without its end-of-turn token is over-long.
      overlong_actions: what an over-long generation is: "invalid" (an
        invalid action, penalised; the default) or "play" (its cut text is
        parsed and played like any action: for small models trained from
        scratch on large vocabularies, which rarely sample end-of-turn early).
      invalid_penalty: subtracted from the turn reward of an invalid action
        (the engine's or the environment's verdict).
      invalid_message: observation shown for an action the engine rejects;
        ``{reason}`` is replaced by why.
      action_pattern: optional regular expression; its first group (or the
        whole match) is the action. No match is an invalid action. None: the
        stripped text is the action.
      system_prompt: optional system message before the task.
      enable_thinking: passed to the chat template (Qwen3: False gives every
        generation prompt an empty think block); None passes nothing.
      observation_role: "user" or "tool": the role observations after the
        task take in the chat template (see `ChatFormat`).
      step_timeout_s: seconds an environment reset/step may take; longer ends
        the episode as failed.
      num_threads: worker threads stepping environments.
      seq_len: T of the TurnBatch; None pads to the next multiple of
        `seq_bucket` above the longest row.
      seq_bucket: bucket size for T when `seq_len` is None.
      row_bucket: B is padded with empty rows to a multiple of this (windowed
        mode has a data-dependent number of rows).
      engine: "continuous" (`aem_jax.rollout.engine`: each episode keeps its
        KV cache across turns, episodes join and leave the decode batch
        independently, environment steps run while others decode) or
        "simple" (all episodes in lockstep, every prompt re-prefilled each
        turn). Policies without a model (scripted, remote) are played by
        "simple" either way.
      num_slots: KV-cache slots of the continuous engine (episodes played at
        once; the others wait for a slot); None: one per episode.
    """

    num_tasks: int = 8
    group_size: int = 4
    max_turns: int = 4
    history: str = "concatenated"
    window: int = 2
    max_context_tokens: int = 512
    max_action_tokens: int = 16
    overlong_actions: str = "invalid"
    invalid_penalty: float = 0.0
    invalid_message: str = "invalid action ( {reason} ) ."
    action_pattern: str | None = None
    system_prompt: str | None = None
    enable_thinking: bool | None = None
    observation_role: str = "user"
    step_timeout_s: float = 30.0
    num_threads: int = 8
    seq_len: int | None = None
    seq_bucket: int = 64
    row_bucket: int = 1
    engine: str = "continuous"
    num_slots: int | None = None

    def __post_init__(self):
        positive = ("num_tasks", "group_size", "max_turns", "max_context_tokens",
                    "max_action_tokens", "num_threads", "seq_bucket", "row_bucket")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RolloutConfig.{name}={value!r}; must be a positive int")
        if self.overlong_actions not in OVERLONG_ACTIONS:
            raise ValueError(f"RolloutConfig.overlong_actions={self.overlong_actions!r}; "
                             f"allowed: {OVERLONG_ACTIONS}")
        if self.engine not in ENGINES:
            raise ValueError(f"RolloutConfig.engine={self.engine!r}; allowed: {ENGINES}")
        if self.num_slots is not None and (not isinstance(self.num_slots, int)
                                           or self.num_slots < 1):
            raise ValueError(f"RolloutConfig.num_slots={self.num_slots!r}; must be a positive "
                             "int or None (one slot per episode)")
        if self.history not in HISTORY_MODES:
            raise ValueError(f"RolloutConfig.history={self.history!r}; allowed: {HISTORY_MODES}")
        if self.history == "windowed" and self.window < 0:
            raise ValueError(f"RolloutConfig.window={self.window!r}; must be >= 0")
        if self.max_action_tokens >= self.max_context_tokens:
            raise ValueError(
                f"RolloutConfig.max_action_tokens={self.max_action_tokens} must be below "
                f"max_context_tokens={self.max_context_tokens}")
        if self.seq_len is not None and self.seq_len < self.max_context_tokens:
            raise ValueError(
                f"RolloutConfig.seq_len={self.seq_len} is below max_context_tokens="
                f"{self.max_context_tokens}; rows could not fit")
        if self.step_timeout_s <= 0:
            raise ValueError(f"RolloutConfig.step_timeout_s={self.step_timeout_s!r}; must be > 0")

    @property
    def num_episodes(self) -> int:
        """B = N * G."""
        return self.num_tasks * self.group_size


@dataclasses.dataclass
class EpisodeRecord:
    """One episode, for logging.

    Attributes:
      episode: index in the batch (task index * G + rollout index).
      group: task index in [0, N).
      seed: the environment's reset seed.
      transcript: the chat, ``{"role", "content"}`` dicts (actions as decoded).
      turn_rewards: reward after each turn (penalties included).
      success: the environment reported success.
      turns: turns played.
      invalid_actions: turns whose action was invalid.
      truncated: cut short by max_turns, max_context_tokens or the environment.
      failed: the environment raised or timed out; `error` says what.
    """

    episode: int
    group: int
    seed: int
    transcript: list[dict[str, str]] = dataclasses.field(default_factory=list)
    turn_rewards: list[float] = dataclasses.field(default_factory=list)
    success: bool = False
    turns: int = 0
    invalid_actions: int = 0
    truncated: bool = False
    failed: bool = False
    error: str | None = None

    @property
    def episode_return(self) -> float:
        """Sum of the turn rewards."""
        return float(sum(self.turn_rewards))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (with the return)."""
        return dataclasses.asdict(self) | {"return": self.episode_return}
