"""``chain``: a two-step chain MDP for checking that an algorithm learns at all.

Two rooms; each turn the agent says one word::

    user:      room one . say left or right .
    assistant: left
    user:      room two . say left or right .
    assistant: right
    user:      you found the treasure . you win !

In room one, "left" leads to room two (reward 0) and "right" ends the
episode (reward 0). In room two, "right" wins (reward 1, success) and "left"
ends the episode (reward 0). Any other text is an invalid action: the episode
ends with reward 0 and ``info["invalid_action"]`` True (the rollout engine
subtracts ``rollout.invalid_penalty``). The first action never earns a reward
by itself, so a learner succeeds only if credit flows back across turns.

Why: on the built-in games an algorithm can fail for many reasons (too few
steps, an untrained model, a hard copy task). This MDP has one optimal
episode of two one-word actions, so a correct implementation of an RL
algorithm (policy gradient, an actor-critic, soft Q learning) solves it from
random weights in a few dozen small iterations; one that does not points at
a bug in the algorithm rather than the setup.
``tests/trainer/chain_mdp_test.py`` trains ArCHer and ETPO on it (its
configs are a starting point for other algorithms).

A uniformly random player over the two words succeeds with probability 1/4;
a model trained from scratch starts uniform over its whole word-level
vocabulary (~70 tokens: special tokens, punctuation, these words and the
rollout engine's), so it starts near 0. Settings that make it learnable
quickly: ``rollout.max_action_tokens=1`` with
``rollout.overlong_actions="play"`` (the sampled word is the action) and an
``rollout.invalid_penalty`` (0.1) that teaches the two valid words first.
The penalty makes "right" in room one look better than "left" until room
two is learnt (an invalid word there costs the penalty), a small trap a
learner has to get out of.

Every task (seed) is the same game; ``reset`` ignores the seed. Anchors
(GiGPO) name the room.
"""
from __future__ import annotations

import re

from aem_jax.envs.base import Observation, Step

ROOM_ONE = "room one . say left or right ."
ROOM_TWO = "room two . say left or right ."
_TEXTS = (
    ROOM_ONE,
    ROOM_TWO,
    "you found the treasure . you win !",
    "you walk away . you lose .",
    "i do not understand . you lose .",
)


def parse_action(action: str, *, strict: bool = True) -> str | None:
    """"left", "right" or None (not understood).

    Strict (the default): the whole action is one of the two words (case,
    surrounding spaces and a final "." ignored). Lenient: the first of the two
    words anywhere in the text.
    """
    if not isinstance(action, str):
        return None
    words = re.findall(r"[a-z]+|[^\sa-z]", action.lower())
    if strict:
        if words and words[-1] == ".":
            words = words[:-1]
        return words[0] if len(words) == 1 and words[0] in ("left", "right") else None
    return next((w for w in words if w in ("left", "right")), None)


def vocabulary() -> list[str]:
    """Every word of the game's texts (punctuation marks are separate words)."""
    words: list[str] = []
    for text in _TEXTS:
        for word in text.split():
            if word not in words:
                words.append(word)
    return words


class TwoStepChain:
    """The two-step chain (see the module docstring).

    Args:
      strict: accept only the exact one-word actions (default); False: the
        first "left" or "right" anywhere in the action counts.
    """

    def __init__(self, strict: bool = True):
        self.strict = strict
        self._room = 0  # 0: not started or finished, 1 or 2: the agent's room

    def vocabulary(self) -> list[str]:
        """Words of this game's texts (for word-level tokenizers)."""
        return vocabulary()

    def valid_actions(self) -> list[str]:
        return ["left", "right"]

    def optimal_action(self) -> str:
        return "left" if self._room == 1 else "right"

    def _info(self, *, success: bool = False, invalid: bool = False) -> dict:
        anchor = {1: "room one", 2: "room two"}.get(self._room, "end")
        return {"success": success, "invalid_action": invalid, "truncated": False, "anchor": anchor}

    def reset(self, *, seed: int) -> Observation:
        del seed  # one game
        self._room = 1
        return Observation(ROOM_ONE, self._info())

    def step(self, action: str) -> Step:
        if self._room == 0:
            raise RuntimeError("step() called on a finished episode; call reset(seed=...) first")
        move = parse_action(action, strict=self.strict)
        if move is None:
            self._room = 0
            return Step("i do not understand . you lose .", 0.0, True, self._info(invalid=True))
        if self._room == 1 and move == "left":
            self._room = 2
            return Step(ROOM_TWO, 0.0, False, self._info())
        if self._room == 2 and move == "right":
            self._room = 0
            return Step("you found the treasure . you win !", 1.0, True, self._info(success=True))
        self._room = 0
        return Step("you walk away . you lose .", 0.0, True, self._info())
