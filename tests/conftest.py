"""Test-wide set-up: 8 fake CPU devices, float32 maths, quiet logs.

The XLA flag must be set before jax initialises its backends, which is why it
lives at the top of conftest.py (pytest imports it before any test module).
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)


def pytest_report_header(config):
    del config
    return f"jax {jax.__version__}: {jax.device_count()} devices ({jax.devices()[0].platform})"
