"""The registry of training algorithms.

Policy-gradient algorithms share one update (``update.pg_update_step``) and
differ in the advantage estimator, the clipping unit and a few defaults;
ArCHer and ETPO have their own update steps and register a runner module.
Config validation reads this registry, never a second list.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """What distinguishes an algorithm inside the shared training loop.

    Attributes:
      name: registry name.
      estimator: advantage estimator: "grpo" | "rloo" | "gigpo" | "gae".
      loss: "ppo" (token-level clip) or "gspo" (sequence-level clip).
      normalize_std: GRPO std division (False gives Dr.GRPO).
      dynamic_sampling: drop task groups whose rewards are all equal and
        refill the batch (DAPO).
      value_head: trains a value head on the policy trunk (PPO).
      runner: "module:attr" of an algorithm with its own update (ArCHer, ETPO).
      paper: arXiv id.
    """

    name: str
    estimator: str = "grpo"
    loss: str = "ppo"
    normalize_std: bool = True
    dynamic_sampling: bool = False
    value_head: bool = False
    runner: str | None = None
    paper: str = ""


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a for a in (
        Algorithm("grpo", paper="2402.03300"),
        Algorithm("dr_grpo", normalize_std=False, paper="2503.20783"),
        Algorithm("dapo", dynamic_sampling=True, paper="2503.14476"),
        Algorithm("gspo", loss="gspo", paper="2507.18071"),
        Algorithm("rloo", estimator="rloo", paper="2402.14740"),
        Algorithm("gigpo", estimator="gigpo", paper="2505.10978"),
        Algorithm("ppo", estimator="gae", value_head=True, paper="1707.06347"),
        Algorithm("archer", runner="aem_jax.trainer.archer:ArcherTrainer", paper="2402.19446"),
        Algorithm("etpo", runner="aem_jax.trainer.etpo:EtpoTrainer", paper="2402.06700"),
    )
}


def register(algorithm: Algorithm) -> None:
    """Adds an algorithm to the registry (e.g. from a plugin module)."""
    ALGORITHMS[algorithm.name] = algorithm


def get(name: str) -> Algorithm:
    """The registered algorithm ``name``; unknown names list the registered ones."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; registered: {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]
