"""Test-wide set-up: 8 fake CPU devices, float32 maths, quiet logs.

The XLA flag must be set before jax initialises its backends, which is why it
lives at the top of conftest.py (pytest imports it before any test module).
"""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA cache for the whole test session, shared by xdist workers
# and by the training subprocesses tests start: smoke configs and resumed runs
# compile the same programs (sampler, update) again and again.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "aem_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)


def pytest_report_header(config):
    del config
    return f"jax {jax.__version__}: {jax.device_count()} devices ({jax.devices()[0].platform})"
