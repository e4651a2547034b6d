"""Multi-host rollouts: two processes (gloo, one CPU device each) each play their own share of a
step's episodes of the default smoke config; the union of their episodes is the single-process
run's, none played twice, and the assembled global batch equals the single-process batch.

Run as a script, this file is one worker: ``python rollout_share_test.py OUT PID NPROC PORT``.
"""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import multiprocess

REPO = pathlib.Path(__file__).resolve().parents[2]
FIELDS = ("tokens", "loss_mask", "turn_ids", "attention_mask", "turn_rewards", "turn_valid", "group_ids",
          "episode_ids", "old_logp", "old_entropy")


def _worker(out: pathlib.Path, pid: int, nproc: int, port: int) -> None:
    import jax

    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    from aem_jax import sharding
    from aem_jax.trainer import algorithms, loop, rollouts, setup

    config = setup.load_config(str(REPO / "configs/default.py") + ":smoke")
    mesh = sharding.make_mesh(dict(config.mesh))
    ctx = loop.build_context(config, mesh)
    algorithm = algorithms.get(config.algorithm)
    with sharding.use_mesh(mesh):
        batch, records, roll = rollouts.play_share(ctx, algorithm, ctx.init_params, 0)
        local = {"seeds": [r.seed for r in records], "episodes": [r.episode for r in records],
                 "groups": [r.group for r in records], "env_steps": roll["env_steps"]}
        rows = [np.asarray(batch.tokens)[i][np.asarray(batch.attention_mask)[i] > 0]
                for i in range(len(records))]  # concatenated: row i is episode i of the share
        if nproc > 1:
            batch, records, roll = rollouts.assemble(ctx, batch, records, roll)
    np.savez(out / f"process_{pid}_of_{nproc}.npz",
             **{f"local_{k}": np.asarray(v) for k, v in local.items()},
             **{f"row_{i}": r for i, r in enumerate(rows)},
             **{f"global_{f}": np.asarray(getattr(batch, f)) for f in FIELDS},
             global_seeds=np.asarray([r.seed for r in records]),
             global_returns=np.asarray([r.episode_return for r in records]),
             global_env_steps=np.asarray(roll["env_steps"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: pathlib.Path, nproc: int) -> list[dict]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "AEM_JAX_DISTRIBUTED"):
        env.pop(name, None)
    port = _free_port()
    logs = [out / f"log_{pid}_of_{nproc}.txt" for pid in range(nproc)]
    procs = []
    for pid, log in enumerate(logs):
        with open(log, "w") as f:  # files, not pipes: a full pipe would stall the other's collectives
            procs.append(subprocess.Popen([sys.executable, __file__, str(out), str(pid), str(nproc), str(port)],
                                          env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT))
    multiprocess.wait_all(procs, timeout=240)
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log.read_text()[-4000:]
    return [dict(np.load(out / f"process_{pid}_of_{nproc}.npz")) for pid in range(nproc)]


@pytest.mark.slow
def test_two_processes_play_disjoint_shares_whose_union_is_the_single_process_step(tmp_path):
    (one,) = _run(tmp_path, 1)
    two = _run(tmp_path, 2)

    # Each process played only its own tasks (all G rollouts of each), none twice.
    episodes = [list(p["local_episodes"]) for p in two]
    assert episodes == [[0, 1], [2, 3]], episodes  # smoke: 2 tasks x 2 rollouts, one task per process
    assert [set(p["local_groups"]) for p in two] == [{0}, {1}]
    union = sorted(e for p in episodes for e in p)
    assert union == sorted(one["local_episodes"].tolist()) and len(union) == len(set(union))
    seeds = [s for p in two for s in p["local_seeds"].tolist()]
    assert seeds == one["local_seeds"].tolist()
    assert sum(float(p["local_env_steps"]) for p in two) == float(one["local_env_steps"])
    # The same episodes token for token: a row's sampling key is its episode's, wherever it is played.
    rows_two = [p[f"row_{i}"] for p in two for i in range(len(p["local_episodes"]))]
    rows_one = [one[f"row_{i}"] for i in range(len(one["local_episodes"]))]
    for a, b in zip(rows_two, rows_one):
        np.testing.assert_array_equal(a, b)

    # Both processes hold the same global batch, and it is the single-process batch.
    for p in two:
        for f in FIELDS:
            want, got = one[f"global_{f}"], p[f"global_{f}"]
            assert got.shape == want.shape, (f, got.shape, want.shape)
            if f in ("old_logp", "old_entropy"):  # other batch shapes in the sampler: float rounding only
                np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f)
            else:
                np.testing.assert_array_equal(got, want, err_msg=f)
        np.testing.assert_array_equal(p["global_seeds"], one["global_seeds"])
        np.testing.assert_allclose(p["global_returns"], one["global_returns"])
        assert float(p["global_env_steps"]) == float(one["global_env_steps"])


def test_task_shares_cover_the_tasks_once_and_keep_groups_whole():
    from aem_jax.trainer.distributed import task_share

    shares = [task_share(12, p, 4) for p in range(4)]
    assert [list(s) for s in shares] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    with pytest.raises(ValueError, match=r"num_tasks=10 must be a multiple of the number of processes \(4\)"):
        task_share(10, 0, 4)


def test_disagreeing_processes_fail_loudly(monkeypatch):
    from aem_jax.trainer import distributed

    table = np.array([[7, 1], [8, 1]], np.int32)  # two processes: configs 7 and 8 (names sorted), step 1
    monkeypatch.setattr(distributed, "gather_rows", lambda x: table)
    with pytest.raises(RuntimeError, match=r"processes disagree on config_sha256 \(process 0: 7, process 1: 8\)"):
        distributed.check_agreement({"step": 1, "config_sha256": 7})
    monkeypatch.setattr(distributed, "gather_rows", lambda x: np.stack([x, x]))
    distributed.check_agreement({"step": 1, "config_sha256": 7})


def test_episode_keys_make_a_rows_draws_independent_of_its_batch():
    """EpisodeKeys: an episode's tokens are the same played alone or among others, at any row."""
    import jax
    from flax import nnx

    from aem_jax import models
    from aem_jax.models import sampler
    from aem_jax.rollout import TurnContext
    from aem_jax.trainer.rollouts import EpisodeKeys

    config = models.ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                num_kv_heads=1, head_dim=16, qkv_bias=False, qk_norm=True)
    model = models.Decoder(config, rngs=nnx.Rngs(0))

    class Raw:
        def generate(self, prompts, *, key, contexts=None):
            out = sampler.generate(model, prompts, key=key, params=sampler.SamplingParams(max_new_tokens=6),
                                   pad_id=0, max_cache_len=32)
            return [list(out.tokens[i]) for i in range(len(prompts))]

    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    ctx = [TurnContext(e, 0, "", {}, None) for e in range(4)]
    key = jax.random.key(3)
    together = EpisodeKeys(Raw(), first_episode=10).generate(prompts, key=key, contexts=ctx)
    # episode 12 again, at row 0 among other episodes (one batch shape: the sampler compiles once)
    others = [[6, 7, 8, 9], [11], [12, 13], [14, 15]]
    ctx_others = [TurnContext(e, 0, "", {}, None) for e in (0, 7, 8, 9)]
    mixed = EpisodeKeys(Raw(), first_episode=12).generate(others, key=key, contexts=ctx_others)
    assert mixed[0] == together[2]
    reversed_ = EpisodeKeys(Raw(), first_episode=10).generate(prompts[::-1], key=key, contexts=ctx[::-1])
    assert reversed_[::-1] == together
    assert len({tuple(t) for t in together}) > 1


if __name__ == "__main__":
    _worker(pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
