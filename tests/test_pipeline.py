"""The overlapped actor/learner pipeline: rate limiter, weight hand-over, errors, shutdown, learning."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
import torch

from fastdqn.rate_limiter import RateLimiter

pytestmark = pytest.mark.filterwarnings("ignore:.*Box (low|high)'s precision lowered.*")


def sync_schedule(learning_starts: int, train_frequency: int, gradient_steps: int):
    """The synchronous engine's rule (DQN.updates_due), written out independently."""
    def due(step: int) -> int:
        if step < max(learning_starts, 1):
            return 0
        return ((step - learning_starts) // train_frequency + 1) * gradient_steps
    return due


# ---------------------------------------------------------------------------- rate limiter
def test_learner_gets_exactly_the_due_updates_and_never_runs_ahead():
    due = sync_schedule(10, 4, 1)
    limiter = RateLimiter(due, max_lag=100)
    assert limiter.acquire(timeout=0) == 0  # nothing due before learning starts
    limiter.inserted(9)
    assert limiter.acquire(timeout=0) == 0
    limiter.inserted(1)  # step 10: the first update is due
    assert limiter.acquire(timeout=0) == 1
    limiter.updated()
    assert limiter.acquire(timeout=0) == 0
    limiter.inserted(9)  # step 19: due(19) = 3
    assert limiter.acquire(timeout=0) == due(19) - 1 == 2
    limiter.updated(2)
    assert limiter.owed() == 0 and limiter.acquire(timeout=0) == 0


def test_actor_waits_when_the_learner_owes_more_than_max_lag():
    due = sync_schedule(1, 1, 1)  # one update per step from step 1: due(step) = step
    limiter = RateLimiter(due, max_lag=3, steps=1, updates=1)
    assert limiter.can_insert(3)  # would owe 3
    limiter.inserted(2)  # owes 2
    assert limiter.can_insert(1) and not limiter.can_insert(2)
    assert not limiter.await_insert(2, timeout=0.01)
    limiter.updated(1)  # owes 1
    assert limiter.can_insert(2) and not limiter.can_insert(3)
    assert limiter.await_insert(2, timeout=0.01)


def test_a_round_larger_than_max_lag_is_let_through_once_caught_up():
    due = sync_schedule(0, 64, 32)  # rounds of 32 updates every 64 steps
    limiter = RateLimiter(due, max_lag=4, steps=1, updates=32)
    assert limiter.can_insert(63)  # crosses no round boundary
    assert limiter.can_insert(64)  # makes 32 more due: too many, but the learner owes nothing
    limiter.inserted(64)
    assert not limiter.can_insert(64)
    limiter.updated(31)
    assert not limiter.can_insert(64)  # would owe 33
    limiter.updated(1)
    assert limiter.can_insert(64)


def test_close_wakes_every_waiter_at_once():
    limiter = RateLimiter(lambda steps: steps, max_lag=0, steps=5, updates=0)
    results = {}

    def learner_side():
        limiter.updated(5)
        results["acquire"] = limiter.acquire()  # nothing due: waits

    def actor_side():
        results["insert"] = limiter.await_insert(10)
        results["caught_up"] = limiter.await_caught_up()

    learner = threading.Thread(target=learner_side)
    learner.start()
    learner.join(0.2)
    assert learner.is_alive()  # blocked in acquire
    limiter.close()
    learner.join(5)
    assert not learner.is_alive() and results["acquire"] == 0
    actor = threading.Thread(target=actor_side)
    actor.start()
    actor.join(5)
    assert not actor.is_alive() and results == {"acquire": 0, "insert": False, "caught_up": False}


def test_concurrent_actor_and_learner_hold_the_schedule_within_max_lag():
    """Two threads at random speeds; every observed (steps, updates) pair obeys the bounds."""
    due = sync_schedule(50, 4, 1)
    max_lag = 6
    limiter = RateLimiter(due, max_lag=max_lag)
    rng = np.random.default_rng(0)
    inserts = rng.integers(1, 9, size=400).tolist()
    observed: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def actor():
        try:
            for n in inserts:
                assert limiter.await_insert(n, timeout=10)
                limiter.inserted(n)
                observed.append((limiter.steps, limiter.updates))
                if rng.random() < 0.1:
                    time.sleep(0.001)
            assert limiter.await_caught_up(timeout=10)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            limiter.close()

    def learner():
        while (granted := limiter.acquire()) > 0:
            for _ in range(granted):
                assert limiter.updates + 1 <= due(limiter.steps)  # never ahead of the schedule
                limiter.updated()

    threads = [threading.Thread(target=actor), threading.Thread(target=learner)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and not any(t.is_alive() for t in threads)
    steps = sum(inserts)
    assert limiter.steps == steps and limiter.updates == due(steps)  # the sync engine's count exactly
    for step, updates in observed:
        # The insert itself may add at most ratio * 8 + 1 updates; before it, owed <= max_lag.
        assert due(step) - (max_lag + math.ceil(8 / 4)) <= updates <= due(step)
    assert limiter.max_owed <= max_lag


@pytest.mark.parametrize("kwargs, error", [
    (dict(schedule=5, max_lag=1), TypeError),
    (dict(schedule=lambda s: s, max_lag=-1), ValueError),
    (dict(schedule=lambda s: s, max_lag=1.5), ValueError),
    (dict(schedule=lambda s: s, max_lag=1, steps=-2), ValueError),
])
def test_rate_limiter_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error, match="schedule|max_lag|steps"):
        RateLimiter(**kwargs)


# ---------------------------------------------------------------------------- weight hand-over, priorities
def small_learner(hidden=32, **kwargs):
    from fastdqn.learner import Learner
    from fastdqn.networks import build_q_network

    return Learner(build_q_network((4,), 2, hidden_sizes=(hidden, hidden)), obs_shape=(4,), obs_dtype=np.float32,
                   batch_size=8, num_envs=2, device="cpu", **kwargs)


def test_actor_weights_need_an_actor_copy():
    from fastdqn.pipeline import ActorWeights

    with pytest.raises(ValueError, match="actor_copy=True"):
        ActorWeights(small_learner())


def test_actor_takes_published_weights_whole_while_the_learner_writes():
    """The learner sets every weight to k and publishes, k = 1, 2, ...; each refresh the
    actor sees must hold a single k (no mix of two publications), never going back."""
    from fastdqn.pipeline import ActorWeights

    learner = small_learner(hidden=512, actor_copy=True)  # copies long enough to overlap
    weights = ActorWeights(learner)
    assert not weights.refresh()  # nothing published yet
    params = list(learner.q_network.parameters())
    rounds = 400

    def learner_side():
        with torch.no_grad():
            for k in range(1, rounds + 1):
                for p in params:
                    p.fill_(k)
                weights.publish()

    writer = threading.Thread(target=learner_side)
    writer.start()
    seen = [0.0]
    while writer.is_alive() or weights.taken < weights.published:
        if weights.refresh():
            values = torch.cat([p.flatten() for p in learner.actor_network.parameters()]).unique()
            assert len(values) == 1, f"torn weights: {values.tolist()[:5]}"
            assert values.item() >= seen[-1]
            seen.append(values.item())
    writer.join()
    assert seen[-1] == rounds and len(seen) > 2
    assert all(torch.equal(a, b) for a, b in zip(learner.actor_network.parameters(), params))


def test_priorities_reach_the_buffer_one_update_late_and_on_flush():
    from fastdqn.pipeline import _PendingPriorities
    from fastdqn.replay import PrioritizedReplayBuffer

    buf = PrioritizedReplayBuffer(64, (2,), obs_dtype=np.float32, alpha=1.0, eps=1e-6, seed=0)
    for _ in range(20):
        buf.add(np.zeros((1, 2), np.float32), [0], [1.0], np.zeros((1, 2), np.float32), [False], [False])
    first, second = buf.valid_indices()[:4], buf.valid_indices()[4:8]
    initial = buf.sampling_mass(first)
    pending = _PendingPriorities(buf, 4, torch.device("cpu"))
    pending.push(first, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(buf.sampling_mass(first), initial)  # not yet
    pending.push(second, torch.tensor([5.0, 6.0, 7.0, 8.0]))
    np.testing.assert_allclose(buf.sampling_mass(first), [1.0, 2.0, 3.0, 4.0], rtol=1e-5)
    np.testing.assert_array_equal(buf.sampling_mass(second), initial)
    pending.flush()
    np.testing.assert_allclose(buf.sampling_mass(second), [5.0, 6.0, 7.0, 8.0], rtol=1e-5)
    pending.flush()  # nothing left: no change
    np.testing.assert_allclose(buf.sampling_mass(second), [5.0, 6.0, 7.0, 8.0], rtol=1e-5)
