"""experiments/mechanism_mc.py: its statistics and Monte-Carlo estimator against
float64 references, and one small end-to-end measurement."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest
import scipy.stats

from aem_jax import models
from aem_jax.models.sampler import SamplingParams
from aem_jax.rollout import SamplerPolicy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("experiments_mechanism_mc",
                                               os.path.join(ROOT, "experiments", "mechanism_mc.py"))
mc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = mc  # its dataclass looks its module up
_spec.loader.exec_module(mc)


def _data(seed=0, n_groups=6, per=7, ties=False):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_groups), per)
    shift = rng.normal(size=n_groups)[groups] * 3  # group effects the within-group versions remove
    x = rng.normal(size=len(groups)) + shift
    y = 0.6 * x + rng.normal(size=len(groups)) - 2 * shift
    if ties:
        x, y = np.round(x), np.round(y)
    return x, y, groups


def _ref_within(x, y, groups, rank):
    xs, ys = [], []
    for g in np.unique(groups):
        a, b = x[groups == g], y[groups == g]
        if rank:
            a, b = scipy.stats.rankdata(a), scipy.stats.rankdata(b)
        xs.append(a - a.mean())
        ys.append(b - b.mean())
    return np.corrcoef(np.concatenate(xs), np.concatenate(ys))[0, 1]


@pytest.mark.parametrize("ties", [False, True])
def test_correlations_match_float64_references(ties):
    x, y, g = _data(ties=ties)
    np.testing.assert_allclose(mc.ranks(x), scipy.stats.rankdata(x), rtol=0, atol=0)
    np.testing.assert_allclose(mc.pearson(x, y), np.corrcoef(x, y)[0, 1], rtol=1e-12)
    np.testing.assert_allclose(mc.spearman(x, y), scipy.stats.spearmanr(x, y).statistic, rtol=1e-12)
    np.testing.assert_allclose(mc.pearson_within(x, y, g), _ref_within(x, y, g, rank=False), rtol=1e-12)
    np.testing.assert_allclose(mc.spearman_within(x, y, g), _ref_within(x, y, g, rank=True), rtol=1e-12)
    # the group shifts point the other way: pooled and within-group r differ in sign here
    assert mc.pearson(x, y) < 0 < mc.pearson_within(x, y, g)
    assert np.isnan(mc.pearson(np.ones(5), np.arange(5.0)))
    with pytest.raises(ValueError, match="1-d arrays of one length"):
        mc.pearson(np.ones(3), np.ones(4))


def test_cluster_bootstrap_resamples_whole_groups():
    x, y, g = _data(n_groups=5, per=4)
    idx, new = mc.bootstrap_indices(g, np.random.default_rng(3))
    assert len(np.unique(new)) == 5
    for label in np.unique(new):
        rows = idx[new == label]
        assert len(np.unique(g[rows])) == 1 and len(rows) == 4  # one whole original group per new label
    out = mc.correlations(x, y, g, n_boot=300, seed=1)
    assert out["n"] == 20 and out["n_groups"] == 5
    # the interval is the percentile interval of the statistic on explicitly resampled data
    rng = np.random.default_rng(1)
    ref = []
    for _ in range(300):
        i, lab = mc.bootstrap_indices(g, rng)
        ref.append(_ref_within(x[i], y[i], lab, rank=True))
    ref = np.asarray(ref)
    np.testing.assert_allclose(out["spearman_within"]["ci95"], np.percentile(ref[np.isfinite(ref)], [2.5, 97.5]),
                               rtol=1e-10)
    for name in mc.STATS:
        lo, hi = out[name]["ci95"]
        assert lo <= hi
    with pytest.raises(ValueError, match="1-d of one length"):
        mc.correlations(x, y[:-1], g)


def _tiny_model(vocab=5):
    config = models.ModelConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_layers=1,
                                num_heads=2, num_kv_heads=1, head_dim=8)
    return models.init_model(config, seed=4)


def _exact_surprisal_tables(model, prompts, stop, vocab):
    """Per prompt, {response tokens: -log pi(response | prompt)} for every response
    of at most two tokens (the first may stop), from the model's logits in float64
    (one right-padded forward pass over every prompt and prompt + first token)."""
    seqs = [list(p) + extra for p in prompts for extra in [[]] + [[t] for t in range(vocab) if t != stop]]
    width = max(map(len, seqs))
    tokens = np.array([q + [stop] * (width - len(q)) for q in seqs], np.int32)
    mask = np.array([[1] * len(q) + [0] * (width - len(q)) for q in seqs], np.int32)
    logits = np.asarray(models.logits(model, tokens, mask), np.float64)
    nxt = {tuple(q): logits[i, len(q) - 1] - np.logaddexp.reduce(logits[i, len(q) - 1]) for i, q in enumerate(seqs)}
    tables = []
    for p in prompts:
        first, table = nxt[tuple(p)], {}
        for t1 in range(vocab):
            if t1 == stop:
                table[(t1,)] = -first[t1]
                continue
            second = nxt[tuple(p) + (t1,)]
            for t2 in range(vocab):
                table[(t1, t2)] = -first[t1] - second[t2]
        tables.append(table)
    return tables


class _Recording:
    def __init__(self, policy):
        self.policy, self.generations = policy, []

    def generate(self, prompts, *, key, contexts=None):
        out = self.policy.generate(prompts, key=key)
        self.generations += out
        return out


def test_mc_surprisal_matches_exact_enumeration_on_a_tiny_model():
    vocab, stop, m = 5, 0, 1000
    model = _tiny_model(vocab)
    params = SamplingParams(max_new_tokens=2, temperature=1.0, stop_token_ids=(stop,))
    policy = _Recording(SamplerPolicy(model, params, pad_id=stop, max_cache_len=16))
    prompts = [[1, 2, 3], [4, 1]]
    s, h = mc.sample_surprisal(policy, prompts, m=m, key=jax.random.key(0), chunk=2 * m)
    assert s.shape == h.shape == (2, m)
    gens = policy.generations
    for j, table in enumerate(_exact_surprisal_tables(model, prompts, stop, vocab)):
        probs = {seq: np.exp(-v) for seq, v in table.items()}
        np.testing.assert_allclose(sum(probs.values()), 1.0, rtol=1e-9)
        # each sample's surprisal is the exact -log pi of the tokens it drew
        drawn = [tuple(gens[j * m + i].token_ids) for i in range(m)]
        np.testing.assert_allclose(s[j], [table[d] for d in drawn], atol=2e-4)
        # the Monte-Carlo means of S and of Hresp estimate the exact E[S|s]
        exact = sum(p * table[seq] for seq, p in probs.items())
        sd = np.sqrt(sum(p * (table[seq] - exact) ** 2 for seq, p in probs.items()))
        assert abs(s[j].mean() - exact) < 4 * sd / np.sqrt(m)
        assert abs(h[j].mean() - exact) < 4 * sd / np.sqrt(m)
    with pytest.raises(ValueError, match="m=0"):
        mc.sample_surprisal(policy, prompts, m=0, key=jax.random.key(0))


@pytest.mark.slow
def test_measure_end_to_end_on_a_random_smoke_model(tmp_path):
    config = mc.policy_config(os.path.join(ROOT, "configs/default.py:smoke"), None, num_tasks=2, group_size=3)
    out = mc.measure(config, m=3, n_boot=50)
    rows, summ = out["rows"], out["summary"]
    n = summ["responses"]
    assert n == len(rows["alpha"]) > 0 and summ["episodes"] == 6
    # the trainer's signal and proxy, and the batch's log-probs re-scored by the policy
    assert summ["check_signal_vs_trainer_max_abs"] < 1e-5
    assert summ["check_rel_proxy_vs_trainer_max_abs"] < 1e-4
    assert summ["check_rescore_vs_old_logp_max_abs"] < 1e-3
    np.testing.assert_allclose(rows["rel_mc"], np.asarray(rows["S"]) - rows["S_mc_mean"], rtol=1e-12)
    np.testing.assert_allclose(rows["rel_proxy"], np.asarray(rows["S"]) - rows["Hresp"], rtol=1e-12)
    g, a = np.asarray(rows["group"]), np.asarray(rows["alpha"])
    for k in np.unique(g):  # alpha averages 1 over each group's responses
        np.testing.assert_allclose(a[g == k].mean(), 1.0, atol=1e-5)
    assert np.all(np.isfinite(rows["S_mc_mean"])) and np.all(np.asarray(rows["S_mc_mean"]) > 0)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(dict(out, label="smoke")))
    run = tmp_path / "rl"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for i, (p, d) in enumerate([(0.1, 0.2), (-0.3, -0.1), (0.2, 0.05), (0.4, 0.3)]):
            f.write(json.dumps({"step": i + 1, "success": 0.5, "alpha_std": 0.1, "token_entropy": 1.0 - 0.1 * i,
                                "predicted_entropy_drift": p,
                                "measured_entropy_change": d}) + "\n")
    mc.main(["report", "--measurements", str(path), "--drift_runs", str(run), "--out", str(tmp_path / "rep")])
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["drift"]["rl"]["sign_agreement"] == 1.0 and rep["drift"]["rl"]["n_steps"] == 4
    assert rep["drift"]["rl"]["predicted_negative_frac"] == 0.25
    np.testing.assert_allclose(rep["drift"]["rl"]["token_entropy_first_last5"], [0.85, 0.85])
    assert rep["measurements"]["smoke"]["summary"]["responses"] == n
    assert (tmp_path / "rep.png").stat().st_size > 0


def test_batch_drift_is_the_mean_of_advantage_times_relative_surprisal():
    rng = np.random.default_rng(2)
    rows = {k: rng.normal(size=9).tolist() for k in ("advantage", "rel_mc", "rel_proxy")}
    rows["alpha"] = np.exp(rng.uniform(-1, 1, size=9)).tolist()
    out = mc.batch_drift(rows)
    a, al = np.asarray(rows["advantage"]), np.asarray(rows["alpha"])
    for key in ("rel_mc", "rel_proxy"):
        rel = np.asarray(rows[key])
        np.testing.assert_allclose(out[f"grpo_{key}"], sum(a[i] * rel[i] for i in range(9)) / 9, rtol=1e-12)
        np.testing.assert_allclose(out[f"aem_{key}"], sum(al[i] * a[i] * rel[i] for i in range(9)) / 9, rtol=1e-12)


def test_measure_refuses_bad_settings_before_playing():
    spec = os.path.join(ROOT, "configs/default.py:smoke")
    config = mc.policy_config(spec, None, ["aem.signal=surprisal_per_token"])
    with pytest.raises(ValueError, match="aem.signal='surprisal_per_token'"):
        mc.measure(config, m=2)
    with pytest.raises(ValueError, match="group_size=1"):
        mc.policy_config(spec, None, group_size=1)
    with pytest.raises(FileNotFoundError, match="not a Hugging Face directory"):
        mc.policy_config(spec, os.path.join(ROOT, "docs"))
