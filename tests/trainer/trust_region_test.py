"""Step-size controls of the policy-gradient update: learner.max_kl (the step KL
against a float64 reference; a rejected step leaves policy and optimiser state
as they were) and optim.success_gate (the rate factor and where it applies)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aem_jax import models, sharding
from aem_jax.trainer import loop, pg, setup
from aem_jax.trainer.update import shifted_logp_entropy
from aem_jax.trainer.validate import ConfigError
from tests.trainer.update_test import CONFIG, _batch


def test_step_kl_is_the_k3_estimate_on_action_tokens():
    model = models.Decoder(CONFIG, rngs=nnx.Rngs(0))
    graphdef, params, _ = nnx.split(model, nnx.Param, ...)
    batch = _batch(B=6, T=16, seed=3).batch
    logp, _, _ = shifted_logp_entropy(graphdef, params, jnp.asarray(batch.tokens),
                                      jnp.asarray(batch.attention_mask), chunk_size=8)
    rng = np.random.default_rng(0)
    old = np.asarray(logp, np.float64) + rng.normal(scale=0.3, size=logp.shape)  # a behaviour policy nearby
    batch = batch.replace(old_logp=old.astype(np.float32))
    got = float(pg.step_kl(params, jax.tree.map(jnp.asarray, batch), graphdef=graphdef, chunk_size=8))
    log_r = np.asarray(logp, np.float64) - old
    m = batch.loss_mask.astype(np.float64)
    want = np.sum((np.exp(log_r) - 1 - log_r) * m) / m.sum()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # the same policy: no distance
    same = batch.replace(old_logp=np.asarray(logp))
    assert abs(float(pg.step_kl(params, jax.tree.map(jnp.asarray, same), graphdef=graphdef, chunk_size=8))) < 1e-6


@functools.lru_cache(maxsize=None)
def _two_steps(*overrides):
    """Initial parameters, parameters after two training steps, and the steps' records."""
    config = setup.load_config("configs/default.py:smoke", ["eval.num_tasks=0", *overrides])
    algorithm = loop.check_config(config)
    mesh = sharding.make_mesh(dict(config.mesh))
    ctx = loop.build_context(config, mesh)
    init = jax.tree.map(np.asarray, ctx.init_params)
    records = []
    with sharding.use_mesh(mesh):
        state = algorithm.init(ctx)
        for step in range(2):
            state, record, _ = loop.train_step(ctx, algorithm, state, step)
            records.append(record)
    return init, jax.tree.map(np.asarray, state.train.params), records


def _equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_rejected_steps_keep_the_policy_and_measuring_changes_nothing():
    init, base, base_rows = _two_steps()
    assert not _equal(base, init)
    # a threshold no step passes: every step is rejected, the parameters stay the initial ones
    _, rejected, rows = _two_steps("learner.max_kl=1e-12")
    assert [r["rejected_updates"] for r in rows] == [1.0, 1.0]
    assert all(r["post_update_kl"] > 0 for r in rows)
    assert _equal(rejected, init)
    # a threshold every step passes: only measured, the run is the run without the check
    _, kept, rows = _two_steps("learner.max_kl=1e9")
    assert [r["rejected_updates"] for r in rows] == [0.0, 0.0]
    assert _equal(kept, base)
    assert [r["loss"] for r in rows] == [r["loss"] for r in base_rows]


@pytest.mark.parametrize("algorithm", ["archer", "etpo", "sft"])
def test_max_kl_is_refused_outside_the_policy_gradient_family_and_the_gate_is_not(algorithm):
    with pytest.raises(ConfigError, match=f"config.learner.max_kl=.*policy-gradient family only.*'{algorithm}'"):
        loop.check_config(setup.load_config("configs/default.py:smoke",
                                            [f"algorithm={algorithm}", "learner.max_kl=0.1"]))
    # the default job's success gate applies to every algorithm's policy optimiser
    assert setup.load_config("configs/default.py", []).optim.success_gate > 0
    loop.check_config(setup.load_config("configs/default.py:smoke", [f"algorithm={algorithm}"]))


def test_success_gate_is_full_until_the_gate_then_linear_down_to_the_floor():
    o = setup.load_config("configs/default.py", ["optim.success_gate=0.5", "optim.final_lr_fraction=0.1"]).optim
    for s in (0.0, 0.25, 0.5):
        assert setup.success_gate(o, s) == 1.0
    np.testing.assert_allclose([setup.success_gate(o, s) for s in (0.6, 0.75, 0.9, 0.95, 1.0)],
                               [0.8, 0.5, 0.2, 0.1, 0.1], rtol=1e-12)
    off = setup.load_config("configs/default.py", ["optim.success_gate=0"]).optim
    assert setup.success_gate(off, 1.0) == 1.0


def test_the_gate_scales_each_optimiser_update_and_is_logged(monkeypatch):
    # the scale multiplies Adam's update: half the factor, half the parameter change
    from tests.trainer.update_test import _one_update_scaled
    one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    full, _, before = _one_update_scaled(one, _batch(), 1.0)
    half, _, _ = _one_update_scaled(one, _batch(), 0.5)
    for b, f, h in zip(jax.tree.leaves(before), jax.tree.leaves(full.params), jax.tree.leaves(half.params)):
        np.testing.assert_allclose(np.asarray(h) - np.asarray(b), 0.5 * (np.asarray(f) - np.asarray(b)),
                                   rtol=1e-4, atol=1e-7)
    # in the loop: lr_scale is the gate's factor for the step's success, and it changes the run
    monkeypatch.setattr(pg, "success_gate", lambda o, s: 0.25 if o.success_gate else 1.0)
    _, gated, rows = _two_steps("optim.success_gate=0.5")
    assert [r["lr_scale"] for r in rows] == [0.25, 0.25]
    init, base, _ = _two_steps()
    assert not _equal(gated, base)
