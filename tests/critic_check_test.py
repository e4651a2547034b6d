"""Tests for experiments/critic_check.py: Monte-Carlo returns and the critic statistics."""
import importlib.util
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("experiments_critic_check", REPO / "experiments" / "critic_check.py")
cc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cc)


def _loop_returns(r, valid, gamma):
    """G by a double loop over (row, turn): sum of discounted later valid rewards."""
    B, K = r.shape
    G = np.zeros((B, K))
    for b in range(B):
        for j in range(K):
            if valid[b, j]:
                G[b, j] = sum(gamma ** (i - j) * r[b, i] for i in range(j, K) if valid[b, i])
    return G


def test_returns_to_go_matches_loop_on_random_episodes():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(6, 9))
    lengths = rng.integers(0, 10, size=6)
    valid = np.arange(9)[None, :] < lengths[:, None]
    # float32 inside (objectives.discounted_returns), against a float64 loop
    np.testing.assert_allclose(cc.returns_to_go(r, valid, 0.9), _loop_returns(r, valid, 0.9), rtol=1e-5, atol=1e-5)


def test_group_baseline_subtracts_the_groups_mean_per_turn_over_valid_episodes():
    G = np.array([[1.0, 0.5], [0.0, 0.0], [0.2, 0.0], [0.4, 9.0]])
    valid = np.array([[1, 1], [1, 1], [1, 0], [1, 0]], bool)
    groups = np.array([0, 0, 1, 1])
    out = cc.group_baseline_advantage(G, valid, groups)
    np.testing.assert_allclose(out, [[0.5, 0.25], [-0.5, -0.25], [-0.1, 0.0], [0.1, 0.0]])


def test_compare_reads_a_perfect_critic_as_perfect_and_a_shuffled_one_as_noise():
    rng = np.random.default_rng(1)
    B, K = 64, 5
    valid = np.ones((B, K), bool)
    MC = rng.normal(size=(B, K))
    V = rng.normal(size=(B, K))
    G = V + MC
    win = rng.random(B) < 0.5
    perfect = cc.compare(V + MC, V, G, MC, win, valid)  # A = MC exactly
    assert perfect["r_A_MC"] == pytest.approx(1.0)
    assert perfect["sign_agreement"] == 1.0
    assert perfect["utterances"] == B * K
    noise = cc.compare(V + rng.permutation(MC.ravel()).reshape(B, K), V, G, MC, win, valid)
    assert abs(noise["r_A_MC"]) < 0.2
    assert 0.35 < noise["sign_agreement"] < 0.65


def test_compare_ignores_invalid_utterances():
    rng = np.random.default_rng(2)
    Q, V, G, MC = (rng.normal(size=(8, 3)) for _ in range(4))
    valid = np.zeros((8, 3), bool)
    valid[:, 0] = True
    win = np.arange(8) < 4
    garbage = [x.copy() for x in (Q, V, G, MC)]
    for x in garbage:
        x[:, 1:] = 1e6
    a, b = cc.compare(Q, V, G, MC, win, valid), cc.compare(*garbage, win, valid)
    assert a == b
    assert a["utterances"] == 8
    np.testing.assert_allclose(a["A_mean_won"], np.mean((Q - V)[:4, 0]))
