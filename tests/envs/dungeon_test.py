"""The long-horizon dungeon: expert, random floor, irreversible mistakes, partial observability."""
import re

import numpy as np
import pytest

from aem_jax import envs
from aem_jax.envs.dungeon import NUMBER_WORDS, Dungeon, parse_action, vocabulary
from aem_jax.models import build_tokenizer


def _play(env, seed, choose):
    texts, steps = [env.reset(seed=seed).text], []
    while True:
        step = env.step(choose(env))
        texts.append(step.observation)
        steps.append(step)
        if step.done:
            return texts, steps


def _expert(env):
    return env.optimal_action()


def test_registry_makes_the_game_with_its_defaults():
    env = envs.make("dungeon")
    assert isinstance(env, Dungeon) and isinstance(env, envs.Env)
    assert (env.num_rooms, env.num_notes, env.num_keys) == (6, 3, 2)
    assert env.optimal_length == 9 and env.max_turns == 12


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_rooms=2), "num_rooms=2"), (dict(num_rooms=10), "num_rooms=10"),
    (dict(num_rooms=4, num_notes=4), "num_notes=4"), (dict(num_notes=1), "num_notes=1"),
    (dict(num_keys=0), "num_keys=0"), (dict(num_notes=3, num_keys=3), "num_keys=3"),
    (dict(max_turns=8), "max_turns=8.*9"), (dict(num_rooms=6.0), "num_rooms=6.0"),
])
def test_bad_settings_name_the_argument_and_what_is_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Dungeon(**kwargs)


@pytest.mark.parametrize("sizes", [dict(), dict(num_rooms=9, num_notes=5, num_keys=3),
                                   dict(num_rooms=3, num_notes=2, num_keys=1)])
def test_expert_escapes_on_every_seed_in_its_optimal_length(sizes):
    env = Dungeon(**sizes)
    for seed in range(200):
        _, steps = _play(env, seed, _expert)
        assert steps[-1].info["success"] and steps[-1].reward == 1.0, seed
        assert len(steps) == env.optimal_length == 2 * env.num_notes + env.num_keys + 1
        assert sum(s.reward for s in steps) == 1.0 and not any(s.info["invalid_action"] for s in steps)
    assert Dungeon().optimal_length >= 8


def test_random_play_almost_never_escapes():
    env = Dungeon()
    rng = np.random.default_rng(0)
    wins = sum(_play(env, s, lambda e: str(rng.choice(e.valid_actions())))[1][-1].info["success"]
               for s in range(1000))
    assert wins / 1000 <= 0.01


def _layout(env):
    return env._trail, env._exit, set(env._keys)  # noqa: SLF001 -- the hidden layout, to aim mistakes


def test_a_key_tried_on_a_false_door_breaks_and_the_game_cannot_be_won_any_more():
    env = Dungeon(max_turns=30)
    env.reset(seed=4)
    trail, exit_room, _ = _layout(env)
    while env._held == 0:  # noqa: SLF001 -- follow the expert to the first key
        env.step(env.optimal_action())
    decoy = next(r for r in range(1, 7) if r not in trail and r != exit_room)
    env.step(f"go to room {decoy}")
    broke = env.step("unlock door")
    assert broke.observation == "the key breaks in the lock . this door is not the exit ."
    assert not broke.done and env._held == 0  # noqa: SLF001
    # The expert, with every turn it needs, now reaches the exit one key short: the lock jams.
    while True:
        step = env.step(env.optimal_action())
        if step.done:
            break
    assert not step.info["success"] and not step.info["truncated"]
    assert step.observation == "the exit needs every key . the lock jams . you lose ."


def test_trying_the_exit_short_of_a_key_ends_the_episode_at_once():
    env = Dungeon()
    env.reset(seed=2)
    _, exit_room, _ = _layout(env)
    while env._held == 0:  # noqa: SLF001
        env.step(env.optimal_action())
    env.step(f"go to room {exit_room}")
    lost = env.step("unlock door")
    assert lost.done and lost.reward == 0.0 and not lost.info["success"] and not lost.info["truncated"]
    with pytest.raises(RuntimeError, match="reset"):
        env.step("read note")


def test_observations_show_only_the_current_room():
    env = Dungeon(num_rooms=6, num_notes=3, num_keys=2)
    intro = env.reset(seed=5).text
    trail, exit_room, keys = _layout(env)
    # No digits before a note is read: the layout is hidden.
    assert not re.search(r"\d", intro) and intro.endswith(
        f"you are in room {NUMBER_WORDS[trail[0] - 1]} . you see a note and a door .")
    descriptions = {}
    for room in [r for r in range(1, 7) if r != trail[0]]:
        text = env.step(f"go to room {room}").observation
        rooms_named = re.findall(r"room (\w+)", text)
        assert rooms_named == [NUMBER_WORDS[room - 1]], text
        descriptions[room] = text.split(" . ", 1)[1]
    assert descriptions[exit_room] == "you see a door ."  # the exit looks like any decoy's door
    assert all(descriptions[r] == "you see a key , a note and a door ." for r in keys)
    assert not any("key" in t for r, t in descriptions.items() if r not in keys)


def test_deterministic_per_seed_and_varies_across_seeds():
    env = Dungeon()
    assert _play(env, 11, _expert)[0] == _play(env, 11, _expert)[0]
    layouts = set()
    for seed in range(30):
        env.reset(seed=seed)
        trail, exit_room, keys = _layout(env)
        layouts.add((tuple(trail), exit_room, frozenset(keys)))
    assert len(layouts) >= 25


def test_expert_resumes_the_trail_after_a_detour_and_a_skipped_key():
    env = Dungeon(max_turns=20)
    env.reset(seed=8)
    trail, _, keys = _layout(env)
    first_key = next(r for r in trail if r in keys)
    while env._room != first_key:  # noqa: SLF001
        env.step(env.optimal_action())
    named = re.findall(r"\d", env.step("read note").observation)[0]
    env.step(f"go to room {named}")            # move on along the trail without the key
    env.step("go to room 7" if env.num_rooms < 7 else "dance")  # and waste a turn
    actions = []
    while True:
        actions.append(env.optimal_action())
        step = env.step(actions[-1])
        if step.done:
            break
    assert step.info["success"] and f"go to room {first_key}" in actions  # it went back for the key


def test_invalid_actions_explain_and_the_turn_limit_truncates():
    env = Dungeon(num_rooms=4, num_notes=2, num_keys=1, max_turns=6)
    env.reset(seed=1)
    for action in ["dance", "go to room 7", "go to room 0"]:
        step = env.step(action)
        assert step.info["invalid_action"] and not step.done
        assert "go to room with a number from one to four" in step.observation
    for harmless in ["unlock door", "take key"]:
        step = env.step(harmless)
        assert not step.info["invalid_action"] and not step.done
    last = env.step("read note")
    assert last.done and last.info["truncated"] and not last.info["success"]


def test_parser_lenient_reads_numbers_and_keywords_strict_only_phrases():
    assert parse_action("go to room 3") == parse_action("3") == parse_action("room 3 key") == ("go", 3)
    assert parse_action("read note") == parse_action("note") == ("read", None)
    assert parse_action("take key .") == parse_action("key") == ("take", None)
    assert parse_action("unlock door") == parse_action("door please") == ("unlock", None)
    assert parse_action("dance") is None and parse_action(None) is None
    for text, parsed in [("go to room 3", ("go", 3)), (" Take Key . ", ("take", None)),
                         ("unlock door", ("unlock", None)), ("read note", ("read", None))]:
        assert parse_action(text, strict=True) == parsed
    for text in ["3", "key", "go room 3", "read the note", "unlock door now"]:
        assert parse_action(text, strict=True) is None
    env = Dungeon(strict=True)
    env.reset(seed=0)
    assert env.step("note").info["invalid_action"]
    assert not env.step("read note").info["invalid_action"]


def test_vocabulary_covers_every_text_and_stays_small():
    tok = build_tokenizer(vocabulary())
    rng = np.random.default_rng(1)
    texts = []
    sizes_tried = (dict(), dict(num_rooms=9, num_notes=4, num_keys=3), dict(num_rooms=3, num_notes=2, num_keys=1))
    for sizes in sizes_tried:
        env = Dungeon(**sizes)
        for s in range(40):
            texts += _play(env, s, lambda e: str(rng.choice(e.valid_actions() + ["xyzzy"])))[0]
            texts += _play(env, s, _expert)[0]
        texts += env.valid_actions()
    ids = tok(" ".join(texts), add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert len(vocabulary()) < 100
