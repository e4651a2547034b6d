"""Float32 master parameters under bfloat16 compute: a trainer step at lr 1e-6 is not rounded away."""
import jax
import jax.numpy as jnp
import numpy as np

from aem_jax import sharding
from aem_jax.batch import TurnBatch
from aem_jax.trainer import algorithms, loop, setup
from aem_jax.trainer.update import PGBatch

CONFIG = "configs/default.py:smoke"


def _batch(vocab: int, B: int = 4, T: int = 16) -> PGBatch:
    rng = np.random.default_rng(0)
    mask = np.zeros((B, T), np.float32)
    mask[:, 8:] = 1.0
    bk = np.zeros((B, 1), np.float32)
    batch = TurnBatch(
        tokens=rng.integers(0, vocab, size=(B, T)).astype(np.int32), loss_mask=mask,
        turn_ids=np.where(mask > 0, 0, -1).astype(np.int32), old_logp=np.full((B, T), -2.0, np.float32) * mask,
        ref_logp=np.zeros((B, T), np.float32), old_entropy=np.zeros((B, T), np.float32), turn_rewards=bk,
        turn_valid=bk == 0, anchor_ids=bk.astype(np.int32), group_ids=np.zeros(B, np.int32),
        episode_ids=np.arange(B, dtype=np.int32), turn_offset=np.zeros(B, np.int32),
        attention_mask=np.ones((B, T), np.int32), done=bk > 0)
    return PGBatch(batch=batch, advantages=(rng.normal(size=(B, T)) * mask).astype(np.float32),
                   returns=np.zeros((B, T), np.float32))


def _changed_fraction(param_dtype: str) -> tuple[float, dict]:
    """The fraction of parameter entries one GRPO optimiser step (AdamW, lr 1e-6, bfloat16 compute) changes."""
    config = setup.load_config(CONFIG, [
        "model.dtype=bfloat16", f"model.param_dtype={param_dtype}", "optim.learning_rate=1e-6",
        "optim.warmup_steps=1", "loss.entropy_coef=0.0"])
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    ctx = loop.build_context(config, mesh)
    state = algorithms.get("grpo").init(ctx)
    before = jax.tree.map(np.asarray, state.train.params)
    mb = _batch(ctx.model_config.vocab_size)
    with sharding.use_mesh(mesh):
        train, metrics = state.steps.update(state.train, sharding.put_batch(mb, mesh))
    assert float(metrics["skipped"]) == 0.0
    after = jax.tree.map(np.asarray, train.params)
    dtypes = {str(x.dtype) for x in jax.tree.leaves(after)}
    changed = sum(int((a != b).sum()) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))
    total = sum(a.size for a in jax.tree.leaves(before))
    return changed / total, {"dtypes": dtypes, "opt": {str(x.dtype) for x in jax.tree.leaves(train.opt_state)
                                                        if jnp.issubdtype(x.dtype, jnp.floating)}}


def test_float32_master_weights_keep_updates_that_bfloat16_storage_loses():
    """AdamW's first step moves every weight with a gradient by ~lr = 1e-6: a float32 weight
    (2^-24 relative rounding) keeps that, a bfloat16 one (2^-9) keeps it only when |w| < ~5e-4."""
    kept, info = _changed_fraction("float32")
    assert info["dtypes"] == {"float32"} and info["opt"] == {"float32"}
    lost, info16 = _changed_fraction("bfloat16")
    assert info16["dtypes"] == {"bfloat16"}
    assert kept > 0.9, kept
    assert lost < 0.1, lost
