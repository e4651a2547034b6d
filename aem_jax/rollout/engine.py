"""The continuous rollout engine: KV caches kept across turns, episodes batched continuously.

`collect(..., RolloutConfig(engine="continuous"))` plays a model-backed
policy (`SamplerPolicy`, or a wrapper keying rows per episode, see
`policy.slot_policy`) here. Each live episode owns one row ("slot") of a
stacked KV cache (`models.sampler.SlotSampler`):

* a new turn prefills only the tokens its prompt adds to what the slot
  holds -- the observation and the template's glue (`ChatFormat.env_ids`)
  -- at the slot's current position, then decodes. In windowed mode the
  prompt of turn k > h no longer extends the previous one (the window
  dropped a turn): the slot is emptied and the window prefilled afresh;
* a slot is freed when its episode ends and taken by the next waiting one;
* decoding runs over all slots with the rows that are not generating
  masked (one shape per attention width: each call reads only the cache
  columns its rows reach), and returns to the host once half the
  generating rows finished their action, at the latest every
  `DECODE_STEPS` steps. Each finished action's environment step is then
  submitted to the step pool and runs while the other rows decode; its
  episode rejoins the batch when the step is back (steps that come back
  within a short grace of each other rejoin together). A slow
  environment delays only its own episode; a hung one is cut by the pool's
  per-step time limit (``step_timeout_s``) and fails only its episode.

Sampling keys are per episode and per turn, as in the simple engine with the
trainer's per-episode keys: episode e's turn k uses
``fold_in(fold_in(key, k), offset + e)`` and its n-th token of that action
``fold_in(that, n)``. A row's draws therefore depend only on its own key and
its own logits, never on which other episodes share the batch, how many
slots there are or in which order episodes were admitted; batching changes
results by float rounding at most. The recorded log-probs and entropies are
those of the distributions the tokens were drawn from, computed on the
episode's own cache, so they equal a teacher-forced forward pass over the
final row (float rounding aside).

Everything the simple engine decides per turn (cutting at the action limit,
parsing, invalid actions, failed environments, truncation, ``env.finish``)
is the same code (`collect._apply`, `_apply_finish`), so both engines give
the same `TurnBatch` and `EpisodeRecord` structure.
"""
from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aem_jax.models.sampler import SlotSampler
from aem_jax.rollout.collect import _apply, _apply_finish, _cut, _needs_finish, _parse
from aem_jax.rollout.batching import prompt_for_turn
from aem_jax.rollout.policy import Generation, SamplerPolicy

DECODE_STEPS = 8  # decode steps per device call at most: how often waiting episodes can join
PREFILL_CHUNK = 64  # longest prefill chunk; longer appends run as several chunks
# After the first environment result is back, wait at most this share of the last decode call's
# time for the other steps in flight (see `_Engine._collect_env_results`).
GATHER_SHARE = 0.05


@dataclasses.dataclass
class _Slot:
    """One live episode in its cache row."""

    ep: Any  # collect._Episode
    held: list[int] = dataclasses.field(default_factory=list)  # tokens the cache row holds
    tokens: list[int] = dataclasses.field(default_factory=list)  # the current action so far
    logprobs: list[float] = dataclasses.field(default_factory=list)
    entropies: list[float] = dataclasses.field(default_factory=list)
    generating: bool = False
    pending: tuple = ()  # (generation, closed, action, reason) while its environment steps


@jax.jit
def _turn_key(key, turn, episode):
    return jax.random.fold_in(jax.random.fold_in(key, turn), episode)


class _Waiter:
    """Runs environment calls in the step pool one by one, without blocking the engine.

    Each call waits in its own thread (`StepPool.run` with one task and the
    per-step time limit) and posts ``(tag, kind, outcome)`` on `results`
    (tag: the slot of a step, the episode index of a finish),
    so one slow or hung environment holds up only its own episode.
    """

    def __init__(self, pool, timeout_s: float):
        self.pool, self.timeout_s = pool, timeout_s
        self.results: queue.Queue = queue.Queue()
        self.pending = 0

    def submit(self, tag: int, kind: str, fn) -> None:
        def wait():
            self.results.put((tag, kind, self.pool.run([fn], timeout_s=self.timeout_s)[0]))

        self.pending += 1
        threading.Thread(target=wait, daemon=True, name="aem-env-wait").start()

    def get(self, timeout: float | None):
        """The next result; waits `timeout` seconds at most (None: until one comes, 0: not at
        all); raises `queue.Empty` if none came."""
        item = self.results.get(block=timeout != 0.0, timeout=timeout or None)
        self.pending -= 1
        return item


def play(eps, policy: SamplerPolicy, offset: int, pool, chat, config, key, timings) -> None:
    """Plays every active episode of `eps` to its end (in place, as `collect._play_turn` does).

    Args:
      eps: `collect._Episode`s, reset already (inactive ones are skipped).
      policy: the `SamplerPolicy` whose model and sampling parameters act.
      offset: added to an episode's index in its sampling key.
      pool: the `StepPool` environments step in.
      chat: the `ChatFormat`.
      config: the `RolloutConfig` (after `collect._adapt`).
      key: the rollout key.
      timings: seconds, accumulated into "generate" (device calls), "env"
        (waiting for environments with nothing to decode) and "batch".
    """
    waiting = [ep for ep in eps if ep.active]
    if waiting:
        _Engine(waiting, policy, offset, pool, chat, config, key).run(timings)


class _Engine:
    """The state of one `play`: slots, waiting episodes, environment calls in flight."""

    def __init__(self, waiting, policy, offset, pool, chat, config, key):
        self.waiting = collections.deque(waiting)
        self.num_slots = min(config.num_slots or len(waiting), len(waiting))
        self.max_new = min(policy.params.max_new_tokens, config.max_action_tokens)
        self.sampler = SlotSampler(policy.model, policy.params, policy.pad_id,
                                   num_slots=self.num_slots, max_len=config.max_context_tokens,
                                   chunk=PREFILL_CHUNK, decode_steps=DECODE_STEPS)
        self.window = config.window if config.history == "windowed" else None
        self.stops = set(chat.stop_token_ids)
        self.chat, self.config, self.key, self.offset = chat, config, key, offset
        self.waiter = _Waiter(pool, config.step_timeout_s)
        self.live: dict[int, _Slot] = {}
        self.free = list(range(self.num_slots))
        self.ready: set[int] = set()  # slots whose next turn's prompt is to be prefilled
        self.keys = [key] * self.num_slots  # each slot's key for its current action
        self.stacked = None  # self.keys as one [B] array, until a key changes
        self.finishing: dict[int, Any] = {}  # episode index -> episode, while env.finish runs
        self.gen_s = self.env_s = 0.0
        self.last_decode_s = 0.0  # seconds of the last decode call

    def run(self, timings) -> None:
        start = time.perf_counter()
        while self.waiting or self.live or self.waiter.pending:
            while self.waiting and self.free:  # admit waiting episodes into free slots
                s = self.free.pop(0)
                self.live[s] = _Slot(self.waiting.popleft())
                self.ready.add(s)
            self._collect_env_results()
            if self.ready:
                self._prefill()
            self._decode()
        timings["generate"] += self.gen_s
        timings["env"] += self.env_s
        timings["batch"] += time.perf_counter() - start - self.gen_s - self.env_s

    def _collect_env_results(self) -> None:
        """Applies the environment calls that are back; waits for one if nothing can run.

        Once one result is back, the others in flight get a short grace
        (GATHER_SHARE of the last decode call's time) to come back too: a
        decode step costs the same for 1 or B generating rows, so episodes
        whose fast environments return a few milliseconds apart should rejoin
        in the same call rather than trail each other by a whole call. The
        grace bounds what a slow environment costs the others to that share.
        """
        block = not self.ready and not any(sl.generating for sl in self.live.values())
        deadline = None
        while self.waiter.pending:
            t0 = time.perf_counter()
            if deadline is None:
                timeout = None if block else 0.0
            else:
                timeout = max(0.0, deadline - t0)
            try:
                tag, kind, outcome = self.waiter.get(timeout)
            except queue.Empty:
                return
            finally:
                if timeout != 0.0:
                    self.env_s += time.perf_counter() - t0
            if deadline is None:
                deadline = time.perf_counter() + GATHER_SHARE * self.last_decode_s
            if kind == "finish":
                _apply_finish(self.finishing.pop(tag), outcome)
            else:
                self._end_turn(tag, outcome, *self.live[tag].pending)

    def _prefill(self) -> None:
        """Brings the ready slots' caches to their next prompt and starts their actions."""
        appends = {}
        for s in sorted(self.ready):
            slot = self.live[s]
            turn = len(slot.ep.turns)
            prompt = prompt_for_turn(slot.ep, turn, self.window)
            n = len(slot.held)
            # Append what the prompt adds, unless it does not extend what the row holds (a
            # windowed prompt that dropped a turn; a new episode in a row another one left).
            extends = 0 < n <= len(prompt) and prompt[:n] == slot.held
            appends[s] = (prompt[n:] if extends else prompt, not extends)
            slot.held = prompt
            slot.tokens, slot.logprobs, slot.entropies = [], [], []
            slot.generating = True
            self.keys[s] = _turn_key(self.key, turn, self.offset + slot.ep.index)
        self.ready.clear()
        self.stacked = None
        t0 = time.perf_counter()
        self.sampler.prefill(appends)
        self.gen_s += time.perf_counter() - t0

    def _decode(self) -> None:
        """One decode call over all slots; slots whose action ended go to their environment."""
        active = np.array([s in self.live and self.live[s].generating
                           for s in range(self.num_slots)])
        if not active.any():
            return
        steps = np.array([len(self.live[s].tokens) if active[s] else 0
                          for s in range(self.num_slots)], np.int32)
        if self.stacked is None:
            self.stacked = jnp.stack(self.keys)
        t0 = time.perf_counter()
        # Return when half the generating rows are done (their environments then step while
        # the rest decode), at the latest after DECODE_STEPS steps.
        exit_after = (int(active.sum()) + 1) // 2
        out = self.sampler.decode(active, steps, self.stacked, max_new=self.max_new,
                                  exit_after=exit_after)
        self.last_decode_s = time.perf_counter() - t0
        self.gen_s += self.last_decode_s
        for s in np.flatnonzero(active).tolist():
            slot, n = self.live[s], int(out.count[s])
            slot.tokens += out.tokens[s, :n].tolist()
            slot.logprobs += out.logprobs[s, :n].tolist()
            slot.entropies += out.entropy[s, :n].tolist()
            if not out.active[s]:
                self._action_done(s, slot)

    def _action_done(self, s: int, slot: _Slot) -> None:
        """A slot finished sampling its action: check it, then step its environment (or not)."""
        slot.generating = False
        gen, closed = _cut(Generation(slot.tokens, slot.logprobs, slot.entropies), self.stops,
                           self.max_new)
        if len(gen.token_ids) != len(slot.tokens):  # the sampler stops at the first stop token
            raise RuntimeError(f"slot {s} sampled {len(slot.tokens)} tokens past its action's end")
        slot.held = slot.held + list(gen.token_ids)  # every sampled token entered the cache
        action, reason = _parse(self.chat.decode_action(gen.token_ids), closed, self.config)
        if reason is not None:  # invalid: no environment step
            self._end_turn(s, None, gen, closed, action, reason)
            return
        slot.pending = (gen, closed, action, reason)
        self.waiter.submit(s, "step", lambda e=slot.ep, a=action: e.env.step(a))

    def _end_turn(self, s: int, outcome, gen, closed, action, reason) -> None:
        """Applies a turn's result; the episode goes on (prefill) or leaves its slot."""
        ep = self.live[s].ep
        _apply(ep, gen, closed, action, reason, outcome, len(ep.turns), self.chat, self.config)
        if ep.active:
            self.ready.add(s)
            return
        del self.live[s]
        self.free.append(s)
        if _needs_finish(ep):
            self.waiter.submit(ep.index, "finish", lambda e=ep: e.env.finish(e.cut))
            self.finishing[ep.index] = ep
