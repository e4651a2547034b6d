"""Rollouts through python -m aem_jax.serve against the in-process sampler: the largest differences.

Serves the tiny checkpoint of tests/rollout/serve_test.py on loopback (in
this process), plays the treasure game through `EndpointPolicy` and through
the in-process sampler with the keys the server derives from the same seeds,
and prints, per history mode, whether the tokens agree and the largest
log-prob and entropy differences over the agent tokens:

  python experiments/serve_exactness.py [--tasks 8] [--group 4] [--turns 3]
"""
import argparse
import os
import sys
import tempfile
import threading

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from aem_jax import models, serve  # noqa: E402
from aem_jax.rollout import RolloutConfig, SamplerPolicy, collect, remote  # noqa: E402
from aem_jax.trainer.rollouts import EpisodeKeys  # noqa: E402
from tests.rollout.serve_test import MODEL_CONFIG, TOK, Seeded  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    args = parser.parse_args()
    model = models.init_model(MODEL_CONFIG, seed=0)
    directory = os.path.join(tempfile.mkdtemp(), "tiny")
    models.save_pretrained(model, TOK, directory)
    server = serve.Server(serve.Engine.load(directory, name="tiny"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for history in ("concatenated", "windowed"):
        config = RolloutConfig(num_tasks=args.tasks, group_size=args.group, max_turns=args.turns,
                               max_context_tokens=128, max_action_tokens=6, seq_bucket=64,
                               history=history, window=1)
        remote_policy = EpisodeKeys(remote.EndpointPolicy.for_rollout(server.url, TOK, config))
        local_policy = EpisodeKeys(Seeded(SamplerPolicy.for_rollout(model, TOK, config)))
        got, _, _ = collect("treasure", remote_policy, TOK, config, key=jax.random.key(11))
        want, _, _ = collect("treasure", local_policy, TOK, config, key=jax.random.key(11))
        agent = want.loss_mask > 0
        print(f"{history:<13} tokens equal: {np.array_equal(got.tokens, want.tokens)}  "
              f"agent tokens: {int(agent.sum())}  "
              f"max |d logp|: {np.abs(got.old_logp - want.old_logp)[agent].max():.2g}  "
              f"max |d entropy|: {np.abs(got.old_entropy - want.old_entropy)[agent].max():.2g}")
    server.shutdown()


if __name__ == "__main__":
    main()
