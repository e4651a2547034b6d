"""Episodes the rollout cuts short (context or turns): env.finish scores or masks them.

Also: the environment's system prompt reaches the template, and an
environment's step-time bound raises a lower per-step limit.
"""
import time

import jax
import numpy as np
import pytest

from aem_jax.envs.base import Observation, Step
from aem_jax.rollout import ChatFormat, EnvGroup, RolloutConfig, collect
from tests.rollout.helpers import byte_level_tokenizer, scripted

SYSTEM = "You count. Answer with one word."
OBSERVATION = "the counter moved on by one step"
TOK = byte_level_tokenizer([SYSTEM, OBSERVATION, "count from 12345 go", "scored cut short"] * 20)
KEY = jax.random.key(0)


class Counter:
    """Never ends by itself; ``finish`` scores (or masks) what was done."""

    system_prompt = SYSTEM

    def __init__(self, *, mask=False, finish_reward=1.0, sleep=0.0, bound=None,
                 finish_raises=False):
        self.mask, self.finish_reward, self.sleep = mask, finish_reward, sleep
        self.finish_raises = finish_raises
        if bound is not None:
            self.step_time_bound_s = bound
        self.finished, self.turns = [], 0

    def reset(self, *, seed):
        self.turns = 0
        return Observation(f"count from {seed}", {"anchor": "start"})

    def step(self, action):
        time.sleep(self.sleep)
        self.turns += 1
        return Step(OBSERVATION, 0.0, False, {"success": False, "invalid_action": False,
                                              "truncated": False, "anchor": "mid"})

    def finish(self, reason):
        if self.finish_raises:
            raise RuntimeError("evaluation crashed")
        self.finished.append(reason)
        info = {"success": self.finish_reward > 0, "invalid_action": False, "truncated": True,
                "anchor": "end"}
        if self.mask:
            info["exclude_from_loss"] = True
        return Step("scored", self.finish_reward, True, info)


class NoFinish(Counter):
    finish = None


def _config(**overrides):
    fields = dict(num_tasks=2, group_size=2, max_turns=3, max_context_tokens=4000,
                  max_action_tokens=8, seq_bucket=16) | overrides
    return RolloutConfig(**fields)


def _context_for_turns(turns):
    """A max_context_tokens that lets exactly `turns` turns fit (action "go")."""
    chat = ChatFormat(TOK, SYSTEM)
    prompt = len(chat.prompt_ids("count from 0"))
    per_turn = len(chat.action_ids("go")) + len(chat.env_ids(OBSERVATION))
    A = 8
    assert prompt + turns * per_turn + A > prompt + (turns - 1) * per_turn + A + per_turn // 2
    return prompt + (turns - 1) * per_turn + A + per_turn // 2


def _play(group, config, seeds=(0, 0)):
    return collect(group, scripted(lambda ctx: "go", TOK), TOK, config, key=KEY,
                   task_seeds=list(seeds))


@pytest.mark.parametrize("cut", ["context", "turns"])
def test_cut_short_episodes_get_the_reward_of_finish(cut):
    group = EnvGroup(lambda: Counter(finish_reward=1.0))
    config = (_config(max_turns=10, max_context_tokens=_context_for_turns(2)) if cut == "context"
              else _config(max_turns=2))
    batch, records, metrics = _play(group, config)
    reason = "the context is full" if cut == "context" else "no turns left"
    for env, rec in zip(group.take(4), records):
        assert env.finished == [reason] and env.turns == 2
        assert rec.truncated and rec.success and rec.turn_rewards == [0.0, 1.0]
        assert not rec.failed
    assert np.array_equal(batch.turn_rewards[:, :2], np.tile([0.0, 1.0], (4, 1)))
    assert batch.turn_valid[:, :2].all() and (batch.loss_mask.sum(axis=1) > 0).all()
    assert not batch.done.any()  # cut short: truncated, not terminal
    assert metrics["masked"] == 0 and metrics["success_rate"] == 1.0


@pytest.mark.parametrize("history", ["concatenated", "windowed"])
def test_masked_episodes_keep_tokens_but_leave_the_loss(history):
    envs = iter([Counter(mask=True), Counter(), Counter(mask=True), Counter()])
    group = EnvGroup(lambda: next(envs))
    before = group.take(4)
    batch, records, metrics = _play(group, _config(max_turns=2, history=history, window=1))
    assert group.take(4) == before  # masked environments are not discarded as failed
    assert metrics["masked"] == 2 and metrics["failed"] == 0
    for b in range(batch.tokens.shape[0]):
        e = int(batch.episode_ids[b])
        if e < 0:
            continue
        masked = e in (0, 2)
        assert batch.attention_mask[b].sum() > 0
        assert (batch.loss_mask[b].sum() == 0) == masked
        assert (not batch.turn_valid[b].any()) == masked
    assert [r.success for r in records] == [True] * 4  # the evaluation is still reported


def test_environments_without_finish_are_cut_as_before():
    batch, records, _ = _play(EnvGroup(NoFinish), _config(max_turns=2))
    assert all(r.truncated and r.turn_rewards == [0.0, 0.0] and not r.success for r in records)
    assert batch.turn_valid[:, :2].all()


def test_a_finish_that_raises_fails_only_its_episode():
    envs = iter([Counter(finish_raises=True), Counter(), Counter(), Counter(), Counter()])
    group = EnvGroup(lambda: next(envs))
    first = group.take(4)[0]
    batch, records, metrics = _play(group, _config(max_turns=2))
    assert records[0].failed and "evaluation crashed" in records[0].error
    assert not any(r.failed for r in records[1:]) and metrics["failed"] == 1
    assert group.take(4)[0] is not first
    assert batch.loss_mask[0].sum() == 0 and batch.loss_mask[1:].sum(axis=1).min() > 0


def test_the_environment_system_prompt_reaches_the_template():
    batch, records, _ = _play(EnvGroup(Counter), _config(max_turns=1))
    expected = ChatFormat(TOK, SYSTEM).prompt_ids("count from 0")
    assert batch.tokens[0, :len(expected)].tolist() == expected
    assert records[0].transcript[0] == {"role": "system", "content": SYSTEM}
    # The config's system prompt wins.
    batch, records, _ = _play(EnvGroup(Counter), _config(max_turns=1, system_prompt="other"))
    expected = ChatFormat(TOK, "other").prompt_ids("count from 0")
    assert batch.tokens[0, :len(expected)].tolist() == expected
    envs = iter([Counter(), Counter(), Counter(), Counter()])
    envs_list = list(envs)
    envs_list[1].system_prompt = "a different one"
    it = iter(envs_list)
    with pytest.raises(ValueError, match="different system_prompt"):
        _play(EnvGroup(lambda: next(it)), _config(max_turns=1))


def test_a_step_time_bound_raises_the_step_limit():
    slow = _config(max_turns=1, step_timeout_s=0.05, num_tasks=1, group_size=1)
    _, records, metrics = _play(EnvGroup(lambda: Counter(sleep=0.3, bound=5.0)), slow, seeds=[0])
    assert not records[0].failed and metrics["step_timeout_s"] == 5.0
    _, records, metrics = _play(EnvGroup(lambda: Counter(sleep=0.3)), slow, seeds=[0])
    assert records[0].failed and "step_timeout_s=0.05" in records[0].error
    assert metrics["step_timeout_s"] == 0.05
