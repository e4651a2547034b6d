"""ETPO trainer: config checks and a 2-step smoke run that checks the Polyak
target Q, the frozen reference, and the Q networks' checkpoint."""
import json

import numpy as np
import pytest

from aem_jax import sharding
from aem_jax.trainer import checkpoint, loop
from aem_jax.trainer.etpo import EtpoTrainer
from tests.trainer.archer_test import host_copy, load_config, sq_dist


@pytest.mark.parametrize("key, value, message", [
    ("aem.enabled", True, "config.aem.enabled=True"),
    ("rollout.history", "windowed", "config.rollout.history='windowed'"),
    ("etpo.beta", 0.0, "config.etpo.beta=0.0"),
])
def test_bad_config_names_the_key(tmp_path, key, value, message):
    config = load_config("etpo", "smoke")
    section, field = key.split(".")
    config[section][field] = value
    with pytest.raises(ValueError, match=message):
        EtpoTrainer(config, str(tmp_path))


def test_etpo_smoke_polyak_reference_and_checkpoint(tmp_path):
    config = load_config("etpo", "smoke")
    config.eval.num_tasks = 0  # no held-out evaluation (saves a sampler compile)
    config.rollout.invalid_penalty = 0.5  # untrained actions are invalid: non-zero rewards
    config.learner.minibatch_size = 4     # the whole batch: one Q step and one Polyak step per iteration
    config.etpo.tau = 0.1                 # a target move well above float32 rounding
    trainer = loop.trainer_class(config)(config, str(tmp_path))
    assert isinstance(trainer, EtpoTrainer)
    tau = config.etpo.tau
    with sharding.use_mesh(trainer.mesh):
        policy0, reference0 = host_copy(trainer.state.params), host_copy(trainer.reference)
        q0, target0 = host_copy(trainer.q.state.params), host_copy(trainer.q.target)
        assert sq_dist(q0, target0) == 0.0 and sq_dist(policy0, reference0) == 0.0

        first = trainer.train_step(0)
        q1, target1 = host_copy(trainer.q.state.params), host_copy(trainer.q.target)
        assert int(trainer.q.state.step) == 1 and sq_dist(q1, q0) > 0.0
        # One Polyak step after the Q step: target = (1 - tau) target0 + tau q1 exactly.
        for t1, t0, q in zip(target1, target0, q1):
            np.testing.assert_allclose(t1, (1 - tau) * t0 + tau * q, atol=1e-6)
        assert 0.0 < sq_dist(target1, q1) < sq_dist(target0, q1)
        assert np.isfinite([first["q_loss"], first["policy_loss"], first["td_abs"]]).all()
        assert first["q_loss"] > 0.0

        second = trainer.train_step(1)
        assert sq_dist(host_copy(trainer.state.params), policy0) > 0.0
        assert sq_dist(host_copy(trainer.reference), reference0) == 0.0  # frozen
        assert second["kl_ref"] > 0.0  # the policy has left the reference

    config.total_steps = 3
    trainer.run()  # what loop.train does: steps 0..2, checkpointed each step
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert np.isfinite([r["q_loss"], r["policy_loss"], r["q_mean"], r["kl_ref"]]).all()
        assert r["nonfinite_in_a_row"] == 0

    saved = [host_copy(trainer.q.state), host_copy(trainer.q.target), host_copy(trainer.state.params)]
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
    with sharding.use_mesh(trainer.mesh):
        trainer.q = trainer.q.replace(target=trainer.q.state.params)  # clobber; restore must undo it
        step, _ = trainer.restore(ckpt)
    ckpt.close()
    assert step == 3
    for before, after in zip(saved, [trainer.q.state, trainer.q.target, trainer.state.params]):
        assert sq_dist(before, host_copy(after)) == 0.0
