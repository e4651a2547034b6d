"""A pool of daemon worker threads with a per-task time limit.

Environment steps run here. `concurrent.futures.ThreadPoolExecutor` is not
used because its workers are joined at interpreter exit and cannot be
abandoned: one environment that hangs forever would hang the whole program
at exit and, while it hangs, hold a worker. Here a task that outlives its
time limit is abandoned (its daemon thread keeps running, harmlessly, until
the process ends) and a fresh worker replaces the lost one, so the pool keeps
``num_threads`` live workers.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any, Callable, Sequence


class StepTimeout(Exception):
    """A task ran longer than its time limit and was abandoned."""


@dataclasses.dataclass
class _Task:
    fn: Callable[[], Any]
    started: float | None = None
    finished: bool = False
    value: Any = None
    error: BaseException | None = None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one task gave: a value, or the exception it raised (or `StepTimeout`)."""

    value: Any = None
    error: BaseException | None = None


class StepPool:
    """Runs batches of zero-argument callables on daemon threads.

    Args:
      num_threads: live workers (>= 1).
    """

    def __init__(self, num_threads: int):
        if num_threads < 1:
            raise ValueError(f"num_threads={num_threads!r}; must be >= 1")
        self._queue: queue.Queue[_Task] = queue.Queue()
        self._cond = threading.Condition()
        self._num_threads = num_threads
        for _ in range(num_threads):
            self._spawn()

    def _spawn(self) -> None:
        threading.Thread(target=self._work, daemon=True, name="aem-env-step").start()

    def _work(self) -> None:
        while True:
            task = self._queue.get()
            with self._cond:
                task.started = time.monotonic()
            try:
                value, error = task.fn(), None
            except BaseException as e:  # noqa: BLE001 -- any failure ends only its episode
                value, error = None, e
            with self._cond:
                task.value, task.error, task.finished = value, error, True
                self._cond.notify_all()

    def run(self, fns: Sequence[Callable[[], Any]], *, timeout_s: float) -> list[Outcome]:
        """Runs `fns` concurrently; each gets `timeout_s` seconds once started.

        Returns one `Outcome` per callable, in order. A callable still running
        after `timeout_s` seconds gives ``Outcome(error=StepTimeout(...))`` and
        its worker is replaced.
        """
        tasks = [_Task(fn) for fn in fns]
        for task in tasks:
            self._queue.put(task)
        outcomes: list[Outcome | None] = [None] * len(tasks)
        with self._cond:
            while True:
                now = time.monotonic()
                next_deadline = None
                for i, task in enumerate(tasks):
                    if outcomes[i] is not None:
                        continue
                    if task.finished:
                        outcomes[i] = Outcome(task.value, task.error)
                    elif task.started is not None:
                        deadline = task.started + timeout_s
                        if now >= deadline:
                            outcomes[i] = Outcome(error=StepTimeout(
                                f"environment step exceeded step_timeout_s={timeout_s}"))
                            self._spawn()  # the stuck worker is lost; keep the pool size
                        elif next_deadline is None or deadline < next_deadline:
                            next_deadline = deadline
                if all(o is not None for o in outcomes):
                    return outcomes  # type: ignore[return-value]
                # Wake on a finished task or at the earliest deadline; queued
                # tasks have no deadline yet, so poll for their start.
                wait = 0.05 if next_deadline is None else min(0.05, max(next_deadline - now, 0.0))
                self._cond.wait(wait)
