"""Chat settings of the rollout reach RolloutConfig from the trainer config."""
import pytest

from aem_jax.trainer import defaults, setup, validate


@pytest.mark.parametrize("value, want", [("template", None), ("on", True), ("off", False)])
def test_enable_thinking_maps_to_the_template_switch(value, want):
    c = defaults.base()
    c.rollout.enable_thinking = value
    validate.check(c)
    assert setup.rollout_config(c).enable_thinking is want


def test_observation_role_reaches_the_rollout_and_bad_values_are_named():
    c = defaults.base()
    c.rollout.observation_role = "tool"
    assert setup.rollout_config(c).observation_role == "tool"
    c.rollout.observation_role = "assistant"
    with pytest.raises(validate.ConfigError, match="rollout.observation_role='assistant'"):
        validate.check(c)
