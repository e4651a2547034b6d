"""TextWorld walkthroughs played through the rollout engine win on three challenge types."""
import jax
import numpy as np
import pytest

from aem_jax import envs
from aem_jax.envs.textworld_env import DEFAULT_SETTINGS, generate_game
from aem_jax.rollout import ChatFormat, RolloutConfig, anchor_id, collect
from tests.rollout.helpers import byte_level_tokenizer, scripted

TOK = byte_level_tokenizer(["open the door", "take the coin", "go east", "You see a key."] * 10)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("twgames"))


@pytest.mark.parametrize("challenge, settings", [
    ("tw-simple", {"rewards": "dense", "goal": "brief"}),
    ("tw-coin_collector", {"level": 1}),
    ("tw-treasure_hunter", {"level": 1}),
])
def test_walkthrough_wins_through_the_engine(challenge, settings, cache):
    chosen = {}

    def walkthrough(ctx):
        chosen[ctx.episode, ctx.turn] = ctx.info["policy_commands"][0]
        return chosen[ctx.episode, ctx.turn]
    config = RolloutConfig(num_tasks=1, group_size=2, max_turns=20, max_context_tokens=16384,
                           max_action_tokens=64, seq_bucket=256)
    # Make the game first: tw-make can take longer than a step's timeout on a busy machine.
    generate_game(challenge, {**DEFAULT_SETTINGS.get(challenge, {}), **settings}, 3, cache)
    batch, records, metrics = collect(
        "textworld", scripted(walkthrough, TOK), TOK, config, key=jax.random.key(0),
        task_seeds=[3], env_kwargs=dict(challenge=challenge, cache_dir=cache,
                                        policy_commands=True, **settings))
    assert metrics["success_rate"] == 1.0 and metrics["failed"] == 0
    assert records[0].transcript == records[1].transcript  # G rollouts share the task
    chat = ChatFormat(TOK)
    for rec in records:
        assert rec.episode_return > 0 and not rec.truncated and rec.invalid_actions == 0
        b = rec.episode
        for t in range(rec.turns):
            ids = batch.tokens[b][batch.turn_ids[b] == t]
            assert chat.decode_action(ids.tolist()) == chosen[b, t]
        assert batch.done[b, rec.turns - 1] and not batch.done[b, :rec.turns - 1].any()
        assert np.isclose(batch.turn_rewards[b].sum(), rec.episode_return)
    # Anchors hash the room + inventory before each turn.
    env = envs.make("textworld", challenge=challenge, cache_dir=cache, **settings)
    anchor = env.reset(seed=3).info["anchor"]
    for t in range(records[0].turns):
        assert batch.anchor_ids[0, t] == anchor_id(anchor)
        anchor = env.step(chosen[0, t]).info["anchor"]
