"""The continuous engine: KV caches kept across turns, exact log-probs, order-free episodes."""
import threading

import jax
import numpy as np
import pytest

from aem_jax import models
from aem_jax.envs.base import Observation, Step
from aem_jax.envs.treasure import vocabulary
from aem_jax.models import sampler
from aem_jax.rollout import ChatFormat, RolloutConfig, SamplerPolicy, collect
from aem_jax.trainer.rollouts import EpisodeKeys
from tests.rollout.helpers import treasure_tokenizer

TOK = treasure_tokenizer()
CHAT = ChatFormat(TOK)
WORDS = [w for w in vocabulary() if w.isalpha()]


class Chatter:
    """Observations of 3-12 vocabulary words fixed by (seed, turn); never ends by itself.

    ``crash_seed`` raises at its second step; ``slow_seed`` blocks its first
    step until another episode reaches its third step (``gate``), or 20 s.
    """

    def __init__(self, crash_seed=None, slow_seed=None, gate=None):
        self.crash_seed, self.slow_seed, self.gate = crash_seed, slow_seed, gate
        self.seed, self.turn = 0, 0

    def _text(self):
        rng = np.random.default_rng([self.seed, self.turn])
        return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 13))))

    def reset(self, *, seed):
        self.seed, self.turn = seed, 0
        return Observation(self._text(), {"anchor": str(seed)})

    def step(self, action):
        self.turn += 1
        if self.seed == self.crash_seed and self.turn == 2:
            raise RuntimeError("environment crashed")
        if self.gate is not None:
            if self.seed == self.slow_seed and self.turn == 1:
                self.gate["released_by_peer"] = self.gate["event"].wait(20)
            elif self.seed != self.slow_seed and self.turn == 3:
                self.gate["event"].set()
        return Step(self._text(), float(len(action) % 3), False, {"anchor": f"{self.seed}:{self.turn}"})


@pytest.fixture(scope="module")
def model():
    config = models.ModelConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=64,
                                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    return models.init_model(config, seed=0)


def _config(**kw):
    fields = dict(num_tasks=3, group_size=2, max_turns=4, max_context_tokens=192,
                  max_action_tokens=5, overlong_actions="play", seq_bucket=32,
                  engine="continuous") | kw
    return RolloutConfig(**fields)


def _play(model, config, *, key=1, env=None, first_episode=0):
    policy = EpisodeKeys(SamplerPolicy.for_rollout(model, TOK, config), first_episode=first_episode)
    return collect(env or (lambda: Chatter(crash_seed=11)), policy, TOK, config,
                   key=jax.random.key(key), task_seeds=[10 + n for n in range(config.num_tasks)])


def _action_ends(batch):
    """The last token of every action in the batch."""
    ends = []
    for row, turns, agent in zip(batch.tokens, batch.turn_ids, batch.loss_mask == 1):
        for k in np.unique(turns[agent]):
            ends.append(int(row[agent & (turns == k)][-1]))
    return ends


def _teacher_forced(model, batch):
    """Per-token log-prob and entropy of every row under one forward pass, numpy float64."""
    logits = np.asarray(models.logits(model, batch.tokens, batch.attention_mask), np.float64)
    logits = logits - logits.max(-1, keepdims=True)
    logp_all = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    logp = np.take_along_axis(logp_all[:, :-1], batch.tokens[:, 1:, None], -1)[..., 0]
    ent = -np.sum(np.exp(logp_all[:, :-1]) * logp_all[:, :-1], -1)
    return logp, ent


@pytest.mark.parametrize("history", ["concatenated", "windowed"])
def test_recorded_logprobs_and_entropies_equal_a_teacher_forced_pass(model, history):
    config = _config(history=history, window=1)
    batch, records, _ = _play(model, config)
    logp, ent = _teacher_forced(model, batch)
    mask = batch.loss_mask[:, 1:] == 1
    assert mask.sum() > 40
    np.testing.assert_allclose(batch.old_logp[:, 1:][mask], logp[mask], atol=1e-5, rtol=0)
    np.testing.assert_allclose(batch.old_entropy[:, 1:][mask], ent[mask], atol=1e-5, rtol=0)
    # The cases the check must have covered: actions ended by the end-of-turn token and
    # actions cut at the limit, and a failed environment.
    ends = _action_ends(batch)
    assert CHAT.end_of_turn_id in ends and any(e != CHAT.end_of_turn_id for e in ends)
    assert any(r.failed and "crashed" in r.error for r in records)
    # A failed episode keeps its tokens and carries no loss (as in the simple engine).
    failed_rows = [b for b in range(batch.tokens.shape[0])
                   if batch.episode_ids[b] >= 0 and records[batch.episode_ids[b]].failed]
    assert failed_rows and batch.loss_mask[failed_rows].sum() == 0


def test_both_engines_play_the_same_episodes_with_per_episode_keys(model):
    cont, rec_c, _ = _play(model, _config())
    simple, rec_s, _ = _play(model, _config(engine="simple"))
    np.testing.assert_array_equal(cont.tokens, simple.tokens)
    np.testing.assert_array_equal(cont.loss_mask, simple.loss_mask)
    np.testing.assert_allclose(cont.old_logp, simple.old_logp, atol=1e-5)
    np.testing.assert_allclose(cont.old_entropy, simple.old_entropy, atol=1e-5)
    np.testing.assert_array_equal(cont.turn_rewards, simple.turn_rewards)
    assert [r.to_dict() for r in rec_c] == [r.to_dict() for r in rec_s]


def test_episodes_do_not_depend_on_slot_count_or_admission_order(model):
    config = _config(history="windowed", window=2)
    ref, _, _ = _play(model, config)
    for slots in (1, 4):
        other, _, _ = _play(model, _config(history="windowed", window=2,
                                           num_slots=slots))
        np.testing.assert_array_equal(other.tokens, ref.tokens)
        np.testing.assert_allclose(other.old_logp, ref.old_logp, atol=1e-5)
    # Shifting the episode numbering changes every key: different episodes.
    shifted, _, _ = _play(model, config, first_episode=1)
    assert not np.array_equal(shifted.tokens, ref.tokens)


def test_a_slow_environment_delays_only_its_own_episode(model):
    gate = {"event": threading.Event(), "released_by_peer": None}
    config = _config(num_tasks=4, group_size=1, max_turns=4)
    batch, records, _ = _play(model, config, env=lambda: Chatter(slow_seed=10, gate=gate))
    # The slow episode's first step was released by another episode's third step: the
    # others went on while it waited (in lockstep they could not have).
    assert gate["released_by_peer"] is True
    assert not any(r.failed for r in records)
    assert all(r.turns == 4 for r in records)


def test_hung_environment_fails_only_its_episode(model):
    gate = {"event": threading.Event(), "released_by_peer": None}

    class Hung(Chatter):
        def step(self, action):
            if self.seed == 12:
                gate["event"].wait(10)
            return super().step(action)

    config = _config(num_tasks=3, group_size=1, step_timeout_s=1.0)
    try:
        batch, records, _ = _play(model, config, env=Hung)
    finally:
        gate["event"].set()
    assert [r.failed for r in records] == [False, False, True]
    assert "StepTimeout" in records[2].error
    assert [r.turns for r in records[:2]] == [4, 4]


def test_slot_prefill_in_chunks_gives_the_logits_of_a_full_forward_pass(model):
    params = sampler.SamplingParams(max_new_tokens=4)
    slots = sampler.SlotSampler(model, params, 0, num_slots=3, max_len=96, chunk=16)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, len(TOK), n).tolist() for n in (5, 40, 23)]
    slots.prefill({0: (seqs[0], True), 1: (seqs[1][:7], True)})
    slots.prefill({1: (seqs[1][7:], False), 2: (seqs[2], True)})  # 33 more: three chunks
    got = np.asarray(slots.slots.logits_BV)
    assert np.asarray(slots.slots.length_B).tolist() == [5, 40, 23]
    for b, seq in enumerate(seqs):
        want = np.asarray(models.logits(model, np.asarray([seq]), np.ones((1, len(seq)))))[0, -1]
        np.testing.assert_allclose(got[b], want, atol=1e-5)
    # A reset slot forgets what it held.
    slots.prefill({1: (seqs[0], True)})
    np.testing.assert_allclose(np.asarray(slots.slots.logits_BV)[1], got[0], atol=1e-5)


def test_engine_must_be_known():
    with pytest.raises(ValueError, match="engine='fast'.*continuous"):
        RolloutConfig(engine="fast")
    with pytest.raises(ValueError, match="num_slots=0"):
        RolloutConfig(num_slots=0)


@pytest.mark.slow  # ~70 s under load 20 on 2 cores (several widths to compile)
def test_slot_decode_across_attention_widths_equals_a_full_forward_pass(model):
    """Rows of different lengths decoded in calls whose attention width grows (64, 96, 128)."""
    assert [sampler.decode_width(n, 10_000) for n in (1, 65, 97, 129, 300)] == [64, 96, 128, 192, 384]
    assert sampler.decode_width(300, 200) == 200
    params = sampler.SamplingParams(max_new_tokens=64)
    slots = sampler.SlotSampler(model, params, 0, num_slots=3, max_len=160, chunk=16, decode_steps=8)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, len(TOK), n).tolist() for n in (5, 58, 90)]
    slots.prefill({b: (seq, True) for b, seq in enumerate(seqs)})
    keys = jax.random.split(jax.random.key(3), 3)
    active, steps = np.array([True, True, True]), np.zeros(3, np.int32)
    logp = [[] for _ in seqs]
    for call in range(5):  # row 2 reaches column 130: widths 128 then 192
        if call == 2:
            active[0] = False  # a row that sits out a call keeps its cache and logits
        out = slots.decode(active, steps, keys, exit_after=4)
        for b in range(3):
            n = int(out.count[b])
            seqs[b] += out.tokens[b, :n].tolist()
            logp[b] += out.logprobs[b, :n].tolist()
        steps += out.count
        active = out.active.copy()
        active[0] = True
    assert np.asarray(slots.slots.length_B).tolist() == [len(s) for s in seqs] == [5 + 32, 98, 130]
    for b, seq in enumerate(seqs):
        full = np.asarray(models.logits(model, np.asarray([seq]), np.ones((1, len(seq)))), np.float64)[0]
        full = full - full.max(-1, keepdims=True)
        full = full - np.log(np.exp(full).sum(-1, keepdims=True))
        n = len(logp[b])
        want = full[len(seq) - n - 1:-1][np.arange(n), seq[len(seq) - n:]]
        np.testing.assert_allclose(logp[b], want, atol=1e-5, rtol=0)
    # Decoding past the columns the slots were allocated with is refused, not clamped.
    with pytest.raises(ValueError, match="cache columns"):
        for _ in range(10):
            slots.decode(np.array([False, False, True]), np.zeros(3, np.int32), keys)
