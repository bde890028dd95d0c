"""A rate limiter that holds a learner's updates per actor step, like Reverb's SampleToInsertRatio.

The actor reports the env steps it stores (``inserted``); the learner asks for updates
(``acquire``) and reports each one it finishes (``updated``). ``schedule(steps)`` is the
number of updates due after ``steps`` env steps, the same rule the synchronous engine
follows (``DQN.updates_due``), so both pipelines learn from the same amount of replay.

Two rules hold the ratio:

- the learner never runs ahead: update ``u + 1`` waits until ``schedule(steps) >= u + 1``;
- the actor never runs more than ``max_lag`` updates ahead of the learner: storing ``n``
  more steps waits until ``schedule(steps + n) - updates <= max_lag`` (or, when one
  storage alone makes more updates due than that, until the learner has caught up).

So at any moment ``schedule(steps) - max(max_lag, largest step of the schedule) <= updates
<= schedule(steps)``. Waits end early when the limiter is closed (the run stops or a thread
failed); callers then check why. All methods are thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["RateLimiter"]


class RateLimiter:
    """Holds ``updates`` at ``schedule(steps)`` within ``max_lag`` updates.

    Args:
        schedule: updates due after a number of env steps; non-decreasing.
        max_lag: how many due updates the learner may owe before the actor waits (>= 0).
        steps, updates: the counts so far (a resumed run starts from its checkpoint's).
    """

    def __init__(self, schedule: Callable[[int], int], max_lag: int, *, steps: int = 0, updates: int = 0):
        if not callable(schedule):
            raise TypeError(f"schedule must be callable (env steps -> updates due), got {type(schedule).__name__}")
        for name, value in (("max_lag", max_lag), ("steps", steps), ("updates", updates)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        self._schedule = schedule
        self.max_lag = max_lag
        self._steps = steps
        self._updates = updates
        self._closed = False
        self._changed = threading.Condition()
        self.max_owed = 0
        """The most updates the learner ever owed (``schedule(steps) - updates``), for reports."""
        self.learner_wait_s = 0.0
        """Seconds the learner spent waiting for updates to come due (the actor's waits are the
        pipeline's to time)."""

    # ------------------------------------------------------------------ state
    @property
    def steps(self) -> int:
        return self._steps

    @property
    def updates(self) -> int:
        return self._updates

    @property
    def closed(self) -> bool:
        return self._closed

    def owed(self) -> int:
        """Updates due but not done yet."""
        with self._changed:
            return self._schedule(self._steps) - self._updates

    def close(self) -> None:
        """Wake every waiter; from now on waits return at once (False or 0)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    # ------------------------------------------------------------------ actor side
    def can_insert(self, n: int) -> bool:
        """Whether storing ``n`` more steps keeps the learner within ``max_lag`` (no waiting)."""
        with self._changed:
            return self._insert_allowed(n)

    def _insert_allowed(self, n: int) -> bool:
        owed_after = self._schedule(self._steps + n) - self._updates
        caught_up = self._updates >= self._schedule(self._steps)
        return owed_after <= self.max_lag or caught_up

    def await_insert(self, n: int, timeout: float | None = None) -> bool:
        """Block until ``n`` more steps may be stored; False if closed or timed out first."""
        return self._wait(lambda: self._insert_allowed(n), timeout)

    def inserted(self, n: int) -> None:
        """``n`` more env steps were stored (and may be sampled)."""
        with self._changed:
            self._steps += n
            self.max_owed = max(self.max_owed, self._schedule(self._steps) - self._updates)
            self._changed.notify_all()

    def await_caught_up(self, timeout: float | None = None) -> bool:
        """Block until every due update is done (e.g. before a checkpoint); False if closed or timed out."""
        return self._wait(lambda: self._updates >= self._schedule(self._steps), timeout)

    # ------------------------------------------------------------------ learner side
    def acquire(self, timeout: float | None = None) -> int:
        """Block until an update is due; return how many are due now (0 if closed or timed out first)."""
        if not self._wait(lambda: self._updates < self._schedule(self._steps), timeout, timed=True):
            return 0
        with self._changed:
            return self._schedule(self._steps) - self._updates

    def updated(self, n: int = 1) -> None:
        """``n`` more updates were done."""
        with self._changed:
            self._updates += n
            self._changed.notify_all()

    # ------------------------------------------------------------------
    def _wait(self, ready: Callable[[], bool], timeout: float | None, timed: bool = False) -> bool:
        start = time.perf_counter()
        with self._changed:
            ok = self._changed.wait_for(lambda: self._closed or ready(), timeout)
            if timed:
                self.learner_wait_s += time.perf_counter() - start
            return ok and not self._closed
