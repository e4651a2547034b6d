"""A model played through the sampler: behaviour log-probs line up with the batch."""
import jax
import numpy as np
import pytest

from aem_jax import models
from aem_jax.rollout import RolloutConfig, SamplerPolicy, collect
from tests.rollout.helpers import treasure_tokenizer

TOK = treasure_tokenizer()


@pytest.fixture(scope="module")
def model():
    config = models.ModelConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=64,
                                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    return models.init_model(config, seed=0)


@pytest.mark.parametrize("history", ["concatenated", "windowed"])
def test_old_logp_and_entropy_equal_a_forward_pass_at_agent_tokens(model, history):
    config = RolloutConfig(num_tasks=3, group_size=2, max_turns=3, history=history, window=1,
                           max_context_tokens=128, max_action_tokens=6, seq_bucket=64)
    policy = SamplerPolicy.for_rollout(model, TOK, config)
    batch, records, metrics = collect("treasure", policy, TOK, config, key=jax.random.key(1))
    again, _, _ = collect("treasure", policy, TOK, config, key=jax.random.key(1))
    np.testing.assert_array_equal(batch.tokens, again.tokens)
    assert metrics["agent_tokens"] > 0 and metrics["time_generate_s"] > 0
    logits = models.logits(model, batch.tokens, batch.attention_mask)
    logp_all = jax.nn.log_softmax(logits.astype(np.float32), axis=-1)
    # Token t is predicted at position t-1.
    logp = np.take_along_axis(np.asarray(logp_all[:, :-1]), batch.tokens[:, 1:, None], -1)[..., 0]
    ent = -np.sum(np.exp(np.asarray(logp_all[:, :-1])) * np.asarray(logp_all[:, :-1]), -1)
    mask = batch.loss_mask[:, 1:] == 1
    assert batch.loss_mask[:, 0].sum() == 0
    np.testing.assert_allclose(batch.old_logp[:, 1:][mask], logp[mask], atol=2e-4)
    np.testing.assert_allclose(batch.old_entropy[:, 1:][mask], ent[mask], atol=2e-4)
    assert sum(r.turns for r in records) == int(batch.turn_valid.sum())
