"""Held-out success of one algorithm on the two-step chain for several seeds.

Runs the configuration of tests/trainer/chain_mdp_test.py (8 fake CPU devices)
through loop.train, one seed per call, and prints one line per seed:

  python experiments/chain_seeds.py --algorithm archer --seeds 0 1 2 3 4 5
"""
import argparse
import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aem_jax.trainer import loop  # noqa: E402
from tests.trainer.chain_mdp_test import chain_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", choices=("archer", "etpo"), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    args = parser.parse_args()
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as workdir:
            summary = loop.train(chain_config(args.algorithm, seed), workdir)
        print(f"{args.algorithm} seed {seed}: held-out success {summary['success_before']:.2f} -> "
              f"{summary['success_after']:.2f}", flush=True)


if __name__ == "__main__":
    main()
