"""ArCHer's replay buffer: a FIFO of whole episodes in host memory."""
from __future__ import annotations

from typing import Any

import numpy as np

# TurnBatch fields the replay buffer keeps, in compact storage dtypes.
REPLAY_FIELDS: dict[str, Any] = {
    "tokens": np.int32, "attention_mask": np.int8, "loss_mask": np.int8, "turn_ids": np.int32,
    "turn_rewards": np.float32, "turn_valid": np.bool_, "done": np.bool_,
}


def rows_of(batch, seq_len: int | None = None) -> dict[str, np.ndarray]:
    """The replayed fields of a TurnBatch, [B,T] ones right-padded to ``seq_len``
    (padding: no attention, no loss, turn id -1)."""
    rows = {k: np.asarray(getattr(batch, k)).astype(dt) for k, dt in REPLAY_FIELDS.items()}
    T = rows["tokens"].shape[1]
    if seq_len is not None and T != seq_len:
        if T > seq_len:
            raise ValueError(f"batch rows have T={T} tokens, more than the buffer's seq_len={seq_len}")
        for k in ("tokens", "attention_mask", "loss_mask", "turn_ids"):
            rows[k] = np.pad(rows[k], ((0, 0), (0, seq_len - T)), constant_values=-1 if k == "turn_ids" else 0)
    return rows


class ReplayBuffer:
    """FIFO buffer of whole episodes: rows of concatenated TurnBatches, host numpy.

    Every process holds the same buffer (rollouts are global), so sampling
    with the same seed picks the same rows everywhere.
    """

    def __init__(self, capacity: int, seq_len: int | None = None):
        if capacity < 1:
            raise ValueError(f"capacity={capacity}; the replay buffer needs capacity >= 1 episode")
        self.capacity = capacity
        self.seq_len = seq_len  # rows are right-padded to this T (batches come in several T buckets)
        self.arrays: dict[str, np.ndarray] | None = None
        self.size = 0
        self.cursor = 0  # next slot to write

    def add(self, batch) -> None:
        """Appends the rows of ``batch`` (a TurnBatch), dropping the oldest when full."""
        rows = rows_of(batch, self.seq_len)
        n = rows["tokens"].shape[0]
        if self.arrays is None:
            self.arrays = {k: np.zeros((self.capacity,) + v.shape[1:], v.dtype) for k, v in rows.items()}
        for k, v in rows.items():
            if v.shape[1:] != self.arrays[k].shape[1:]:
                raise ValueError(f"batch field {k!r} has row shape {v.shape[1:]}; the buffer holds "
                                 f"{self.arrays[k].shape[1:]} (T and K must stay fixed during a run)")
        keep = min(n, self.capacity)
        slots = (self.cursor + np.arange(keep)) % self.capacity
        for k, v in rows.items():
            self.arrays[k][slots] = v[n - keep:]
        self.cursor = int((self.cursor + keep) % self.capacity)
        self.size = min(self.size + keep, self.capacity)

    def sample(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """``n`` rows drawn uniformly with replacement (a fixed shape for jit)."""
        if not self.size:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = rng.integers(0, self.size, n)
        return {k: v[idx] for k, v in self.arrays.items()}

    def state_dict(self) -> dict[str, Any]:
        """The stored episodes, oldest first (what a checkpoint saves)."""
        if self.arrays is None:
            return {"arrays": {}}
        order = (self.cursor + np.arange(self.size)) % self.capacity if self.size == self.capacity \
            else np.arange(self.size)
        return {"arrays": {k: v[order] for k, v in self.arrays.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        arrays = state.get("arrays") or {}
        size = len(next(iter(arrays.values()))) if arrays else 0
        if size > self.capacity:
            raise ValueError(f"checkpointed replay buffer holds {size} episodes; config.archer.buffer_episodes="
                             f"{self.capacity} is smaller: raise it to at least {size}")
        self.arrays, self.size, self.cursor = None, size, size % self.capacity
        if size:
            self.arrays = {k: np.zeros((self.capacity,) + np.shape(v)[1:], REPLAY_FIELDS[k])
                           for k, v in arrays.items()}
            for k, v in arrays.items():
                self.arrays[k][:size] = v
