"""The built-in treasure game: rules, vocabulary, difficulty and the registry."""
import numpy as np
import pytest

from aem_jax import envs
from aem_jax.envs.treasure import TreasureHunt, vocabulary
from aem_jax.models import build_tokenizer


def _play(env, seed, choose):
    obs = env.reset(seed=seed)
    texts, steps = [obs.text], []
    while True:
        step = env.step(choose(env))
        texts.append(step.observation)
        steps.append(step)
        if step.done:
            return texts, steps


def test_registry_makes_the_game_and_lists_names_for_unknown_ones():
    env = envs.make("treasure", num_boxes=4, num_clues=2)
    assert isinstance(env, TreasureHunt) and isinstance(env, envs.Env)
    assert env.num_boxes == 4 and env.max_turns == 5
    with pytest.raises(ValueError, match="registered environments: .*textworld.*treasure"):
        envs.make("no-such-game")


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_boxes=1), "num_boxes=1"), (dict(num_boxes=10), "num_boxes=10"),
    (dict(num_clues=0), "num_clues=0"), (dict(num_clues=2, max_turns=2), "max_turns=2"),
])
def test_bad_settings_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TreasureHunt(**kwargs)


def test_optimal_play_copies_the_revealed_box_and_wins():
    env = TreasureHunt(num_boxes=6, num_clues=2)
    texts, steps = _play(env, 7, lambda e: e.optimal_action())
    assert len(steps) == 3 and steps[-1].info["success"] and steps[-1].reward == 1.0
    assert [s.reward for s in steps[:-1]] == [0.0, 0.0]
    # The box to open at turn k+1 is only named in the observation of turn k.
    first_box = texts[1].split()[-2]
    assert texts[1].startswith("the note says") and env_path(env)[0] == int(first_box)
    assert all(s.info["anchor"] for s in steps)


def env_path(env):
    return env._path  # noqa: SLF001 -- the hidden boxes, to check the revealed text


def test_deterministic_per_seed_and_varies_across_seeds():
    env = TreasureHunt(num_clues=3)
    runs = [_play(env, 11, lambda e: e.optimal_action())[0] for _ in range(2)]
    assert runs[0] == runs[1]
    paths = {tuple(env_path_after_reset(s)) for s in range(20)}
    assert len(paths) > 10


def env_path_after_reset(seed):
    env = TreasureHunt(num_clues=3)
    env.reset(seed=seed)
    return env_path(env)


@pytest.mark.parametrize("num_clues", [1, 2])
def test_random_play_wins_at_most_20_percent_and_optimal_at_least_95(num_clues):
    env = TreasureHunt(num_boxes=6, num_clues=num_clues)
    rng = np.random.default_rng(0)
    random_wins = sum(_play(env, s, lambda e: rng.choice(e.valid_actions()))[1][-1].info["success"]
                      for s in range(1000))
    optimal_wins = sum(_play(env, s, lambda e: e.optimal_action())[1][-1].info["success"]
                       for s in range(200))
    assert random_wins / 1000 <= 0.20
    assert optimal_wins / 200 >= 0.95


def test_wrong_box_loses_and_opened_box_is_harmless():
    env = TreasureHunt(num_boxes=3, num_clues=2)
    env.reset(seed=0)
    env.step("read note")
    first = env.optimal_action()
    assert not env.step(first).done
    again = env.step(first)
    assert again.observation.endswith("is empty now .") and not again.done
    wrong = next(a for a in env.valid_actions()[1:] if a not in (first, env.optimal_action()))
    lost = env.step(wrong)
    assert lost.done and not lost.info["success"] and lost.reward == 0.0
    assert not lost.info["truncated"]


def test_invalid_actions_explain_and_turn_limit_truncates():
    env = TreasureHunt(num_boxes=4, num_clues=1, max_turns=3)
    env.reset(seed=1)
    for action in ["dance", "open box 9"]:
        step = env.step(action)
        assert step.info["invalid_action"] and not step.done
        assert "open box with a number from one to four" in step.observation
    last = env.step("read note")
    assert last.done and last.info["truncated"] and not last.info["success"]
    with pytest.raises(RuntimeError, match="reset"):
        env.step("read note")


def test_vocabulary_covers_every_text_so_word_level_tokens_are_never_unknown():
    tok = build_tokenizer(vocabulary())
    rng = np.random.default_rng(1)
    texts = []
    for clues, spell in ((1, True), (2, False), (3, True), (1, False)):
        env = TreasureHunt(num_boxes=9, num_clues=clues, spell_count=spell)
        for s in range(30):
            texts += _play(env, s, lambda e: rng.choice(e.valid_actions() + ["xyzzy"]))[0]
        texts += env.valid_actions()
    ids = tok(" ".join(texts), add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert len(vocabulary()) < 70


def test_spelled_count_leaves_only_revealed_digits_in_the_history():
    import re
    spelled, digits = TreasureHunt(num_boxes=4), TreasureHunt(num_boxes=4, spell_count=False)
    assert "four boxes" in spelled.reset(seed=3).text and not re.search(r"\d", spelled.reset(seed=3).text)
    assert "boxes 1 to 4" in digits.reset(seed=3).text
    assert "from one to four" in spelled.step("dance").observation


def test_lenient_parser_reads_numbers_and_keywords_strict_one_only_phrases():
    from aem_jax.envs.treasure import parse_action
    assert parse_action("open box 3") == parse_action("3") == parse_action("box 3 please") \
        == ("open", 3)
    assert parse_action("note") == parse_action("read note .") == ("read", None)
    assert parse_action("open the gold") is None and parse_action(None) is None
    assert parse_action("3", strict=True) is None
    assert parse_action("open box 3", strict=True) == ("open", 3)
    env = TreasureHunt(num_boxes=4, strict=True)
    env.reset(seed=0)
    assert env.step("note").info["invalid_action"]
    assert not env.step("read note").info["invalid_action"]
