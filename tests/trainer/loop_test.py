"""The loop's shape: named random streams, no import cycle, every registered
algorithm from the default config, DAPO's refill across T buckets, and run
integrity at the loop level (workdir lock, config fingerprint)."""
import dataclasses
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest

from aem_jax.trainer import algorithms, integrity, loop, rng, rollouts, setup
from tests.trainer.archer_test import _rows


def test_no_two_streams_steps_or_seeds_share_a_key():
    seen = {}
    for seed in range(4):
        streams = rng.Streams(seed)
        for name in rng.STREAMS:
            for step in range(20):
                data = tuple(np.asarray(jax.random.key_data(streams.at(name, step))).tolist())
                assert data not in seen, (seed, name, step, seen.get(data))
                seen[data] = (seed, name, step)
    # the same (seed, name, step) always gives the same key: resumes draw what an uninterrupted run drew
    a, b = rng.Streams(1).at("rollout", 5), rng.Streams(1).at("rollout", 5)
    assert (np.asarray(jax.random.key_data(a)) == np.asarray(jax.random.key_data(b))).all()
    with pytest.raises(ValueError, match="unknown random stream 'rollouts'"):
        rng.Streams(0).key("rollouts")


def test_task_seeds_of_training_and_eval_are_disjoint():
    train = {s for seed in range(3) for step in range(50) for s in rng.task_seeds(seed, step, 64)}
    assert not train & set(rng.eval_seeds(64))


TRAINER_MODULES = ("loop", "algorithms", "pg", "archer", "etpo", "critic", "replay", "targets", "rollouts",
                   "update", "setup", "validate", "checkpoint", "metrics", "integrity", "context", "rng")


@pytest.mark.parametrize("module", TRAINER_MODULES)
def test_every_trainer_module_imports_first_without_a_cycle(module):
    """Imported first in a fresh interpreter, each module must load: a cycle would fail for one of them."""
    result = subprocess.run([sys.executable, "-c", f"import aem_jax.trainer.{module}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_algorithm_is_reached_through_a_string():
    import pathlib
    root = pathlib.Path(loop.__file__).parent
    for path in root.glob("*.py"):
        text = path.read_text()
        assert "import_module" not in text and "runner" not in text, path
    assert all(callable(a.init) and callable(a.update) for a in algorithms.ALGORITHMS.values())


@pytest.mark.parametrize("name", sorted(algorithms.ALGORITHMS))
def test_every_registered_algorithm_runs_from_the_default_config(tmp_path, name):
    config = setup.load_config("configs/default.py:smoke", [f"algorithm={name}", "eval.num_tasks=0",
                                                           "total_steps=1"])
    summary = loop.train(config, str(tmp_path))
    assert summary["final_step"] == 1
    assert (tmp_path / "checkpoints" / "1").is_dir()


@dataclasses.dataclass
class _Record:
    episode_return: float
    turns: int = 1


def test_dapo_refill_pads_batches_of_another_t_bucket(monkeypatch):
    G, N = 2, 2
    main = _rows(0, N * G, T=4, K=1)
    extra = _rows(100, N * G, T=8, K=1)   # the extra rollout landed in a longer T bucket
    calls = []

    def fake_collect(*args, **kwargs):
        calls.append(kwargs["task_seeds"])
        return extra, [_Record(1.0), _Record(0.0)] * N, {}

    monkeypatch.setattr(rollouts, "collect", fake_collect)
    config = ml_collections.ConfigDict({"dapo": {"max_resample": 1}, "rollout": {"group_size": G, "num_tasks": N},
                                        "env": {"name": "treasure", "kwargs": {}}})
    ctx = types.SimpleNamespace(config=config, keys=rng.Streams(0), rollout=None,
                                tokenizer=types.SimpleNamespace(pad_token_id=0, eos_token_id=1))
    records = [_Record(1.0), _Record(0.0), _Record(1.0), _Record(1.0)]  # group 1 is uninformative
    batch, new_records, roll = rollouts.dynamic_sampling(ctx, None, 3, main, records, {"env_steps": 4})
    assert batch.tokens.shape == (4, 8) and len(calls) == 1
    np.testing.assert_array_equal(batch.tokens[2:], np.asarray(extra.tokens)[:2])   # refilled from the extra batch
    np.testing.assert_array_equal(batch.tokens[:2, :4], np.asarray(main.tokens)[:2])  # kept, padded
    assert (batch.attention_mask[:2, 4:] == 0).all() and (batch.loss_mask[:2, 4:] == 0).all()
    assert (batch.turn_ids[:2, 4:] == -1).all()
    assert [r.episode_return for r in new_records] == [1.0, 0.0, 1.0, 0.0]
    assert roll["dapo_informative_frac"] == 0.5 and roll["env_steps"] == 8


def test_a_second_trainer_on_a_locked_workdir_stops_before_building(tmp_path):
    config = setup.load_config("configs/default.py:smoke")
    with integrity.WorkdirLock(tmp_path):
        with pytest.raises(integrity.WorkdirLockedError):
            loop.train(config, str(tmp_path))


def test_resume_with_a_changed_config_names_the_keys_and_growing_total_steps_is_allowed(tmp_path):
    overrides = ["eval.num_tasks=0", "total_steps=1"]
    loop.train(setup.load_config("configs/default.py:smoke", overrides), str(tmp_path))
    summary = loop.train(setup.load_config("configs/default.py:smoke", overrides + ["total_steps=2"]),
                         str(tmp_path))
    assert summary["start_step"] == 1 and summary["final_step"] == 2
    changed = overrides + ["total_steps=3", "seed=1", "optim.learning_rate=0.002"]
    with pytest.raises(integrity.ConfigMismatchError, match=r"optim.learning_rate 0.001 -> 0.002, seed 0 -> 1"):
        loop.train(setup.load_config("configs/default.py:smoke", changed), str(tmp_path))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # the refused run wrote nothing


def test_env_steps_budget_ends_training_at_the_step_that_reaches_it_and_resumes(tmp_path):
    """env_steps_budget: the run ends after the first step whose cumulative environment steps reach
    it, with its held-out evaluation there; a larger budget resumes; a reached one trains nothing."""
    import json

    base = ["total_steps=5", "eval.num_tasks=2"]
    summary = loop.train(setup.load_config("configs/default.py:smoke", base + ["env_steps_budget=1"]),
                         str(tmp_path))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["final_step"] == 1 and len(rows) == 1 and summary["success_after"] is not None
    first = rows[0]["env_steps"]
    assert first > 0 and rows[0]["env_steps_total"] == first
    held = json.loads((tmp_path / "eval.json").read_text())
    assert held["step"] == 1 and held["success_after"] == summary["success_after"]

    grown = base + [f"env_steps_budget={int(first) + 1}"]
    summary = loop.train(setup.load_config("configs/default.py:smoke", grown), str(tmp_path))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["start_step"] == 1 and summary["final_step"] == 2 and len(rows) == 2
    assert rows[1]["env_steps_total"] == first + rows[1]["env_steps"]
    assert json.loads((tmp_path / "eval.json").read_text())["step"] == 2

    summary = loop.train(setup.load_config("configs/default.py:smoke", grown), str(tmp_path))
    assert summary["start_step"] == 2 and summary["final_step"] == 2
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_env_steps_so_far_falls_back_to_the_metrics_lines(tmp_path):
    assert loop.env_steps_so_far({"env_steps_total": 7.0}, tmp_path, 3) == 7.0
    assert loop.env_steps_so_far({}, tmp_path, 0) == 0.0
    (tmp_path / "metrics.jsonl").write_text("".join(
        f'{{"step": {s}, "env_steps": {10 * s}}}\n' for s in (1, 2, 3, 4)))
    assert loop.env_steps_so_far({}, tmp_path, 3) == 60.0
    with pytest.raises(Exception, match="env_steps_budget"):
        loop.check_config(setup.load_config("configs/default.py:smoke", ["env_steps_budget=-1"]))
