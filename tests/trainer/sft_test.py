"""Supervised warm start (algorithm "sft"): the loss against a float64 reference, its
gradient, micro-batches, the expert's demonstrations (assistant tokens only, noise),
config checks, and an RL run that starts from the exported warm start."""
import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from aem_jax import models, sharding
from aem_jax.batch import TurnBatch
from aem_jax.rollout import ChatFormat
from aem_jax.trainer import algorithms, checkpoint, loop, rng, setup, sft
from aem_jax.trainer.update import TrainState
from aem_jax.trainer.validate import ConfigError

CONFIG = models.ModelConfig(
    vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
    head_dim=8, model_type="qwen3", qkv_bias=False, qk_norm=True, max_position_embeddings=64)
B, T = 8, 12


def _batch(seed=0) -> TurnBatch:
    """Random tokens, some left padding, 0 to 6 loss tokens per row (row 3 has none)."""
    r = np.random.default_rng(seed)
    tokens = r.integers(0, CONFIG.vocab_size, size=(B, T)).astype(np.int32)
    attention = np.ones((B, T), np.int32)
    attention[::3, :2] = 0
    mask = np.zeros((B, T), np.float32)
    for b, n in enumerate([6, 1, 4, 0, 5, 2, 3, 6]):
        mask[b, T - n:] = 1.0
    turn_ids = np.where(mask > 0, 0, -1).astype(np.int32)
    zeros_BT, zeros_BK = np.zeros((B, T), np.float32), np.zeros((B, 1), np.float32)
    return TurnBatch(tokens=tokens, loss_mask=mask, turn_ids=turn_ids, old_logp=zeros_BT, ref_logp=zeros_BT,
                     old_entropy=zeros_BT, turn_rewards=zeros_BK, turn_valid=(mask.sum(1, keepdims=True) > 0),
                     anchor_ids=np.zeros((B, 1), np.int32), group_ids=np.zeros(B, np.int32),
                     episode_ids=np.arange(B, dtype=np.int32), turn_offset=np.zeros(B, np.int32),
                     attention_mask=attention, done=np.zeros((B, 1), bool))


@functools.cache
def _model():
    graphdef, params, _ = nnx.split(models.Decoder(CONFIG, rngs=nnx.Rngs(0)), nnx.Param, ...)
    return graphdef, params


def _reference_loss(params, graphdef, batch):
    """The NLL from full logits (jax.nn.log_softmax), independent of the chunked path."""
    logits = models.logits(nnx.merge(graphdef, params), batch.tokens, batch.attention_mask).astype(jnp.float32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), batch.tokens[:, 1:, None], axis=-1)[..., 0]
    mask = batch.loss_mask[:, 1:]
    return -jnp.sum(logp * mask) / jnp.sum(mask)


def test_loss_is_the_mean_nll_of_the_loss_mask_tokens_float64_reference():
    graphdef, params = _model()
    batch = jax.tree.map(jnp.asarray, _batch())
    loss, metrics = jax.jit(functools.partial(sft.sft_loss, chunk_size=5), static_argnums=1)(
        (params, {}), graphdef, batch)
    logits = np.asarray(jax.jit(models.logits)(nnx.merge(graphdef, params), batch.tokens, batch.attention_mask),
                        np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    tokens, mask = np.asarray(batch.tokens), np.asarray(batch.loss_mask, np.float64)
    nll, ent, n = 0.0, 0.0, 0
    for b in range(B):
        for t in range(1, T):
            if mask[b, t]:
                lp = logits[b, t - 1] - logz[b, t - 1]
                nll -= lp[tokens[b, t]]
                ent -= (np.exp(lp) * lp).sum()
                n += 1
    np.testing.assert_allclose(float(loss), nll / n, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["demo_token_entropy"]), ent / n, rtol=1e-5)
    assert float(loss) == float(metrics["loss"])


def test_gradient_matches_the_full_logits_reference():
    graphdef, params = _model()
    batch = jax.tree.map(jnp.asarray, _batch(1))
    grads = jax.jit(jax.grad(lambda p, b: sft.sft_loss((p, {}), graphdef, b, chunk_size=4)[0]))(params, batch)
    expected = jax.jit(jax.grad(lambda p, b: _reference_loss(p, graphdef, b)))(params, batch)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-6)


def _step(batch, microbatch_size):
    graphdef, params = _model()
    optimizer = optax.sgd(0.5)  # the update is the gradient: compare it directly
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, extra={},
                       opt_state=optimizer.init((params, {})), nonfinite=jnp.zeros((), jnp.int32))
    step = jax.jit(functools.partial(sft.sft_update_step, graphdef=graphdef, optimizer=optimizer, chunk_size=8,
                                     microbatch_size=microbatch_size))
    return step(state, jax.tree.map(jnp.asarray, batch))


@pytest.mark.parametrize("microbatch_size", [2, 4])
def test_micro_batches_give_the_whole_minibatch_update(microbatch_size):
    batch = _batch(2)
    whole, m_whole = _step(batch, 0)
    parts, m_parts = _step(batch, microbatch_size)
    for k in ("loss", "demo_token_entropy", "grad_norm"):
        np.testing.assert_allclose(float(m_parts[k]), float(m_whole[k]), rtol=2e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(parts.params), jax.tree.leaves(whole.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert int(parts.step) == 1 and int(parts.nonfinite) == 0


# --- demonstrations ---------------------------------------------------------------

@functools.cache
def _ctx(noise: float, num_tasks: int = 16, group_size: int = 2):
    config = setup.load_config("configs/sft.py", [f"sft.noise={noise}", f"rollout.num_tasks={num_tasks}",
                                                  f"rollout.group_size={group_size}",
                                                  f"learner.minibatch_size={num_tasks * group_size}"])
    return types.SimpleNamespace(config=config, keys=rng.Streams(config.seed),
                                 tokenizer=setup.scratch_tokenizer(config))


def _assistant_ids(ctx, record):
    """The tokens the chat format gives the assistant turns of an episode: each action and its end of turn."""
    eot = ChatFormat(ctx.tokenizer).end_of_turn_id
    ids = []
    for message in record.transcript:
        if message["role"] == "assistant":
            ids += list(ctx.tokenizer.encode(message["content"], add_special_tokens=False)) + [eot]
    return ids


def test_the_expert_wins_and_the_loss_mask_holds_exactly_its_action_tokens():
    ctx = _ctx(0.0)
    batch, records, metrics = sft.demonstrations(ctx, step=3)
    assert metrics["demo_success"] == 1.0 and metrics["demo_noisy_share"] == 0.0
    assert metrics["demo_invalid_action_rate"] == 0.0
    tokens, mask = np.asarray(batch.tokens), np.asarray(batch.loss_mask)
    for row, record in enumerate(records):
        actions = [m["content"] for m in record.transcript if m["role"] == "assistant"]
        assert actions[0] == "read note" and actions[1].startswith("open box ")
        assert tokens[row][mask[row] > 0].tolist() == _assistant_ids(ctx, record)
    assert metrics["demo_tokens"] == mask.sum()
    # the tasks are the step's training tasks, and a step's demonstrations are reproducible
    assert [r.seed for r in records][::2] == rng.task_seeds(ctx.config.seed, 3, 16)
    again, _, _ = sft.demonstrations(ctx, step=3)
    np.testing.assert_array_equal(np.asarray(again.tokens), tokens)


def test_noise_replaces_that_share_of_actions_with_random_valid_ones():
    valid = {"read note", *(f"open box {i}" for i in range(1, 5))}
    shares, successes = {}, {}
    for noise in (0.5, 1.0):
        ctx = _ctx(noise, num_tasks=64, group_size=2)
        batch, records, metrics = sft.demonstrations(ctx, step=0)
        actions = [m["content"] for r in records for m in r.transcript if m["role"] == "assistant"]
        assert set(actions) <= valid and metrics["demo_invalid_action_rate"] == 0.0
        shares[noise], successes[noise] = metrics["demo_noisy_share"], metrics["demo_success"]
        for row, record in enumerate(records):
            assert np.asarray(batch.tokens)[row][np.asarray(batch.loss_mask)[row] > 0].tolist() == \
                _assistant_ids(ctx, record)
    assert shares[1.0] == 1.0
    # 256 actions drawn with p = 0.5: within 4 standard deviations (0.125)
    assert abs(shares[0.5] - 0.5) < 0.125
    # an exact imitator of a noisy expert: 1 - noise * 4/5 right per turn, two turns
    assert abs(successes[0.5] - 0.6 ** 2) < 0.2 and successes[1.0] < 0.2
    # G rollouts of a task draw their noise apart: not every group's two episodes are the same
    _, records, _ = sft.demonstrations(_ctx(0.5, num_tasks=64, group_size=2), step=0)
    pairs = [(a.transcript, b.transcript) for a, b in zip(records[::2], records[1::2])]
    assert any(x != y for x, y in pairs)


def test_noisy_expert_draws_depend_on_the_episode_not_the_batch():
    env = types.SimpleNamespace(valid_actions=lambda: ["a", "b", "c"], optimal_action=lambda: "x")
    context = lambda e, k: types.SimpleNamespace(env=env, info={}, episode=e, turn=k)  # noqa: E731
    one = sft.NoisyExpert(0.5, root=7)
    shifted = sft.NoisyExpert(0.5, root=7, first_episode=10)
    assert [one(context(10 + e, k)) for e in range(20) for k in range(3)] == \
        [shifted(context(e, k)) for e in range(20) for k in range(3)]
    assert one.actions == 60 and 0 < one.noisy < 60 and one.noisy == shifted.noisy


def test_textworld_expert_plays_the_numbered_walkthrough():
    numbered = types.SimpleNamespace(numbered_commands=True)
    info = {"admissible_commands": ["go east", "take coin", "look"], "policy_commands": ["take coin", "win"]}
    ctx = types.SimpleNamespace(env=numbered, info=info, turn=0, episode=0)
    assert sft.expert_action(ctx) == "2"
    ctx.env = types.SimpleNamespace(numbered_commands=False)
    assert sft.expert_action(ctx) == "take coin"
    assert sft.random_action(ctx, np.random.default_rng(0)) in info["admissible_commands"]
    ctx.info = {}
    with pytest.raises(ValueError, match="no scripted expert"):
        sft.expert_action(ctx)


def test_the_longhorizon_variant_clones_the_dungeon_expert():
    config = setup.load_config("configs/sft.py:longhorizon", ["rollout.num_tasks=4", "learner.minibatch_size=4"])
    assert config.env.name == "dungeon" and config.rollout.max_turns == config.env.kwargs["max_turns"]
    ctx = types.SimpleNamespace(config=config, keys=rng.Streams(0), tokenizer=setup.scratch_tokenizer(config))
    batch, records, metrics = sft.demonstrations(ctx, step=0)
    assert metrics["demo_success"] == 1.0 and metrics["demo_invalid_action_rate"] == 0.0
    assert all(r.turns >= 8 for r in records)  # long-horizon: the expert needs 8 turns or more
    for row, record in enumerate(records):
        assert np.asarray(batch.tokens)[row][np.asarray(batch.loss_mask)[row] > 0].tolist() == \
            _assistant_ids(ctx, record)


@pytest.mark.slow
def test_textworld_walkthrough_demonstrations_win():
    pytest.importorskip("textworld")
    config = setup.load_config("configs/sft.py:textworld", ["rollout.num_tasks=4", "learner.minibatch_size=4"])
    ctx = types.SimpleNamespace(config=config, keys=rng.Streams(0), tokenizer=setup.scratch_tokenizer(config))
    batch, records, metrics = sft.demonstrations(ctx, step=0)
    assert metrics["demo_success"] == 1.0 and metrics["demo_invalid_action_rate"] == 0.0
    for record in records:  # numbered commands: the expert answers with numbers, as the policy acts
        assert all(m["content"].isdigit() for m in record.transcript if m["role"] == "assistant")
    assert np.asarray(batch.loss_mask).sum() == metrics["demo_tokens"] > 0


@pytest.mark.slow
def test_swe_gold_patch_demonstrations_resolve():
    config = setup.load_config("configs/swe.py:smoke", [
        "algorithm=sft", "rollout.max_turns=8", "env.kwargs.max_turns=8", "rollout.max_action_tokens=3000",
        "rollout.max_context_tokens=16384", "rollout.seq_bucket=512", "rollout.num_tasks=2", "rollout.group_size=1",
        "learner.minibatch_size=2", "learner.microbatch_size=0"])
    loop.check_config(config)
    ctx = types.SimpleNamespace(config=config, keys=rng.Streams(0), tokenizer=setup.scratch_tokenizer(config))
    batch, records, metrics = sft.demonstrations(ctx, step=0)
    assert metrics["demo_success"] == 1.0 and metrics["demo_invalid_action_rate"] == 0.0, records
    for row, record in enumerate(records):
        assert record.transcript[-1]["role"] != "assistant" or "submit" in record.transcript[-1]["content"]
        assert np.asarray(batch.tokens)[row][np.asarray(batch.loss_mask)[row] > 0].tolist() == \
            _assistant_ids(ctx, record)


# --- config checks ----------------------------------------------------------------

@pytest.mark.parametrize("noise", [1.5, -0.1])
def test_a_noise_outside_0_1_names_the_key(noise):
    with pytest.raises(ConfigError, match=rf"config\.sft\.noise={noise} is not allowed; must be in \[0, 1\]"):
        loop.check_config(setup.load_config("configs/sft.py", [f"sft.noise={noise}"]))


def test_swe_has_an_expert_but_no_valid_actions_to_draw_noise_from():
    config = setup.load_config("configs/swe.py:smoke", ["algorithm=sft"])
    loop.check_config(config)  # the gold patch through the tools is its expert
    config.sft.noise = 0.1
    with pytest.raises(ConfigError, match=r"config\.sft\.noise=0.1 is not allowed; environment 'swe' lists no"):
        loop.check_config(config)


def test_textworld_needs_the_walkthrough_and_the_variant_sets_it():
    config = setup.load_config("configs/sft.py:textworld")
    assert config.env.kwargs["policy_commands"] is True
    loop.check_config(config)
    config.env.kwargs["policy_commands"] = False
    with pytest.raises(ConfigError, match=r"config\.env\.kwargs\.policy_commands=False"):
        loop.check_config(config)
    with pytest.raises(ConfigError, match=r"config\.sft\.nois is not a config key; did you mean sft\.noise"):
        setup.load_config("configs/sft.py", ["sft.nois=0.1"])


# --- end to end ---------------------------------------------------------------------

def _params_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.mark.slow
def test_an_rl_run_starts_from_the_exported_warm_start(tmp_path):
    sft_dir, rl_dir = tmp_path / "sft", tmp_path / "rl"
    config = setup.load_config("configs/sft.py:smoke", ["total_steps=3", "sft.noise=0.25"])
    summary = loop.train(config, str(sft_dir))
    assert summary["final_step"] == 3
    records = [json.loads(l) for l in (sft_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] > records[-1]["loss"] > 0  # three steps of cloning lower the NLL
    assert {"heldout_success", "heldout_response_entropy", "heldout_response_entropy_std"} <= set(records[-1])
    export = sft_dir / "export" / "final"
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in export.iterdir()}

    # the SFT run's final parameters (from its last checkpoint) ...
    mesh = sharding.make_mesh(dict(config.mesh))
    sft_ctx = loop.build_context(config, mesh)
    with sharding.use_mesh(mesh):
        ckpt = checkpoint.Checkpointer(sft_dir / "checkpoints")
        step, _, state = loop.restore(sft_ctx, algorithms.get("sft"), sft.init(sft_ctx), ckpt, sft_dir)
        ckpt.close()
    assert step == 3
    # ... are the initial parameters of an RL config given --config.model.source=DIR
    rl = setup.load_config("configs/default.py:smoke", [f"model.source={export}", "total_steps=1",
                                                       "eval.num_tasks=0"])
    rl_ctx = loop.build_context(rl, sharding.make_mesh(dict(rl.mesh)))
    assert _params_equal(rl_ctx.init_params, state.train.params)
    assert rl_ctx.tokenizer.get_vocab() == sft_ctx.tokenizer.get_vocab()
    assert loop.train(rl, str(rl_dir))["final_step"] == 1


def test_cloning_fits_the_experts_tokens():
    """Jitted steps on one batch of demonstrations: the NLL falls tenfold and the policy's most
    likely next token is the expert's at (nearly) every assistant position."""
    ctx = _ctx(0.0, num_tasks=16, group_size=1)
    batch, _, _ = sft.demonstrations(ctx, step=0)
    config = setup.load_config("configs/sft.py:smoke")
    mesh = sharding.make_mesh(dict(config.mesh))
    with sharding.use_mesh(mesh):
        model, _ = setup.build_model(config, mesh)
    graphdef, params, _ = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adam(3e-3)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, extra={},
                       opt_state=optimizer.init((params, {})), nonfinite=jnp.zeros((), jnp.int32))
    step = jax.jit(functools.partial(sft.sft_update_step, graphdef=graphdef, optimizer=optimizer, chunk_size=64))
    batch = jax.tree.map(jnp.asarray, batch)
    losses = []
    for _ in range(60):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] > 4.0 and losses[-1] < 0.1 * losses[0], losses[::10]
    logits = jax.jit(models.logits)(nnx.merge(graphdef, state.params), batch.tokens, batch.attention_mask)
    predicted = np.asarray(jnp.argmax(logits[:, :-1], axis=-1))
    mask = np.asarray(batch.loss_mask)[:, 1:] > 0
    assert (predicted[mask] == np.asarray(batch.tokens)[:, 1:][mask]).mean() >= 0.9
