"""The trainer's advantage diagnostics: the alpha histogram."""
import numpy as np
import pytest

from aem_jax.trainer.advantages import ALPHA_HIST_BINS, alpha_histogram


def _reference(alpha, valid, lam):
    u = np.clip(np.log(alpha[valid]) / abs(lam), -1, 1)
    edges = np.linspace(-1, 1, ALPHA_HIST_BINS + 1)
    counts, _ = np.histogram(u, bins=edges)
    return counts / max(valid.sum(), 1)


@pytest.mark.parametrize("lam", [0.5, 1.0, 2.0, -1.0])
def test_alpha_histogram_matches_numpy(lam):
    rng = np.random.default_rng(0)
    alpha = np.exp(rng.uniform(-abs(lam), abs(lam), size=(16, 3)) * 0.999)
    valid = rng.random((16, 3)) < 0.7
    hist = alpha_histogram(alpha, valid, lam)
    got = np.array([float(hist[f"alpha_hist_{i}"]) for i in range(ALPHA_HIST_BINS)])
    np.testing.assert_allclose(got, _reference(alpha, valid, lam), atol=1e-6)
    assert got.sum() == pytest.approx(1.0, abs=1e-6)


def test_alpha_one_falls_in_the_middle_bin_and_invalid_rows_are_ignored():
    alpha = np.ones((4, 2), np.float32)
    alpha[0, 0] = 100.0  # invalid: must not count
    valid = np.ones((4, 2), bool)
    valid[0, 0] = False
    hist = alpha_histogram(alpha, valid, 1.0)
    middle = ALPHA_HIST_BINS // 2
    assert float(hist[f"alpha_hist_{middle}"]) == pytest.approx(1.0)
    assert sum(float(v) for v in hist.values()) == pytest.approx(1.0)
