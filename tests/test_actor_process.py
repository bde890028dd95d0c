"""The async pipeline with the actor in a forked process (CPU): exactness against reference
runs, determinism, resume, errors from either process, Ctrl-C and a killed learner."""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import alarm_after, assert_stopped_by_ctrl_c, failing_on_call, start_training

from fastdqn import actor_process
from fastdqn.agent import DQN
from fastdqn.config import DQNConfig

pytestmark = pytest.mark.filterwarnings("ignore:.*Box (low|high)'s precision lowered.*")


def small_config(**overrides) -> DQNConfig:
    """Rounds of 4 updates every 32 steps of 4 envs: a policy lag of 32 steps, 8 vector steps."""
    settings = dict(device="cpu", pipeline="async", actor="process", hidden_sizes=(16,), batch_size=16,
                    buffer_size=4_000, learning_starts=200, num_envs=4, train_frequency=32, gradient_steps=4,
                    target_update_interval=8, n_step=2, log_interval=400, eval_episodes=0, save_buffer=False,
                    total_steps=2_000, exploration_fraction=0.5)
    return DQNConfig(**{**settings, **overrides})


def make_agent(run_dir, config) -> DQN:
    return DQN("CartPole-v1", config, run_dir=run_dir, progress=False, tensorboard=False)


def trained_state(agent: DQN) -> dict:
    learner = agent.learner
    return {"q": [p.detach().clone() for p in learner.q_network.parameters()],
            "target": [p.detach().clone() for p in learner.target_network.parameters()],
            "updates": learner.num_updates, "steps": agent.env_steps, "episodes": agent.episodes,
            "np_rng": agent.np_rng.bit_generator.state, "act_rng": learner.act_rng.bit_generator.state}


def assert_same_run(a: dict, b: dict) -> None:
    assert a["updates"] == b["updates"] > 0 and a["steps"] == b["steps"] and a["episodes"] == b["episodes"]
    assert a["np_rng"] == b["np_rng"] and a["act_rng"] == b["act_rng"]
    for name in ("q", "target"):
        for x, y in zip(a[name], b[name], strict=True):
            assert torch.equal(x, y), name


def no_actor_left() -> bool:
    return not multiprocessing.active_children()


class LaggedActing:
    """A reference for the policy lag, in one process: the synchronous engine, acting at step s
    with the online weights it had after step max(s - lag, the last cut), kept step by step."""

    def __init__(self, agent: DQN, lag: int) -> None:
        self.agent, self.lag = agent, lag
        self.history = {agent.env_steps: self.weights()}
        self.step = self.cut = agent.env_steps
        acted_steps, act = agent._acted_steps, agent.learner.act
        agent._acted_steps = lambda total: self.steps(acted_steps(total))
        agent.learner.act = lambda obs, epsilon: self.act(act, obs, epsilon)

    def weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.agent.learner.q_network.parameters()]

    def steps(self, acted_steps):
        for item in acted_steps:
            self.step += len(item[1])
            yield item  # the loop stores it and runs the updates due
            self.history[self.step] = self.weights()
            if item[-1]:
                self.cut = self.step

    def act(self, act, obs, epsilon):
        target = max(self.step - self.lag, self.cut)
        params = list(self.agent.learner.q_network.parameters())
        current = self.weights()
        with torch.no_grad():
            for p, w in zip(params, self.history[target]):
                p.copy_(w)
            actions = act(obs, epsilon).clone()
            for p, w in zip(params, current):
                p.copy_(w)
        return actions


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("prioritized", [False, True])
def test_with_no_policy_lag_the_run_is_the_sync_run_bit_for_bit(tmp_path, monkeypatch, prioritized):
    """Lag 0: the actor acts at every step with the learner's newest weights, as sync does, and
    draws the same random numbers. Two learn calls and a checkpoint in between."""
    monkeypatch.setattr(actor_process, "policy_lag_steps", lambda config: 0)
    states = {}
    for pipeline in ("sync", "async"):
        config = small_config(pipeline=pipeline, prioritized=prioritized, checkpoint_interval=600)
        agent = make_agent(tmp_path / pipeline, config)
        agent.learn(1_000)
        agent.learn(2_000)
        states[pipeline] = trained_state(agent)
        if pipeline == "async":
            assert agent.pipeline_report["policy_lag_steps"] == 0
    assert_same_run(states["sync"], states["async"])
    assert no_actor_left()


@pytest.mark.parametrize("env_id, backend", [("CartPole-v1", "gymnasium"), ("Breakout-v5", "envpool")])
def test_other_envs_cross_the_process_boundary_unchanged(tmp_path, monkeypatch, env_id, backend):
    """The gymnasium fallback's envs, and Atari's uint8 frame stacks: with lag 0, still sync's run."""
    monkeypatch.setattr(actor_process, "policy_lag_steps", lambda config: 0)
    settings = dict(backend=backend, num_envs=2, total_steps=400, learning_starts=100, train_frequency=8,
                    checkpoint_interval=200, batch_size=8, buffer_size=1_000)
    states = {}
    for pipeline in ("sync", "async"):
        agent = DQN(env_id, small_config(pipeline=pipeline, **settings), run_dir=tmp_path / pipeline, progress=False,
                    tensorboard=False)
        agent.learn()
        states[pipeline] = trained_state(agent)
    assert_same_run(states["sync"], states["async"])


def test_the_actor_acts_with_the_weights_of_one_round_ago(tmp_path):
    """Against the one-process reference of the policy lag: a round of 32 steps behind, and
    after a cut (here a checkpoint every 144 steps) the cut step's weights. Mostly greedy, with
    weights that move fast, so that other weights would act differently."""
    settings = dict(checkpoint_interval=144, learning_rate=0.02, exploration_fraction=0.1, end_epsilon=0.0)
    config = small_config(**settings)
    reference = make_agent(tmp_path / "reference", small_config(pipeline="sync", **settings))
    LaggedActing(reference, lag=32)
    reference.learn()
    agent = make_agent(tmp_path / "process", config)
    agent.learn()
    assert agent.pipeline_report["policy_lag_steps"] == actor_process.policy_lag_steps(config) == 32
    assert_same_run(trained_state(reference), trained_state(agent))
    # And it is not the sync run: the lag changes what the actor does.
    sync = make_agent(tmp_path / "sync", small_config(pipeline="sync", **settings))
    sync.learn()
    assert not all(torch.equal(a, b) for a, b in zip(sync.q_network.parameters(), agent.q_network.parameters()))


@pytest.mark.parametrize("schedule", [
    dict(num_envs=8, train_frequency=4, gradient_steps=1, checkpoint_interval=400),  # more envs than a round
    dict(num_envs=3, train_frequency=7, gradient_steps=2, learning_starts=101, checkpoint_interval=300),  # uneven
])
def test_the_lag_holds_for_other_schedules(tmp_path, schedule):
    settings = dict(learning_rate=0.02, exploration_fraction=0.1, end_epsilon=0.0, total_steps=1_200, **schedule)
    reference = make_agent(tmp_path / "reference", small_config(pipeline="sync", **settings))
    config = small_config(**settings)
    LaggedActing(reference, lag=actor_process.policy_lag_steps(config))
    reference.learn()
    agent = make_agent(tmp_path / "process", config)
    agent.learn()
    assert_same_run(trained_state(reference), trained_state(agent))


def test_a_slow_actor_still_finds_the_weights_it_needs(tmp_path, monkeypatch):
    """The actor dawdles before it looks for its snapshot, so the learner runs as far ahead as
    the tokens let it, writing snapshots all the while: the ring must still hold the one the
    actor needs (with one snapshot fewer it does not)."""
    newest = actor_process.ActorProcess._newest_snapshot

    def slow_newest(self, step):  # runs in the actor process, forked with the patch
        time.sleep(0.01)
        return newest(self, step)

    monkeypatch.setattr(actor_process.ActorProcess, "_newest_snapshot", slow_newest)
    settings = dict(num_envs=8, train_frequency=4, gradient_steps=1, learning_rate=0.02, exploration_fraction=0.1,
                    end_epsilon=0.0, total_steps=1_600)
    reference = make_agent(tmp_path / "reference", small_config(pipeline="sync", **settings))
    LaggedActing(reference, lag=8)
    reference.learn()
    agent = make_agent(tmp_path / "process", small_config(**settings))
    agent.learn()
    assert_same_run(trained_state(reference), trained_state(agent))


def test_the_lag_rounds_up_to_whole_vector_steps():
    assert actor_process.policy_lag_steps(small_config(train_frequency=4, num_envs=8)) == 8
    assert actor_process.policy_lag_steps(small_config(train_frequency=10, num_envs=4)) == 12
    assert actor_process.policy_lag_steps(DQNConfig()) == 256  # CartPole: one round of 32 vector steps


def test_a_resumed_run_continues_exactly_as_the_uninterrupted_one(tmp_path):
    # A checkpoint on a round's step: for a lag after it, the resumed actor can only act with
    # the checkpoint's weights, and so must the uninterrupted one (see the test above).
    config = small_config(checkpoint_interval=296, save_buffer=True, learning_rate=0.02, exploration_fraction=0.1,
                          end_epsilon=0.0)
    whole = make_agent(tmp_path / "whole", config)
    whole.learn()
    first = make_agent(tmp_path / "pieces", config)
    save = first.save_checkpoint

    def save_then_stop():  # the run is stopped right after its first checkpoint
        save()
        raise KeyboardInterrupt

    first.save_checkpoint = save_then_stop
    with pytest.raises(KeyboardInterrupt):
        first.learn()
    assert no_actor_left()
    resumed = DQN.resume(tmp_path / "pieces", progress=False, tensorboard=False)
    assert resumed.env_steps == 296
    resumed.learn()
    assert_same_run(trained_state(whole), trained_state(resumed))


@pytest.mark.parametrize(("method", "call"), [("_log", 2), ("_store", 201)])
def test_a_stopped_learn_goes_on_exactly_as_from_a_cut_at_its_last_stored_step(tmp_path, method, call):
    """Stopped in its loop, right after step 800 (writing that step's metrics row, or storing
    the next), learn() again in the same process equals a run whose checkpoint cut falls on
    step 800, RNG states included: the actor's draws reach the learner with every step."""
    config = small_config(total_steps=1_500, checkpoint_interval=10**6, exploration_fraction=0.8, end_epsilon=0.1)
    cut = make_agent(tmp_path / "cut", dataclasses.replace(config, checkpoint_interval=800))
    cut.learn()
    stopped = make_agent(tmp_path / "stopped", config)
    # Rows at 400 and 800; 4 envs store 4 steps a call.
    setattr(stopped, method, failing_on_call(getattr(stopped, method), call, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        stopped.learn()
    assert stopped.env_steps == 800 and no_actor_left()
    delattr(stopped, method)
    stopped.learn()
    a, b = trained_state(cut), trained_state(stopped)
    assert a.pop("episodes") >= b.pop("episodes")  # a stopped row's episodes were never counted
    assert_same_run(a | {"episodes": 0}, b | {"episodes": 0})


def test_stopped_in_a_first_step_that_is_a_cut_the_generators_stay_at_the_last_stored_step(tmp_path):
    """The cut step's RNG states reach the learner before the step is stored: stopped in
    between, it must give them back (those of the step it started from)."""
    agent = make_agent(tmp_path, small_config(total_steps=800))
    agent.learn()
    before = (agent.np_rng.bit_generator.state, agent.learner.act_rng.bit_generator.state)
    agent._store = failing_on_call(agent._store, 1, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        agent.learn(804)  # one vector step: the end, a cut
    assert agent.env_steps == 800 and no_actor_left()
    assert (agent.np_rng.bit_generator.state, agent.learner.act_rng.bit_generator.state) == before


def test_the_report_holds_the_sync_schedule_and_where_the_time_went(tmp_path):
    from fastdqn.metrics import read_config

    agent = make_agent(tmp_path, small_config(actor="auto"))
    threads = torch.get_num_threads()
    agent.learn()
    assert {key: read_config(tmp_path)[key] for key in ("pipeline", "actor")} == {"pipeline": "async", "actor": "process"}
    report = agent.pipeline_report
    assert report["actor"] == "process" and report["env_steps"] == agent.env_steps == 2_000
    assert report["updates"] == agent.learner.num_updates == agent.updates_due(2_000)
    assert report["replay_ratio"] == pytest.approx(agent.learner.num_updates / 2_000, abs=1e-4)
    assert set(report["time_s"]["actor"]) == {"act", "env", "hand-off", "make_env", "wait"}
    assert {"learn", "wait", "publish"} <= set(report["time_s"]["learner"])
    assert torch.get_num_threads() == threads  # the learner's thread count is put back


@pytest.mark.parametrize("torch_threads,cores,learner", [(8, 3, 2), (2, 2, 1), (1, 4, 1)])
def test_the_learner_leaves_the_actor_a_core(tmp_path, monkeypatch, torch_threads_restored, torch_threads, cores,
                                             learner):
    from fastdqn import config

    monkeypatch.setattr(config, "usable_cores", lambda: cores)
    monkeypatch.setattr(actor_process, "usable_cores", lambda: cores)
    agent = make_agent(tmp_path, small_config(torch_threads=torch_threads, total_steps=400))
    seen = set()
    update = agent.learner.update
    agent.learner.update = lambda batch, **kwargs: (seen.add(torch.get_num_threads()), update(batch, **kwargs))
    callers = torch.get_num_threads()
    agent.learn()
    assert seen == {learner} and agent.pipeline_report["learner_torch_threads"] == learner
    assert torch.get_num_threads() == callers  # the caller's setting, put back


@pytest.mark.slow
def test_async_pipeline_solves_cartpole_like_sync(tmp_path):
    """The sync engine's bar (test_agent), with the same default preset, on the CPU's async pipeline."""
    config = DQNConfig(device="cpu", save_buffer=False, pipeline="async", eval_episodes=0)
    agent = make_agent(tmp_path, config)
    agent.learn()
    assert agent.pipeline_report["actor"] == "process"
    result = agent.evaluate(10, epsilon=0.0, seed=12345)
    assert result["mean_return"] >= 475, result


# ---------------------------------------------------------------------------- errors and shutdown
def test_an_actor_error_is_raised_with_its_traceback_and_the_actor_is_gone(tmp_path):
    agent = make_agent(tmp_path, small_config())
    # Its 30th call, in the actor process, which forks with it.
    agent.learner.act = failing_on_call(agent.learner.act, 30, ValueError("boom in the actor"))
    with pytest.raises(actor_process.ActorProcessError, match="(?s)in failing.*ValueError: boom in the actor"):
        agent.learn()
    assert 0 < agent.learner.num_updates and no_actor_left()


def test_a_learner_error_stops_the_actor(tmp_path, monkeypatch):
    monkeypatch.setattr(actor_process, "JOIN_TIMEOUT_S", 60.0)  # an actor that must be killed fails the test
    agent = make_agent(tmp_path, small_config())
    agent.learner.update = failing_on_call(agent.learner.update, 20, RuntimeError("boom in the learner"))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="boom in the learner"):
        agent.learn()
    assert time.monotonic() - start < 30 and no_actor_left()


def test_a_long_actor_error_still_arrives(tmp_path):
    """A traceback longer than a pipe holds: the actor sends its end, and does not block."""
    agent = make_agent(tmp_path, small_config())
    agent.learner.act = failing_on_call(agent.learner.act, 30, ValueError("x" * 200_000 + " the end"))
    start = time.monotonic()
    with pytest.raises(actor_process.ActorProcessError, match=r"(?s)\[\.\.\.\].*x the end"):
        agent.learn()
    assert time.monotonic() - start < 30 and no_actor_left()


def test_an_interrupt_right_after_the_fork_stops_the_actor(tmp_path, monkeypatch):
    """Ctrl-C may reach the learner while it starts the actor (another thread can take the
    signal): the actor must not be left running, and torch's threads are put back."""
    @contextlib.contextmanager
    def interrupted_after_the_fork(arrays):
        yield
        raise KeyboardInterrupt

    monkeypatch.setattr(actor_process, "kept_from_forks", interrupted_after_the_fork)
    agent = make_agent(tmp_path, small_config())
    threads = torch.get_num_threads()
    with pytest.raises(KeyboardInterrupt):
        agent.learn()
    assert no_actor_left() and torch.get_num_threads() == threads


def test_process_actor_config_is_checked():
    with pytest.raises(ValueError, match="actor must be one of auto, thread, process"):
        DQNConfig(actor="fork")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_the_process_actor_refuses_cuda(tmp_path):
    with pytest.raises(ValueError, match="needs a CPU device"):
        make_agent(tmp_path, small_config(device="cuda"))


def _processes_of(run_dir: Path) -> list[int]:
    """Live processes whose command line names run_dir: the training process and its actor."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(run_dir).encode() in (entry / "cmdline").read_bytes() and \
                        (entry / "stat").read_text().split()[2] != "Z":
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _gone(run_dir: Path, within: float) -> bool:
    deadline = time.monotonic() + within
    while _processes_of(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _processes_of(run_dir)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_ends_the_run_and_its_actor_cleanly(tmp_path, stop):
    proc, run_dir = start_training(tmp_path, actor="process")
    try:
        assert len(_processes_of(run_dir)) == 2  # the learner and its actor
        # As a terminal's Ctrl-C, or a batch job's time limit: to the learner and its actor.
        os.killpg(proc.pid, stop)
        interrupted = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        # Well within the learner's wait for its actor (JOIN_TIMEOUT_S), after which it would kill it.
        assert time.monotonic() - interrupted < actor_process.JOIN_TIMEOUT_S / 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert_stopped_by_ctrl_c(proc, stderr, run_dir, stop)
    assert "the actor process did not end cleanly" not in stderr  # it ignores the signal; the learner stops it
    assert _gone(run_dir, within=5)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_the_actor_dies_with_a_killed_learner(tmp_path):
    proc, run_dir = start_training(tmp_path, actor="process")
    try:
        assert len(_processes_of(run_dir)) == 2
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _gone(run_dir, within=5)


def test_episode_statistics_cross_the_process_boundary(tmp_path):
    """Returns logged by the learner are the actor's episodes: the same as a lag-0 sync run's."""
    from fastdqn.metrics import read_csv

    rows = {}
    for pipeline in ("sync", "async"):
        agent = make_agent(tmp_path / pipeline, small_config(pipeline=pipeline, learning_starts=2_000))
        agent.learn()  # random actions throughout: the lag does not matter
        rows[pipeline] = [(r["step"], r["episodes"], r["episode_return"]) for r in
                          read_csv(tmp_path / pipeline / "metrics.csv")]
    assert rows["sync"] == rows["async"] and len(rows["sync"]) >= 5
    assert np.isfinite([r[2] for r in rows["sync"]]).all()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_DONTFORK is Linux's")
@pytest.mark.parametrize("kept", [False, True])
def test_a_forked_child_shares_no_pages_of_arrays_kept_from_forks(kept):
    """Copy-on-write: while a forked child lives, every write of the parent to a page they share
    faults and copies the page. Pages kept from the fork are the parent's alone."""
    import resource

    array = np.ones(64 << 20, np.uint8)  # 16k pages, all touched
    context = multiprocessing.get_context("fork")
    done = context.Event()
    with actor_process.kept_from_forks([array]) if kept else contextlib.nullcontext():
        child = context.Process(target=done.wait, args=(30,), daemon=True)
        child.start()
    try:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        array += 1
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    finally:
        done.set()
        child.join()
    pages = array.nbytes // 4096
    assert (faults < pages // 10) if kept else (faults > pages // 2), faults


def test_the_actor_process_keeps_the_replay_buffer_from_its_fork(tmp_path, monkeypatch):
    kept = []
    real = actor_process.kept_from_forks

    def recording(arrays):
        arrays = list(arrays)
        kept.append({a.ctypes.data for a in arrays})
        return real(arrays)

    monkeypatch.setattr(actor_process, "kept_from_forks", recording)
    agent = make_agent(tmp_path, small_config(total_steps=400))
    agent.learn()
    storage = agent.buffer._core.storage()
    assert kept == [{a.ctypes.data for a in storage.values()}]


def test_the_actor_never_collects_what_it_inherits(tmp_path, monkeypatch):
    """Garbage of the learner's process not yet collected when the actor forks (here an envpool
    env in a reference cycle) is the actor's too. Collected there, the env would join worker
    threads that the fork did not copy, and envpool aborts the actor."""
    import gc

    from fastdqn.envs import make_env

    agent = make_agent(tmp_path, small_config())
    act = agent.learner.act

    def act_then_collect(obs, epsilon):  # in the actor
        actions = act(obs, epsilon)
        gc.collect()
        return actions

    agent.learner.act = act_then_collect
    monkeypatch.setattr(actor_process, "JOIN_TIMEOUT_S", 1.0)  # a hung actor: killed soon after the alarm
    gc.disable()
    try:
        garbage = {"env": make_env("CartPole-v1", 2, seed=0)}
        garbage["itself"] = garbage
        del garbage
        with alarm_after(60):  # without the fix the actor hangs (or aborts) in the collection
            agent.learn(600)
    finally:
        gc.enable()
    assert agent.env_steps == 600 and no_actor_left()
