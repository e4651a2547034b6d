"""ArCHer trainer: turn positions, replay buffer, and a 2-step smoke run that
checks the warm-up, the Polyak target and the replay buffer's checkpoint."""
import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

from aem_jax.batch import TurnBatch
from aem_jax import sharding
from aem_jax.trainer import checkpoint, loop
from aem_jax.trainer.critic import turn_positions
from aem_jax.trainer.replay import ReplayBuffer

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def load_config(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(f"test_config_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def host_copy(tree):
    return [np.array(x, np.float64) for x in jax.tree.leaves(tree)]


def sq_dist(a, b) -> float:
    return sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b))


def test_turn_positions_hand_fixture():
    #            t: 0   1   2  3  4   5  6   7
    turn_ids = np.array([[-1, -1, 0, 0, -1, 1, -1, -1]], np.int32)
    mask = (turn_ids >= 0).astype(np.float32)
    first, last, present = turn_positions(turn_ids, mask, num_turns=3)
    np.testing.assert_array_equal(first, [[2, 5, 8]])
    np.testing.assert_array_equal(last, [[3, 5, -1]])
    np.testing.assert_array_equal(present, [[True, True, False]])


def _rows(start: int, n: int, T: int = 3, K: int = 2) -> TurnBatch:
    tok = np.arange(start, start + n, dtype=np.int32)[:, None] * np.ones((1, T), np.int32)
    bk = np.zeros((n, K), np.float32)
    return TurnBatch(tokens=tok, loss_mask=np.ones((n, T), np.float32), turn_ids=np.zeros((n, T), np.int32),
                     old_logp=tok * 0.0, ref_logp=tok * 0.0, old_entropy=tok * 0.0, turn_rewards=bk,
                     turn_valid=bk > -1, anchor_ids=bk.astype(np.int32), group_ids=np.zeros(n, np.int32),
                     episode_ids=np.arange(n, dtype=np.int32), turn_offset=np.zeros(n, np.int32),
                     attention_mask=np.ones((n, T), np.int32), done=bk > 0)


def test_replay_buffer_is_fifo_and_round_trips_its_state():
    buf = ReplayBuffer(5)
    buf.add(_rows(0, 3))
    buf.add(_rows(3, 4))  # 7 episodes into 5 slots: 0 and 1 are dropped
    assert buf.size == 5 and buf.cursor == 2
    assert buf.arrays["tokens"][:, 0].tolist() == [5, 6, 2, 3, 4]
    assert buf.state_dict()["arrays"]["tokens"][:, 0].tolist() == [2, 3, 4, 5, 6]  # oldest first
    again = ReplayBuffer(5)
    again.load_state_dict(buf.state_dict())
    for k, v in buf.state_dict()["arrays"].items():
        np.testing.assert_array_equal(again.state_dict()["arrays"][k], v)
    again.add(_rows(7, 1))  # the next write replaces the oldest episode (2)
    assert again.state_dict()["arrays"]["tokens"][:, 0].tolist() == [3, 4, 5, 6, 7]
    bigger = ReplayBuffer(7)  # a larger capacity on resume keeps FIFO order
    bigger.load_state_dict(buf.state_dict())
    bigger.add(_rows(7, 3))
    assert bigger.state_dict()["arrays"]["tokens"][:, 0].tolist() == [3, 4, 5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="buffer_episodes"):
        ReplayBuffer(2).load_state_dict(buf.state_dict())
    with pytest.raises(ValueError, match="row shape"):
        buf.add(_rows(0, 1, T=4))


def test_replay_buffer_pads_rows_of_any_t_bucket_to_its_seq_len():
    buf = ReplayBuffer(4, seq_len=5)
    buf.add(_rows(0, 2, T=3))
    buf.add(_rows(2, 1, T=5))
    rows = buf.state_dict()["arrays"]
    assert rows["tokens"].shape == (3, 5)
    np.testing.assert_array_equal(rows["attention_mask"][0], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(rows["turn_ids"][0], [0, 0, 0, -1, -1])
    np.testing.assert_array_equal(rows["loss_mask"][0], [1, 1, 1, 0, 0])
    with pytest.raises(ValueError, match="seq_len=5"):
        buf.add(_rows(0, 1, T=6))


def _start(config):
    algorithm = loop.check_config(config)
    ctx = loop.build_context(config, sharding.make_mesh(dict(config.mesh)))
    return algorithm, ctx


def test_archer_smoke_warmup_polyak_entropy_and_checkpointed_replay(tmp_path):
    config = load_config("archer", "smoke")
    config.eval.num_tasks = 0  # no held-out evaluation (saves a sampler compile)
    config.rollout.invalid_penalty = 0.5  # untrained actions are invalid: non-zero rewards for the critic
    config.rollout.seq_bucket = 16        # batches of several T buckets share the replay buffer
    config.archer.actor_steps = 2         # the first optimiser step has learning rate 0 (warm-up from 0)
    config.archer.buffer_episodes = 10    # three batches of 4 episodes wrap around
    algorithm, ctx = _start(config)
    with sharding.use_mesh(ctx.mesh):
        state = algorithm.init(ctx)
        policy0 = host_copy(state.policy.params)
        critic0, target0 = host_copy(state.critic.params), host_copy(state.target)
        assert sq_dist(critic0, target0) == 0.0

        state, warm, _ = loop.train_step(ctx, algorithm, state, 0)  # actor warm-up: only the critic learns
        assert warm["actor_updated"] == 0.0 and int(state.policy.step) == 0
        assert sq_dist(host_copy(state.policy.params), policy0) == 0.0
        critic1, target1 = host_copy(state.critic.params), host_copy(state.target)
        assert int(state.critic.step) == config.archer.critic_steps
        assert sq_dist(critic1, critic0) > 0.0
        # Polyak: the target moved towards the online critic without reaching it.
        assert 0.0 < sq_dist(target1, critic1) < sq_dist(target0, critic1)
        assert np.isfinite([warm["q_loss"], warm["v_loss"]]).all() and warm["q_loss"] > 0.0
        assert warm["buffer_size"] == 4.0

        state, act, _ = loop.train_step(ctx, algorithm, state, 1)
        assert act["actor_updated"] == 1.0 and int(state.policy.step) == config.archer.actor_steps
        assert sq_dist(host_copy(state.policy.params), policy0) > 0.0
        assert np.isfinite([act["actor_loss"], act["advantage_abs_mean"], act["alpha_mean"]]).all()
        # loss.entropy_coef is honoured: the bonus is -coef * mean token entropy
        assert act["entropy_bonus"] < 0.0
        np.testing.assert_allclose(act["entropy_bonus"], -config.loss.entropy_coef * act["token_entropy_new"],
                                   rtol=0.3)
        # the default actor is the clipped surrogate (archer.actor_clip): its diagnostics are reported;
        # the first step on a batch has ratio 1, the second one sees the first's change
        assert config.archer.actor_clip > 0.0
        assert np.isfinite([act["actor_clip_frac"], act["actor_approx_kl"], act["actor_ratio_mean"]]).all()
        assert act["actor_approx_kl"] >= 0.0 and 0.0 <= act["actor_clip_frac"] <= 1.0

    # The run itself: steps 0..2, checkpointed each step.
    config.total_steps = 3
    loop.train(config, str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert np.isfinite([r["q_loss"], r["v_loss"], r["q_mean"], r["v_mean"], r["success"]]).all()
        assert r["nonfinite_in_a_row"] == 0
    assert records[-1]["buffer_size"] == 10.0  # 5 batches of 4 into 10 slots

    # The replay buffer, critic and target come back from the last checkpoint.
    algorithm, ctx = _start(config)
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
    with sharding.use_mesh(ctx.mesh):
        fresh = algorithm.init(ctx)
        target_init = host_copy(fresh.target)
        step, _, restored = loop.restore(ctx, algorithm, fresh, ckpt, tmp_path)
    ckpt.close()
    assert step == 3 and restored.buffer.size == 10
    assert sq_dist(host_copy(restored.target), target_init) > 0.0


@pytest.mark.parametrize("clip, allowed", [(-0.1, r"must be in \[0, 1\)"), (1.0, r"must be in \[0, 1\)"),
                                           (float("nan"), "must be a finite number")])
def test_archer_actor_clip_out_of_range_is_named(clip, allowed):
    config = load_config("archer", "smoke")
    config.archer.actor_clip = clip
    with pytest.raises(ValueError, match=r"config\.archer\.actor_clip=.* is not allowed; " + allowed):
        loop.check_config(config)


def test_centered_actor_advantages_are_the_raw_ones_minus_their_batch_mean():
    """archer.center_advantages: A - mean(A) over the batch's valid utterances (AEM off, so the
    advantages pass through compute_advantages unscaled)."""
    from aem_jax.trainer import archer, rollouts
    from aem_jax.trainer.advantages import AdvantageSettings
    from aem_jax.trainer.critic import critic_values

    config = load_config("archer", "smoke")
    config.eval.num_tasks = 0
    config.aem.enabled = False
    algorithm, ctx = _start(config)
    with sharding.use_mesh(ctx.mesh):
        state = algorithm.init(ctx)
        batch = rollouts.collect_step(ctx, algorithm, algorithm.policy_params(state), 0)[0]
        dev = sharding.put_batch(batch, ctx.mesh)
        kw = dict(graphdef=state.critic_graphdef, settings=AdvantageSettings.from_config(config, estimator="none"))
        key = jax.random.key(0)
        # the critic's output layers start at zero (A = 0): perturb every parameter to get an offset
        leaves, tree = jax.tree.flatten(state.critic.params)
        noise = jax.random.split(jax.random.key(1), len(leaves))
        params = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
                                           for x, k in zip(leaves, noise)])
        raw, info = archer.actor_advantages(params, dev, key, **kw)
        cen, info_c = archer.actor_advantages(params, dev, key, center=True, **kw)
        K = batch.turn_rewards.shape[1]
        valid = np.asarray(critic_values(state.critic_graphdef, params, {
            k: getattr(dev, k) for k in ("tokens", "attention_mask", "loss_mask", "turn_ids", "turn_valid")},
            num_turns=K)["valid"])
    raw, cen = np.asarray(raw, np.float64), np.asarray(cen, np.float64)
    assert valid.sum() >= 2
    mean = raw[valid].mean()
    assert abs(mean) > 1e-6  # the random critic has an offset to remove
    np.testing.assert_allclose(cen[valid], raw[valid] - mean, atol=1e-5)
    assert (cen[~valid] == 0).all() and abs(cen[valid].mean()) < 1e-5
    np.testing.assert_allclose(info_c["archer_advantage_mean"], mean, atol=1e-5)  # logged before centering
