"""Held-out evaluation (pass@k, the held-out split, its own key stream, exact
resume), transcripts and Hugging Face exports (aem_jax/trainer/records.py and
their use in the loop)."""
import dataclasses
import json
import math
import os
import re
import shutil
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from etils import epath
from flax import nnx

from aem_jax import models as M
from aem_jax import sharding
from aem_jax.rollout import EpisodeRecord
from aem_jax.trainer import defaults, loop, records, rng, rollouts, setup, validate
from aem_jax.trainer.validate import ConfigError
from tests.trainer.archer_test import _rows
from tests.trainer.metrics_test import memory_workdir  # noqa: F401 (fixture)
from tests.trainer.resume_test import is_timing


# --- pass@k ----------------------------------------------------------------------

def _pass_at_k_exact(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k) in exact rationals (math.comb(a, k) = 0 for a < k)."""
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def test_pass_at_k_equals_the_binomial_formula():
    rng_ = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng_.integers(1, 60))
        c, k = int(rng_.integers(0, n + 1)), int(rng_.integers(1, n + 1))
        assert records.pass_at_k(n, c, k) == pytest.approx(_pass_at_k_exact(n, c, k), abs=1e-12), (n, c, k)
    assert records.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the success rate
    assert records.pass_at_k(5, 0, 5) == 0.0 and records.pass_at_k(5, 1, 5) == 1.0
    for bad in ((4, 1, 5), (4, 1, 0), (4, 5, 1)):
        with pytest.raises(ValueError, match="pass@k needs"):
            records.pass_at_k(*bad)


def test_eval_metrics_average_pass_at_k_over_tasks_and_always_report_pass_at_1():
    rng_ = np.random.default_rng(1)
    successes = rng_.random((7, 4)) < 0.4
    returns = rng_.normal(size=(7, 4))
    out = records.eval_metrics(successes, returns, (2, 4))
    assert sorted(out) == ["eval/pass@1", "eval/pass@2", "eval/pass@4", "eval/return"]
    for k in (1, 2, 4):
        want = np.mean([_pass_at_k_exact(4, int(c), k) for c in successes.sum(axis=1)])
        assert out[f"eval/pass@{k}"] == pytest.approx(want, abs=1e-12)
    assert out["eval/pass@1"] == pytest.approx(successes.mean())
    assert out["eval/return"] == pytest.approx(returns.mean())


# --- schedule, eval.json -----------------------------------------------------------

def test_schedule_of_evaluations_transcripts_and_exports():
    c = defaults.base()
    c.total_steps, c.eval.every, c.records.transcripts_every = 10, 4, 3
    c.export.enabled, c.export.every = True, 4
    s = records.Schedule.of(c)
    assert [t for t in range(11) if s.evaluates(t)] == [0, 4, 8, 10]
    assert [t for t in range(1, 11) if s.transcribes(t)] == [3, 6, 9]
    assert [s.exports(t) for t in (3, 4, 8, 10)] == [None, "step_000004", "step_000008", "final"]
    c.eval.every, c.export.every = 0, 0
    s = records.Schedule.of(c)
    assert [t for t in range(11) if s.evaluates(t)] == [0, 10] and s.exports(4) is None
    c.eval.num_tasks, c.export.enabled = 0, False
    s = records.Schedule.of(c)
    assert not any(s.evaluates(t) for t in range(11)) and s.exports(10) is None


@pytest.mark.parametrize("where", ["local", "object store"])
def test_eval_log_keeps_evaluations_up_to_the_resume_step(where, tmp_path, request):
    workdir = str(tmp_path) if where == "local" else request.getfixturevalue("memory_workdir")
    settings = {"num_tasks": 2, "samples_per_task": 1, "split": None}
    log = records.EvalLog(workdir, resume_step=0, total_steps=4, enabled=True)
    for step in (0, 2, 4):
        log.add(step, settings, {"eval/pass@1": step / 10})
    saved = json.loads((epath.Path(workdir) / "eval.json").read_text())
    assert (saved["step"], saved["success_before"], saved["success_after"]) == (4, 0.0, 0.4)
    assert [h["step"] for h in saved["history"]] == [0, 2, 4]
    resumed = records.EvalLog(workdir, resume_step=2, total_steps=4, enabled=True)
    assert [h["step"] for h in resumed.history] == [0, 2]  # step 4 was after the checkpoint
    assert resumed.find(2, settings) is not None and resumed.find(2, dict(settings, num_tasks=3)) is None
    resumed.add(2, settings, {"eval/pass@1": 0.9})  # a repeated step replaces, never duplicates
    assert [h["step"] for h in resumed.history] == [0, 2] and resumed.pass_at_1(2) == 0.9
    fresh = records.EvalLog(workdir, resume_step=0, total_steps=4, enabled=True)
    assert fresh.history == []  # a fresh run starts a new log


# --- transcripts ---------------------------------------------------------------------

def _record(episode: int, **kwargs) -> EpisodeRecord:
    chat = [{"role": "system", "content": "tools"}, {"role": "user", "content": "the task"},
            {"role": "assistant", "content": "ls"}, {"role": "user", "content": "a.py"},
            {"role": "assistant", "content": "submit"}]
    return EpisodeRecord(episode=episode, group=episode // 2, seed=100 + episode // 2, transcript=chat,
                         turn_rewards=[-0.05, 1.0], success=True, turns=2, **kwargs)


def test_transcripts_on_an_object_store(memory_workdir):  # noqa: F811 (fixture)
    recs = [_record(0), _record(1, failed=True, error="StepTimeout: environment step exceeded step_timeout_s=1")]
    path = records.write_transcripts(memory_workdir, records.step_name("step", 12), recs, step=12, kind="train")
    assert os.fspath(path) == f"{memory_workdir}/transcripts/step_000012.jsonl"
    lines = [json.loads(line) for line in epath.Path(path).read_text().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert (first["step"], first["kind"], first["episode"], first["group"], first["seed"]) == (12, "train", 0, 0, 100)
    assert first["prompt"] == [{"role": "system", "content": "tools"}, {"role": "user", "content": "the task"}]
    # the last action got no observation (the episode ended); rewards are per turn
    assert first["turns"] == [{"action": "ls", "observation": "a.py", "reward": -0.05},
                              {"action": "submit", "reward": 1.0}]
    assert first["return"] == pytest.approx(0.95) and first["success"] is True
    assert lines[1]["failed"] is True and lines[1]["error"].startswith("StepTimeout")
    assert [p.name for p in epath.Path(memory_workdir, "transcripts").iterdir()] == ["step_000012.jsonl"]


def test_episode_metrics_report_masked_and_timed_out_shares():
    recs = [_record(i, failed=i == 3, error="StepTimeout: x" if i == 3 else None) for i in range(4)]
    recs[2].failed, recs[2].error = True, "RuntimeError: boom"  # failed, but not a timeout
    out = rollouts.episode_metrics(_rows(0, 4), recs, {"masked": 1}, t_roll=1.0, t_update=1.0, train_passes=1.0)
    assert out["masked_episodes_frac"] == 0.25 and out["step_timeout_frac"] == 0.25
    assert out["failed_episodes"] == 2.0


# --- Hugging Face export ------------------------------------------------------------------

def _tiny_model():
    tok = M.build_tokenizer([f"w{i}" for i in range(40)])
    config = M.ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=2, num_kv_heads=1, head_dim=16, model_type="qwen3", qkv_bias=False,
                           qk_norm=True, tie_embeddings=False)
    return M.init_model(config, seed=5), tok


def _batch(vocab: int):
    tokens = np.random.default_rng(2).integers(5, vocab, (2, 10)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :3] = 0
    return tokens, mask


def _torch_logits(path, tokens, mask) -> np.ndarray:
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(path), dtype=torch.float32)
    with torch.no_grad():
        return hf(input_ids=torch.tensor(tokens, dtype=torch.long),
                  attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()


def test_export_loads_in_transformers_with_the_jax_logits(tmp_path):
    model, tok = _tiny_model()
    tokens, mask = _batch(len(tok))
    ours = np.asarray(jax.jit(M.logits)(model, jnp.asarray(tokens), jnp.asarray(mask)))
    target = records.export_policy(model, tok, str(tmp_path), "step_000003")
    assert os.fspath(target) == str(tmp_path / "export" / "step_000003")
    valid = mask.astype(bool)
    theirs = _torch_logits(target, tokens, mask)
    assert np.abs(theirs - ours)[valid].max() / np.abs(ours)[valid].max() < 1e-4
    loaded_tok = transformers.AutoTokenizer.from_pretrained(os.fspath(target))
    assert loaded_tok.chat_template == tok.chat_template
    # Writing the same name again replaces it whole; nothing temporary stays behind.
    records.export_policy(model, tok, str(tmp_path), "step_000003")
    assert sorted(os.listdir(tmp_path / "export")) == ["step_000003"]
    # bfloat16 weights: config.json says so and transformers reads them as such.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    half = nnx.merge(graphdef, records.cast_params(params, "bfloat16"), rest)
    target = records.export_policy(half, tok, str(tmp_path), "final", dtype="bfloat16")
    assert json.loads((target / "config.json").read_text())["torch_dtype"] == "bfloat16"
    weights = safetensors.numpy.load_file(os.fspath(target / "model.safetensors"))
    assert {str(w.dtype) for w in weights.values()} == {"bfloat16"}
    half_ours = np.asarray(jax.jit(M.logits)(half, jnp.asarray(tokens), jnp.asarray(mask)), np.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(target))
    assert hf.dtype == torch.bfloat16
    theirs = _torch_logits(target, tokens, mask)  # the bfloat16 weights, computed in float32
    assert np.abs(theirs - half_ours)[valid].max() / np.abs(half_ours)[valid].max() < 0.05


def test_export_to_an_object_store_uploads_the_same_files(tmp_path, memory_workdir):  # noqa: F811 (fixture)
    model, tok = _tiny_model()
    local = records.export_policy(model, tok, str(tmp_path), "final")
    remote = records.export_policy(model, tok, memory_workdir, "final")
    assert os.fspath(remote) == f"{memory_workdir}/export/final"
    names = sorted(p.name for p in epath.Path(remote).iterdir())
    assert names == sorted(os.listdir(local)) and "config.json" in names and "model.safetensors" in names
    for name in names:
        assert (epath.Path(remote) / name).read_bytes() == (local / name).read_bytes(), name


# --- config checks ---------------------------------------------------------------------

def _swe_config():
    c = setup.load_config("configs/swe.py:smoke")
    assert c.env.kwargs["split"] == "train"
    return c


@pytest.mark.parametrize("changes,message", [
    ({"eval.pass_at": (1, 4)}, "config.eval.pass_at=(1, 4) is not allowed; must be a non-empty tuple of distinct "
                               "ints k in [1, eval.samples_per_task=1]"),
    ({"eval.pass_at": ()}, "config.eval.pass_at=() is not allowed"),
    ({"eval.pass_at": (1, 1)}, "config.eval.pass_at=(1, 1) is not allowed"),
    ({"eval.samples_per_task": 0}, "config.eval.samples_per_task=0 is not allowed; must be >= 1"),
    ({"eval.every": -1}, "config.eval.every=-1 is not allowed; must be >= 0 (0 = only before and after training)"),
    ({"records.transcripts_every": -2}, "config.records.transcripts_every=-2 is not allowed"),
    ({"export.every": -1}, "config.export.every=-1 is not allowed"),
    ({"export.dtype": "float16"}, "config.export.dtype='float16' is not allowed; allowed: 'float32', 'bfloat16'"),
    ({"eval.split": "test"}, "config.eval.split='test' is not allowed; environment 'treasure' has no splits"),
])
def test_bad_eval_records_and_export_settings_name_the_key(changes, message):
    config = defaults.base()
    for key, value in changes.items():
        block, leaf = key.split(".")
        with config[block].ignore_type():
            config[block][leaf] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate.check(config)


def test_swe_evaluates_its_held_out_split_never_the_training_split():
    c = _swe_config()
    validate.check(c)
    assert records.eval_split(c) == "test"
    c.eval.split = "train"
    with pytest.raises(ConfigError, match=re.escape("config.eval.split='train' is not allowed; evaluation plays "
                                                    "'train', which overlaps the training split "
                                                    "(env.kwargs.split='train')")):
        validate.check(c)
    for train, held_out in (("test", ""), ("test[:100]", ""), ("train+test", "test[:5]"), ("train", "all")):
        c.env.kwargs["split"], c.eval.split = train, held_out
        with pytest.raises(ConfigError, match="overlaps the training split"):
            validate.check(c)
    c.env.kwargs["split"], c.eval.split = "test[:100]", "test[100:]"  # disjoint slices of an unsplit file
    validate.check(c)
    assert records.eval_split(defaults.base()) is None  # seed-generated tasks: held-out seeds


@pytest.fixture(scope="module")
def smoke_ctx():
    config = setup.load_config("configs/default.py:smoke")
    return loop.build_context(config, sharding.make_mesh(dict(config.mesh)))


def test_evaluate_plays_the_held_out_split_with_its_own_key_stream(monkeypatch, smoke_ctx):
    ctx, config = smoke_ctx, smoke_ctx.config
    swe = config.copy_and_resolve_references()
    swe.env.name, swe.env.kwargs = "swe", {"tasks": "local", "split": "train"}
    swe.eval.num_tasks, swe.eval.samples_per_task, swe.eval.pass_at = 3, 4, (1, 4)
    ctx = dataclasses.replace(ctx, config=swe)
    wins = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], bool)
    calls = []

    def fake_collect(env, policy, tokenizer, cfg, *, key, task_seeds, env_kwargs):
        calls.append(dict(env=env, policy=policy, cfg=cfg, key=key, task_seeds=task_seeds, env_kwargs=env_kwargs))
        recs = [EpisodeRecord(episode=i, group=i // 4, seed=task_seeds[i // 4], success=bool(wins.flat[i]),
                              turn_rewards=[float(wins.flat[i])]) for i in range(12)]
        return None, recs, {}

    monkeypatch.setattr(rollouts, "collect", fake_collect)
    result = rollouts.evaluate(ctx, ctx.init_params, 7)
    (call,) = calls
    assert call["env"] == "swe" and call["env_kwargs"] == {"tasks": "local", "split": "test"}
    assert call["task_seeds"] == rng.eval_seeds(3)
    assert (call["cfg"].num_tasks, call["cfg"].group_size) == (3, 4)
    assert isinstance(call["policy"], rollouts.EpisodeKeys)  # a key per episode
    key_data = lambda k: np.asarray(jax.random.key_data(k)).tolist()  # noqa: E731
    assert key_data(call["key"]) == key_data(ctx.keys.at("eval", 7))
    np.testing.assert_array_equal(result.successes, wins)
    assert result.metrics["eval/pass@1"] == pytest.approx(wins.mean())
    assert result.metrics["eval/pass@4"] == pytest.approx(2 / 3)
    assert result.metrics["eval/return"] == pytest.approx(wins.mean())


class _Gathered(Exception):
    """Raised by the patched gather to stop evaluate once the shares are recorded."""


def test_evaluate_shares_uneven_task_counts_among_processes(monkeypatch, smoke_ctx):
    """4 tasks x 2 samples on 3 processes: shares of 1, 1 and 2 tasks, each with
    the episode keys one process would use; the gathered successes come back
    in task order."""
    config = smoke_ctx.config.copy_and_resolve_references()
    config.eval.num_tasks, config.eval.samples_per_task = 4, 2
    ctx = dataclasses.replace(smoke_ctx, config=config)
    wins = np.array([[1, 0], [0, 0], [1, 1], [0, 1]], bool)
    played = {}

    def fake_collect(env, policy, tokenizer, cfg, *, key, task_seeds, env_kwargs):
        tasks = [s - rng.eval_seeds(1)[0] for s in task_seeds]
        played[jax.process_index()] = (tasks, policy.first_episode)
        recs = [EpisodeRecord(episode=i, group=i // 2, seed=task_seeds[i // 2],
                              success=bool(wins[tasks[i // 2], i % 2]), turn_rewards=[0.5])
                for i in range(2 * len(tasks))]
        return None, recs, {}

    sent = {}

    def capture(rows):
        sent[jax.process_index()] = rows.copy()
        raise _Gathered

    monkeypatch.setattr(rollouts, "collect", fake_collect)
    monkeypatch.setattr(rollouts.distributed, "process_local", lambda tree, mesh, dtype=None: (tree, mesh))
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    for p in range(3):
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        monkeypatch.setattr(rollouts.distributed, "gather_rows", capture)
        with pytest.raises(_Gathered):
            rollouts.evaluate(ctx, ctx.init_params, 5)
    assert played == {0: ([0], 0), 1: ([1], 2), 2: ([2, 3], 4)}
    monkeypatch.setattr(rollouts.distributed, "gather_rows", lambda rows: np.stack([sent[p] for p in range(3)]))
    result = rollouts.evaluate(ctx, ctx.init_params, 5)  # as process 2
    np.testing.assert_array_equal(result.successes, wins)
    assert [r.group for r in result.records] == [2, 2, 3, 3] and [r.episode for r in result.records] == [4, 5, 6, 7]
    assert result.metrics["eval/return"] == pytest.approx(0.5)


# --- the loop: every output, and a resume that neither repeats nor skips one ----------------

@pytest.mark.slow
def test_loop_evaluates_transcribes_exports_and_resumes_exactly(tmp_path):
    """3 steps, checkpoints at 2 and 3; then the run is "killed" after step 3's
    evaluation and export but before its checkpoint (checkpoint 3 and the last
    outputs removed, as they would be missing or stale) and resumed: step 3 is
    trained, evaluated, transcribed and exported again, once, with the same
    numbers and bytes."""
    overrides = ["total_steps=3", "checkpoint.every=2", "eval.num_tasks=2", "eval.every=1",
                 "eval.samples_per_task=2", "records.transcripts_every=1", "export.enabled=true",
                 "export.every=2", "loss.entropy_coef=0.05"]
    config = setup.load_config("configs/default.py:smoke", overrides)
    config.eval.pass_at = (1, 2)
    workdir = tmp_path / "run"
    summary = loop.train(config, str(workdir))
    log = json.loads((workdir / "eval.json").read_text())
    assert [h["step"] for h in log["history"]] == [0, 1, 2, 3]
    assert summary["success_after"] == log["success_after"] == log["history"][-1]["eval/pass@1"]
    assert sorted(os.listdir(workdir / "transcripts")) == [
        "eval_000000.jsonl", "eval_000001.jsonl", "eval_000002.jsonl", "eval_000003.jsonl",
        "step_000001.jsonl", "step_000002.jsonl", "step_000003.jsonl"]
    episodes = (workdir / "transcripts" / "step_000002.jsonl").read_text().splitlines()
    assert len(episodes) == 4 and all(json.loads(e)["step"] == 2 for e in episodes)
    assert len((workdir / "transcripts" / "eval_000003.jsonl").read_text().splitlines()) == 4
    assert sorted(os.listdir(workdir / "export")) == ["final", "step_000002"]
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all({"eval/pass@1", "eval/pass@2", "masked_episodes_frac", "step_timeout_frac"} <= r.keys() for r in lines)

    reference = tmp_path / "reference"
    shutil.copytree(workdir, reference)
    shutil.rmtree(workdir / "checkpoints" / "3")
    shutil.rmtree(workdir / "export" / "final")
    (workdir / "transcripts" / "step_000003.jsonl").write_text("stale\n")
    resumed = loop.train(config, str(workdir))
    assert resumed["start_step"] == 2
    again = json.loads((workdir / "eval.json").read_text())
    assert again == log  # step 3 evaluated once more, with the same keys: the same numbers
    strip = lambda rows: [{k: v for k, v in r.items() if not is_timing(k)} for r in rows]  # noqa: E731
    assert strip(json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()) == strip(lines)
    for name in ("step_000003.jsonl", "eval_000003.jsonl"):
        assert (workdir / "transcripts" / name).read_text() == (reference / "transcripts" / name).read_text()
    for name in os.listdir(reference / "export" / "final"):
        assert (workdir / "export" / "final" / name).read_bytes() == \
            (reference / "export" / "final" / name).read_bytes(), name
    # A finished run resumed with a new evaluation size only evaluates (and exports nothing new).
    config.eval.num_tasks = 4
    summary = loop.train(config, str(workdir))
    log = json.loads((workdir / "eval.json").read_text())
    assert (log["step"], log["num_tasks"]) == (3, 4) and [h["step"] for h in log["history"]] == [0, 1, 2, 3]
    assert summary["success_after"] == log["success_after"]
