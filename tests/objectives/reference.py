"""Plain numpy float64 references for the objectives, written loop by loop."""
import numpy as np


def logsumexp(x):
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def token_logprobs(logits, targets):
    logits = np.asarray(logits, np.float64)
    picked = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
    return picked - logsumexp(logits)


def token_entropy(logits):
    logits = np.asarray(logits, np.float64)
    p = np.exp(logits - logsumexp(logits)[..., None])
    return -(p * np.log(np.maximum(p, 1e-300))).sum(-1)


def turn_sum(x, turn_ids, num_turns):
    x = np.asarray(x, np.float64)
    out = np.zeros((x.shape[0], num_turns))
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if turn_ids[b, t] >= 0:
                out[b, turn_ids[b, t]] += x[b, t]
    return out


def turn_mean(x, turn_ids, num_turns):
    s = turn_sum(x, turn_ids, num_turns)
    c = turn_sum(np.ones_like(x, dtype=np.float64), turn_ids, num_turns)
    return np.where(c > 0, s / np.maximum(c, 1), 0.0)


def grpo(scores, groups, normalize_std=True, leave_one_out=False, eps=1e-6, valid=None):
    scores = np.asarray(scores, np.float64)
    valid = np.ones(len(scores), bool) if valid is None else np.asarray(valid, bool)
    out = np.zeros(len(scores))
    for i in range(len(scores)):
        if not valid[i]:
            continue
        members = [j for j in range(len(scores)) if groups[j] == groups[i] and valid[j]]
        if len(members) < 2:
            continue
        r = scores[members]
        if leave_one_out:
            out[i] = scores[i] - np.mean([scores[j] for j in members if j != i])
        elif normalize_std:
            out[i] = (scores[i] - r.mean()) / (r.std(ddof=1) + eps)
        else:
            out[i] = scores[i] - r.mean()
    return out


def discounted(rewards, valid, gamma):
    E, K = rewards.shape
    out = np.zeros((E, K))
    for e in range(E):
        g = 0.0
        for k in reversed(range(K)):
            if valid[e, k]:
                g = rewards[e, k] + gamma * g
                out[e, k] = g
    return out


def gigpo(rewards, valid, anchors, groups, gamma, step_weight, eps=1e-6):
    E, K = rewards.shape
    r = np.where(valid, rewards, 0.0)
    ep = grpo(r.sum(1), groups, eps=eps, valid=valid.any(1))
    ret = discounted(r, valid, gamma)
    out = np.zeros((E, K))
    for e in range(E):
        for k in range(K):
            if not valid[e, k]:
                continue
            members = [ret[e2, k2] for e2 in range(E) for k2 in range(K)
                       if valid[e2, k2] and groups[e2] == groups[e] and anchors[e2, k2] == anchors[e, k]]
            step = 0.0
            if len(members) > 1:
                m = np.array(members)
                step = (ret[e, k] - m.mean()) / (m.std(ddof=1) + eps)
            out[e, k] = ep[e] + step_weight * step
    return out


def gae(rewards, values, mask, gamma, lam, dones=None):
    B, T = rewards.shape
    dones = np.zeros((B, T), bool) if dones is None else dones
    adv = np.zeros((B, T))
    for b in range(B):
        next_v, next_a = 0.0, 0.0
        for t in reversed(range(T)):
            if dones[b, t]:
                next_v, next_a = 0.0, 0.0
            if mask[b, t]:
                delta = rewards[b, t] + gamma * next_v - values[b, t]
                a = delta + gamma * lam * next_a
                adv[b, t] = a
                next_v, next_a = values[b, t], a
    return adv, np.where(mask, adv + values, 0.0)


def aem_alpha(h, groups, valid, lam, min_range):
    B, K = h.shape
    alpha = np.ones((B, K))
    for g in set(groups.tolist()):
        idx = [(b, k) for b in range(B) for k in range(K) if groups[b] == g and valid[b, k]]
        if not idx:
            continue
        vals = np.array([h[b, k] for b, k in idx], np.float64)
        lo, hi = vals.min(), vals.max()
        if hi - lo < min_range:
            continue
        w = np.exp(-lam * (vals - lo) / (hi - lo))
        for (b, k), wi in zip(idx, w / w.mean()):
            alpha[b, k] = wi
    return alpha


def ppo_token_loss(logp, old, adv, clip_low, clip_high, dual_clip=None):
    ratio = np.exp(np.asarray(logp, np.float64) - old)
    loss = np.maximum(-ratio * adv, -np.clip(ratio, 1 - clip_low, 1 + clip_high) * adv)
    if dual_clip is not None:
        loss = np.where(adv < 0, np.minimum(loss, -dual_clip * adv), loss)
    return loss


def aggregate(values, mask, agg, norm_length=None):
    values = np.asarray(values, np.float64)
    m = np.asarray(mask, np.float64)
    rows = [b for b in range(m.shape[0]) if m[b].sum() > 0]
    if agg == "token-mean":
        return (values * m).sum() / max(m.sum(), 1e-300) if m.sum() else 0.0
    if not rows:
        return 0.0
    if agg == "seq-mean-token-sum":
        return sum((values[b] * m[b]).sum() for b in rows) / len(rows)
    if agg == "seq-mean-token-mean":
        return sum((values[b] * m[b]).sum() / m[b].sum() for b in rows) / len(rows)
    L = m.shape[1] if norm_length is None else norm_length
    return sum((values[b] * m[b]).sum() for b in rows) / (len(rows) * L)
