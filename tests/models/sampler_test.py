"""The KV-cache sampler against transformers and against full forward passes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import aem_jax.models as M
from aem_jax.models import sampler as S

logits_fn = jax.jit(M.logits)
PROMPT_LENGTHS = (5, 11, 2)


def _prompts(vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(5, vocab, n).tolist() for n in PROMPT_LENGTHS]


def _full_forward_logp(model, prompt, generated):
    """log-softmax of a full forward pass at the positions that produced `generated`."""
    seq = np.asarray(list(prompt) + list(generated), np.int32)[None]
    logp = jax.nn.log_softmax(logits_fn(model, jnp.asarray(seq), jnp.ones_like(seq)))[0]
    return np.asarray(logp[len(prompt) - 1:len(prompt) - 1 + len(generated)])


@pytest.fixture(scope="module")
def models(checkpoints):
    return {arch: M.from_pretrained(c.path)[0] for arch, c in checkpoints.items()}


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_greedy_equals_transformers_generate(checkpoints, models, arch):
    ckpt, model = checkpoints[arch], models[arch]
    prompts = _prompts(len(ckpt.tokenizer))
    params = S.SamplingParams(max_new_tokens=12, temperature=0.0)
    out = S.generate(model, prompts, key=jax.random.key(0), params=params, pad_id=0)
    assert out.tokens.shape == (3, 12) and out.tokens.dtype == np.int32
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = ckpt.torch_model.generate(
                torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                eos_token_id=None)[0, len(prompt):].numpy()
        np.testing.assert_array_equal(out.tokens[i], ref)
        # Greedy reports the temperature-1 distribution.
        logp = _full_forward_logp(model, prompt, out.tokens[i])
        np.testing.assert_allclose(out.logprobs[i], logp[np.arange(12), out.tokens[i]], atol=1e-4)


def test_sampled_logprobs_and_entropy_equal_full_forward(models):
    model = models["qwen3"]
    prompts = _prompts(model.config.vocab_size, seed=1)
    params = S.SamplingParams(max_new_tokens=10, temperature=1.0)
    out = S.generate(model, prompts, key=jax.random.key(7), params=params, pad_id=0)
    for i, prompt in enumerate(prompts):
        logp = _full_forward_logp(model, prompt, out.tokens[i])
        np.testing.assert_allclose(out.logprobs[i], logp[np.arange(10), out.tokens[i]], atol=1e-4)
        entropy = -(np.exp(logp) * logp).sum(-1)
        np.testing.assert_allclose(out.entropy[i], entropy, atol=1e-4)
    assert (out.lengths == 10).all()


def test_deterministic_for_a_key(models):
    model = models["qwen3"]
    prompts = _prompts(model.config.vocab_size)
    params = S.SamplingParams(max_new_tokens=10, temperature=1.0)
    a = S.generate(model, prompts, key=jax.random.key(1), params=params, pad_id=0)
    b = S.generate(model, prompts, key=jax.random.key(1), params=params, pad_id=0)
    c = S.generate(model, prompts, key=jax.random.key(2), params=params, pad_id=0)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (a.tokens != c.tokens).any()


def test_temperature_top_k_top_p(models):
    model = models["llama"]
    prompts = _prompts(model.config.vocab_size)
    key = jax.random.key(3)
    greedy = S.generate(model, prompts, key=key, pad_id=0,
                        params=S.SamplingParams(max_new_tokens=12, temperature=0.0))
    top1 = S.generate(model, prompts, key=key, pad_id=0,
                      params=S.SamplingParams(max_new_tokens=12, temperature=0.7, top_k=1))
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    np.testing.assert_allclose(top1.logprobs, 0.0, atol=1e-6)
    nucleus = S.generate(model, prompts, key=key, pad_id=0,
                         params=S.SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1e-4))
    np.testing.assert_array_equal(nucleus.tokens, greedy.tokens)
    top3 = S.generate(model, prompts, key=key, pad_id=0,
                      params=S.SamplingParams(max_new_tokens=12, temperature=2.0, top_k=3, top_p=0.9))
    assert (top3.entropy <= np.log(3) + 1e-5).all() and (top3.entropy > 0).any()
    # Temperature: log-probs are those of softmax(logits / T).
    hot = S.generate(model, prompts, key=key, pad_id=0,
                     params=S.SamplingParams(max_new_tokens=12, temperature=2.0))
    for i, prompt in enumerate(prompts):
        seq = np.asarray([prompt + hot.tokens[i].tolist()], np.int32)
        logits = logits_fn(model, jnp.asarray(seq), jnp.ones_like(seq))[0, len(prompt) - 1:-1]
        logp = np.asarray(jax.nn.log_softmax(logits / 2.0))
        np.testing.assert_allclose(hot.logprobs[i], logp[np.arange(12), hot.tokens[i]], atol=1e-4)


def test_stop_tokens_pad_the_rest(models):
    model = models["qwen2"]
    prompts = _prompts(model.config.vocab_size)
    free = S.generate(model, prompts, key=jax.random.key(0), pad_id=0,
                      params=S.SamplingParams(max_new_tokens=12, temperature=0.0))
    stop = int(free.tokens[0, 3])
    out = S.generate(model, prompts, key=jax.random.key(0), pad_id=0,
                     params=S.SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(stop,)))
    for i in range(3):
        hits = np.flatnonzero(free.tokens[i] == stop)
        n = hits[0] + 1 if hits.size else 12
        assert out.lengths[i] == n
        np.testing.assert_array_equal(out.tokens[i, :n], free.tokens[i, :n])
        assert (out.tokens[i, n:] == 0).all() and (out.logprobs[i, n:] == 0).all()
    assert out.lengths[0] <= 4


def test_compiles_once_per_bucket_and_rejects_long_prompts(models):
    model = models["qwen2"]
    vocab = model.config.vocab_size
    params = S.SamplingParams(max_new_tokens=5, temperature=1.0, top_k=4)
    rng = np.random.default_rng(0)
    before = S.compiled_cache_size()
    for lengths in [(3, 9, 12), (16, 1, 4), (10,) * 4]:  # batch bucket 4, prompt bucket 16
        prompts = [rng.integers(5, vocab, n).tolist() for n in lengths]
        out = S.generate(model, prompts, key=jax.random.key(0), params=params, pad_id=0)
        assert out.tokens.shape == (len(lengths), 5)
    assert S.compiled_cache_size() == before + 1
    with pytest.raises(ValueError, match="max_cache_len=20.*prompt 1"):
        S.generate(model, [[5] * 3, [5] * 16], key=jax.random.key(0), params=params, pad_id=0,
                   max_cache_len=20)
    with pytest.raises(ValueError, match="token ids outside"):
        S.generate(model, [[vocab]], key=jax.random.key(0), params=params, pad_id=0)
    assert S.compiled_cache_size() == before + 1
    with pytest.raises(ValueError, match="top_p"):
        S.SamplingParams(top_p=0.0)


def test_inverse_cdf_sampling_matches_the_distribution():
    logits = jnp.asarray([[0.0, 1.0, -jnp.inf, 2.0, 0.5] + [-jnp.inf] * 600])
    logp = jax.nn.log_softmax(logits)
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: S.inverse_cdf_sample(logp, k)[0]))(keys))
    freq = np.bincount(draws, minlength=logits.shape[1]) / len(draws)
    np.testing.assert_allclose(freq[:5], np.exp(np.asarray(logp[0, :5])), atol=0.015)
    assert freq[2] == 0 and freq[5:].sum() == 0
