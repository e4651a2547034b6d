"""The learning-rate schedule: warm-up, then constant or cosine decay over the run."""
import math

import numpy as np
import pytest

from aem_jax.trainer import defaults, setup, targets, validate


def _config(**optim):
    c = defaults.base()
    c.total_steps = 50
    for k, v in optim.items():
        setattr(c.optim, k, v)
    return c


def test_updates_per_step_counts_minibatches_and_epochs():
    c = _config()
    c.rollout.num_tasks, c.rollout.group_size, c.learner.minibatch_size, c.learner.epochs = 10, 8, 32, 2
    assert setup.updates_per_step(c) == 2 * math.ceil(80 / 32)


def test_cosine_matches_the_formula():
    c = _config(schedule="cosine", learning_rate=1e-3, warmup_steps=5, final_lr_fraction=0.1)
    horizon = c.total_steps * setup.updates_per_step(c)
    sched = setup.learning_rate(c.optim, horizon)
    lr, f, w = 1e-3, 0.1, 5
    for t in (0, 1, 4):
        assert float(sched(t)) == pytest.approx(lr / w + (lr - lr / w) * t / w, rel=1e-5)
    for t in (5, 17, horizon // 2, horizon - 1, horizon, horizon + 10):
        x = min(max(t - w, 0) / (horizon - w), 1.0)
        want = lr * (f + (1 - f) * 0.5 * (1 + np.cos(np.pi * x)))
        assert float(sched(t)) == pytest.approx(want, rel=1e-5)


def test_decay_steps_overrides_the_derived_horizon():
    c = _config(schedule="cosine", decay_steps=100, final_lr_fraction=0.0)
    sched = setup.learning_rate(c.optim, 10_000)
    assert float(sched(100)) == pytest.approx(0.0, abs=1e-12)
    half = 0.5 * (1 + np.cos(np.pi * (52 - 5) / (100 - 5)))
    assert float(sched(52)) == pytest.approx(c.optim.learning_rate * half, rel=1e-5)


def test_constant_is_the_default_and_side_optimisers_stay_constant():
    c = _config()
    assert c.optim.schedule == "constant"
    sched = setup.learning_rate(c.optim, 1000)
    assert float(sched(999)) == pytest.approx(c.optim.learning_rate)
    c.optim.schedule = "cosine"
    opt = targets.side_optimizer(c, 1e-4)  # builds without total_steps and does not decay
    import jax.numpy as jnp
    import optax
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    for _ in range(300):
        updates, state = opt.update({"w": jnp.ones(3)}, state, params)
    # Adam's normalised step of a constant gradient is ~lr at every step
    assert float(jnp.abs(updates["w"][0])) == pytest.approx(1e-4, rel=1e-2)
    del optax


@pytest.mark.parametrize("field,value", [("schedule", "linear"), ("final_lr_fraction", 1.5),
                                         ("decay_steps", -1)])
def test_bad_schedule_settings_are_config_errors(field, value):
    c = _config(**{field: value})
    with pytest.raises(validate.ConfigError, match=f"optim.{field}"):
        validate.check(c)


def test_archer_counts_its_actor_steps_after_the_warm_up():
    """ArCHer's policy optimiser steps archer.actor_steps times per iteration,
    and not at all in the first actor_warmup iterations, so the cosine
    horizon is (total_steps - actor_warmup) * actor_steps updates."""
    c = _config(schedule="cosine", warmup_steps=1, final_lr_fraction=0.0)
    c.algorithm = "archer"
    c.archer.actor_steps, c.archer.actor_warmup = 3, 5
    c.rollout.num_tasks, c.rollout.group_size, c.learner.minibatch_size = 16, 8, 32  # 4 minibatches
    assert setup.updates_per_step(c) == 3
    opt = setup.optimizer(c)
    params = {"w": np.zeros(2, np.float32)}
    state = opt.init(params)
    horizon = (50 - 5) * 3
    lrs = []
    for t in range(horizon + 2):
        grads = {"w": np.ones(2, np.float32)}
        updates, state = opt.update(grads, state, params)
        lrs.append(float(np.abs(np.asarray(updates["w"])).max()))
    assert lrs[horizon // 2] > 0.0 and lrs[horizon] == pytest.approx(0.0, abs=1e-12)
