"""Token log-probabilities and entropies, naive and chunked from hidden states.

For logits ``l`` over a vocabulary of V entries and target token ``y``:

  logp_y = l_y - logsumexp(l)                     (log-prob, float32)
  H      = logsumexp(l) - sum_v softmax(l)_v l_v   (entropy of softmax(l))

With V ~ 150k and thousands of tokens per sequence, [B,T,V] float32 logits do
not fit in memory. ``logprobs_and_entropy_from_hidden`` therefore walks the
flattened token axis in chunks, computing ``hidden @ unembedding`` for one
chunk at a time, and its custom VJP recomputes each chunk's logits in the
backward pass, so neither pass ever holds more than one chunk's logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from aem_jax.objectives import _checks


def token_logprobs(logits, targets):
    """Log-probability of each target token: ``l[y] - logsumexp(l)``.

    Args:
      logits: [B,T,V] floating logits; ``logits[b, t]`` scores token ``t``.
      targets: [B,T] integer token ids in [0, V).

    Returns:
      [B,T] float32 log-probs.
    """
    _checks.check_rank("logits", logits, 3)
    _checks.check_rank("targets", targets, 2)
    _checks.check_floating("logits", logits)
    _checks.check_integer("targets", targets)
    _checks.check_leading("targets", targets, logits.shape[:2], "[B,T] of logits")
    logits_BTV = logits.astype(jnp.float32)
    picked_BT = jnp.take_along_axis(logits_BTV, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked_BT - jax.nn.logsumexp(logits_BTV, axis=-1)


def token_entropy(logits):
    """Entropy of ``softmax(logits)`` per position: ``lse(l) - sum_v p_v l_v``.

    Args:
      logits: [B,T,V] floating logits.

    Returns:
      [B,T] float32 entropies (nats).
    """
    _checks.check_rank("logits", logits, 3)
    _checks.check_floating("logits", logits)
    logits_BTV = logits.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    probs_BTV = jnp.exp(logits_BTV - lse_BT[..., None])
    return lse_BT - jnp.sum(probs_BTV * logits_BTV, axis=-1)


def _chunk_stats(hidden_CD, unembedding_DV, targets_C):
    """Logits of one chunk and the statistics both passes need."""
    logits_CV = jnp.dot(hidden_CD, unembedding_DV, preferred_element_type=jnp.float32)
    lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
    probs_CV = jnp.exp(logits_CV - lse_C[:, None])
    mean_logit_C = jnp.sum(probs_CV * logits_CV, axis=-1)
    picked_C = jnp.take_along_axis(logits_CV, targets_C[:, None], axis=-1)[:, 0]
    return logits_CV, probs_CV, lse_C, mean_logit_C, picked_C


@jax.custom_vjp
def _chunked(hidden_NCD, unembedding_DV, targets_NC):

    def body(_, xs):
        hidden_CD, targets_C = xs
        _, _, lse_C, mean_logit_C, picked_C = _chunk_stats(hidden_CD, unembedding_DV, targets_C)
        return None, (picked_C - lse_C, lse_C - mean_logit_C)

    _, (logp_NC, entropy_NC) = jax.lax.scan(body, None, (hidden_NCD, targets_NC))
    return logp_NC, entropy_NC


def _chunked_fwd(hidden_NCD, unembedding_DV, targets_NC):
    out = _chunked(hidden_NCD, unembedding_DV, targets_NC)
    # Residuals are the inputs only: logits are recomputed chunk by chunk.
    return out, (hidden_NCD, unembedding_DV, targets_NC)


def _chunked_bwd(residuals, cotangents):
    hidden_NCD, unembedding_DV, targets_NC = residuals
    g_logp_NC, g_entropy_NC = cotangents

    def body(g_unembedding_DV, xs):
        hidden_CD, targets_C, g_logp_C, g_entropy_C = xs
        logits_CV, probs_CV, _, mean_logit_C, _ = _chunk_stats(hidden_CD, unembedding_DV, targets_C)
        # d logp_y / d l = onehot(y) - p ;  d H / d l = -p * (l - sum_v p_v l_v)
        g_logits_CV = -probs_CV * (
            g_logp_C[:, None] + g_entropy_C[:, None] * (logits_CV - mean_logit_C[:, None])
        )
        # The one-hot term as a scatter, so no second [C, V] block is built.
        g_logits_CV = g_logits_CV.at[jnp.arange(targets_C.shape[0]), targets_C].add(g_logp_C)
        g_hidden_CD = jnp.dot(
            g_logits_CV, unembedding_DV.T.astype(jnp.float32), preferred_element_type=jnp.float32
        ).astype(hidden_CD.dtype)
        g_unembedding_DV = g_unembedding_DV + jnp.dot(
            hidden_CD.T.astype(jnp.float32), g_logits_CV, preferred_element_type=jnp.float32
        )
        return g_unembedding_DV, g_hidden_CD

    init_DV = jnp.zeros(unembedding_DV.shape, jnp.float32)
    g_unembedding_DV, g_hidden_NCD = jax.lax.scan(
        body, init_DV, (hidden_NCD, targets_NC, g_logp_NC, g_entropy_NC)
    )
    return g_hidden_NCD, g_unembedding_DV.astype(unembedding_DV.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def logprobs_and_entropy_from_hidden(hidden, unembedding, targets, *, chunk_size: int = 1024):
    """Token log-probs and entropies from final hidden states, chunk by chunk.

    Computes ``logits = hidden @ unembedding`` one chunk of ``chunk_size``
    tokens (over the flattened [B*T] axis) at a time, in float32 accumulation,
    and returns the same values as ``token_logprobs(logits, targets)`` and
    ``token_entropy(logits)``. The backward pass (a custom VJP) recomputes each
    chunk's logits, so at most one [chunk_size, V] block of logits is live in
    either pass; gradients flow to ``hidden`` and ``unembedding``.

    Args:
      hidden: [B,T,D] final hidden states (after the last norm).
      unembedding: [D,V] output projection (the transposed embedding when tied).
      targets: [B,T] integer token ids in [0, V).
      chunk_size: tokens per chunk (positive int); B*T is padded up to a multiple.

    Returns:
      (logp [B,T] float32, entropy [B,T] float32).
    """
    _checks.check_rank("hidden", hidden, 3)
    _checks.check_rank("unembedding", unembedding, 2)
    _checks.check_rank("targets", targets, 2)
    _checks.check_floating("hidden", hidden)
    _checks.check_floating("unembedding", unembedding)
    _checks.check_integer("targets", targets)
    _checks.check_positive_int("chunk_size", chunk_size)
    B, T, D = hidden.shape
    if unembedding.shape[0] != D:
        raise ValueError(
            f"unembedding must have shape [D={D}, V], got {unembedding.shape} for hidden {hidden.shape}"
        )
    _checks.check_leading("targets", targets, (B, T), "[B,T] of hidden")
    n = B * T
    chunk = min(chunk_size, n)
    padded = -(-n // chunk) * chunk
    hidden_ND = jnp.pad(hidden.reshape(n, D), ((0, padded - n), (0, 0)))
    targets_N = jnp.pad(targets.reshape(n).astype(jnp.int32), (0, padded - n))
    logp_NC, entropy_NC = _chunked(
        hidden_ND.reshape(-1, chunk, D), unembedding, targets_N.reshape(-1, chunk)
    )
    logp_BT = logp_NC.reshape(-1)[:n].reshape(B, T)
    entropy_BT = entropy_NC.reshape(-1)[:n].reshape(B, T)
    return logp_BT, entropy_BT
