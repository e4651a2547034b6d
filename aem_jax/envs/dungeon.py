"""``dungeon``: a long-horizon game of rooms, keys and a note trail.

The built-in treasure game grown to several rooms. The agent starts in one
of ``num_rooms`` rooms and sees only the room it stands in. A trail of
``num_notes`` notes leads through the dungeon: the note in the start room
names the room of the next note (or key), that note the next, and the last
note names the room of the exit. ``num_keys`` of the trail's rooms also hold
a key; the exit opens only with every key. Example (4 rooms, 2 notes, 1
key; the expert needs ``2 * num_notes + num_keys + 1`` = 6 turns)::

    user:      escape the dungeon . it has four rooms , each with a door ;
               one door is the exit . the notes tell where the keys and the
               exit are . you can read note , take key , unlock door or go
               to room with a number . you are in room three . you see a
               note and a door .
    assistant: read note
    user:      the note says : the next key is in room 1 .
    assistant: go to room 1
    user:      you are in room one . you see a key , a note and a door .
    assistant: take key
    user:      you take the key . you hold one of one keys .
    assistant: read note
    user:      the note says : the exit is in room 4 .
    assistant: go to room 4
    user:      you are in room four . you see a door .
    assistant: unlock door
    user:      you unlock the exit and escape . you win !

Actions: "read note", "take key", "unlock door" and "go to room N"; by
default the parser is lenient (see `parse_action`). The reward is 1 on
escaping, 0 otherwise, given at the end.

Why this game (issue 18): the treasure game is won in 2-4 turns and a
mistake shows at once. Here the expert needs 9 turns with the defaults
(6 rooms, 3 notes, 2 keys), the state is partially observable (a room is
described only while the agent is in it, the exit door looks like every
other door, and the room to go to next is named once, in an earlier
observation), and some mistakes are irreversible with a delayed effect, so
credit has to flow back across many turns:

* trying a key on a door that is not the exit breaks the key: the episode
  goes on but can no longer be won (there are exactly ``num_keys`` keys);
* trying the exit holding some but not all keys (a key skipped rooms ago)
  jams the lock and ends the episode as lost.

Harmless mistakes (reading where there is no note, taking where there is no
key, unlocking with no key, going to the room one is in) waste a turn.
Numbers: room descriptions and the instructions spell them ("room three"),
notes use digits ("room 1"), so the only digits in the history are those
the notes revealed and the policy must copy the latest one (as in
``treasure`` with ``spell_count``).

Floors and lengths (``python experiments/random_player.py --env dungeon
--episodes 1000``, sizes as arguments): with the defaults (6 rooms, 3 notes,
2 keys, 12 turns) the expert wins every seed in 9 turns and a uniformly
random player over the 9 valid actions wins 0 of 1000 seeds (0.04 % over
100,000: it can stumble on both keys and the exit without reading a note).
Of its losses 98 % run out of turns, 1.5 % jam the exit, and 11 % of its
episodes break a key on a false door. With 4 rooms, 2 notes and 1 key the
expert takes 6 turns and random play wins 1.4 %; with 9 rooms, 5 notes and
3 keys, 14 turns and 0 %.

Anchors (GiGPO): the agent-visible state -- room, keys held and broken, the
rooms whose notes were read and the room the latest note named -- so
rollouts of one task that reach the same knowledge share an anchor.
"""
from __future__ import annotations

import re

import numpy as np

from aem_jax.envs.base import Observation, Step, turn_limited_step

MAX_ROOMS = 9
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_STRICT_RE = re.compile(r"^\s*(read\s+note|take\s+key|unlock\s+door|go\s+to\s+room\s+(\d+))\s*\.?\s*$")
# Lenient keywords, in the order they are looked for in the text.
_KEYWORDS = {"read": "read", "note": "read", "take": "take", "key": "take",
             "unlock": "unlock", "door": "unlock"}


def parse_action(action: str, *, strict: bool = False) -> tuple[str, int | None] | None:
    """("read"|"take"|"unlock", None), ("go", room) or None when not understood.

    Strict: exactly "read note", "take key", "unlock door" or "go to room N"
    (case, surrounding spaces and a final "." ignored). Lenient (the
    default): the first number in the text goes to that room; else the first
    of the words read/note, take/key, unlock/door picks that action; other
    words are ignored. Leniency is for learning from scratch, as in
    ``treasure``: a policy is rewarded as soon as it emits the right number.
    """
    if not isinstance(action, str):
        return None
    if strict:
        match = _STRICT_RE.match(action.lower())
        if match is None:
            return None
        if match.group(2):
            return "go", int(match.group(2))
        return match.group(1).split()[0], None
    words = re.findall(r"[a-z]+|\d+", action.lower())
    number = next((w for w in words if w.isdigit()), None)
    if number is not None:
        return "go", int(number)
    kind = next((_KEYWORDS[w] for w in words if w in _KEYWORDS), None)
    return None if kind is None else (kind, None)


# Every sentence the game can say, with {w} for a spelled number and {b} for
# a digit; the vocabulary is derived from these so it can never miss a word.
_INTRO = ("escape the dungeon . it has {w} rooms , each with a door ; one door is the exit . "
          "the notes tell where the keys and the exit are . "
          "you can read note , take key , unlock door or go to room with a number . ")
_TEXTS = (
    _INTRO,
    "you are in room {w} . you see a key , a note and a door .",
    "you are in room {w} . you see a note and a door .",
    "you are in room {w} . you see a door .",
    "the note says : the next note is in room {b} .",
    "the note says : the next key is in room {b} .",
    "the note says : the exit is in room {b} .",
    "there is no note here .",
    "you take the key . you hold {w} of {w} keys .",
    "there is no key here .",
    "you are already in room {w} .",
    "you have no key .",
    "the key breaks in the lock . this door is not the exit .",
    "you unlock the exit and escape . you win !",
    "the exit needs every key . the lock jams . you lose .",
    "i do not understand . say read note , take key , unlock door or go to room with a number "
    "from one to {w} .",
    "you are out of turns . you lose .",
)


def vocabulary(max_rooms: int = MAX_ROOMS) -> list[str]:
    """Every word the game's observations, instructions and valid actions use.

    Punctuation marks are separate words (the word-level tokenizer isolates
    them); numbers run 1..``max_rooms`` as digits and as words.
    """
    words: list[str] = []
    for text in _TEXTS:
        for word in text.split():
            if "{" not in word and word not in words:
                words.append(word)
    words += [str(i) for i in range(1, max_rooms + 1) if str(i) not in words]
    words += [w for w in NUMBER_WORDS[:max_rooms] if w not in words]
    return words


def expert_turns(num_notes: int, num_keys: int) -> int:
    """Turns of the expert's episode: read the start note; for each later note
    go, take its key if any, read it; then go to the exit and unlock it."""
    return 1 + 2 * (num_notes - 1) + num_keys + 2


class Dungeon:
    """The dungeon game (see the module docstring).

    Args:
      num_rooms: rooms, 3..9; rooms off the trail are decoys (their doors
        break keys). More rooms make guessing harder.
      num_notes: notes on the trail, 2..num_rooms - 1 (the trail's rooms and
        the exit room are distinct); each note after the first adds 2 turns.
      num_keys: keys, 1..num_notes - 1, each in a distinct room of the trail
        after the start; each adds a turn.
      max_turns: turns before the game ends as lost and truncated; defaults
        to the expert's length ``2 * num_notes + num_keys + 1`` plus 3.
      strict: accept only the exact phrases (default: lenient, see
        `parse_action`).
    """

    def __init__(self, num_rooms: int = 6, num_notes: int = 3, num_keys: int = 2,
                 max_turns: int | None = None, strict: bool = False):
        for name, value in (("num_rooms", num_rooms), ("num_notes", num_notes), ("num_keys", num_keys)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"{name}={value!r}; allowed: an integer")
        if not 3 <= num_rooms <= MAX_ROOMS:
            raise ValueError(f"num_rooms={num_rooms!r}; allowed: 3..{MAX_ROOMS}")
        if not 2 <= num_notes <= num_rooms - 1:
            raise ValueError(f"num_notes={num_notes!r}; allowed: 2..num_rooms - 1 ({num_rooms - 1}): "
                             f"the trail's rooms and the exit room are distinct")
        if not 1 <= num_keys <= num_notes - 1:
            raise ValueError(f"num_keys={num_keys!r}; allowed: 1..num_notes - 1 ({num_notes - 1}): "
                             f"keys lie in the trail's rooms after the start")
        optimal = expert_turns(num_notes, num_keys)
        max_turns = optimal + 3 if max_turns is None else max_turns
        if not isinstance(max_turns, (int, np.integer)) or max_turns < optimal:
            raise ValueError(f"max_turns={max_turns!r}; allowed: an integer >= the expert's episode "
                             f"length {optimal} (2 * num_notes + num_keys + 1)")
        self.num_rooms = int(num_rooms)
        self.num_notes = int(num_notes)
        self.num_keys = int(num_keys)
        self.max_turns = int(max_turns)
        self.strict = strict
        # The hidden layout, drawn by reset.
        self._trail: list[int] = []        # rooms of notes 0..num_notes-1 (0 = start)
        self._exit = 0
        self._keys: set[int] = set()       # rooms still holding a key
        # The state.
        self._room = 0
        self._held = 0
        self._broken = 0
        self._turn = 0
        self._done = True
        # What the agent has seen (the expert plays from this only).
        self._seen_notes: set[int] = set()  # rooms known to hold a note (seen or named by a note)
        self._read: set[int] = set()       # rooms whose note has been read
        self._seen_keys: set[int] = set()  # rooms seen holding a key not yet taken
        self._known_exit: int | None = None
        self._latest: int | None = None    # room the latest read note named

    def vocabulary(self) -> list[str]:
        """Words of this game's texts (see module-level `vocabulary`)."""
        return vocabulary(MAX_ROOMS)

    def valid_actions(self) -> list[str]:
        """The actions the game understands (for random and scripted players)."""
        return ["read note", "take key", "unlock door"] + [
            f"go to room {i}" for i in range(1, self.num_rooms + 1)]

    @property
    def optimal_length(self) -> int:
        """Turns of the expert's episode (see `expert_turns`)."""
        return expert_turns(self.num_notes, self.num_keys)

    def optimal_action(self) -> str:
        """The best action from what the agent has seen so far.

        In order: take a key lying here; read an unread note here; fetch a
        key seen elsewhere; go to a room known to hold an unread note (the
        latest named first); go to the exit and unlock it once every key is
        held. From the start this is the trail in 2 * num_notes + num_keys + 1
        turns; after a detour it resumes the trail.
        """
        here = self._room
        if here in self._seen_keys:
            return "take key"
        if here in self._seen_notes and here not in self._read:
            return "read note"
        if self._seen_keys:
            return f"go to room {min(self._seen_keys)}"
        unread = self._seen_notes - self._read
        if unread:
            target = self._latest if self._latest in unread else min(unread)
            return f"go to room {target}"
        if self._known_exit is not None:
            return "unlock door" if here == self._known_exit else f"go to room {self._known_exit}"
        return "read note"

    def _anchor(self) -> str:
        latest = "nothing" if self._latest is None else f"room {self._latest}"
        read = " ".join(str(r) for r in sorted(self._read)) or "none"
        return (f"in room {self._room} ; holds {self._held} keys ; broke {self._broken} ; "
                f"read notes of rooms {read} ; latest names {latest}")

    def _info(self, *, success: bool = False, invalid: bool = False, truncated: bool = False):
        return {"success": success, "invalid_action": invalid, "truncated": truncated,
                "anchor": self._anchor()}

    def _describe(self, room: int) -> str:
        """The room as the agent sees it on entering, and what it learns from that."""
        has_note, has_key = room in self._trail, room in self._keys
        if has_note:
            self._seen_notes.add(room)
        if has_key:
            self._seen_keys.add(room)
        things = "a key , a note and a door" if has_key else "a note and a door" if has_note else "a door"
        return f"you are in room {NUMBER_WORDS[room - 1]} . you see {things} ."

    def reset(self, *, seed: int) -> Observation:
        rng = np.random.default_rng(seed)
        rooms = [int(r) + 1 for r in rng.permutation(self.num_rooms)[: self.num_notes + 1]]
        self._trail, self._exit = rooms[:-1], rooms[-1]
        key_stops = rng.choice(np.arange(1, self.num_notes), size=self.num_keys, replace=False)
        self._keys = {self._trail[int(i)] for i in key_stops}
        self._room, self._held, self._broken = self._trail[0], 0, 0
        self._turn, self._done = 0, False
        self._seen_notes, self._read, self._seen_keys = set(), set(), set()
        self._known_exit, self._latest = None, None
        intro = _INTRO.format(w=NUMBER_WORDS[self.num_rooms - 1]) + self._describe(self._room)
        return Observation(intro, self._info())

    def _read_note(self) -> str:
        here = self._room
        if here not in self._trail:
            return "there is no note here ."
        self._read.add(here)
        stage = self._trail.index(here)
        if stage == self.num_notes - 1:
            target, what = self._exit, "the exit"
            self._known_exit = target
        else:
            target = self._trail[stage + 1]
            what = "the next key" if target in self._keys else "the next note"
            self._seen_notes.add(target)
        self._latest = target
        return f"the note says : {what} is in room {target} ."

    def _take_key(self) -> str:
        if self._room not in self._keys:
            return "there is no key here ."
        self._keys.discard(self._room)
        self._seen_keys.discard(self._room)
        self._held += 1
        return (f"you take the key . you hold {NUMBER_WORDS[self._held - 1]} of "
                f"{NUMBER_WORDS[self.num_keys - 1]} keys .")

    def _unlock(self) -> tuple[str, float, bool, bool]:
        """(text, reward, done, success) of trying the door of this room."""
        if self._held == 0:
            return "you have no key .", 0.0, False, False
        if self._room != self._exit:
            self._held -= 1
            self._broken += 1
            return "the key breaks in the lock . this door is not the exit .", 0.0, False, False
        if self._held < self.num_keys:
            return "the exit needs every key . the lock jams . you lose .", 0.0, True, False
        return "you unlock the exit and escape . you win !", 1.0, True, True

    def step(self, action: str) -> Step:
        if self._done:
            raise RuntimeError("step() called on a finished episode; call reset(seed=...) first")
        self._turn += 1
        parsed = parse_action(action, strict=self.strict)
        reward, done, success, invalid = 0.0, False, False, False
        if parsed is None or (parsed[0] == "go" and not 1 <= parsed[1] <= self.num_rooms):
            text = ("i do not understand . say read note , take key , unlock door or go to room "
                    f"with a number from one to {NUMBER_WORDS[self.num_rooms - 1]} .")
            invalid = True
        elif parsed[0] == "go":
            if parsed[1] == self._room:
                text = f"you are already in room {NUMBER_WORDS[self._room - 1]} ."
            else:
                self._room = parsed[1]
                text = self._describe(self._room)
        elif parsed[0] == "read":
            text = self._read_note()
        elif parsed[0] == "take":
            text = self._take_key()
        else:
            text, reward, done, success = self._unlock()
        self._done = done or self._turn >= self.max_turns
        return turn_limited_step(text, reward, done, turn=self._turn, max_turns=self.max_turns,
                                 info=self._info, success=success, invalid=invalid)
