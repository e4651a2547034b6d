"""Restoring one checkpoint of a finished run without touching its directory.

Shared by the scripts that inspect runs (critic_check.py, reeval.py): the
run's config is rebuilt from ``--config=SPEC --config.KEY=VALUE`` flags (the
checkpoint's config check names any key that differs from the run's), and
the asked step is restored from a scratch copy of ``checkpoints/STEP``.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from aem_jax import sharding
from aem_jax.trainer import checkpoint, loop, setup


def config_from_flags(flags: list[str]):
    """The config of ``--config=SPEC`` and ``--config.KEY=VALUE`` flags; SystemExit names a bad flag."""
    spec = next((f.split("=", 1)[1] for f in flags if f.startswith("--config=")), None)
    if spec is None:
        raise SystemExit("the flags after -- need --config=FILE[:variant]")
    bad = [f for f in flags if not f.startswith("--config.") and not f.startswith("--config=")]
    if bad:
        raise SystemExit(f"flags after -- must be --config=SPEC or --config.KEY=VALUE, got {bad}")
    return setup.load_config(spec, [f[len("--config."):] for f in flags if f.startswith("--config.")])


def checkpoint_steps(workdir) -> list[int]:
    """The steps of ``workdir/checkpoints`` (sorted; empty without any)."""
    root = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


@contextlib.contextmanager
def restored(config, workdir, step: int):
    """Yields (algorithm, ctx, the state restored at ``step``) inside the run's mesh.

    ``ctx.init_params`` are the policy's parameters before training (with
    ``model.source`` set, the warm start the run began from).
    """
    src = Path(workdir) / "checkpoints" / str(step)
    if not src.is_dir():
        have = checkpoint_steps(workdir)
        raise SystemExit(f"no checkpoint step {step} in {workdir}; have: {', '.join(map(str, have)) or 'none'}")
    algorithm = loop.check_config(config)
    mesh = sharding.make_mesh(dict(config.mesh))
    ctx = loop.build_context(config, mesh)
    with tempfile.TemporaryDirectory() as tmp, sharding.use_mesh(mesh):
        # A scratch copy holding only the asked step: the run directory is never written.
        shutil.copytree(src, Path(tmp) / "checkpoints" / str(step))
        fresh = algorithm.init(ctx)
        ckpt = checkpoint.Checkpointer(Path(tmp) / "checkpoints", max_to_keep=2, save_interval_steps=1)
        try:
            got, _, state = loop.restore(ctx, algorithm, fresh, ckpt, Path(tmp))
        finally:
            ckpt.close()
        if got != step:
            raise SystemExit(f"restored step {got}, asked {step}")
        yield algorithm, ctx, state
