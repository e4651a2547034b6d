"""Software-engineering agents, DeepSWE-style RLOO + AEM (the AEM paper's SWE-bench-Verified setup).

Run on a TPU slice (see docs/tpu.md and launch/):
  python -m aem_jax.train --config=configs/swe.py --workdir=gs://BUCKET/runs/swe
Run 2 smoke steps on CPU with a tiny scratch model on the project's local task set:
  python -m aem_jax.train --config=configs/swe.py:smoke --workdir=/tmp/swe_smoke

Settings (ALGORITHMS.md section 3, DeepSWE's "GRPO++"): leave-one-out
advantages without std division, clip-higher 0.28, token-mean loss, no KL and
no entropy term, many long turns. The agent speaks the XML tool format of
aem_jax.envs.swe (bash, view, str_replace, create, submit).

Precision: float32 master parameters and AdamW moments, bfloat16 compute
(``model.param_dtype`` / ``model.dtype``): at lr 1e-6 an AdamW step moves a
weight by ~1e-6 of its scale, below bfloat16's 2^-9 rounding step, so
bfloat16 storage would drop most updates.

Mesh for a TPU v5p-128 slice (64 chips, 95 GiB HBM each): Qwen3-32B has
32.8e9 parameters; float32 master parameters + 2 float32 Adam moments are
12 bytes/param = 393 GB, and the float32 gradient another 4 bytes/param
(131 GB) during the update: 525 GB in all, about 8.2 GB per chip when
parameters and optimiser state are sharded FSDP-style over 16 chips
(``fsdp=16``) and the wide matmuls over 4 (``tensor=4``, heads / MLP /
vocab); the remaining axis is data parallel (``data=-1`` -> 1 here; 2 on
v5p-256). The rest of each chip's HBM holds activations: a minibatch of
32 rows x 32k tokens is accumulated in micro-batches of 16 rows
(``learner.microbatch_size``: one row per FSDP shard at a time). On a
v5p-64, use fsdp=8, tensor=4.
"""
from aem_jax.trainer.defaults import base, smoke


def get_config(arg: str | None = None):
    c = base()
    c.algorithm = "rloo"                 # DeepSWE's leave-one-out advantages
    c.total_steps = 200
    c.env.name = "swe"
    c.env.kwargs = {
        "tasks": "local",                # the project's generated task set; or a SWE-bench JSONL path / TFDS name
        "split": "train",
        "sandbox": "local",              # local (bubblewrap / unshare) | container (docker / podman with the instance image)
        "max_turns": 40,                 # tool calls per episode
        "command_timeout_s": 60.0,       # wall-clock limit of one command
        "episode_time_s": 1800.0,        # wall-clock limit of one episode
    }
    c.model.source = "Qwen/Qwen3-32B"    # hub id or local Hugging Face directory
    c.model.dtype = "bfloat16"           # compute
    c.model.param_dtype = "float32"      # master parameters and optimiser state
    c.rollout.num_tasks = 16
    c.rollout.group_size = 8
    c.rollout.max_turns = 40
    c.rollout.history = "concatenated"
    c.rollout.seq_bucket = 0         # one shape: long SWE rows would otherwise compile per 32-token length
    c.rollout.max_context_tokens = 32768
    c.rollout.max_action_tokens = 2048
    c.rollout.temperature = 1.0
    c.rollout.step_timeout_s = 120.0
    c.rollout.num_threads = 32
    c.loss.clip_low = 0.2
    c.loss.clip_high = 0.28              # clip-higher
    c.loss.agg = "token-mean"
    c.loss.chunk_size = 2048
    c.aem.enabled = True
    c.learner.minibatch_size = 32
    c.learner.microbatch_size = 16       # gradient accumulation: 2 micro-batches per optimiser step
    c.model.remat = "full"               # recompute each layer in the backward pass: 36 GiB per v5p chip for
                                         # the train step instead of >= 383 GiB (python -m aem_jax.plan, docs/tpu.md)
    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 10
    c.mesh.data = -1
    c.mesh.fsdp = 16
    c.mesh.tensor = 4
    c.checkpoint.every = 5
    c.eval.num_tasks = 21                # the local set's held-out "test" split (21 tasks; eval.split "" = test)
    c.eval.every = 25                    # pass@k on the held-out split every 25 steps (and before / after)
    c.eval.samples_per_task = 4          # 4 sampled episodes per held-out task: pass@1 and pass@4
    c.eval.pass_at = (1, 4)
    c.records.transcripts_every = 10     # every 10th step's episodes to workdir/transcripts/
    c.export.enabled = True              # Hugging Face directory for transformers / vLLM
    c.export.every = 100                 # workdir/export/step_000100, ...; workdir/export/final at the end
    c.export.dtype = "bfloat16"          # as Qwen3's published weights
    if arg == "smoke":
        c.model.source = "scratch"
        c.model.dtype = "float32"
        c.model.param_dtype = "float32"
        c.model.tokenizer = "bpe"
        c.model.tokenizer_corpus_tasks = 2
        c.model.bpe_vocab_size = 400
        c.mesh.fsdp = 1
        c.mesh.tensor = 1
        smoke(c)
        c.learner.microbatch_size = 2    # minibatch of 4 rows in 2 micro-batches: accumulation runs in the smoke test
        c.env.kwargs["max_turns"] = 2
        c.rollout.max_turns = 2
        c.rollout.max_context_tokens = 2048
        c.rollout.max_action_tokens = 16
        c.rollout.num_threads = 4
        c.loss.chunk_size = 512
        c.eval.num_tasks = 0
        c.eval.samples_per_task = 1
        c.eval.pass_at = (1,)
        c.records.transcripts_every = 1
        c.export.enabled = False
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/swe.py; known: smoke")
    return c
