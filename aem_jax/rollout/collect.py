"""`collect`: N tasks x G rollouts played turn by turn into a `TurnBatch`.

Two engines (``RolloutConfig.engine``) play the episodes; both give the same
`TurnBatch` and `EpisodeRecord` structure and share every per-turn decision
below. "continuous" (`aem_jax.rollout.engine`) keeps each episode's KV cache
across turns and lets episodes join and leave the decode batch on their own;
it needs a model-backed policy (`policy.slot_policy`), other policies are
played by "simple". "simple" plays all episodes in lockstep: each turn it
(1) builds every active episode's prompt from token segments
(`ChatFormat`), (2) asks the policy for all actions in one batch, (3) checks
each action (end-of-turn reached, non-empty, parsable), (4) steps the
environments of the valid ones in a thread pool with a per-step time limit,
and (5) appends the observation's tokens. An environment that raises or
hangs ends only its own episode, which is marked failed.

Environments may provide (all optional, duck-typed):

* ``system_prompt`` (str): the system message when ``RolloutConfig.system_prompt``
  is None (the SWE env's tool documentation);
* ``step_time_bound_s`` (float): the longest a reset / step may take; the
  per-step limit is raised to it when ``step_timeout_s`` is lower (an
  evaluation that runs the hidden tests is slow, not hung);
* ``finish(reason) -> Step``: called when the rollout cuts an episode short
  (its next prompt would overflow ``max_context_tokens``, or ``max_turns``
  ran out) so the environment can score what the agent did so far; its
  reward is added to the last turn's. A step or finish whose info has
  ``exclude_from_loss`` true masks the episode: like a failed one it keeps
  its tokens but has loss_mask 0 and turn_valid False, so it counts in
  neither the loss nor the group statistics ("compact filtering").

Determinism: given (key, task seeds) the result is fixed -- the policy key of
turn k is ``fold_in(key, k)`` (the continuous engine: ``fold_in(fold_in(key,
k), e)`` for episode e, as the trainer's per-episode keys give the simple
engine) and the environments are seeded by the task seeds; thread
scheduling changes nothing the batch depends on.
"""
from __future__ import annotations

import dataclasses
import re
import threading
import time
from typing import Any, Callable, Sequence

import jax

from aem_jax import envs as envs_lib
from aem_jax.batch import TurnBatch
from aem_jax.rollout.batching import Turn, build_turn_batch, prompt_for_turn
from aem_jax.rollout.chat import ChatFormat
from aem_jax.rollout.config import REASONS, EpisodeRecord, RolloutConfig
from aem_jax.rollout.policy import Generation, Policy, TurnContext, slot_policy
from aem_jax.rollout.pool import StepPool


class EnvGroup:
    """Environments made once and reused across `collect` calls.

    Args:
      env: a registered name (see `aem_jax.envs.registered()`) or a
        zero-argument factory.
      **kwargs: passed to `aem_jax.envs.make` with a name.

    An environment whose episode failed (raised or hung) is dropped and
    replaced by a fresh one on the next `take`.
    """

    def __init__(self, env: str | Callable[[], Any], **kwargs: Any):
        if isinstance(env, str):
            self._factory = lambda: envs_lib.make(env, **kwargs)
        elif callable(env):
            self._factory = env
        else:
            raise TypeError(f"env={env!r}; expected a registered name or a factory callable")
        self._envs: list[Any] = []
        # One collect at a time plays these environments.
        self.lock = threading.Lock()

    def take(self, count: int) -> list[Any]:
        """The first `count` environments, making missing ones."""
        while len(self._envs) < count:
            self._envs.append(self._factory())
        return self._envs[:count]

    def discard(self, index: int) -> None:
        """Replaces environment `index` by a fresh one."""
        self._envs[index] = self._factory()


@dataclasses.dataclass
class _Episode:
    index: int
    group: int
    env: Any
    record: EpisodeRecord
    prompt_ids: list[int] = dataclasses.field(default_factory=list)
    task_ids: list[int] = dataclasses.field(default_factory=list)
    turns: list[Turn] = dataclasses.field(default_factory=list)
    observation: str = ""
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    anchor: str = ""
    active: bool = True
    cut: str | None = None  # why the rollout cut the episode short, until `finish` ran
    masked: bool = False  # excluded from the loss (the environment's exclude_from_loss)

    @property
    def failed(self) -> bool:
        """No learning signal (what `build_turn_batch` reads): the env failed, or masked."""
        return self.record.failed or self.masked


def _cut(gen: Generation, stops: set[int], limit: int) -> tuple[Generation, bool]:
    """Cuts a generation after its first stop token; (generation, closed)."""
    ids = list(gen.token_ids)
    end = next((i + 1 for i, t in enumerate(ids) if t in stops), None)
    closed = end is not None and end <= limit
    n = end if closed else min(len(ids), limit)
    return Generation(ids[:n], list(gen.logprobs[:n]), list(gen.entropies[:n])), closed


def _parse(text: str, closed: bool, config: RolloutConfig) -> tuple[str, str | None]:
    """(action, reason it is invalid or None)."""
    text = text.strip()
    if not closed and config.overlong_actions == "invalid":
        return text, REASONS["over-long"]
    if not text:
        return text, REASONS["empty"]
    if config.action_pattern is not None:
        match = re.search(config.action_pattern, text, re.DOTALL)
        if match is None:
            return text, REASONS["unparsable"]
        text = (match.group(1) if match.groups() else match.group(0)).strip()
        if not text:
            return text, REASONS["empty"]
    return text, None


def _fail(ep: _Episode, error: BaseException) -> None:
    ep.record.failed, ep.record.error = True, f"{type(error).__name__}: {error}"
    ep.active = False


def _reset_all(eps, seeds, pool, chat, config):
    outcomes = pool.run([lambda e=ep, s=s: e.env.reset(seed=s) for ep, s in zip(eps, seeds)],
                        timeout_s=config.step_timeout_s)
    for ep, outcome in zip(eps, outcomes):
        if outcome.error is not None:
            _fail(ep, outcome.error)
            continue
        obs = outcome.value
        ep.observation, ep.info = obs.text, dict(obs.info)
        ep.anchor = str(ep.info.get("anchor", obs.text))
        ep.prompt_ids = chat.prompt_ids(obs.text)
        if config.history == "windowed":
            ep.task_ids = chat.task_ids(obs.text)
        if config.system_prompt is not None:
            ep.record.transcript.append({"role": "system", "content": config.system_prompt})
        ep.record.transcript.append({"role": "user", "content": obs.text})
        if len(ep.prompt_ids) + config.max_action_tokens > config.max_context_tokens:
            ep.active, ep.record.truncated = False, True


def _apply(ep, gen, closed, action, reason, outcome, turn_index, chat, config):
    """Records one turn's result on `ep` and decides whether it continues."""
    rec = ep.record
    rec.transcript.append(chat.assistant_message(gen.token_ids))
    terminal = truncated = False
    if reason is not None:
        text, reward = config.invalid_message.format(reason=reason), -config.invalid_penalty
        rec.invalid_actions += 1
        anchor, info = ep.anchor, ep.info
    elif outcome.error is not None:
        ep.turns.append(Turn(gen.token_ids, gen.logprobs, gen.entropies, None, 0.0, False,
                             ep.anchor))
        rec.turns, rec.turn_rewards = rec.turns + 1, rec.turn_rewards + [0.0]
        return _fail(ep, outcome.error)
    else:
        step = outcome.value
        info = dict(step.info)
        text, reward = step.observation, float(step.reward)
        if info.get("invalid_action", False):
            reward -= config.invalid_penalty
            rec.invalid_actions += 1
        rec.success = rec.success or bool(info.get("success", False))
        ep.masked = ep.masked or bool(info.get("exclude_from_loss", False))
        truncated = bool(step.done) and bool(info.get("truncated", False))
        terminal = bool(step.done) and not truncated
        anchor = str(info.get("anchor", text))
    rec.transcript.append({"role": "user", "content": text})
    rec.turns, rec.turn_rewards = rec.turns + 1, rec.turn_rewards + [reward]
    turn = Turn(gen.token_ids, gen.logprobs, gen.entropies, None, reward, terminal, ep.anchor)
    ep.turns.append(turn)
    ep.observation, ep.info, ep.anchor = text, info, anchor
    if terminal or truncated:
        ep.active, rec.truncated = False, truncated
        return
    if turn_index + 1 >= config.max_turns:
        ep.active, rec.truncated, ep.cut = False, True, "no turns left"
        return
    turn.env_ids = chat.env_ids(text, closed=closed)
    window = None
    if config.history == "windowed":
        turn.user_ids, window = chat.user_ids(text), config.window
    prompt = prompt_for_turn(ep, len(ep.turns), window)
    if len(prompt) + config.max_action_tokens > config.max_context_tokens:
        ep.active, rec.truncated, ep.cut = False, True, "the context is full"


def _finish_cut(eps, pool, config):
    """Lets the environments of episodes the rollout cut short end them (``env.finish``).

    The returned reward is added to the last turn's; an environment whose
    ``finish`` raises or hangs fails its episode like a failed step.
    """
    cut = [ep for ep in eps if _needs_finish(ep)]
    outcomes = pool.run([lambda e=ep: e.env.finish(e.cut) for ep in cut],
                        timeout_s=config.step_timeout_s)
    for ep, outcome in zip(cut, outcomes):
        _apply_finish(ep, outcome)


def _needs_finish(ep) -> bool:
    """The rollout cut `ep` short and its environment can score it (``env.finish``)."""
    return ep.cut is not None and bool(ep.turns) and callable(getattr(ep.env, "finish", None))


def _apply_finish(ep, outcome) -> None:
    """Records the outcome of ``ep.env.finish``: its reward goes to the last turn."""
    ep.cut = None
    if outcome.error is not None:
        _fail(ep, outcome.error)
        return
    step, rec = outcome.value, ep.record
    info = dict(step.info)
    reward = float(step.reward)
    ep.turns[-1].reward += reward
    rec.turn_rewards[-1] += reward
    rec.success = rec.success or bool(info.get("success", False))
    ep.masked = ep.masked or bool(info.get("exclude_from_loss", False))


def _play_turn(k, eps, policy, pool, chat, config, key, timings):
    """Plays turn `k` of every active episode."""
    active = [ep for ep in eps if ep.active]
    window = config.window if config.history == "windowed" else None
    t0 = time.perf_counter()
    prompts = [prompt_for_turn(ep, k, window) for ep in active]
    contexts = [TurnContext(ep.index, k, ep.observation, ep.info, ep.env) for ep in active]
    t1 = time.perf_counter()
    gens = policy.generate(prompts, key=jax.random.fold_in(key, k), contexts=contexts)
    t2 = time.perf_counter()
    if len(gens) != len(prompts):
        raise ValueError(f"policy returned {len(gens)} generations for {len(prompts)} prompts")
    stops = set(chat.stop_token_ids)
    checked = []
    for gen in gens:
        gen, closed = _cut(gen, stops, config.max_action_tokens)
        action, reason = _parse(chat.decode_action(gen.token_ids), closed, config)
        checked.append((gen, closed, action, reason))
    stepping = [(ep, c) for ep, c in zip(active, checked) if c[3] is None]
    t3 = time.perf_counter()
    outcomes = pool.run([lambda e=ep, a=c[2]: e.env.step(a) for ep, c in stepping],
                        timeout_s=config.step_timeout_s)
    t4 = time.perf_counter()
    by_episode = {ep.index: o for (ep, _), o in zip(stepping, outcomes)}
    for ep, (gen, closed, action, reason) in zip(active, checked):
        _apply(ep, gen, closed, action, reason, by_episode.get(ep.index), k, chat, config)
    t5 = time.perf_counter()
    _finish_cut(active, pool, config)
    t6 = time.perf_counter()
    timings["generate"] += t2 - t1
    timings["env"] += (t4 - t3) + (t6 - t5)
    timings["batch"] += (t1 - t0) + (t3 - t2) + (t5 - t4)


def _metrics(records: list[EpisodeRecord], timings: dict[str, float], batch: TurnBatch,
             *, masked: int = 0, step_timeout_s: float = 0.0):
    n = max(len(records), 1)
    turns = sum(r.turns for r in records)
    total = sum(timings.values())
    return {
        "episodes": len(records),
        "success_rate": sum(r.success for r in records) / n,
        "return_mean": sum(r.episode_return for r in records) / n,
        "turns_mean": turns / n,
        "invalid_action_rate": sum(r.invalid_actions for r in records) / max(turns, 1),
        "truncated_frac": sum(r.truncated for r in records) / n,
        "failed": sum(r.failed for r in records),
        "masked": masked,
        "step_timeout_s": step_timeout_s,
        "agent_tokens": float(batch.loss_mask.sum()),
        "rows": int(batch.tokens.shape[0]),
        "seq_len": int(batch.tokens.shape[1]),
        "time_generate_s": timings["generate"],
        "time_env_s": timings["env"],
        "time_batch_s": timings["batch"],
        "time_total_s": total,
        "episodes_per_s": len(records) / total if total > 0 else 0.0,
    }


def collect(
    env: str | Callable[[], Any] | EnvGroup,
    policy: Policy,
    tokenizer: Any,
    config: RolloutConfig,
    *,
    key: jax.Array,
    task_seeds: Sequence[int] | None = None,
    seed_offset: int = 0,
    env_kwargs: dict[str, Any] | None = None,
    pool: StepPool | None = None,
) -> tuple[TurnBatch, list[EpisodeRecord], dict[str, float]]:
    """Plays N tasks x G rollouts and packs them into a `TurnBatch`.

    Args:
      env: a registered environment name (with `env_kwargs`; its
        environments are kept and reused by later calls with the same name and
        kwargs), a factory (fresh environments each call), or an `EnvGroup`.
      policy: a `Policy` (`SamplerPolicy`, `ScriptedPolicy`, ...).
      tokenizer: the model's tokenizer; its chat template formats turns.
      config: `RolloutConfig`.
      key: sampling key; turn k uses ``fold_in(key, k)`` (see Determinism above).
      task_seeds: N environment seeds, one per task (the G rollouts of task n
        share ``task_seeds[n]``); default ``seed_offset + n``.
      seed_offset: first default task seed.
      env_kwargs: keyword arguments for `aem_jax.envs.make` when `env` is a name.
      pool: a `StepPool`; default one shared per ``config.num_threads``.

    Returns:
      (batch, records, metrics): the `TurnBatch` (numpy arrays; rows are
      episodes ``n * G + g`` in concatenated mode, their turns in order in
      windowed mode), one `EpisodeRecord` per episode, and scalar metrics
      including the time spent in generation, environments and batching.
    """
    N = config.num_tasks
    seeds = list(range(seed_offset, seed_offset + N)) if task_seeds is None else list(task_seeds)
    if len(seeds) != N:
        raise ValueError(f"task_seeds has {len(seeds)} entries; config.num_tasks is {N}")
    group = env if isinstance(env, EnvGroup) else _group_for(env, env_kwargs or {})
    with group.lock:
        return _collect(group, policy, tokenizer, config, key, seeds, pool)


def _collect(group, policy, tokenizer, config, key, seeds, pool):
    N, G = config.num_tasks, config.group_size
    pool = pool or _shared_pool(config.num_threads)
    envs = group.take(N * G)
    config = _adapt(config, envs)
    chat = ChatFormat(tokenizer, config.system_prompt, enable_thinking=config.enable_thinking,
                      observation_role=config.observation_role)
    timings = {"generate": 0.0, "env": 0.0, "batch": 0.0}
    eps = [_Episode(i, i // G, e, EpisodeRecord(i, i // G, seeds[i // G]))
           for i, e in enumerate(envs)]
    t0 = time.perf_counter()
    _reset_all(eps, [ep.record.seed for ep in eps], pool, chat, config)
    timings["env"] += time.perf_counter() - t0
    slots = slot_policy(policy) if config.engine == "continuous" else None
    if slots is not None:
        from aem_jax.rollout import engine  # imported late: it builds on this module

        engine.play(eps, *slots, pool, chat, config, key, timings)
    else:
        for k in range(config.max_turns):
            if not any(ep.active for ep in eps):
                break
            _play_turn(k, eps, policy, pool, chat, config, key, timings)
    t0 = time.perf_counter()
    batch = build_turn_batch(
        eps, num_turns=config.max_turns, windowed=config.history == "windowed",
        window=config.window, seq_len=config.seq_len, seq_bucket=config.seq_bucket,
        row_bucket=config.row_bucket, pad_id=pad_id(tokenizer))
    timings["batch"] += time.perf_counter() - t0
    for ep in eps:
        if ep.record.failed:
            group.discard(ep.index)
    records = [ep.record for ep in eps]
    return batch, records, _metrics(records, timings, batch,
                                    masked=sum(ep.masked and not ep.record.failed for ep in eps),
                                    step_timeout_s=config.step_timeout_s)


def _adapt(config: RolloutConfig, envs: Sequence[Any]) -> RolloutConfig:
    """The config with the environments' system prompt and step-time bound applied.

    ``system_prompt``: the config's, else the environments' own (they must
    agree). ``step_timeout_s``: at least every environment's
    ``step_time_bound_s``.
    """
    changes: dict[str, Any] = {}
    if config.system_prompt is None:
        prompts = {getattr(env, "system_prompt", None) for env in envs}
        if len(prompts) > 1:
            raise ValueError("the environments of one batch have different system_prompt "
                             "attributes; set RolloutConfig.system_prompt")
        prompt = prompts.pop() if prompts else None
        if prompt is not None:
            changes["system_prompt"] = str(prompt)
    bound = max([float(getattr(env, "step_time_bound_s", 0.0) or 0.0) for env in envs] + [0.0])
    if bound > config.step_timeout_s:
        changes["step_timeout_s"] = bound
    return dataclasses.replace(config, **changes) if changes else config


_POOLS: dict[int, StepPool] = {}
_GROUPS: dict[str, EnvGroup] = {}
_GROUPS_LOCK = threading.Lock()


def _group_for(env: str | Callable[[], Any], kwargs: dict[str, Any]) -> EnvGroup:
    """The environments of a registered name + kwargs, kept across calls.

    Reusing them matters for environments that are slow to start (a TextWorld
    interpreter); factories get a fresh group each call.
    """
    if not isinstance(env, str):
        return EnvGroup(env, **kwargs)
    cache_key = f"{env}:{sorted(kwargs.items())!r}"
    with _GROUPS_LOCK:
        if cache_key not in _GROUPS:
            _GROUPS[cache_key] = EnvGroup(env, **kwargs)
        return _GROUPS[cache_key]


def _shared_pool(num_threads: int) -> StepPool:
    """One pool per size per process: workers are long-lived daemon threads."""
    if num_threads not in _POOLS:
        _POOLS[num_threads] = StepPool(num_threads)
    return _POOLS[num_threads]


def pad_id(tokenizer: Any) -> int:
    """The token id batches are padded with (the tokenizer's pad token, else its end of sequence)."""
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)
