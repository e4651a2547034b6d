"""TextWorld adapter: generation cache, observations, info keys, bad input."""
import os

import pytest

from aem_jax import envs
from aem_jax.envs.textworld_env import TextWorldEnv, clean_feedback, generate_game


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("twcache"))


def test_generated_game_is_cached_won_by_its_walkthrough_and_reports_info(cache):
    env = envs.make("textworld", challenge="tw-coin_collector", level=2, cache_dir=cache,
                    admissible_commands=True, policy_commands=True, max_steps=30)
    obs = env.reset(seed=5)
    path = generate_game("tw-coin_collector", {"level": 2}, 5, cache)
    assert os.path.exists(path) and path.startswith(cache)
    mtime = os.path.getmtime(path)
    assert "$$" not in obs.text and "Admissible commands:" in obs.text
    assert obs.info["anchor"].endswith("You are carrying nothing.")
    assert obs.info["admissible_commands"] and obs.info["max_score"] >= 1
    total, step = 0.0, None
    while step is None or not step.done:
        step = env.step((step or obs).info["policy_commands"][0])
        total += step.reward
        assert not step.info["invalid_action"]
    assert step.info["success"] and not step.info["lost"] and not step.info["truncated"]
    assert total == step.info["score"] == step.info["max_score"]
    # Same settings and seed: the cached game is reused, not made again.
    env.reset(seed=5)
    assert os.path.getmtime(path) == mtime
    bad = env.step("dance with the coin")
    assert bad.info["invalid_action"] and bad.reward == 0.0 and not bad.done
    # A game file given by path plays the same game; the step limit truncates.
    fixed = envs.make("textworld", game_file=path, max_steps=1)
    fixed.reset(seed=123)
    step = fixed.step("look")
    assert step.done and step.info["truncated"] and not step.info["success"]


def test_game_pool_replays_a_fixed_set_of_games(cache):
    env = envs.make("textworld", challenge="tw-coin_collector", level=2, cache_dir=cache, game_pool=3)
    assert env._game_path(8) == env._game_path(5) == generate_game("tw-coin_collector", {"level": 2}, 2, cache)
    assert env.reset(seed=8).text == env.reset(seed=2).text


def test_test_split_never_replays_a_training_game(cache):
    """Held-out evaluation passes split="test": its games come from tw-make
    seeds no training seed reaches, with or without a pool."""
    from aem_jax.envs.textworld_env import TEST_GAME_OFFSET
    from aem_jax.trainer import records, rng

    kw = dict(challenge="tw-coin_collector", level=2, cache_dir=cache, game_pool=3)
    train, test = envs.make("textworld", **kw), envs.make("textworld", split="test", **kw)
    seed = rng.eval_seeds(1)[0]
    assert train._game_path(seed) == train._game_path(seed % 3)  # the pool: a training game
    assert test._game_path(seed) == generate_game("tw-coin_collector", {"level": 2},
                                                  TEST_GAME_OFFSET + seed % 3, cache)
    assert records.split_default("textworld") == (True, "train")
    with pytest.raises(ValueError, match=r"seed=2147483648; TextWorld task seeds must be in"):
        train._game_path(TEST_GAME_OFFSET)


def test_numbered_commands_are_listed_and_played_by_number(cache):
    env = envs.make("textworld", challenge="tw-coin_collector", level=2, cache_dir=cache,
                    admissible_commands=True, policy_commands=True, numbered_commands=True)
    obs, step = env.reset(seed=5), None
    while step is None or not step.done:
        info = (step or obs).info
        commands = info["admissible_commands"]
        listed = " ; ".join(f"{i} {c}" for i, c in enumerate(commands, 1))
        text = obs.text if step is None else step.observation
        assert text.endswith(f"Admissible commands: {listed} .")
        step = env.step(f"i pick {commands.index(info['policy_commands'][0]) + 1} please 1")
        assert not step.info["invalid_action"]
    assert step.info["success"]
    assert env.reset(seed=5) and env.step("99").info["invalid_action"]
    with pytest.raises(ValueError, match="needs admissible_commands=True"):
        TextWorldEnv(challenge="tw-simple", numbered_commands=True)


def test_missing_game_file_says_how_to_make_it(tmp_path):
    env = TextWorldEnv(game_file=str(tmp_path / "gone.z8"))
    with pytest.raises(FileNotFoundError, match="tw-make tw-simple .*--output"):
        env.reset(seed=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(challenge="tw-zork"), "challenge='tw-zork'"),
    (dict(game_file="g.z8", level=3), "need challenge"),
    (dict(max_steps=0), "max_steps=0"),
    (dict(game_pool=-1), "game_pool=-1"),
    (dict(split="eval"), "split='eval'; allowed: train, test"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextWorldEnv(**kwargs)


def test_clean_feedback_drops_banner_prompt_and_status():
    raw = ("\n\n  ________  ________\n |        \\|        \\\n  \\$$$$$$$$| $$$$$$$$\n\n"
           "Welcome!\n\n-= Kitchen =-\nA kitchen.\n\n\n\n>     -= Kitchen =-0/1")
    assert clean_feedback(raw) == "Welcome!\n\n-= Kitchen =-\nA kitchen."


def test_sanitize_command_keeps_the_interpreter_safe():
    from aem_jax.envs.textworld_env import MAX_COMMAND_CHARS, sanitize_command

    assert sanitize_command("  go   east \nthen more lines") == "go east"
    assert sanitize_command("take\x00 coin\u00e9\u2603") == "take coin"
    assert len(sanitize_command("x" * 10_000)) == MAX_COMMAND_CHARS
    assert sanitize_command("\n\n") == ""
    assert sanitize_command("\\itch yourself \\") == "itch yourself"


def test_garbage_model_output_is_an_invalid_action_not_a_crash(cache):
    env = envs.make("textworld", challenge="tw-coin_collector", level=2, cache_dir=cache, max_steps=5)
    env.reset(seed=5)
    long_reply = ("go north and " * 400) + "\n" + "\u2603" * 100
    step = env.step(long_reply)  # frotz would overflow its input buffer on the raw text
    assert not step.done
    step = env.step("\n\n")
    assert step.info["invalid_action"] and "did not understand" in step.observation
    # dumb-frotz reads "\\..." as its own meta-command; an unknown one looped forever.
    step = env.step("\\itch yourselfcham")
    assert step.info["invalid_action"] and not step.done
    assert env.step("look").observation
