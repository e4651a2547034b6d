"""Tests for ``python -m aem_jax.plan``: ahead-of-time compiles for a named TPU slice.

The planner runs in a subprocess (it points JAX at libtpu's deviceless
topology) on a 2-layer Qwen3-shaped model described by a config.json alone.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from aem_jax import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install '.[plan]')")

TINY = {"model_type": "qwen3", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1024,
        "tie_word_embeddings": True, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "eos_token_id": 1}
# Small shapes for the SWE config: 2 tasks x 8 rollouts, 512-token context.
SMALL = ["--config.rollout.max_context_tokens=512", "--config.rollout.max_action_tokens=64",
         "--config.rollout.num_tasks=2", "--config.learner.minibatch_size=8", "--config.rollout.max_turns=4"]


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("JAX_PLATFORMS", None)  # the planner sets its own
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "aem_jax.plan", "--config=configs/swe.py", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _record(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _model_dir(tmp_path, **changes):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**TINY, **changes}))
    return str(d)


def _tiny_param_count(c) -> tuple[int, int]:
    """(parameters split over all 4 chips, replicated parameters) of TINY on fsdp=2 x tensor=2."""
    D, F, N, K, H, V, L = (c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                           c["num_key_value_heads"], c["head_dim"], c["vocab_size"], c["num_hidden_layers"])
    split = V * D + L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F)
    replicated = L * (2 * D + 2 * H) + D  # the two norms and q/k norms per layer, the final norm
    return split, replicated


def test_slice_names_count_cores_on_v4_v5p_and_chips_on_v5e_v6e():
    assert (plan.parse_slice("v5p-64").chips, plan.parse_slice("v5p-64").topology_name) == (32, "v5p:2x4x4")
    assert (plan.parse_slice("v4-8").chips, plan.parse_slice("v4-8").topology_name) == (4, "v4:2x2x1")
    assert (plan.parse_slice("v6e-64").chips, plan.parse_slice("v6e-64").topology_name) == (64, "v6e:8x8")
    assert plan.parse_slice("v5litepod-16").name == "v5e-16" and plan.parse_slice("v5e-16").hosts == 4
    assert plan.parse_slice("v5e-8").hosts == 1 and plan.parse_slice("v5p-128").hosts == 16
    for bad in ("v5p-6", "v5p-63", "v7-8", "tpu", "v6e-3"):
        with pytest.raises(ValueError, match="known: .*v5p-64"):
            plan.parse_slice(bad)


def test_unknown_topology_exits_2_with_one_line_listing_the_known_ones():
    result = _run("--topology=v5p-63", timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "v5p-63" in line and "v5p-64" in line and "v6e-64" in line and "v4-8" in line


def test_analytic_flops_match_a_direct_count():
    from aem_jax.models import from_hf_config

    mc = from_hf_config(TINY)
    B, T = 3, 7
    split, _ = _tiny_param_count(TINY)
    dense = 2 * split * B * T  # every matmul weight (embedding = tied unembedding) once per token
    pairs = sum(t + 1 for t in range(T))  # causal query-key pairs
    attention = 2 * 2 * TINY["num_hidden_layers"] * TINY["num_attention_heads"] * TINY["head_dim"] * B * pairs
    assert plan.forward_flops(mc, B, T) == dense + attention
    assert plan.train_flops(mc, B, T) == 3 * (dense + attention)


@needs_libtpu
@pytest.mark.slow
def test_tiny_model_fits_with_consistent_figures(tmp_path):
    record = _record(_run("--topology=v5e-4", f"--config.model.source={_model_dir(tmp_path)}",
                          "--config.mesh.fsdp=2", "--config.mesh.tensor=2", *SMALL))
    assert record["topology"] == "v5e-4" and record["chips"] == 4 and record["fits"] is True
    assert record["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert record["hbm_bytes_per_chip"] == 16 * 1024**3
    for key in ("train", "sampler"):
        mem = record[f"{key}_memory"]
        assert all(v >= 0 for v in mem.values()) and mem["arguments"] > 0 and mem["temporaries"] > 0
        total = mem["arguments"] + mem["outputs"] + mem["temporaries"] - mem["aliased"] + mem["code"]
        resident = record["opt_state_bytes_per_chip"] + 8 if key == "sampler" else 0
        assert record[f"{key}_step_bytes_per_chip" if key == "train" else "sampler_bytes_per_chip"] == total + resident
        assert 0 < total + resident < record["hbm_bytes_per_chip"]
    # Parameters: every matrix split over the 4 chips, the norm scales whole.
    itemsize = {"float32": 4, "bfloat16": 2}[record["model"]["param_dtype"]]
    split, replicated = _tiny_param_count(TINY)
    assert record["model"]["params"] == split + replicated
    assert record["params_bytes_per_chip"] == (split // 4 + replicated) * itemsize
    # Adam's two moments are laid out as the parameters; the step counts are scalars.
    assert 2 * record["params_bytes_per_chip"] <= record["opt_state_bytes_per_chip"] <= 2 * record["params_bytes_per_chip"] + 64
    # The donated train state comes back in the same buffers.
    assert record["train_memory"]["aliased"] >= record["params_bytes_per_chip"] + record["opt_state_bytes_per_chip"]
    assert record["minibatch_rows"] == 8 and record["sampler_rows"] == 16 and record["context_tokens"] == 512
    assert record["flops_per_step"] >= record["model_flops_per_step"] > 0
    assert record["compiled_flops_per_step"] > 0
    # Traced as on a TPU host: attention="auto" is the Pallas splash kernel (forward and backward).
    assert record["model"]["attention"] != "auto" or record["train_pallas_calls"] >= 2
    peak = record["flops_per_step"] / (4 * record["peak_flops_per_chip"])
    assert record["est_step_seconds"] >= peak > 0 and record["est_sampler_seconds"] > 0


@needs_libtpu
@pytest.mark.slow
def test_parameters_that_cannot_fit_report_fits_false_with_largest_buffers(tmp_path):
    # 17.5 B parameters (a 1M-token vocabulary, untied) on four 16 GiB chips.
    source = _model_dir(tmp_path, hidden_size=8192, intermediate_size=8192, num_hidden_layers=1,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=128, vocab_size=1 << 20,
                        tie_word_embeddings=False)
    result = _run("--topology=v5e-4", f"--config.model.source={source}", "--config.mesh.fsdp=4",
                  "--config.mesh.tensor=1", *SMALL)
    record = _record(result)
    assert record["fits"] is False and record["chips"] == 4
    assert record["params_bytes_per_chip"] + record["opt_state_bytes_per_chip"] > record["hbm_bytes_per_chip"]
    assert "train" in record["not_fitting"]
    train = record["not_fitting"]["train"]
    assert train["reason"] and train["largest"]
    assert train["largest"][0]["bytes_per_chip"] == (1 << 20) * 8192 * {"float32": 4, "bfloat16": 2}[
        record["model"]["param_dtype"]] // 4
    assert record["train_step_bytes_per_chip"] > record["hbm_bytes_per_chip"]
    assert "DOES NOT FIT" in result.stdout


@needs_libtpu
@pytest.mark.slow
def test_multi_host_sampler_runs_on_one_hosts_chips_with_its_share_of_the_tasks(tmp_path):
    # v5p-16: 8 chips on 2 hosts of 4; 2 tasks x 8 rollouts -> one task (8 rows) per process.
    record = _record(_run("--topology=v5p-16", "--steps=sampler", f"--config.model.source={_model_dir(tmp_path)}",
                          "--config.mesh.fsdp=2", "--config.mesh.tensor=4", *SMALL))
    assert (record["chips"], record["hosts"]) == (8, 2)
    # The host-blocked mesh keeps tensor=4 inside each host; the fsdp axis spans the two.
    assert record["sampler_mesh"] == {"data": 1, "fsdp": 1, "tensor": 4}
    assert record["sampler_rows"] == 8
    assert record["train_step_bytes_per_chip"] is None and record["train_memory"] is None  # not compiled
    # The process-local copy: bfloat16 (the compute dtype), split by tensor over the host's 4 chips,
    # whole along the fsdp axis that spans the hosts; kv_heads=2 cannot split over 4 chips.
    c = TINY
    D, F, N, K, H, V, L = (c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                           c["num_key_value_heads"], c["head_dim"], c["vocab_size"], c["num_hidden_layers"])
    split = V * D + L * (D * N * H + N * H * D + 3 * D * F)
    whole = L * (2 * D * K * H + 2 * D + 2 * H) + D
    assert record["model"]["param_dtype"] == "float32" and record["sampler_params_dtype"] == ["bfloat16"]
    assert record["sampler_params_bytes_per_chip"] == 2 * (split // 4 + whole)
    assert record["sampler_memory"]["arguments"] >= record["sampler_params_bytes_per_chip"]
    # Every float32 training shard stays resident next to the sampler, with Adam's moments.
    total = sum(record["sampler_memory"][k] for k in ("arguments", "outputs", "temporaries", "code")) \
        - record["sampler_memory"]["aliased"]
    resident = record["opt_state_bytes_per_chip"] + 8 + record["params_bytes_per_chip"]
    assert record["sampler_bytes_per_chip"] == total + resident and record["fits"] is True


@needs_libtpu
@pytest.mark.slow
def test_multi_host_sampler_on_v6e_whose_hosts_are_2x2_blocks_of_the_grid(tmp_path):
    # v6e-16: a 4x4 grid, 4 hosts of 2x2 chips (host 0 holds device ids 0, 1, 4, 5); tensor=8 spans two
    # hosts, so each host's copy is split 4 ways by tensor; 4 tasks x 8 rollouts -> 8 rows per host.
    record = _record(_run("--topology=v6e-16", "--steps=sampler", f"--config.model.source={_model_dir(tmp_path)}",
                          "--config.mesh.fsdp=2", "--config.mesh.tensor=8", *SMALL, "--config.rollout.num_tasks=4"))
    assert (record["chips"], record["hosts"], record["sampler_rows"]) == (16, 4, 8)
    assert record["mesh"] == {"data": 1, "fsdp": 2, "tensor": 8}
    assert record["sampler_mesh"] == {"data": 1, "fsdp": 1, "tensor": 4}
    assert record["sampler_memory"] is not None and record["fits"] is True, record.get("not_fitting")
