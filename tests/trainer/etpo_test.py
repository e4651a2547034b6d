"""ETPO trainer: config checks and a 2-step smoke run that checks the Polyak
target Q, the frozen reference, the entropy bonus, AEM's weights and the Q
networks' checkpoint."""
import json

import numpy as np
import pytest

from aem_jax import sharding
from aem_jax.trainer import checkpoint, loop
from aem_jax.trainer.etpo import alpha_weights
from aem_jax.trainer.advantages import AdvantageSettings
from tests.trainer.archer_test import _rows, host_copy, load_config, sq_dist


@pytest.mark.parametrize("key, value, message", [
    ("rollout.history", "windowed", "config.rollout.history='windowed'"),
    ("etpo.beta", 0.0, "config.etpo.beta=0.0"),
    ("loss.agg", "seq-mean-token-mean", "config.loss.agg='seq-mean-token-mean'"),
    ("etpo.q.residual", True, "config.etpo.q.residual=True.*from_policy=True"),
])
def test_bad_config_names_the_key(key, value, message):
    config = load_config("etpo", "smoke")
    config.aem.enabled = True
    *sections, field = key.split(".")
    block = config
    for name in sections:
        block = block[name]
    block[field] = value
    with pytest.raises(ValueError, match=message):
        loop.check_config(config)


def test_alpha_weights_are_one_without_aem_and_alpha_per_response_with_it():
    batch = _rows(0, 4, T=3, K=1)
    batch = batch.replace(group_ids=np.zeros(4, np.int32),
                          old_entropy=np.array([[0.1] * 3, [0.5] * 3, [1.0] * 3, [2.0] * 3], np.float32),
                          turn_valid=np.ones((4, 1), bool))
    base = dict(estimator="none", num_groups=1, num_episodes=4, max_turns=1)
    off, _ = alpha_weights(batch, None, settings=AdvantageSettings(**base))
    np.testing.assert_array_equal(off, np.ones((4, 3)))
    on, info = alpha_weights(batch, None, settings=AdvantageSettings(**base, aem_enabled=True, aem_lam=1.0))
    on = np.asarray(on)
    assert np.allclose(on, on[:, :1])              # one weight per response
    assert on[0, 0] > on[1, 0] > on[2, 0] > on[3, 0]  # lower entropy, larger alpha
    np.testing.assert_allclose(on[:, 0].mean(), 1.0, rtol=1e-5)  # alpha averages 1 in the group
    assert float(info["alpha_std"]) > 0


def test_etpo_smoke_polyak_reference_and_checkpoint(tmp_path):
    config = load_config("etpo", "smoke")
    config.eval.num_tasks = 0  # no held-out evaluation (saves a sampler compile)
    config.rollout.invalid_penalty = 0.5  # untrained actions are invalid: non-zero rewards
    config.learner.minibatch_size = 4     # the whole batch: one Q step and one Polyak step per iteration
    config.etpo.tau = 0.1                 # a target move well above float32 rounding
    config.loss.entropy_coef = 0.01       # configs/etpo.py has none; checked below that a bonus is honoured
    algorithm = loop.check_config(config)
    ctx = loop.build_context(config, sharding.make_mesh(dict(config.mesh)))
    tau = config.etpo.tau
    with sharding.use_mesh(ctx.mesh):
        state = algorithm.init(ctx)
        policy0, reference0 = host_copy(state.policy.params), host_copy(state.reference)
        q0, target0 = host_copy(state.q.state.params), host_copy(state.q.target)
        assert sq_dist(q0, target0) == 0.0 and sq_dist(policy0, reference0) == 0.0

        state, first, _ = loop.train_step(ctx, algorithm, state, 0)
        q1, target1 = host_copy(state.q.state.params), host_copy(state.q.target)
        assert int(state.q.state.step) == 1 and sq_dist(q1, q0) > 0.0
        # One Polyak step after the Q step: target = (1 - tau) target0 + tau q1 exactly.
        for t1, t0, q in zip(target1, target0, q1):
            np.testing.assert_allclose(t1, (1 - tau) * t0 + tau * q, atol=1e-6)
        assert 0.0 < sq_dist(target1, q1) < sq_dist(target0, q1)
        assert np.isfinite([first["q_loss"], first["policy_loss"], first["td_abs"]]).all()
        assert first["q_loss"] > 0.0
        # loss.entropy_coef is honoured
        assert first["entropy_bonus"] < 0.0

        state, second, _ = loop.train_step(ctx, algorithm, state, 1)
        assert sq_dist(host_copy(state.policy.params), policy0) > 0.0
        assert sq_dist(host_copy(state.reference), reference0) == 0.0  # frozen
        assert second["kl_ref"] > 0.0  # the policy has left the reference

    config.total_steps = 3
    loop.train(config, str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert np.isfinite([r["q_loss"], r["policy_loss"], r["q_mean"], r["kl_ref"]]).all()
        assert r["nonfinite_in_a_row"] == 0

    ctx = loop.build_context(config, sharding.make_mesh(dict(config.mesh)))
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
    with sharding.use_mesh(ctx.mesh):
        fresh = algorithm.init(ctx)
        q_init = host_copy(fresh.q.state.params)
        step, _, restored = loop.restore(ctx, algorithm, fresh, ckpt, tmp_path)
    ckpt.close()
    assert step == 3 and int(restored.q.state.step) == 3
    assert sq_dist(host_copy(restored.q.state.params), q_init) > 0.0


def test_residual_q_starts_at_zero_and_leaves_the_first_policy_step_at_the_reference():
    config = load_config("etpo", "smoke")
    config.eval.num_tasks = 0
    config.rollout.invalid_penalty = 0.5
    config.learner.minibatch_size = 4     # one Q step and one policy step per iteration
    config.loss.entropy_coef = 0.0        # the policy's only gradient: KL to rho and Q
    config.etpo.q.from_policy = True
    config.etpo.q.residual = True
    algorithm = loop.check_config(config)
    ctx = loop.build_context(config, sharding.make_mesh(dict(config.mesh)))
    with sharding.use_mesh(ctx.mesh):
        state = algorithm.init(ctx)
        policy0 = host_copy(state.policy.params)
        state, first, _ = loop.train_step(ctx, algorithm, state, 0)
    # Q = f_theta - f_ref with theta = ref at the start: its first values are exactly 0 ...
    assert first["q_mean"] == 0.0
    assert first["q_loss"] > 0.0 and first["target_mean"] != 0.0
    # ... and the policy step after one Q step moves the policy (Q is no longer 0), by a finite amount
    assert np.isfinite(first["policy_loss"]) and sq_dist(host_copy(state.policy.params), policy0) > 0.0


def test_q_steps_equal_repeated_single_q_steps_from_the_same_policy():
    """``etpo.q_steps=2`` on a minibatch is two single Q steps (each with its Polyak step) that read the
    same policy, followed by the policy step on the second Q network."""
    import functools

    import jax
    from aem_jax.trainer.etpo import EtpoBatch, etpo_update_step
    from aem_jax.trainer.update import copy_tree

    config = load_config("etpo", "smoke")
    config.eval.num_tasks = 0
    config.etpo.tau = 0.3
    config.etpo.q.from_policy = True
    config.etpo.q.residual = True
    # Adam's eps well above float32 rounding of the gradients: with 1e-8 an element whose gradient is
    # rounding noise (the two paths fuse differently) takes a full signed step of either sign.
    config.optim.eps = 1e-4
    algorithm = loop.check_config(config)
    ctx = loop.build_context(config, sharding.make_mesh(dict(config.mesh)))
    V = ctx.model_config.vocab_size
    rng = np.random.default_rng(0)
    batch = _rows(0, 4, T=6, K=2)
    batch = batch.replace(tokens=rng.integers(1, V, (4, 6)).astype(np.int32),
                          turn_ids=np.array([[-1, 0, 0, -1, 1, 1]] * 4, np.int32),
                          loss_mask=np.array([[0, 1, 1, 0, 1, 1]] * 4, np.float32),
                          turn_rewards=np.array([[0, 1], [0, 0], [0, 1], [0, 0]], np.float32),
                          turn_valid=np.ones((4, 2), bool), done=np.array([[0, 1]] * 4, bool))
    mb = EtpoBatch(batch=jax.tree.map(jax.numpy.asarray, batch), weights=jax.numpy.ones((4, 6)))
    with sharding.use_mesh(ctx.mesh):
        state = algorithm.init(ctx)
        step = functools.partial(
            etpo_update_step, policy_graphdef=ctx.graphdef, q_graphdef=ctx.graphdef,
            policy_optimizer=ctx.optimizer, q_optimizer=__import__(
                "aem_jax.trainer.targets", fromlist=["side_optimizer"]).side_optimizer(
                    config, config.etpo.q_learning_rate),
            beta=0.1, gamma=0.9, tau=0.3, delta=10.0, agg="token-mean", entropy_coef=0.0, residual=True)
        _, q1, _ = step(copy_tree(state.policy), copy_tree(state.q), state.reference, mb, q_steps=1)
        policy_a, q2, m_a = step(copy_tree(state.policy), q1, state.reference, mb, q_steps=1)
        policy_b, q_b, m_b = step(copy_tree(state.policy), copy_tree(state.q), state.reference, mb, q_steps=2)
    assert int(q_b.state.step) == 2
    for a, b in zip(host_copy((q2.state.params, q2.target)), host_copy((q_b.state.params, q_b.target))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(host_copy(policy_a.params), host_copy(policy_b.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m_a["q_loss"], m_b["q_loss"], rtol=1e-5)
    assert sq_dist(host_copy(q1.state.params), host_copy(q_b.state.params)) > 0.0  # the second step moved Q


def test_q_steps_must_be_a_positive_integer():
    config = load_config("etpo", "smoke")
    config.etpo.q_steps = 0
    with pytest.raises(ValueError, match="config.etpo.q_steps=0"):
        loop.check_config(config)


def test_policy_warmup_trains_only_q_then_both():
    config = load_config("etpo", "smoke")
    config.eval.num_tasks = 0
    config.rollout.invalid_penalty = 0.5
    config.learner.minibatch_size = 4
    config.etpo.policy_warmup = 1
    config.etpo.q_steps = 2
    algorithm = loop.check_config(config)
    ctx = loop.build_context(config, sharding.make_mesh(dict(config.mesh)))
    with sharding.use_mesh(ctx.mesh):
        state = algorithm.init(ctx)
        policy0, q0 = host_copy(state.policy.params), host_copy(state.q.state.params)
        state, first, _ = loop.train_step(ctx, algorithm, state, 0)
        # warm-up iteration: Q moved (two steps), the policy and its optimiser did not
        assert first["policy_updated"] == 0.0 and "policy_loss" not in first
        assert int(state.q.state.step) == 2 and sq_dist(host_copy(state.q.state.params), q0) > 0.0
        assert int(state.policy.step) == 0 and sq_dist(host_copy(state.policy.params), policy0) == 0.0
        state, second, _ = loop.train_step(ctx, algorithm, state, 1)
        assert second["policy_updated"] == 1.0 and np.isfinite(second["policy_loss"])
        assert int(state.q.state.step) == 4 and int(state.policy.step) == 1
        assert sq_dist(host_copy(state.policy.params), policy0) > 0.0


def test_policy_warmup_must_be_a_non_negative_integer():
    config = load_config("etpo", "smoke")
    config.etpo.policy_warmup = -1
    with pytest.raises(ValueError, match="config.etpo.policy_warmup=-1"):
        loop.check_config(config)
