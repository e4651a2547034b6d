"""validate.check: unknown keys, every numeric field's type, finiteness and range,
rules between fields, the environment's keyword arguments, the algorithm name."""
import importlib.util
import math
import numbers
import pathlib
import re

import pytest
from ml_collections import ConfigDict

from aem_jax.trainer import defaults, validate
from aem_jax.trainer.validate import ConfigError

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def base(**changes) -> ConfigDict:
    """base() with dotted keys set (``**{"optim.b1": 0.5}``)."""
    config = defaults.base()
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        with node.ignore_type():
            node[leaf] = value
    return config


def rejected(key: str, value) -> str:
    """The message of check() for ``key=value`` (which must name both)."""
    with pytest.raises(ConfigError) as info:
        validate.check(base(**{key: value}))
    message = str(info.value)
    assert message.startswith(f"config.{key}={value!r} is not allowed; "), message
    return message.partition(" is not allowed; ")[2]


# Configs whose task is not a text game refuse the :textworld variant.
NO_TEXTWORLD_VARIANT = ("swe", "longhorizon")


@pytest.mark.parametrize("spec", [
    f"{p.stem}:{v}" for p in sorted(CONFIGS.glob("*.py")) for v in ("", "smoke", "textworld", "smoke,textworld")
    if not (p.stem in NO_TEXTWORLD_VARIANT and "textworld" in v)])
def test_every_shipped_config_passes(spec):
    name, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    validate.check(module.get_config(variant or None))


@pytest.mark.parametrize("key,value,allowed", [
    ("total_steps", 0, "must be >= 1"),
    ("total_steps", 2.0, "must be an int >= 1"),
    ("total_steps", "3", "must be an int >= 1"),
    ("total_steps", True, "must be an int >= 1"),
    ("optim.learning_rate", 0.0, "must be > 0"),
    ("optim.learning_rate", math.inf, "must be a finite number > 0"),
    ("optim.learning_rate", math.nan, "must be a finite number > 0"),
    ("optim.b1", 1.0, "must be in [0, 1)"),
    ("optim.b2", -0.1, "must be in [0, 1)"),
    ("optim.eps", 0.0, "must be > 0"),
    ("optim.weight_decay", -1e-4, "must be >= 0"),
    ("optim.grad_clip", 0.0, "must be > 0"),
    ("optim.warmup_steps", -1, "must be >= 0"),
    ("model.hidden_size", 0, "must be >= 1"),
    ("model.head_dim", 0, "must be >= 1"),
    ("model.bpe_vocab_size", 100, "must be >= 261"),
    ("rollout.num_tasks", 0, "must be >= 1"),
    ("rollout.group_size", 0, "must be >= 1"),
    ("rollout.max_turns", 0, "must be >= 1"),
    ("rollout.temperature", -0.5, "must be >= 0"),
    ("rollout.temperature", math.inf, "must be a finite number >= 0"),
    ("rollout.top_p", 0.0, "must be in (0, 1]"),
    ("rollout.top_p", 1.5, "must be in (0, 1]"),
    ("rollout.top_k", -1, "must be >= 0"),
    ("rollout.window", -1, "must be >= 0"),
    ("rollout.num_threads", 0, "must be >= 1"),
    ("rollout.step_timeout_s", 0.0, "must be > 0"),
    ("rollout.seq_bucket", -1, "must be >= 0 (0 = pad every batch to rollout.max_context_tokens)"),
    ("rollout.history", "flat", "allowed: 'concatenated', 'windowed'"),
    ("checkpoint.every", 0, "must be >= 1"),
    ("checkpoint.keep", 0, "must be >= 1"),
    ("eval.num_tasks", -1, "must be >= 0"),
    ("learner.epochs", 0, "must be >= 1"),
    ("learner.minibatch_size", 0, "must be >= 1"),
    ("loss.entropy_coef", -0.01, "must be >= 0"),
    ("loss.kl_coef", -1.0, "must be >= 0"),
    ("loss.chunk_size", 0, "must be >= 1"),
    ("loss.dual_clip", 1.0, "must be 0 (off) or a constant > 1"),
    ("loss.kl_kind", "k4", "allowed: 'k1', 'k2', 'k3', 'low_var_kl'"),
    ("aem.lam", math.nan, "must be a finite number"),
    ("aem.scope", "episode", "allowed: 'group', 'batch', 'trajectory'"),
    ("advantage.gamma", 1.5, "must be in [0, 1]"),
    ("ppo.lam", -0.1, "must be in [0, 1]"),
    ("ppo.value_coef", -1.0, "must be >= 0"),
    ("mesh.data", 0, "must be -1 (all remaining devices) or >= 1"),
    ("mesh.fsdp", 2.5, "must be an int: -1 (all remaining devices) or >= 1"),
    ("aem.enabled", 1, "must be True or False"),
    ("model.source", 3, "must be a string"),
    ("model.dtype", "float16", "allowed: 'float32', 'bfloat16'"),
    ("model.param_dtype", "float16", "allowed: 'float32', 'bfloat16'"),
    ("learner.microbatch_size", -1, "must be >= 0 (0 = the whole minibatch at once)"),
])
def test_bad_value_names_the_key_value_and_what_is_allowed(key, value, allowed):
    assert rejected(key, value) == allowed


def test_every_numeric_field_has_a_rule_and_every_rule_a_field():
    fields = validate.paths(defaults.base(), skip=validate.OPEN_BLOCKS)
    numeric = {k for k, v in fields.items() if isinstance(v, numbers.Real) and not isinstance(v, bool)
               and k.split(".")[0] not in validate.ALGORITHM_BLOCKS}
    assert numeric - set(validate.RULES) == set()
    assert set(validate.RULES) - set(fields) == set()


def test_algorithm_blocks_are_type_checked_but_their_ranges_left_to_the_algorithm():
    validate.check(base(**{"archer.tau": 5.0, "etpo.beta": -1.0}))  # out of range: the algorithm's job
    with pytest.raises(ConfigError, match=re.escape("config.archer.tau=nan is not allowed; must be a finite")):
        validate.check(base(**{"archer.tau": math.nan}))
    with pytest.raises(ConfigError, match=re.escape("config.etpo.q.from_policy=1 is not allowed; must be True")):
        validate.check(base(**{"etpo.q.from_policy": 1}))


@pytest.mark.parametrize("key,message", [
    ("optim.learnig_rate", "config.optim.learnig_rate is not a config key; did you mean optim.learning_rate?"),
    ("learning_rate", "config.learning_rate is not a config key; did you mean optim.learning_rate"),
    ("rollout.temprature", "config.rollout.temprature is not a config key; did you mean rollout.temperature?"),
    ("loss.zzz", "config.loss.zzz is not a config key; keys of config.loss: agg, chunk_size, clip_high"),
    ("archer.critic.hiden_size", "config.archer.critic.hiden_size is not a config key; "
                                 "did you mean archer.critic.hidden_size?"),
])
def test_unknown_key_names_the_nearest_known_keys(key, message):
    config = defaults.base()
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    with node.unlocked():
        node[leaf] = 1
    with pytest.raises(ConfigError) as info:
        validate.check(config)
    assert str(info.value).startswith(message)


def test_missing_key_and_a_block_replaced_by_a_value():
    config = defaults.base()
    with config.unlocked():
        del config.optim["b2"]
    with pytest.raises(ConfigError, match=r"config\.optim\.b2 is missing; .*defaults\.base\(\)"):
        validate.check(config)
    with pytest.raises(ConfigError, match=r"config\.optim=1 is not allowed; must be a block of keys"):
        validate.check(base(optim=1))


def test_env_kwargs_are_checked_against_the_constructor():
    config = base()
    config.env.kwargs = {"num_boxs": 4}
    with pytest.raises(ConfigError, match=re.escape(
            "config.env.kwargs.num_boxs is not a keyword argument of environment 'treasure'; "
            "did you mean env.kwargs.num_boxes?")):
        validate.check(config)
    # TextWorldEnv takes **settings (tw-make options): any keyword is accepted
    defaults.textworld(config)
    config.env.kwargs = {"anything": 1}
    validate.check(config)
    config.env.name = "nowhere"
    with pytest.raises(ConfigError, match=r"config\.env\.name='nowhere'.*registered environments: .*treasure"):
        validate.check(config)


@pytest.mark.parametrize("changes,message", [
    ({"model.num_kv_heads": 3}, "config.model.num_heads=4 is not allowed; must be a multiple of "
                                "model.num_kv_heads=3"),
    ({"model.head_dim": 15}, "config.model.head_dim=15 is not allowed; must be even"),
    ({"rollout.max_action_tokens": 128}, "config.rollout.max_action_tokens=128 is not allowed; must be below "
                                         "rollout.max_context_tokens=128"),
    ({"learner.minibatch_size": 100}, "config.learner.minibatch_size=100 is not allowed; must divide "
                                      "num_tasks * group_size = 512"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "config.mesh={'data': -1, 'fsdp': -1, 'tensor': 1} is not allowed; "
                                         "at most one axis may be -1"),
    ({"learner.microbatch_size": 48}, "config.learner.microbatch_size=48 is not allowed; must divide "
                                      "learner.minibatch_size=128"),
    ({"learner.microbatch_size": 256}, "config.learner.microbatch_size=256 is not allowed; must divide "
                                       "learner.minibatch_size=128"),
    ({"model.param_dtype": "bfloat16"}, "config.model.param_dtype='bfloat16' is not allowed; bfloat16 "
                                        "parameters need model.dtype='bfloat16'"),
    ({"algorithm": "archer", "rollout.history": "concatenated", "learner.microbatch_size": 32},
     "config.learner.microbatch_size=32 is not allowed; ArCHer's actor step does not accumulate"),
    ({"algorithm": "etpo", "learner.microbatch_size": 32},
     "config.learner.microbatch_size=32 is not allowed; ETPO's Q and policy steps do not accumulate"),
    ({"rollout.action_pattern": "(unclosed"}, "config.rollout.action_pattern='(unclosed' is not allowed; "
                                              "must be a regular expression"),
])
def test_rules_between_fields(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate.check(base(**changes))


def test_unknown_algorithm_lists_the_registered_ones_last():
    with pytest.raises(ConfigError, match=r"config\.algorithm='nope' is not allowed; .*grpo.*ppo"):
        validate.check(base(algorithm="nope"))
    # a bad value elsewhere is reported first: the name check comes last
    with pytest.raises(ConfigError, match=r"config\.total_steps"):
        validate.check(base(algorithm="nope", total_steps=0))


def test_override_keys_of_a_loaded_config():
    config = defaults.base()
    validate.check_override_key(config, "env.kwargs.num_boxes")
    with pytest.raises(ConfigError, match=r"config\.seed\.x is not a config key; config\.seed is a value"):
        validate.check_override_key(config, "seed.x")
    with pytest.raises(ConfigError, match=r"config\.optim\.lr is not a config key; keys of config\.optim: "
                                          r"b1, b2, .*learning_rate"):
        validate.check_override_key(config, "optim.lr")  # none is close: the block's keys


def test_hub_id_while_offline_says_how_to_use_a_local_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    validate.check(base(**{"model.source": str(tmp_path)}))  # a local directory: fine
    with pytest.raises(ConfigError, match=r"config\.model\.source='org/model' is not allowed; .*local copy"):
        validate.check(base(**{"model.source": "org/model"}))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    validate.check(base(**{"model.source": "org/model"}))
