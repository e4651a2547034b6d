"""``treasure``: the built-in game for the CPU default.

A room holds a note and ``num_boxes`` numbered boxes. The note names a box;
that box holds the next note, and so on for ``num_clues`` notes, the last one
naming the box with the gold. Opening the box the latest note names is
progress, opening a box no note has named springs a trap and ends the
episode. Example with 6 boxes and one clue::

    user:      find the gold . you see a note and six boxes . you can
               read note or open box with a number .
    assistant: read note
    user:      the note says : the gold is in box 4 .
    assistant: open box 4
    user:      you open box 4 and find the gold . you win !

Actions are "read note" and "open box N"; by default the parser is lenient
(the first number opens that box, "read" or "note" reads), see
`parse_action`.

Why this game: it is genuinely multi-turn (the right action at turn k is a
number only an earlier observation revealed, so the policy must copy it from
its history), the reward is sparse (1 on success at the end, 0 otherwise),
the vocabulary is ~40 words, episodes are ``num_clues + 1`` turns when played
well, and a small transformer trained from scratch learns the copy quickly.

A uniformly random player over the ``num_boxes + 1`` valid actions wins with
probability at most ``p / (1 - p) * p**(num_clues - 1)`` where
``p = 1 / (num_boxes + 1)`` (1/6 for the defaults), since each turn it either
reads (p), picks the right box (p) or springs a trap.

Anchors (GiGPO): the agent-visible state -- how many notes it has followed and
which box it currently knows of -- so rollouts of one task that reach the
same knowledge share an anchor.
"""
from __future__ import annotations

import re

import numpy as np

from aem_jax.envs.base import Observation, Step, turn_limited_step

MAX_BOXES = 9
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_STRICT_RE = re.compile(r"^\s*(read\s+note|open\s+box\s+(\d+))\s*\.?\s*$")


def parse_action(action: str, *, strict: bool = False) -> tuple[str, int | None] | None:
    """("read", None), ("open", box) or None when the action is not understood.

    Strict: exactly "read note" or "open box N". Lenient (the default): the
    first number in the text opens that box, else "read" or "note" reads the
    note; other words are ignored. Leniency is for learning from scratch: a
    policy earns its first rewards as soon as it emits the right number,
    before it has learnt the full phrase.
    """
    if not isinstance(action, str):
        return None
    if strict:
        match = _STRICT_RE.match(action.lower())
        if match is None:
            return None
        return ("open", int(match.group(2))) if match.group(2) else ("read", None)
    words = re.findall(r"[a-z]+|\d+", action.lower())
    number = next((w for w in words if w.isdigit()), None)
    if number is not None:
        return "open", int(number)
    return ("read", None) if {"read", "note"} & set(words) else None

# Every sentence the game can say, with {n}, {b} and {k} for numbers; the
# vocabulary is derived from these so it can never miss a word.
_TEXTS = (
    "find the gold . you see a note and boxes 1 to {n} . "
    "you can read note or open box with a number .",
    "find the gold . you see a note and {w} boxes . "
    "you can read note or open box with a number .",
    "the note says : the gold is in box {b} .",
    "the note says : the next note is in box {b} .",
    "you open box {k} . it holds a note that says : the gold is in box {b} .",
    "you open box {k} . it holds a note that says : the next note is in box {b} .",
    "you open box {k} and find the gold . you win !",
    "you open box {k} . it holds a trap . you lose .",
    "box {k} is empty now .",
    "i do not understand . say read note or open box with a number from 1 to {n} .",
    "i do not understand . say read note or open box with a number from one to {w} .",
    "you are out of turns . you lose .",
    "box {k} is locked . read the note first .",
)


def vocabulary(max_boxes: int = MAX_BOXES) -> list[str]:
    """Every word the game's observations, instructions and valid actions use.

    Punctuation marks are separate words (the word-level tokenizer isolates
    them), numbers run 1..``max_boxes``.
    """
    words: list[str] = []
    for text in _TEXTS:
        for word in text.split():
            if "{" not in word and word not in words:
                words.append(word)
    words += [str(i) for i in range(1, max_boxes + 1) if str(i) not in words]
    words += [w for w in NUMBER_WORDS[1:max_boxes] if w not in words]
    return words


class TreasureHunt:
    """The treasure game (see the module docstring).

    Args:
      num_boxes: boxes in the room, 2..9. More boxes make guessing harder.
      num_clues: notes to follow before the gold, 1..num_boxes; the optimal
        episode takes ``num_clues + 1`` turns.
      max_turns: turns before the game ends as lost and truncated; defaults to
        ``num_clues + 3`` (room for one wasted turn and a re-read).
      strict: accept only the exact phrases "read note" / "open box N"
        (default: lenient, see `parse_action`).
      locked: boxes stay locked until the note on the floor has been read,
        so blind guessing never wins and every success needs the copy of a
        revealed number (without it, a policy trained from scratch tends to
        settle on guessing the first box: 1 / num_boxes success).
      spell_count: the instructions give the number of boxes as a word ("four
        boxes") instead of a range of digits ("boxes 1 to 4"), so the only
        digits in the history are those the notes revealed. With digits in
        the instructions, a model trained from scratch often learns to copy
        *a* digit from its context, the instructions' 1 or 4 included, and
        stays near 1 / num_boxes success for hundreds of steps.
    """

    def __init__(self, num_boxes: int = 6, num_clues: int = 1, max_turns: int | None = None,
                 strict: bool = False, locked: bool = True, spell_count: bool = True):
        if not 2 <= num_boxes <= MAX_BOXES:
            raise ValueError(f"num_boxes={num_boxes!r}; allowed: 2..{MAX_BOXES}")
        if not 1 <= num_clues <= num_boxes:
            raise ValueError(f"num_clues={num_clues!r}; allowed: 1..num_boxes ({num_boxes})")
        max_turns = num_clues + 3 if max_turns is None else max_turns
        if max_turns < num_clues + 1:
            raise ValueError(
                f"max_turns={max_turns!r} is below the optimal episode length {num_clues + 1}")
        self.num_boxes = num_boxes
        self.num_clues = num_clues
        self.max_turns = max_turns
        self.strict = strict
        self.locked = locked
        self.spell_count = spell_count
        self._path: list[int] = []
        self._stage = 0          # notes followed so far (0 = the note on the floor)
        self._known: int | None = None  # box the agent has been told to open next
        self._opened: set[int] = set()
        self._turn = 0
        self._done = True

    # The agent-visible words of the game, for word-level tokenizers.
    def vocabulary(self) -> list[str]:
        """Words of this game's texts (see module-level `vocabulary`)."""
        return vocabulary(MAX_BOXES)

    def valid_actions(self) -> list[str]:
        """The actions the game understands (for random and scripted players)."""
        return ["read note"] + [f"open box {i}" for i in range(1, self.num_boxes + 1)]

    def optimal_action(self) -> str:
        """The best action from what the agent has seen so far."""
        if self._known is None:
            return "read note"
        return f"open box {self._known}"

    def _anchor(self) -> str:
        known = "nothing" if self._known is None else f"box {self._known}"
        return f"followed {self._stage} of {self.num_clues} notes ; knows {known}"

    def _info(self, *, success: bool = False, invalid: bool = False, truncated: bool = False):
        return {"success": success, "invalid_action": invalid, "truncated": truncated,
                "anchor": self._anchor()}

    def reset(self, *, seed: int) -> Observation:
        rng = np.random.default_rng(seed)
        self._path = [int(b) + 1 for b in rng.permutation(self.num_boxes)[: self.num_clues]]
        self._stage, self._known, self._opened = 0, None, set()
        self._turn, self._done = 0, False
        intro = _TEXTS[1] if self.spell_count else _TEXTS[0]
        return Observation(intro.format(n=self.num_boxes, w=NUMBER_WORDS[self.num_boxes - 1]), self._info())

    def _clue(self, stage: int) -> str:
        """What the note of `stage` says: where to look next."""
        what = "the gold" if stage == self.num_clues - 1 else "the next note"
        return f"{what} is in box {self._path[stage]} ."

    def _open(self, box: int) -> tuple[str, float, bool, bool]:
        """(text, reward, done, success) of opening `box`."""
        if self.locked and self._known is None:
            return f"box {box} is locked . read the note first .", 0.0, False, False
        if box == self._path[self._stage]:
            self._opened.add(box)
            if self._stage == self.num_clues - 1:
                return f"you open box {box} and find the gold . you win !", 1.0, True, True
            self._stage += 1
            self._known = self._path[self._stage]
            text = f"you open box {box} . it holds a note that says : {self._clue(self._stage)}"
            return text, 0.0, False, False
        if box in self._opened:
            return f"box {box} is empty now .", 0.0, False, False
        return f"you open box {box} . it holds a trap . you lose .", 0.0, True, False

    def step(self, action: str) -> Step:
        if self._done:
            raise RuntimeError("step() called on a finished episode; call reset(seed=...) first")
        self._turn += 1
        parsed = parse_action(action, strict=self.strict)
        box = parsed[1] if parsed else None
        if parsed is None or (box is not None and not 1 <= box <= self.num_boxes):
            span = (f"one to {NUMBER_WORDS[self.num_boxes - 1]}" if self.spell_count
                    else f"1 to {self.num_boxes}")
            text = f"i do not understand . say read note or open box with a number from {span} ."
            reward, done, success, invalid = 0.0, False, False, True
        elif box is None:
            # The note on the floor always names the first box; reading it
            # again later teaches nothing new.
            if self._stage == 0:
                self._known = self._path[0]
            text = "the note says : " + self._clue(0)
            reward, done, success, invalid = 0.0, False, False, False
        else:
            text, reward, done, success = self._open(box)
            invalid = False
        self._done = done or self._turn >= self.max_turns
        return turn_limited_step(text, reward, done, turn=self._turn, max_turns=self.max_turns,
                                 info=self._info, success=success, invalid=invalid)

