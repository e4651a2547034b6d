"""TextWorld games (the engine under ALFWorld) as an `Env`.

Two ways to name a game:

  make("textworld", game_file="path/to/game.z8")      # an existing game
  make("textworld", challenge="tw-coin_collector", level=3)
                                                        # generated per seed

With a challenge, ``reset(seed=s)`` plays the game that ``tw-make <challenge>
<settings> --seed s`` generates; games are made locally (no download) into a
cache directory keyed by (challenge, settings, seed, textworld version) and
reused. Keyword arguments other than the ones below are the challenge's
``tw-make`` settings (``level=3`` -> ``--level 3``, ``cook=True`` ->
``--cook``); see ``tw-make <challenge> --help``. Defaults per challenge are in
`DEFAULT_SETTINGS`.

Reward is the change in the game's own score; ``info`` carries ``success``
(the game is won), ``lost``, ``score``, ``max_score``, ``invalid_action``
(the parser did not understand), ``truncated`` (``max_steps`` reached) and
``anchor``: the room description and the inventory, the state GiGPO groups
turns by. Optional: ``admissible_commands`` (also listed in the observation)
and ``policy_commands`` (the walkthrough from the current state).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from typing import Any

from aem_jax.envs.base import Observation, Step

DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "tw-simple": {"rewards": "dense", "goal": "detailed"},
    "tw-coin_collector": {"level": 1},
    "tw-treasure_hunter": {"level": 1},
    "tw-cooking": {"recipe": 1, "take": 1, "go": 1, "open": True},
}
CHALLENGES = tuple(DEFAULT_SETTINGS)
SPLITS = ("train", "test")
# tw-make seed offset of the test split's games (task seeds stay below it; numpy
# seeds must stay below 2**32).
TEST_GAME_OFFSET = 2**31

# Replies of the Inform 7 parser to a command it could not act on.
_PARSER_FAILURES = (
    "that's not a verb i recognise", "i didn't understand that sentence",
    "you can't see any such thing", "i only understood you as far as",
    "that noun did not make sense", "you seem to want to talk to someone",
    "i beg your pardon", "please give one of the answers above",
)
_BANNER_CHARS = set(" _|\\/$<>")
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()
# textworld.start parses the game's grammar with parsers that are not
# thread-safe; environments start one at a time, then step concurrently.
_START_LOCK = threading.Lock()


def default_cache_dir() -> str:
    """``$AEM_JAX_CACHE/textworld``, else ``~/.cache/aem_jax/textworld``."""
    root = os.environ.get("AEM_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                        "aem_jax"))
    return os.path.join(root, "textworld")


def _import_textworld():
    try:
        import textworld
    except ImportError as e:
        raise ImportError("the textworld environment needs the `textworld` package: "
                          "pip install textworld") from e
    return textworld


def _tw_make_command(challenge: str, settings: dict[str, Any], seed: int, output: str):
    script = os.path.join(os.path.dirname(sys.executable), "tw-make")
    if not os.path.exists(script):
        script = shutil.which("tw-make")
    if script is None:
        raise FileNotFoundError("tw-make not found next to the Python interpreter or on PATH; "
                                "pip install textworld")
    args = [sys.executable, script, challenge]
    for name, value in sorted(settings.items()):
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False and value is not None:
            args += [flag, str(value)]
    return args + ["--seed", str(seed), "--output", output, "--silent", "-f"]


def generate_game(challenge: str, settings: dict[str, Any], seed: int, cache_dir: str,
                  *, timeout_s: float = 600.0) -> str:
    """Path of the ``.z8`` game for (challenge, settings, seed), made if missing.

    Generation writes into a temporary directory and moves the files into
    place (the ``.z8`` last), so concurrent callers never see half a game.
    """
    textworld = _import_textworld()
    spec = json.dumps({"challenge": challenge, "settings": settings, "seed": seed,
                       "textworld": textworld.__version__}, sort_keys=True)
    digest = hashlib.blake2b(spec.encode(), digest_size=8).hexdigest()
    path = os.path.join(cache_dir, challenge, f"seed{seed}-{digest}.z8")
    if os.path.exists(path):
        return path
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(path, threading.Lock())
    with lock:
        if os.path.exists(path):
            return path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
            out = os.path.join(tmp, "game.z8")
            cmd = _tw_make_command(challenge, settings, seed, out)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            if proc.returncode != 0 or not os.path.exists(out):
                raise RuntimeError(f"tw-make failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                                   f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            os.replace(os.path.join(tmp, "game.json"), path[:-3] + ".json")
            os.replace(out, path)
        with open(path[:-3] + ".spec.json", "w") as f:
            f.write(spec)
    return path


def clean_feedback(text: str) -> str:
    """Game text without the title banner, the prompt and the status line."""
    lines = [ln for ln in text.splitlines()
             if not (ln.strip() and set(ln) <= _BANNER_CHARS)
             and not ln.startswith("Would you like to RESTART")]
    text = "\n".join(lines).rstrip()
    text = re.sub(r"\n>[^\n]*$", "", text)  # "> ... -= Room =-score/moves"
    return re.sub(r"\n{3,}", "\n\n", text).strip()


MAX_COMMAND_CHARS = 80


def sanitize_command(action: str) -> str:
    """The part of a model's reply the Inform interpreter may safely read.

    The Z-machine interpreter (frotz, inside jericho) copies the command into
    a fixed-size buffer without a bound check: long or multi-line model output
    crashed the whole process. Keep the first line, printable ASCII only, at
    most ``MAX_COMMAND_CHARS`` characters. Backslashes are dropped: dumb-frotz
    reads a line starting with one as its own meta-command, and an unknown one
    made it print an error in an endless loop until it crashed.
    """
    first = action.strip().splitlines()[0] if action.strip() else ""
    printable = "".join(ch for ch in first if 32 <= ord(ch) < 127 and ch != "\\")
    return " ".join(printable.split())[:MAX_COMMAND_CHARS].strip()


class TextWorldEnv:
    """A TextWorld game behind the `Env` protocol (see the module docstring).

    Args:
      game_file: an existing ``.z8``/``.ulx`` game; its seed-independent.
      challenge: a ``tw-make`` challenge (one of `CHALLENGES`) used when no
        game_file is given; each reset seed is its own game.
      cache_dir: where generated games live (default `default_cache_dir()`).
      admissible_commands: list the valid commands in each observation.
      policy_commands: put the walkthrough from the current state in ``info``.
      max_steps: steps before the episode ends as truncated.
      numbered_commands: number the admissible commands in the observation
        ("Admissible commands: 1 go west ; 2 look .") and let an action whose
        first number is k play command k ("2", "2 please" and "i pick 2" all
        play command 2; actions without a number are played as text).
        Choosing from a list is how ALFWorld-style agents act; it lets a
        model trained from scratch act without first learning to spell
        commands. Needs ``admissible_commands=True``.
      game_pool: 0 (default): every reset seed is its own game. k > 0: seed
        ``s`` plays game ``s % k``, a fixed set of k games made once and
        cached -- generating a game takes ``tw-make`` seconds, so training on
        fresh seeds every step spends most of its time there.
      split: "train" (default) or "test". The test split's games come from
        tw-make seeds ``TEST_GAME_OFFSET + s`` (``+ s % game_pool`` with a
        pool), which no training seed below the offset reaches, so a
        held-out evaluation (the trainer passes ``split="test"``) never
        replays a training game, with or without a pool.
      **settings: ``tw-make`` settings of the challenge.
    """

    def __init__(self, game_file: str | None = None, *, challenge: str = "tw-simple",
                 cache_dir: str | None = None, admissible_commands: bool = False,
                 policy_commands: bool = False, max_steps: int = 50, game_pool: int = 0,
                 numbered_commands: bool = False, split: str = "train",
                 **settings: Any):
        if game_file is None and challenge not in DEFAULT_SETTINGS:
            raise ValueError(f"challenge={challenge!r}; allowed: {', '.join(CHALLENGES)}")
        if game_file is not None and settings:
            raise ValueError(f"tw-make settings {sorted(settings)} need challenge=..., "
                             f"not game_file={game_file!r}")
        if max_steps < 1:
            raise ValueError(f"max_steps={max_steps!r}; must be >= 1")
        if not isinstance(game_pool, int) or game_pool < 0:
            raise ValueError(f"game_pool={game_pool!r}; must be an int >= 0 (0 = a game per seed)")
        self.game_pool = game_pool
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; allowed: {', '.join(SPLITS)}")
        self.split = split
        if numbered_commands and not admissible_commands:
            raise ValueError("numbered_commands=True needs admissible_commands=True (the list to number)")
        self.numbered_commands = numbered_commands
        self._commands: list[str] = []
        textworld = _import_textworld()
        self.game_file = game_file
        self.challenge = challenge
        self.settings = {**DEFAULT_SETTINGS.get(challenge, {}), **settings}
        self.cache_dir = cache_dir or default_cache_dir()
        self.admissible_commands = admissible_commands
        self.max_steps = max_steps
        self._infos = textworld.EnvInfos(
            score=True, max_score=True, won=True, lost=True, inventory=True, description=True,
            admissible_commands=admissible_commands, policy_commands=policy_commands)
        self._env = None
        self._loaded: str | None = None
        self._score = 0.0
        self._steps = 0
        self._last_anchor = ""

    def _game_path(self, seed: int) -> str:
        if self.game_file is None:
            if not 0 <= seed < TEST_GAME_OFFSET:
                raise ValueError(f"seed={seed}; TextWorld task seeds must be in [0, {TEST_GAME_OFFSET})")
            game_seed = seed % self.game_pool if self.game_pool else seed
            if self.split == "test":
                game_seed += TEST_GAME_OFFSET
            return generate_game(self.challenge, self.settings, game_seed, self.cache_dir)
        if not os.path.exists(self.game_file):
            raise FileNotFoundError(
                f"game_file={self.game_file!r} does not exist. Make it with e.g. "
                f"`tw-make tw-simple --rewards dense --goal detailed --seed 1 "
                f"--output {self.game_file}`, or pass challenge=... (without game_file) to "
                f"generate games per seed into {self.cache_dir}")
        return self.game_file

    def _observe(self, gs: Any, text: str) -> tuple[str, dict[str, Any]]:
        info = {"success": bool(gs["won"]), "lost": bool(gs["lost"]),
                "score": float(gs["score"]), "max_score": float(gs["max_score"]),
                "anchor": f"{clean_feedback(gs['description'] or '')}\n{gs['inventory'] or ''}"}
        if self.admissible_commands:
            commands = list(gs["admissible_commands"] or [])
            info["admissible_commands"] = commands
            self._commands = commands
            if self.numbered_commands:
                listed = " ; ".join(f"{i} {c}" for i, c in enumerate(commands, 1))
                text = f"{text}\n\nAdmissible commands: {listed} ."
            else:
                text = f"{text}\n\nAdmissible commands: {', '.join(commands)}."
        if self._infos.policy_commands:
            info["policy_commands"] = list(gs["policy_commands"] or [])
        self._last_anchor = info["anchor"]
        return text, info

    def reset(self, *, seed: int) -> Observation:
        path = self._game_path(seed)
        if self._loaded != path:
            with _START_LOCK, warnings.catch_warnings():
                # jericho warns that it cannot track score in TextWorld games;
                # TextWorld tracks the score itself.
                warnings.filterwarnings("ignore", message=".*is not fully supported")
                if self._env is not None:
                    self._env.close()
                self._env = _import_textworld().start(path, request_infos=self._infos)
            self._loaded = path
        gs = self._env.reset()
        self._score, self._steps = float(gs["score"]), 0
        text, info = self._observe(gs, clean_feedback(gs.feedback))
        return Observation(text, info)

    def step(self, action: str) -> Step:
        """Plays ``action`` (sanitised: see `sanitize_command`)."""
        if self._env is None:
            raise RuntimeError("step() before reset(seed=...)")
        command = sanitize_command(action)
        if self.numbered_commands:
            # The first number anywhere, as the built-in game's parser reads
            # it: a model trained from scratch emits digits long before it
            # learns to put them first.
            number = re.search(r"\d+", command)
            if number and 1 <= int(number.group(0)) <= len(self._commands):
                command = self._commands[int(number.group(0)) - 1]
        if not command:
            self._steps += 1
            text = (f"i did not understand {action[:40]!r} . type a short command such as "
                    f"go north , take coin or look .")
            info = {"success": False, "invalid_action": True, "anchor": self._last_anchor,
                    "truncated": self._steps >= self.max_steps, "score": self._score}
            return Step(text, 0.0, info["truncated"], info)
        gs, score, done = self._env.step(command)
        self._steps += 1
        reward, self._score = float(score) - self._score, float(score)
        feedback = clean_feedback(gs.feedback)
        text, info = self._observe(gs, feedback)
        info["invalid_action"] = any(p in feedback.lower() for p in _PARSER_FAILURES)
        info["truncated"] = not done and self._steps >= self.max_steps
        return Step(text, reward, bool(done) or info["truncated"], info)

    def close(self) -> None:
        """Stops the interpreter."""
        if self._env is not None:
            self._env.close()
            self._env, self._loaded = None, None
