"""The registry of training algorithms: name -> ``context.Algorithm`` record.

The policy-gradient family shares one update (``pg``) and differs in the
advantage estimator, the clipping unit and a few flags; ArCHer and ETPO have
their own modules. Config validation reads this registry, never a second
list. Plain imports: nothing here is looked up by string.
"""
from __future__ import annotations

from aem_jax.trainer import archer, etpo, pg, sft
from aem_jax.trainer.context import Algorithm

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a for a in (
        pg.algorithm("grpo", paper="2402.03300"),
        pg.algorithm("dr_grpo", paper="2503.20783", normalize_std=False),
        pg.algorithm("dapo", paper="2503.14476", dynamic_sampling=True),
        pg.algorithm("gspo", paper="2507.18071", loss="gspo"),
        pg.algorithm("rloo", paper="2402.14740", estimator="rloo"),
        pg.algorithm("gigpo", paper="2505.10978", estimator="gigpo"),
        pg.algorithm("ppo", paper="1707.06347", estimator="gae", value_head=True),
        archer.ALGORITHM,
        etpo.ALGORITHM,
        sft.ALGORITHM,
    )
}


def register(algorithm: Algorithm) -> None:
    """Adds an algorithm to the registry (e.g. from a plugin module)."""
    ALGORITHMS[algorithm.name] = algorithm


def get(name: str) -> Algorithm:
    """The registered algorithm ``name``; unknown names list the registered ones."""
    if name not in ALGORITHMS:
        raise ValueError(f"config.algorithm={name!r} is not allowed; registered: {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]
