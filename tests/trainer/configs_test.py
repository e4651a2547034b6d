"""Every config file loads, documents its fields, and its :smoke variant trains 2 steps.

(default, archer and etpo smoke runs are exercised by train_cli_test.py,
archer_test.py and etpo_test.py.)
"""
import importlib.util
import json
import math
import pathlib
import re

import pytest

from aem_jax.trainer import algorithms
from aem_jax.trainer.loop import train

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
DEFAULTS = pathlib.Path(__file__).resolve().parents[2] / "aem_jax" / "trainer" / "defaults.py"


def load(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "Run:" in (module.__doc__ or "") or "python -m aem_jax.train" in (module.__doc__ or "")
    return module.get_config(arg)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.py")))
def test_config_loads_and_names_a_registered_algorithm(name):
    config = load(name)
    assert config.algorithm in algorithms.ALGORITHMS
    smoke = load(name, "smoke")
    assert smoke.total_steps == 2
    with pytest.raises(ValueError, match="unknown variant"):
        load(name, "no-such-variant")


def test_every_base_field_is_commented():
    base = DEFAULTS.read_text().split("def textworld")[0]
    lines = [l for l in base.splitlines() if re.match(r"\s+c\.[a-z0-9_.]+ = ", l)]
    assert len(lines) > 50
    uncommented = [l.strip() for l in lines if "#" not in l and "ConfigDict()" not in l]
    assert not uncommented, uncommented


@pytest.mark.parametrize("name", ["dapo", "gspo", "rloo", "gigpo", "ppo", "textworld", "swe"])
def test_smoke_trains_two_steps(name, tmp_path):
    config = load(name, "smoke")
    config.eval.num_tasks = 0
    summary = train(config, str(tmp_path))
    assert summary["final_step"] == 2
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert 0.0 <= r["success"] <= 1.0
    assert (tmp_path / "checkpoints").is_dir() and (tmp_path / "curves.png").is_file()


@pytest.mark.parametrize("name", ["default", "dapo", "rloo", "gigpo", "ppo", "archer", "etpo"])
def test_textworld_variant_switches_the_environment_only(name):
    treasure, tw = load(name), load(name, "textworld")
    assert (treasure.env.name, tw.env.name) == ("treasure", "textworld")
    assert tw.algorithm == treasure.algorithm and tw.model.tokenizer == "bpe"
    if name in ("ppo", "archer", "etpo"):
        assert tw.rollout.history == "concatenated"
    episodes = lambda c: c.rollout.num_tasks * c.rollout.group_size  # noqa: E731
    assert episodes(load(name, "textworld")) == episodes(load("textworld"))
    both = load(name, "smoke,textworld")
    assert both.env.name == "textworld" and both.total_steps == 2 and both.env.kwargs["max_steps"] == 2


@pytest.mark.parametrize("name", ["default", "dapo", "rloo", "gigpo", "gspo", "ppo", "archer", "etpo", "sft"])
def test_longhorizon_variant_switches_to_the_dungeon_of_configs_longhorizon(name):
    from aem_jax.trainer.loop import check_config

    game, lh = load("longhorizon"), load(name, "longhorizon")
    assert lh.env.name == "dungeon" and lh.env.to_dict() == game.env.to_dict()
    assert lh.algorithm == load(name).algorithm
    for key in ("max_turns", "max_context_tokens", "max_action_tokens", "history"):
        assert lh.rollout[key] == game.rollout[key], key
    check_config(lh)
    check_config(load(name, "longhorizon,smoke"))
    with pytest.raises(ValueError, match="two environments"):
        load(name, "longhorizon,textworld")


def test_load_config_applies_typed_overrides_and_names_bad_keys():
    from aem_jax.trainer import setup
    from aem_jax.trainer.validate import ConfigError

    path = str(CONFIGS / "ppo.py")
    config = setup.load_config(path + ":smoke", ["aem.enabled=FALSE", "optim.learning_rate=3e-4",
                                                 "rollout.num_tasks=3", "env.name=treasure"])
    reference = load("ppo", "smoke")
    assert config.aem.enabled is False and config.optim.learning_rate == 3e-4
    assert config.rollout.num_tasks == 3 and isinstance(config.rollout.num_tasks, int)
    assert config.model.hidden_size == reference.model.hidden_size
    with pytest.raises(ConfigError, match=r"config\.aem\.nope is not a config key; "):
        setup.load_config(path, ["aem.nope=1"])
    with pytest.raises(ConfigError, match=re.escape(
            "config.optim.learnig_rate is not a config key; did you mean optim.learning_rate?")):
        setup.load_config(path, ["optim.learnig_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"config\.env\.kwargs\.num_boxs is not a config key; "
                                          r"did you mean env\.kwargs\.num_boxes\?"):
        setup.load_config(path, ["env.kwargs.num_boxs=3"])
    with pytest.raises(ConfigError, match="not a boolean"):
        setup.load_config(path, ["aem.enabled=yes"])
    with pytest.raises(ConfigError, match=re.escape("config.rollout.num_tasks='many' is not allowed; must be of "
                                                    "type int")):
        setup.load_config(path, ["rollout.num_tasks=many"])
    with pytest.raises(FileNotFoundError, match="missing.py"):
        setup.load_config(str(CONFIGS / "missing.py"))


def test_entropy_mask_is_validated_before_building():
    from aem_jax.trainer import setup, validate

    config = setup.load_config(str(CONFIGS / "default.py"), ["loss.entropy_mask=nonzero_advantage"])
    validate.check(config)
    config.loss.entropy_mask = "positive"
    with pytest.raises(validate.ConfigError, match=r"config.loss.entropy_mask='positive'.*nonzero_advantage"):
        validate.check(config)


@pytest.mark.parametrize("key,bad,message", [
    ("dual_clip", 0.5, "must be 0 (off) or a constant > 1"),
    ("dual_clip", 1.0, "must be 0 (off) or a constant > 1"),
    ("clip_low", 1.0, "must be in [0, 1)"),
    ("clip_high", -0.1, "must be >= 0"),
])
def test_clip_settings_are_validated_before_building(key, bad, message):
    from aem_jax.trainer import setup, validate

    config = setup.load_config(str(CONFIGS / "default.py"))
    validate.check(config)  # dual clip 3, clips 0.2: fine
    config.loss[key] = bad
    with pytest.raises(validate.ConfigError,
                       match=re.escape(f"config.loss.{key}={bad!r} is not allowed; {message}")):
        validate.check(config)
