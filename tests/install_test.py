"""The install is honest: what the code imports at run time is what pyproject.toml declares.

``test_fresh_venv_*`` build a virtual environment with no system packages,
install the project with no extras (``pip install .``, from a copy of the
sources so the checkout is not touched), and run there what a user runs
first: the default config's ``:smoke`` variant, and ``import
aem_jax.objectives`` alone. A package that the code imports but
pyproject.toml does not declare (jinja2 once: transformers renders chat
templates with it but no longer depends on it) fails here, whatever the
developer's own environment happens to hold. pip's cache is reused, so after
the first run the install reads wheels from disk.

The suite's one slow test (about a minute and a half on 2 cores); deselect it
with ``-m 'not slow'`` while iterating.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import venv

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# What importing the losses must not pull in: the trainer, models, environments,
# and the heavy libraries only they need.
NOT_IMPORTED_BY_OBJECTIVES = (
    "aem_jax.trainer", "aem_jax.models", "aem_jax.envs", "aem_jax.rollout",
    "transformers", "tensorflow_datasets", "torch", "textworld", "orbax", "flax",
)

OBJECTIVES_CHECK = f"""
import sys
import aem_jax.objectives as obj
bad = sorted(m for m in sys.modules if m.split('.')[0] in {NOT_IMPORTED_BY_OBJECTIVES!r}
             or any(m == p or m.startswith(p + '.') for p in {NOT_IMPORTED_BY_OBJECTIVES!r}))
assert not bad, f"import aem_jax.objectives imported {{bad[:8]}}"
import jax.numpy as jnp
logp = obj.token_logprobs(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), jnp.int32))
assert logp.shape == (1, 2)
print("objectives ok")
"""


def _run(cmd, *, cwd, env=None, timeout=900):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {result.returncode}\n"
        f"--- stdout (tail)\n{result.stdout[-4000:]}\n--- stderr (tail)\n{result.stderr[-4000:]}")
    return result


def _clean_env() -> dict[str, str]:
    """The environment minus what would leak the developer's packages into the venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """(python of a fresh venv holding ``pip install .`` of this checkout, scratch dir)."""
    root = tmp_path_factory.mktemp("fresh_install")
    src = root / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copy(REPO / "README.md", src)
    shutil.copytree(REPO / "aem_jax", src / "aem_jax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", str(src)], cwd=root, env=_clean_env())
    return python, root


@pytest.mark.slow
def test_fresh_venv_core_install_has_no_test_or_optional_packages(fresh_venv):
    python, root = fresh_venv
    probe = ("import importlib.util as u; "
             "print(*[m for m in ('torch', 'textworld', 'tensorflow_datasets', 'pytest') if u.find_spec(m)])")
    out = _run([python, "-c", probe], cwd=root, env=_clean_env()).stdout.strip()
    # Otherwise the checks below would not prove that the core install is enough.
    assert out == "", f"the core install pulled in optional packages: {out}"


@pytest.mark.slow
def test_fresh_venv_objectives_import_alone(fresh_venv):
    python, root = fresh_venv
    assert "objectives ok" in _run([python, "-c", OBJECTIVES_CHECK], cwd=root, env=_clean_env()).stdout


@pytest.mark.slow
def test_fresh_venv_runs_default_smoke(fresh_venv):
    python, root = fresh_venv
    workdir = root / "run"
    env = dict(_clean_env(), JAX_PLATFORMS="cpu")
    # cwd outside the checkout: the installed package, not the source tree, is imported
    _run([python, "-m", "aem_jax.train", f"--config={REPO / 'configs' / 'default.py'}:smoke",
          f"--workdir={workdir}"], cwd=root, env=env)
    assert (workdir / "eval.json").is_file()
    assert (workdir / "metrics.jsonl").read_text().count("\n") == 2


def test_objectives_import_pulls_in_no_trainer_models_or_heavy_libraries():
    """The same check in this environment (fast; torch and TextWorld are installed here)."""
    result = subprocess.run([sys.executable, "-c", OBJECTIVES_CHECK], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
