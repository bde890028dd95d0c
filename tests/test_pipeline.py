"""The overlapped actor/learner pipeline with the actor thread (CUDA's): rate limiter, weight
hand-over, errors, shutdown, learning. The actor process (CPU's) is tested in test_actor_process."""

from __future__ import annotations

import contextlib
import math
import threading
import time

import numpy as np
import pytest
import torch
from faults import alarm_after, assert_stopped_by_ctrl_c, default_ctrl_c, failing_on_call, start_training

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
def small_learner(hidden=32, device="cpu", **kwargs):
    from fastdqn.learner import Learner
    from fastdqn.networks import build_q_network

    return Learner(build_q_network((4,), 2, hidden_sizes=(hidden, hidden)), obs_shape=(4,), obs_dtype=np.float32,
                   batch_size=8, num_envs=2, device=device, **kwargs)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def on_stream(device: str):
    """The thread's own CUDA stream, as in the pipeline; nothing on CPU."""
    return torch.cuda.stream(torch.cuda.Stream()) if device == "cuda" else contextlib.nullcontext()


def test_actor_weights_need_an_actor_copy():
    from fastdqn.pipeline import ActorWeights

    with pytest.raises(ValueError, match="actor_copy=True"):
        ActorWeights(small_learner())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[cuda, pytest.mark.cuda])])
def test_actor_takes_published_weights_whole_while_the_learner_writes(device):
    """The learner sets every weight to k and publishes, k = 1, 2, ...; each refresh the
    actor sees must hold a single k (no mix of two publications), never going back. On
    CUDA each thread works on its own stream, as in the pipeline."""
    from fastdqn.pipeline import ActorWeights

    learner = small_learner(hidden=512, device=device, actor_copy=True)  # copies long enough to overlap
    weights = ActorWeights(learner)
    if device == "cuda":  # the learner was built on the default stream; the threads use others (as run() does)
        torch.cuda.synchronize()
    assert not weights.refresh()  # nothing published yet
    params = list(learner.q_network.parameters())
    rounds = 400

    def learner_side():
        with on_stream(device), torch.no_grad():
            for k in range(1, rounds + 1):
                for p in params:
                    p.fill_(k)
                weights.publish()

    writer = threading.Thread(target=learner_side)
    writer.start()
    seen = [0.0]
    with on_stream(device):
        while writer.is_alive() or weights.taken < weights.published:
            if weights.refresh():
                values = torch.cat([p.flatten() for p in learner.actor_network.parameters()]).unique()
                assert len(values) == 1, f"torn weights: {values.tolist()[:5]}"
                assert values.item() >= seen[-1]
                seen.append(values.item())
    writer.join()
    if device == "cuda":
        torch.cuda.synchronize()
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


# ---------------------------------------------------------------------------- the pipeline in DQN.learn
def async_config(**overrides):
    from fastdqn.config import DQNConfig

    settings = dict(device="cpu", pipeline="async", actor="thread", hidden_sizes=(16,), batch_size=16, buffer_size=4_000,
                    learning_starts=64, num_envs=4, train_frequency=4, gradient_steps=1, n_step=1,
                    log_interval=200, eval_episodes=0, save_buffer=False)
    return DQNConfig(**{**settings, **overrides})


def make_agent(tmp_path, config, env_id="CartPole-v1"):
    from fastdqn.agent import DQN

    return DQN(env_id, config, run_dir=tmp_path / "run", progress=False, tensorboard=False)


def finish_within(seconds: float, fn):
    """Run fn in a thread; fail (instead of hanging the suite) if it does not return in time.
    Returns the exception fn raised, or None."""
    outcome: dict[str, BaseException | None] = {"error": None}

    def target():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not finish within {seconds} s"
    return outcome["error"]


def learner_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fastdqn-learner" and t.is_alive()]


def test_async_run_does_the_sync_schedules_updates_and_holds_the_ratio(tmp_path):
    from fastdqn.metrics import read_csv

    config = async_config()
    agent = make_agent(tmp_path, config)
    assert finish_within(120, lambda: agent.learn(3_000)) is None
    report = agent.pipeline_report
    assert agent.env_steps >= 3_000
    # Exactly the updates the synchronous engine does for these steps.
    assert agent.learner.num_updates == agent.updates_due(agent.env_steps) == report["updates"]
    assert report["replay_ratio"] == pytest.approx(agent.learner.num_updates / agent.env_steps, abs=1e-4)
    assert report["max_owed_updates"] <= report["max_lag_updates"]
    # Held during the run too: at every metrics row the learner owed at most max_lag updates.
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert len(rows) >= 10
    for row in rows:
        due = agent.updates_due(int(row["step"]))
        assert due - report["max_lag_updates"] <= row["updates"] <= due, row
    assert not learner_threads()


def test_the_actor_stands_still_while_the_learner_may_capture_its_update_graph(tmp_path, monkeypatch):
    """While one thread captures a CUDA graph, no other may replay a graph or draw CUDA random
    numbers. Simulated on CPU by a learner that says it graphs but never finishes a capture:
    then no action is chosen while an update runs."""
    from fastdqn.pipeline import AsyncPipeline

    monkeypatch.setattr(AsyncPipeline, "_capture_action_graph", lambda self: None)
    agent = make_agent(tmp_path, async_config())
    learner = agent.learner
    learner.cuda_graph = True  # update_graph_captured stays False on CPU
    running = {"act": 0, "update": 0}
    overlaps = []

    def watched(name, call):
        def wrapper(*args, **kwargs):
            running[name] += 1
            if running["act"] and running["update"]:
                overlaps.append(name)
            try:
                return call(*args, **kwargs)
            finally:
                running[name] -= 1
        return wrapper

    learner.act = watched("act", learner.act)
    learner.update = watched("update", learner.update)
    assert finish_within(120, lambda: agent.learn(3_000)) is None
    assert learner.num_updates == agent.updates_due(agent.env_steps) > 100
    assert not overlaps


def test_async_stores_exactly_what_sync_stores(tmp_path):
    """Before learning starts both take the same random actions on the same seeded envs; with
    all envs in one async batch (vector envs) the buffers must match, row for row, including
    the episodes cut at the end."""
    buffers = {}
    for pipeline in ("sync", "async"):
        config = async_config(pipeline=pipeline, learning_starts=2_000, n_step=3)
        agent = make_agent(tmp_path / pipeline, config)
        assert finish_within(60, lambda: agent.learn(2_000)) is None
        indices = agent.buffer.valid_indices()
        buffers[pipeline] = indices, agent.buffer.get(indices)
    (sync_indices, sync_rows), (async_indices, async_rows) = buffers["sync"], buffers["async"]
    np.testing.assert_array_equal(sync_indices, async_indices)
    assert len(sync_indices) > 1_500
    for name, column in sync_rows.arrays().items():
        np.testing.assert_array_equal(column, async_rows.arrays()[name], err_msg=name)


def test_learner_error_reaches_the_caller_and_stops_both_threads(tmp_path):
    agent = make_agent(tmp_path, async_config())
    agent.learner.update = failing_on_call(agent.learner.update, 20, RuntimeError("boom in the learner"))
    error = finish_within(60, lambda: agent.learn(5_000))
    assert isinstance(error, RuntimeError) and "boom in the learner" in str(error)
    # With the learner thread's traceback.
    assert any(frame.name == "failing" for frame in __import__("traceback").extract_tb(error.__traceback__))
    assert agent.env_steps < 5_000 and not learner_threads()


def test_actor_error_reaches_the_caller_and_stops_the_learner(tmp_path):
    agent = make_agent(tmp_path, async_config())
    agent.buffer = agent._make_buffer()
    # The 200th add, well after learning starts: the learner thread is busy.
    agent.buffer.add = failing_on_call(agent.buffer.add, 200, ValueError("boom in the actor"))
    error = finish_within(60, lambda: agent.learn(5_000))
    assert isinstance(error, ValueError) and "boom in the actor" in str(error)
    assert agent.learner.num_updates > 0 and not learner_threads()


def test_ctrl_c_stops_cleanly_keeps_the_checkpoint_and_the_run_resumes(tmp_path):
    from fastdqn.agent import DQN
    from fastdqn.checkpoint import list_checkpoints

    config = async_config(checkpoint_interval=1_000, save_buffer=True)
    agent = make_agent(tmp_path, config)
    agent.buffer = agent._make_buffer()
    add = agent.buffer.add

    def interrupting_add(*args, **kwargs):
        if agent.buffer._core.size() >= 1_500:  # past the first checkpoint
            raise KeyboardInterrupt
        add(*args, **kwargs)

    agent.buffer.add = interrupting_add
    error = finish_within(60, lambda: agent.learn(3_000))
    assert isinstance(error, KeyboardInterrupt) and not learner_threads()
    checkpoints = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [int(p.stem.split("-")[1]) // 1_000 for p in checkpoints] == [1]
    resumed = DQN.resume(tmp_path / "run", progress=False, tensorboard=False)
    assert 1_000 <= resumed.env_steps < 1_000 + config.num_envs
    # Checkpoints are written with the learner caught up: the sync schedule's count exactly.
    assert resumed.learner.num_updates == resumed.updates_due(resumed.env_steps)
    assert finish_within(120, lambda: resumed.learn(3_000)) is None
    assert resumed.env_steps >= 3_000 and resumed.learner.num_updates == resumed.updates_due(resumed.env_steps)


def test_ctrl_c_between_a_locks_acquire_and_its_with_block_leaves_no_lock_held(tmp_path, monkeypatch):
    """Python runs a signal handler between any two bytecodes, also between a lock's acquire and
    the with-block that would release it: a KeyboardInterrupt raised there leaves the lock held,
    and the learner waits on it forever. Here SIGINT arrives in exactly that window of the rate
    limiter's lock (in the main thread, as a real Ctrl-C does): the run must still stop at once,
    with KeyboardInterrupt, and leave Ctrl-C's handler as it was."""
    import signal

    from fastdqn import pipeline
    from fastdqn.rate_limiter import RateLimiter

    monkeypatch.setattr(pipeline, "JOIN_TIMEOUT_S", 10.0)  # a stuck learner fails the test, not the suite
    inserted = RateLimiter.inserted
    fired = []

    def inserted_with_a_sigint_in_the_window(self, n):
        if not fired and self.updates > 50:  # both threads busy
            fired.append(True)
            self._changed.acquire()
            signal.raise_signal(signal.SIGINT)  # the handler runs here, before the release below
            self._changed.release()
        inserted(self, n)

    monkeypatch.setattr(RateLimiter, "inserted", inserted_with_a_sigint_in_the_window)
    agent = make_agent(tmp_path, async_config())
    with default_ctrl_c():
        handler = signal.getsignal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            agent.learn(20_000)  # in the main thread: only it receives signals
        assert signal.getsignal(signal.SIGINT) is handler
    assert fired and not learner_threads()
    assert agent.pipeline_report["env_steps"] < 1_000  # stopped at once: ~50 updates are ~260 steps


def test_ctrl_c_between_the_actors_wait_check_and_its_wait_still_stops_the_run(tmp_path, monkeypatch):
    """Ctrl-C between the actor's check of a wait condition and the wait itself, while the
    learner waits for work: the learner leaves without waking anyone, so Ctrl-C itself must
    wake the actor's wait, or the run hangs. CartPole's schedule of rounds, where the actor
    waits out every round."""
    import signal

    inside = {"acquire": threading.Event(), "await_caught_up": threading.Event()}
    for name, flag in inside.items():
        def watched(self, *args, _method=getattr(RateLimiter, name), _flag=flag, **kwargs):
            _flag.set()
            try:
                return _method(self, *args, **kwargs)
            finally:
                _flag.clear()

        monkeypatch.setattr(RateLimiter, name, watched)
    agent = make_agent(tmp_path, async_config(gradient_steps=8, train_frequency=32))
    updates_due, fired = agent.updates_due, []

    def updates_due_with_a_sigint(step):  # the actor's wait condition calls it
        due = updates_due(step)
        if (not fired and step > 500 and inside["await_caught_up"].is_set() and inside["acquire"].is_set()
                and agent.learner.num_updates < due and threading.current_thread() is threading.main_thread()):
            fired.append(step)
            signal.raise_signal(signal.SIGINT)  # the handler runs here: the condition will say "wait"
        return due

    agent.updates_due = updates_due_with_a_sigint
    with default_ctrl_c(), pytest.raises(KeyboardInterrupt), alarm_after(30):  # a hang would be in the main thread
        agent.learn(20_000)
    assert fired and not learner_threads()
    assert agent.pipeline_report["env_steps"] < fired[0] + 1_000


@pytest.mark.parametrize("stop, sigint_ignored", [("SIGINT", False), ("SIGTERM", False), ("SIGTERM", True)])
def test_sigint_or_sigterm_to_an_async_training_run_ends_it_cleanly(tmp_path, stop, sigint_ignored):
    """A real Ctrl-C (SIGINT to the process), or SIGTERM (also to a background job, which has
    SIGINT ignored), while both threads run: exit status 130 (143), the resume hint, a checkpoint
    where it stopped, and nothing left hanging."""
    import signal

    proc, run_dir = start_training(tmp_path, actor="thread", sigint_ignored=sigint_ignored)
    try:
        proc.send_signal(getattr(signal, stop))
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert_stopped_by_ctrl_c(proc, stderr, run_dir, getattr(signal, stop))


def test_prioritized_replay_in_the_pipeline_anneals_beta_and_updates_priorities(tmp_path):
    agent = make_agent(tmp_path, async_config(prioritized=True, per_beta=0.4))
    assert finish_within(120, lambda: agent.learn(1_500)) is None
    assert agent.buffer.beta == pytest.approx(1.0)
    assert agent.learner.num_updates == agent.updates_due(agent.env_steps)
    # New transitions get the largest priority so far; after training they differ.
    mass = agent.buffer.sampling_mass(agent.buffer.valid_indices())
    assert mass.min() < mass.max()


def test_a_stop_at_once_keeps_the_last_updates_priorities(tmp_path, monkeypatch):
    """Priorities reach the buffer one update late; stopped at once (a second Ctrl-C), the learner
    still hands over its last update's before it ends."""
    from fastdqn import pipeline

    agent = make_agent(tmp_path, async_config(prioritized=True, per_alpha=1.0, per_eps=1e-6))
    made: list[tuple[np.ndarray, np.ndarray]] = []  # (indices, new priorities) of each update
    push, update = pipeline._PendingPriorities.push, pipeline.AsyncPipeline._update

    def recording_push(self, indices, priorities):
        made.append((indices.copy(), priorities.numpy().copy()))
        push(self, indices, priorities)

    def update_then_stop_at_the_tenth(self, batches, publish=False):
        update(self, batches, publish)
        if len(made) == 10:
            self._interrupted = True
            self._limiter.close()

    monkeypatch.setattr(pipeline._PendingPriorities, "push", recording_push)
    monkeypatch.setattr(pipeline.AsyncPipeline, "_update", update_then_stop_at_the_tenth)
    error = finish_within(60, lambda: agent.learn(3_000))
    assert isinstance(error, KeyboardInterrupt) and agent.learner.num_updates == len(made) == 10
    expected = {}
    for indices, priorities in made:  # applied in order: a later update's priority of an index wins
        expected.update(zip(indices.tolist(), priorities.tolist()))
    indices = np.array(sorted(expected))
    np.testing.assert_allclose(agent.buffer.sampling_mass(indices), [expected[i] + 1e-6 for i in indices.tolist()],
                               rtol=1e-5)


def test_atari_frame_stacks_in_async_batches_with_a_checkpoint_mid_run(tmp_path):
    config = async_config(batch_size=8, buffer_size=2_000, learning_starts=100, num_envs=4,
                          checkpoint_interval=200, log_interval=100)
    agent = make_agent(tmp_path, config, env_id="Breakout-v5")
    assert finish_within(180, lambda: agent.learn(400)) is None
    report = agent.pipeline_report
    assert report["env_batch"] == 2  # half the envs step while the actor acts on the other half
    assert agent.learner.num_updates == agent.updates_due(agent.env_steps) > 0
    assert (tmp_path / "run" / "checkpoints").is_dir()
    # Where each thread's time went, each part counted once: within the run's wall time.
    times = report["time_s"]
    assert {"env", "act", "store", "wait", "checkpoint", "make_env"} <= set(times["actor"])
    assert times["actor"]["make_env"] > 0  # the envs of both segments (before and after the checkpoint)
    assert {"sample", "update", "wait"} <= set(times["learner"])
    for thread in ("actor", "learner"):
        assert sum(times[thread].values()) <= report["wall_s"] * 1.01, thread


@pytest.mark.parametrize("prioritized", [False, True])
def test_async_pipeline_with_rounds_learns_exactly_what_sync_learns(tmp_path, prioritized):
    """CartPole's preset updates in rounds (max_lag 0): the actor waits out each round and acts
    with the weights it ends with, the learner samples when it updates (after the last
    update's priorities are in), so the async run stores the same transitions and makes the
    same updates as sync, bit for bit."""
    from fastdqn.config import DQNConfig

    networks = {}
    for pipeline in ("sync", "async"):
        config = DQNConfig(device="cpu", save_buffer=False, eval_episodes=0, pipeline=pipeline, actor="thread",
                           total_steps=3_000, prioritized=prioritized)
        agent = make_agent(tmp_path / pipeline, config)
        assert finish_within(120, agent.learn) is None
        networks[pipeline] = agent
    assert agent.pipeline_report["max_lag_updates"] == 0
    sync, run = networks["sync"].learner, networks["async"].learner
    assert run.num_updates == sync.num_updates > 0
    for module in ("q_network", "target_network"):
        for a, b in zip(getattr(run, module).parameters(), getattr(sync, module).parameters(), strict=True):
            assert torch.equal(a, b)
    if prioritized:  # and the buffers hold the same priorities
        buffers = [networks[pipeline].buffer for pipeline in ("sync", "async")]
        indices = buffers[0].valid_indices()
        np.testing.assert_array_equal(buffers[1].valid_indices(), indices)
        np.testing.assert_array_equal(buffers[1].sampling_mass(indices), buffers[0].sampling_mass(indices))


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("prioritized", [False, True])
def test_async_pipeline_on_cuda_keeps_the_schedule(tmp_path, prioritized):
    config = async_config(device="cuda", batch_size=32, buffer_size=5_000, learning_starts=200, num_envs=8,
                          prioritized=prioritized, log_interval=500)
    agent = make_agent(tmp_path, config, env_id="Breakout-v5")
    assert finish_within(300, lambda: agent.learn(3_000)) is None
    assert agent.learner.cuda_graph and agent.learner.num_updates == agent.updates_due(agent.env_steps)
    assert agent.pipeline_report["env_batch"] == 4
    assert agent.pipeline_report["actor_syncs"] > 0
    assert all(torch.isfinite(p).all() for p in agent.q_network.parameters())


def test_a_requested_stop_is_a_cut_with_the_learner_caught_up_and_its_checkpoint(tmp_path):
    """Ctrl-C's first step (DQN.request_stop): the actor's next env batch is a cut: the learner
    catches up, the row and checkpoint of that step are written, and learn() raises."""
    from fastdqn.agent import DQN
    from fastdqn.checkpoint import list_checkpoints, load_checkpoint
    from fastdqn.metrics import read_csv

    agent = make_agent(tmp_path, async_config(save_buffer=True))
    update = agent.learner.update

    def update_asking_for_a_stop(*args, **kwargs):
        if agent.learner.num_updates == 100:
            agent.request_stop()
        return update(*args, **kwargs)

    agent.learner.update = update_asking_for_a_stop
    error = finish_within(60, lambda: agent.learn(20_000))
    assert isinstance(error, KeyboardInterrupt) and not learner_threads()
    stopped = agent.env_steps
    assert stopped < 5_000 and agent.learner.num_updates == agent.updates_due(stopped)
    assert read_csv(tmp_path / "run" / "metrics.csv")[-1]["step"] == stopped
    checkpoint = load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])
    assert checkpoint["counters"]["env_steps"] == stopped
    del agent.learner.update
    resumed = DQN.resume(tmp_path / "run", progress=False, tensorboard=False)
    assert resumed.learner.num_updates == resumed.updates_due(stopped)
    assert finish_within(120, lambda: resumed.learn(stopped + 1_000)) is None
    assert resumed.learner.num_updates == resumed.updates_due(resumed.env_steps)


def test_a_stop_requested_during_a_cut_is_the_next_steps_not_that_cuts_again(tmp_path):
    """Asked for while a periodic checkpoint is written, the stop cuts at a later step: no
    second row or checkpoint at the periodic step."""
    from fastdqn.checkpoint import list_checkpoints
    from fastdqn.metrics import read_csv

    agent = make_agent(tmp_path, async_config(checkpoint_interval=600, log_interval=200))
    save = agent.save_checkpoint

    def save_asking_for_a_stop():
        agent.request_stop()
        return save()

    agent.save_checkpoint = save_asking_for_a_stop
    error = finish_within(60, lambda: agent.learn(20_000))
    assert isinstance(error, KeyboardInterrupt)
    steps = [row["step"] for row in read_csv(tmp_path / "run" / "metrics.csv")]
    assert steps == sorted(set(steps)) and 600 < steps[-1] == agent.env_steps  # strictly increasing
    assert [int(p.stem.split("-")[1]) for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [steps[-1]]


def test_a_second_sigterm_to_a_background_run_stops_it_at_once_and_cleanly(tmp_path):
    """With SIGINT ignored (a background job) SIGTERM still goes through the pipeline's safe stop:
    a second one during the stop closes the rate limiter instead of raising wherever it lands
    (when the second comes, the first stop may be done: the test is of the outcome either way)."""
    import signal
    import time

    proc, run_dir = start_training(tmp_path, actor="thread", sigint_ignored=True)
    try:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # Exit status 143, or killed by the second SIGTERM once the stop was done (a shell reports 143 too).
    assert proc.returncode in (128 + signal.SIGTERM, -signal.SIGTERM), stderr
    assert "Traceback" not in stderr and "continue with: fastdqn train --resume" in stderr
