"""Held-out success of one algorithm on the two-step chain for several seeds.

Runs the configuration of tests/trainer/chain_mdp_test.py (8 fake CPU devices)
through loop.train, one seed per call, and prints one line per seed and a
last line with the number of seeds that reached 0.9 (the test's bar):

  python experiments/chain_seeds.py --algorithm archer --seeds 0 1 2 3 4 5
  python experiments/chain_seeds.py --algorithm archer --seeds 0 1 --set archer.actor_clip=0 \
      --set archer.actor_steps=1 --workdir /tmp/chain_runs

``--set KEY=VALUE`` overrides one field of that config (value parsed as a
Python literal: 0.1, 3, True, 'text'); ``--workdir DIR`` keeps each run's
metrics.jsonl and eval.json under DIR/<algorithm>_seed<seed> (default: a
temporary directory, deleted).
"""
import argparse
import ast
import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aem_jax.trainer import loop  # noqa: E402
from tests.trainer.chain_mdp_test import chain_config  # noqa: E402

BAR = 0.9  # held-out success the chain test asks for


def parse_override(text: str) -> tuple[str, object]:
    """``"a.b=VALUE"`` -> ("a.b", the Python literal VALUE, or the raw string)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def apply_override(config, key: str, value) -> None:
    """Sets ``config.<key>`` (dotted); the key must exist in the config."""
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        if name not in node:
            raise KeyError(f"--set {key}: no field {name!r} in the config")
        node = node[name]
    if leaf not in node:
        raise KeyError(f"--set {key}: no field {leaf!r} in the config")
    node[leaf] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", choices=("archer", "etpo"), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--set", dest="overrides", type=parse_override, action="append", default=[],
                        metavar="KEY=VALUE", help="override one field of the chain config (repeatable)")
    parser.add_argument("--workdir", default=None, help="keep each run's outputs under this folder")
    args = parser.parse_args()
    passed = 0
    for seed in args.seeds:
        config = chain_config(args.algorithm, seed)
        for key, value in args.overrides:
            apply_override(config, key, value)
        if args.workdir:
            summary = loop.train(config, os.path.join(args.workdir, f"{args.algorithm}_seed{seed}"))
        else:
            with tempfile.TemporaryDirectory() as workdir:
                summary = loop.train(config, workdir)
        passed += summary["success_after"] >= BAR
        print(f"{args.algorithm} seed {seed}: held-out success {summary['success_before']:.2f} -> "
              f"{summary['success_after']:.2f}", flush=True)
    settings = " ".join(f"{k}={v!r}" for k, v in args.overrides) or "(test settings)"
    print(f"{args.algorithm} {settings}: {passed}/{len(args.seeds)} seeds reach {BAR}", flush=True)


if __name__ == "__main__":
    main()
