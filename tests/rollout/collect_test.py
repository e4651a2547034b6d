"""The rollout engine on the treasure game with scripted players."""
import time

import jax
import numpy as np
import pytest

from aem_jax.envs.treasure import TreasureHunt
from aem_jax.rollout import (ChatFormat, EnvGroup, Generation, RolloutConfig, anchor_id,
                             collect)
from tests.rollout.helpers import Faulty, mixed_player, scripted, treasure_tokenizer

TOK = treasure_tokenizer()
CHAT = ChatFormat(TOK)
KEY = jax.random.key(0)


def _recording(act):
    """Wraps a player so the actions it chose are kept per (episode, turn)."""
    chosen = {}

    def wrapped(ctx):
        chosen[ctx.episode, ctx.turn] = act(ctx)
        return chosen[ctx.episode, ctx.turn]
    return wrapped, chosen


def _run(history, *, window=1, act=None, **overrides):
    act, chosen = _recording(act or mixed_player())
    fields = dict(num_tasks=6, group_size=3, max_turns=5, history=history, window=window,
                  max_context_tokens=400, seq_bucket=32) | overrides
    config = RolloutConfig(**fields)
    batch, records, metrics = collect("treasure", scripted(act, TOK), TOK, config, key=KEY,
                                      task_seeds=[10 + n for n in range(config.num_tasks)],
                                      env_kwargs=dict(num_clues=2))
    return batch, records, metrics, chosen


def _turn_rows(batch, windowed):
    """(episode, turn) -> (row, slot) for every valid turn of the batch."""
    out = {}
    for b in range(batch.tokens.shape[0]):
        for k in range(batch.num_turns):
            if batch.turn_valid[b, k]:
                out[int(batch.episode_ids[b]), int(batch.turn_offset[b]) + k] = (b, k)
    return out


@pytest.mark.parametrize("history", ["concatenated", "windowed"])
def test_masked_tokens_of_each_turn_decode_to_exactly_its_action(history):
    batch, records, _, chosen = _run(history)
    rows = _turn_rows(batch, history == "windowed")
    assert set(rows) == set(chosen)
    for (e, t), (b, k) in rows.items():
        sel = (batch.loss_mask[b] == 1) & (batch.turn_ids[b] == k)
        ids = batch.tokens[b][sel]
        assert ids[-1] == CHAT.end_of_turn_id
        assert TOK.decode(ids, skip_special_tokens=True) == chosen[e, t]
        assert np.all(batch.old_logp[b][sel] == 0.0)
    assert np.all((batch.loss_mask == 1) == (batch.turn_ids >= 0))
    assert np.all(batch.attention_mask[batch.loss_mask == 1] == 1)
    assert not batch.ref_logp.any()
    assert sum(r.turns for r in records) == len(rows)


def test_concatenated_rows_are_the_chat_with_only_actions_masked():
    batch, records, _, chosen = _run("concatenated")
    for rec in records:
        b = rec.episode
        users = [m["content"] for m in rec.transcript if m["role"] == "user"]
        expected, mask = list(CHAT.prompt_ids(users[0])), []
        mask += [0] * len(expected)
        for t in range(rec.turns):
            action = CHAT.action_ids(chosen[b, t])
            expected += action
            mask += [1] * len(action)
            if t + 1 < rec.turns:
                env = CHAT.env_ids(users[t + 1])
                expected += env
                mask += [0] * len(env)
        n = len(expected)
        assert batch.tokens[b, :n].tolist() == expected
        assert batch.loss_mask[b, :n].tolist() == mask
        assert not batch.loss_mask[b, n:].any() and not batch.attention_mask[b, n:].any()
        # The pieces are the chat template's own rendering of the conversation.
        chat = [{"role": m["role"], "content": m["content"]} for m in rec.transcript[:-1]]
        rendered = TOK.apply_chat_template(chat, tokenize=False)
        assert TOK(rendered, add_special_tokens=False)["input_ids"] == expected


@pytest.mark.parametrize("window", [0, 1, 2])
def test_windowed_rows_hold_the_task_and_last_h_pairs(window):
    batch, records, _, chosen = _run("windowed", window=window)
    assert batch.num_turns == 1 and np.all(batch.turn_ids[batch.loss_mask == 1] == 0)
    for b in range(batch.tokens.shape[0]):
        e, k = int(batch.episode_ids[b]), int(batch.turn_offset[b])
        users = [m["content"] for m in records[e].transcript if m["role"] == "user"]
        # task, obs_{k-h}, a_{k-h}, ..., a_{k-1}, obs_k as the template renders it.
        chat = [{"role": "user", "content": users[0]}]
        for j in range(max(0, k - window), k):
            if j > 0 and j == k - window:
                chat.append({"role": "user", "content": users[j]})
            chat += [{"role": "assistant", "content": chosen[e, j]},
                     {"role": "user", "content": users[j + 1]}]
        if window == 0 and k > 0:
            chat.append({"role": "user", "content": users[k]})
        rendered = TOK.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        expected = TOK(rendered, add_special_tokens=False)["input_ids"]
        action = CHAT.action_ids(chosen[e, k])
        n = len(expected) + len(action)
        assert batch.tokens[b, :n].tolist() == expected + action
        assert batch.loss_mask[b, :n].tolist() == [0] * len(expected) + [1] * len(action)
        assert not batch.attention_mask[b, n:].any()


def test_history_modes_give_the_same_actions_rewards_anchors_and_dones():
    concat, rec_c, m_c, _ = _run("concatenated")
    windowed, rec_w, m_w, _ = _run("windowed", window=2)
    assert [r.transcript for r in rec_c] == [r.transcript for r in rec_w]
    rows_c, rows_w = _turn_rows(concat, False), _turn_rows(windowed, True)
    assert rows_c.keys() == rows_w.keys()
    for key in rows_c:
        (bc, kc), (bw, kw) = rows_c[key], rows_w[key]
        for field in ("turn_rewards", "anchor_ids", "done"):
            assert getattr(concat, field)[bc, kc] == getattr(windowed, field)[bw, kw], field
        assert concat.group_ids[bc] == windowed.group_ids[bw]
        agent_c = concat.tokens[bc][(concat.turn_ids[bc] == kc)]
        agent_w = windowed.tokens[bw][(windowed.turn_ids[bw] == kw)]
        assert agent_c.tolist() == agent_w.tolist()
    assert m_c["success_rate"] == m_w["success_rate"] and m_c["turns_mean"] == m_w["turns_mean"]


def test_group_ids_and_anchor_ids_match_a_replay_of_each_episode():
    G = 3
    batch, records, _, chosen = _run("concatenated", group_size=G)
    assert batch.group_ids.tolist() == [e // G for e in range(len(records))]
    assert batch.episode_ids.tolist() == list(range(len(records)))
    for rec in records:
        env = TreasureHunt(num_clues=2)
        anchor = env.reset(seed=rec.seed).info["anchor"]
        assert rec.seed == 10 + rec.group
        for t in range(rec.turns):
            assert batch.anchor_ids[rec.episode, t] == anchor_id(anchor)
            action = chosen[rec.episode, t]
            if action:  # the engine rejects empty actions without stepping the game
                anchor = env.step(action).info["anchor"]
    # All rollouts of a task start from the same state; a stable hash, not Python's hash().
    assert len(set(batch.anchor_ids[:G, 0].tolist())) == 1
    assert anchor_id("followed 0 of 2 notes ; knows nothing") == anchor_id(
        "followed 0 of 2 notes ; knows nothing") < 2**31


def test_scripted_optimal_player_succeeds_at_least_95_percent():
    batch, records, metrics, _ = _run("concatenated", act=lambda ctx: ctx.env.optimal_action(),
                                      num_tasks=40, group_size=2)
    assert metrics["success_rate"] >= 0.95 and metrics["failed"] == 0
    for rec in records:
        n = rec.turns
        assert rec.success and n == 3 and rec.turn_rewards == [0.0, 0.0, 1.0]
        assert batch.done[rec.episode].tolist() == [False, False, True, False, False]
        assert batch.turn_valid[rec.episode].tolist() == [True] * 3 + [False] * 2


def test_malformed_output_is_an_invalid_action_with_penalty_never_an_exception():
    outputs = {0: " ".join(["open box"] * 10), 1: "", 2: "read note",
               3: "<a> open box 9 </a>"}

    def act(ctx):
        return outputs[ctx.episode % 4] if ctx.turn == 0 else ctx.env.optimal_action()
    config = RolloutConfig(num_tasks=4, group_size=1, max_turns=2, max_action_tokens=12,
                           max_context_tokens=300, invalid_penalty=0.25,
                           action_pattern=r"<\s*a\s*>(.*)<\s*/\s*a\s*>")
    batch, records, metrics = collect("treasure", scripted(act, TOK), TOK, config, key=KEY)
    over, empty, unparsable, env_invalid = records
    assert "over-long" in over.transcript[2]["content"]
    assert "empty" in empty.transcript[2]["content"]
    assert "no parsable action" in unparsable.transcript[2]["content"]
    assert "i do not understand" in env_invalid.transcript[2]["content"]
    for rec in records:
        assert rec.turn_rewards[0] == -0.25 and rec.invalid_actions >= 1 and not rec.failed
    # The over-long action keeps its 12 generated tokens (no end of turn) and the
    # engine closes the message with a context token.
    row = batch.tokens[0]
    agent = np.flatnonzero(batch.turn_ids[0] == 0)
    assert len(agent) == 12 and CHAT.end_of_turn_id not in row[agent]
    assert row[agent[-1] + 1] == CHAT.end_of_turn_id and batch.loss_mask[0, agent[-1] + 1] == 0
    assert metrics["invalid_action_rate"] > 0
    # The engine's messages are in the vocabulary (`message_words`): no unknown tokens.
    assert TOK.unk_token_id not in batch.tokens


def test_overlong_action_is_played_when_configured():
    # "read note" then a long tail: cut at 4 tokens, the cut text is the action.
    def act(ctx):
        return "read note read note read note read note" if ctx.turn == 0 else ctx.env.optimal_action()
    base = dict(num_tasks=2, group_size=1, max_turns=3, max_action_tokens=4, max_context_tokens=300,
                invalid_penalty=0.25)
    _, invalid, _ = collect("treasure", scripted(act, TOK), TOK, RolloutConfig(**base), key=KEY)
    _, played, _ = collect("treasure", scripted(act, TOK), TOK,
                           RolloutConfig(**base, overlong_actions="play"), key=KEY)
    assert all("over-long" in r.transcript[2]["content"] and r.turn_rewards[0] == -0.25 for r in invalid)
    assert all("over-long" not in r.transcript[2]["content"] and r.turn_rewards[0] == 0.0 for r in played)
    assert all(r.invalid_actions == 0 and r.success for r in played)
    with pytest.raises(ValueError, match="overlong_actions='drop'"):
        RolloutConfig(overlong_actions="drop")


def test_turn_and_context_limits_truncate():
    _, records, metrics, _ = _run("concatenated", act=lambda c: "read note", max_turns=2)
    assert all(r.truncated and not r.success and r.turns == 2 for r in records)
    assert metrics["truncated_frac"] == 1.0
    first_prompt = len(CHAT.prompt_ids(TreasureHunt().reset(seed=0).text))
    batch, records, _, _ = _run("concatenated", act=lambda c: c.env.optimal_action(),
                                max_context_tokens=first_prompt + 8 + 5, max_action_tokens=8)
    assert all(r.truncated and r.turns == 1 for r in records)
    assert not batch.done.any()
    assert batch.tokens.shape[1] >= int(batch.attention_mask.sum(1).max())


class RandomPolicy:
    """Samples among the game's actions with the engine's key (a stand-in for a model)."""

    def generate(self, prompts, *, key, contexts=None):
        out = []
        for i, ctx in enumerate(contexts):
            actions = ctx.env.valid_actions()
            j = int(jax.random.randint(jax.random.fold_in(key, i), (), 0, len(actions)))
            ids = CHAT.action_ids(actions[j])
            out.append(Generation(ids, [-0.5] * len(ids), [1.0] * len(ids)))
        return out


def test_deterministic_given_key_and_task_seeds():
    config = RolloutConfig(num_tasks=4, group_size=4, max_turns=4, max_context_tokens=300)
    runs = [collect("treasure", RandomPolicy(), TOK, config, key=jax.random.key(k),
                    task_seeds=[3, 1, 4, 1]) for k in (5, 5, 6)]
    (a, ra, _), (b, rb, _), (c, rc, _) = runs
    for field in ("tokens", "loss_mask", "turn_rewards", "anchor_ids", "old_logp", "old_entropy"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert [r.transcript for r in ra] == [r.transcript for r in rb]
    assert [r.transcript for r in ra] != [r.transcript for r in rc]
    assert np.all(a.old_logp[a.loss_mask == 1] == -0.5) and not a.old_logp[a.loss_mask == 0].any()
    assert ra[4].seed == ra[12].seed == 1 and ra[4].group == 1 and ra[12].group == 3


def test_raising_and_hanging_environments_end_only_their_own_episodes():
    group = EnvGroup(lambda: Faulty(raise_seed=1, hang_seed=2))
    config = RolloutConfig(num_tasks=4, group_size=2, max_turns=4, max_context_tokens=300,
                           step_timeout_s=1.0, num_threads=4)
    player = scripted(lambda c: c.env.optimal_action(), TOK)
    start = time.monotonic()
    try:
        batch, records, metrics = collect(group, player, TOK, config, key=KEY)
        hung_reset = collect(lambda: Faulty(hang_seed=0, at_turn=0), player, TOK,
                             RolloutConfig(num_tasks=2, group_size=1, max_context_tokens=300,
                                           step_timeout_s=0.5, num_threads=2), key=KEY)
    finally:
        Faulty.release.set()
    assert time.monotonic() - start < 20
    assert metrics["failed"] == 4
    for rec in records:
        if rec.group == 1:
            assert rec.failed and "RuntimeError: environment crashed" in rec.error
        elif rec.group == 2:
            assert rec.failed and "StepTimeout" in rec.error
        else:
            assert rec.success and not rec.failed and rec.error is None
        failed_rows = rec.failed
        assert bool(batch.loss_mask[rec.episode].any()) != failed_rows
        assert bool(batch.turn_valid[rec.episode].any()) != failed_rows
    _, hung_records, hung_metrics = hung_reset
    assert hung_records[0].failed and hung_records[0].turns == 0
    assert hung_records[1].success and hung_metrics["failed"] == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(history="summary"), "history='summary'"),
    (dict(group_size=0), "group_size=0"),
    (dict(max_action_tokens=600, max_context_tokens=512), "max_action_tokens=600"),
    (dict(seq_len=100, max_context_tokens=512), "seq_len=100"),
    (dict(step_timeout_s=0), "step_timeout_s=0"),
])
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RolloutConfig(**kwargs)


def test_task_seed_count_and_unknown_env_are_reported():
    config = RolloutConfig(num_tasks=2, group_size=1, max_context_tokens=300)
    player = scripted(lambda c: "read note", TOK)
    with pytest.raises(ValueError, match="task_seeds has 3 entries; config.num_tasks is 2"):
        collect("treasure", player, TOK, config, key=KEY, task_seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="registered environments"):
        collect("trasure", player, TOK, config, key=KEY)
