"""The synchronous training engine (fastdqn.agent.DQN) and its config."""

import dataclasses
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import failing_on_call

from fastdqn.agent import DQN, linear_schedule
from fastdqn.config import DQNConfig, preset_for_env
from fastdqn.metrics import read_csv

pytestmark = pytest.mark.filterwarnings("ignore:.*Box (low|high)'s precision lowered.*")

TINY = dict(hidden_sizes=(16,), batch_size=16, buffer_size=2_000, learning_starts=64, log_interval=100,
            eval_episodes=2, save_buffer=False, num_envs=2, n_step=1, train_frequency=4, gradient_steps=1)


def tiny(**overrides) -> DQNConfig:
    return DQNConfig(**{**TINY, **overrides})


def agent(tmp_path, env_id="CartPole-v1", config=None, **kwargs):
    return DQN(env_id, config if config is not None else tiny(), run_dir=tmp_path / "run", progress=False,
               tensorboard=False, **kwargs)


@pytest.mark.slow
def test_default_preset_solves_cartpole_within_50k_steps(tmp_path):
    config = DQNConfig(device="cpu", save_buffer=False)
    assert config.total_steps <= 50_000
    dqn = agent(tmp_path, config=config)
    dqn.learn()
    assert dqn.env_steps <= 50_000 + config.num_envs
    result = dqn.evaluate(10, epsilon=0.0, seed=12345)
    assert len(result["returns"]) == 10
    assert result["mean_return"] >= 475, result


def test_linear_schedule_matches_hand_values():
    assert linear_schedule(1.0, 0.1, 100, 0) == 1.0
    assert linear_schedule(1.0, 0.1, 100, 50) == pytest.approx(0.55)
    assert linear_schedule(1.0, 0.1, 100, 100) == pytest.approx(0.1)
    assert linear_schedule(1.0, 0.1, 100, 10_000) == pytest.approx(0.1)
    assert linear_schedule(1.0, 0.1, 0, 0) == pytest.approx(0.1)


@pytest.mark.parametrize("num_envs", [1, 3, 8])
def test_updates_per_env_step_hold_with_many_envs(tmp_path, num_envs):
    config = tiny(num_envs=num_envs, train_frequency=4, gradient_steps=1, learning_starts=100, eval_episodes=0)
    dqn = agent(tmp_path, config=config)
    dqn.learn(1_000)
    # Reference: CleanRL's rule applied to every single env step the run took, one by one.
    expected = sum(config.gradient_steps for s in range(config.learning_starts, dqn.env_steps + 1)
                   if (s - config.learning_starts) % config.train_frequency == 0)
    assert dqn.env_steps == math.ceil(1_000 / num_envs) * num_envs
    assert dqn.learner.num_updates == expected
    assert abs(dqn.learner.num_updates / (dqn.env_steps - 100) - config.replay_ratio) < 0.01


def test_updates_wait_for_complete_n_step_windows(tmp_path):
    config = tiny(num_envs=8, n_step=3, learning_starts=0, train_frequency=8, gradient_steps=1, eval_episodes=0)
    dqn = agent(tmp_path, config=config)
    dqn.learn(400)  # updates from the first step would find no complete 3-step transition
    # The first updates wait until every env has taken n_step steps, then catch up.
    assert dqn.updates_due(16) == 0 and dqn.updates_due(24) == 4
    assert dqn.learner.num_updates == 400 // 8 + 1


def test_epsilon_follows_schedule_in_metrics(tmp_path):
    config = tiny(num_envs=2, start_epsilon=0.9, end_epsilon=0.2, exploration_fraction=0.5, eval_episodes=0,
                  learning_starts=300)
    dqn = agent(tmp_path, config=config)
    dqn.learn(1_000)
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert [r["step"] for r in rows] == [100.0 * k for k in range(1, 11)]
    for row in rows:
        # epsilon is logged for the last iteration before the row: step - num_envs. Before
        # learning_starts every action is uniformly random, which is epsilon 1.
        acted_at = row["step"] - 2
        expected = 1.0 if acted_at < 300 else max(0.9 - 0.7 * acted_at / 500, 0.2)
        assert row["epsilon"] == pytest.approx(expected, abs=1e-5)
    assert dqn.epsilon(750, 1_000) == pytest.approx(0.2)


def test_learning_writes_run_directory(tmp_path):
    dqn = agent(tmp_path, config=tiny(eval_episodes=3))
    dqn.learn(500)
    run = tmp_path / "run"
    import json

    record = json.loads((run / "config.json").read_text())
    assert record["env_id"] == "CartPole-v1" and record["config"]["batch_size"] == 16
    rows = read_csv(run / "metrics.csv")
    assert rows[-1]["step"] == 500 and rows[-1]["updates"] == dqn.learner.num_updates
    assert all(np.isfinite(r["loss"]) for r in rows if r["step"] > 64 + 100)
    evals = read_csv(run / "eval.csv")
    assert len(evals) == 1 and evals[0]["episodes"] == 3
    assert (run / "checkpoints").is_dir()


@pytest.mark.parametrize("pipeline", ["sync", "async"])
def test_a_run_ending_on_an_evaluation_step_evaluates_once_there(tmp_path, pipeline):
    # Three envs step 3 at a time: the evaluation due at 200 comes at step 201, the last one.
    dqn = agent(tmp_path, config=tiny(num_envs=3, eval_interval=100, pipeline=pipeline))
    dqn.learn(200)
    steps = [row["step"] for row in read_csv(tmp_path / "run" / "eval.csv")]
    assert steps == [102, 201]


@pytest.mark.parametrize("pipeline", ["sync", "async"])
def test_resuming_a_finished_run_does_not_evaluate_its_last_step_again(tmp_path, pipeline):
    """The final evaluation comes after the final checkpoint: a resumed run learns from eval.csv
    that it was made."""
    from fastdqn.agent import DQN

    dqn = agent(tmp_path, config=tiny(eval_interval=150, checkpoint_interval=100, save_buffer=True, pipeline=pipeline))
    dqn.learn(200)
    resumed = DQN.resume(tmp_path / "run", progress=False, tensorboard=False)
    with pytest.warns(UserWarning, match=r"learn\(200\) has nothing to do"):
        resumed.learn(200)
    steps = [row["step"] for row in read_csv(tmp_path / "run" / "eval.csv")]
    assert steps == [150, 200]


def test_learn_without_a_total_goes_on_to_the_configs_after_a_finished_call(tmp_path):
    dqn = agent(tmp_path, config=tiny(total_steps=400, eval_episodes=0))
    dqn.learn(200)
    assert dqn.env_steps == 200 and dqn.scheduled_total_steps == 400
    dqn.learn()
    assert dqn.env_steps == 400


def learned_state(dqn: DQN) -> dict:
    """What a run learned and stored: networks, optimizer, counters, RNGs, the buffer's samples."""
    buf = dqn.buffer
    indices = buf.valid_indices()
    return {"q": [p.detach().clone() for p in dqn.learner.q_network.parameters()],
            "target": [p.detach().clone() for p in dqn.learner.target_network.parameters()],
            "optimizer": dqn.learner.optimizer.state_dict(), "updates": dqn.learner.num_updates,
            "steps": dqn.env_steps, "np_rng": dqn.np_rng.bit_generator.state,
            "act_rng": dqn.learner.act_rng.bit_generator.state, "held": len(buf), "indices": indices,
            "transitions": buf.get(indices).arrays()}


def assert_same_state(a: dict, b: dict) -> None:
    for key in a:
        if key == "optimizer":
            for name, value in a[key]["state"].items():
                for field, tensor in value.items():
                    assert torch.equal(tensor, b[key]["state"][name][field]), (name, field)
        elif key in ("q", "target"):
            assert all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key
        elif key == "transitions":
            for field, column in a[key].items():
                np.testing.assert_array_equal(column, b[key][field], err_msg=field)
        elif key == "indices":
            np.testing.assert_array_equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize(("interruption", "stopped_in"), [(KeyboardInterrupt, "act"), (RuntimeError, "act"),
                                                         (KeyboardInterrupt, "env.step")])
def test_an_interrupted_learn_goes_on_as_from_a_cut_at_its_last_stored_step(tmp_path, interruption, stopped_in):
    """Ctrl-C or an error in learn(), before or after the next step's random draws: learn()
    again goes on, and the run equals one whose checkpoint cut falls on the last step stored
    (n-step windows close there as at a truncation; the envs restart from that step's seed;
    the draws for the step not stored are taken back)."""
    config = tiny(eval_episodes=0, n_step=2, checkpoint_interval=10**6)
    interrupted = agent(tmp_path / "interrupted", config=config)
    # The step from 662 to 664 (two envs): its 300th action from learning_starts 64, its 332nd env step.
    target, name = (interrupted.learner, "act") if stopped_in == "act" else (interrupted.env, "step")
    setattr(target, name, failing_on_call(getattr(target, name), 300 if name == "act" else 332, interruption("stop")))
    with pytest.raises(interruption, match="stop"):
        interrupted.learn(1_000)
    assert interrupted.env_steps == 662
    delattr(target, name)
    interrupted.learn()  # to the interrupted call's total
    cut = agent(tmp_path / "cut", config=tiny(eval_episodes=0, n_step=2, checkpoint_interval=662))
    cut.learn(1_000)
    assert interrupted.env_steps == cut.env_steps == 1_000
    assert_same_state(learned_state(interrupted), learned_state(cut))


def run_rows(run_dir, name: str) -> list[dict]:
    """A run's metrics.csv or eval.csv rows without the figures that depend on timing."""
    return [{k: v for k, v in row.items() if k not in ("wall_time", "steps_per_s")}
            for row in read_csv(run_dir / name)]


@pytest.mark.parametrize("pipeline,actor", [("sync", "auto"), ("async", "process")])
def test_a_requested_stop_is_a_cut_and_its_checkpoint_resumes_as_the_cut_run_goes_on(tmp_path, pipeline, actor):
    """A stop requested in the middle of a round of updates (as Ctrl-C asks for one): the next
    step is stored as a cut's, its row and checkpoint are written, and learn() raises. Resumed
    from that checkpoint, or called again, the run is the one whose checkpoint cut falls on
    that step: networks, optimizer, RNGs, the buffer's samples, metrics and evaluations."""
    config = tiny(n_step=2, save_buffer=True, pipeline=pipeline, actor=actor, gradient_steps=4, train_frequency=16,
                  eval_interval=200, log_interval=100)
    stopped = agent(tmp_path / "stopped", config=config)
    update = stopped.learner.update

    def update_asking_for_a_stop(*args, **kwargs):
        if stopped.learner.num_updates == 130:  # the 3rd of a round's 4
            stopped.request_stop()
        return update(*args, **kwargs)

    stopped.learner.update = update_asking_for_a_stop
    with pytest.raises(KeyboardInterrupt, match="as requested"):
        stopped.learn(1_000)
    cut_step = stopped.env_steps
    assert 500 < cut_step < 1_000 and cut_step % 200  # not an evaluation's or a periodic checkpoint's step
    assert stopped.learner.num_updates == stopped.updates_due(cut_step)  # the round was finished
    del stopped.learner.update
    shutil.copytree(tmp_path / "stopped" / "run", tmp_path / "resumed" / "run")
    resumed = DQN.resume(tmp_path / "resumed" / "run", progress=False, tensorboard=False)
    stopped.learn()
    resumed.learn()
    cut = agent(tmp_path / "cut", config=dataclasses.replace(config, checkpoint_interval=cut_step))
    cut.learn(1_000)
    for run, directory in ((stopped, "stopped"), (resumed, "resumed")):
        assert_same_state(learned_state(run), learned_state(cut))
        for csv_name in ("metrics.csv", "eval.csv"):
            assert run_rows(tmp_path / directory / "run", csv_name) == run_rows(tmp_path / "cut" / "run", csv_name)


@pytest.mark.parametrize("pipeline,actor", [("sync", "auto"), ("async", "thread"), ("async", "process")])
def test_a_stop_requested_during_the_last_checkpoint_leaves_the_final_evaluation_to_the_next_call(
        tmp_path, pipeline, actor):
    dqn = agent(tmp_path, config=tiny(eval_interval=10**6, pipeline=pipeline, actor=actor))
    save = dqn.save_checkpoint

    def save_asking_for_a_stop():
        dqn.request_stop()
        return save()

    dqn.save_checkpoint = save_asking_for_a_stop
    with pytest.raises(KeyboardInterrupt, match="as requested"):
        dqn.learn(400)
    assert dqn.env_steps == 400 and read_csv(tmp_path / "run" / "eval.csv") == []
    del dqn.save_checkpoint
    dqn.learn()
    assert [row["step"] for row in read_csv(tmp_path / "run" / "eval.csv")] == [400]


@pytest.mark.parametrize("pipeline,actor", [("sync", "auto"), ("async", "thread"), ("async", "process")])
def test_learn_goes_on_after_an_error_in_an_update_in_every_pipeline(tmp_path, pipeline, actor):
    """An update fails mid-round: nothing stored is lost, and learn() again runs to the total
    with the updates due (those the failure skipped included)."""
    dqn = agent(tmp_path, config=tiny(eval_episodes=0, n_step=2, pipeline=pipeline, actor=actor))
    dqn.learner.update = failing_on_call(dqn.learner.update, 50, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        dqn.learn(1_000)
    stopped, held = dqn.env_steps, len(dqn.buffer)
    stored = dqn.buffer.get(dqn.buffer.valid_indices())
    assert 0 < stopped < 1_000 and held > 0
    del dqn.learner.update
    dqn.learn()
    assert dqn.env_steps >= 1_000 and dqn.learner.num_updates == dqn.updates_due(dqn.env_steps)
    assert len(dqn.buffer) > held  # the buffer (2,000 slots) has not wrapped: nothing was overwritten
    kept = dqn.buffer.get(stored.indices)
    for field, column in stored.arrays().items():
        np.testing.assert_array_equal(column, kept.arrays()[field], err_msg=field)


@pytest.mark.parametrize("eval_episodes", [0, 2])
def test_a_finished_run_resumed_goes_on_to_the_configs_total_as_its_agent_would(tmp_path, eval_episodes):
    """Its last checkpoint was written inside the learn() call (before the final evaluation);
    resumed, the run still reads as finished, not as stopped at its end."""
    dqn = agent(tmp_path, config=tiny(total_steps=400, eval_episodes=eval_episodes, eval_interval=10**6,
                                      save_buffer=True))
    dqn.learn(200)
    resumed = DQN.resume(tmp_path / "run", progress=False, tensorboard=False)
    assert dqn.scheduled_total_steps == resumed.scheduled_total_steps == 400
    assert resumed.unfinished_total_steps is None
    resumed.learn()
    assert resumed.env_steps == 400


def test_learn_to_a_total_already_passed_writes_nothing_but_a_missing_evaluation(tmp_path):
    dqn = agent(tmp_path, config=tiny(eval_interval=10**6))
    dqn.learn(200)
    dqn.save(tmp_path / "agent.pt")
    loaded = DQN.load(tmp_path / "agent.pt", run_dir=tmp_path / "new", progress=False, tensorboard=False)
    loaded.learn(100)
    assert not (tmp_path / "new" / "checkpoints").exists() and read_csv(tmp_path / "new" / "metrics.csv") == []
    assert [row["step"] for row in read_csv(tmp_path / "new" / "eval.csv")] == [200]  # the agent's own, at 200
    assert loaded.learner.num_updates == dqn.learner.num_updates


def test_a_failure_while_cleaning_up_a_stopped_learn_does_not_hide_why_it_stopped(tmp_path):
    dqn = agent(tmp_path, config=tiny(eval_episodes=0))
    dqn.learner.act = failing_on_call(dqn.learner.act, 10, KeyboardInterrupt())
    dqn.buffer = dqn._make_buffer()
    dqn.buffer.end_episodes = failing_on_call(dqn.buffer.end_episodes, 1, OSError("disk gone"))
    with pytest.raises(KeyboardInterrupt) as stopped:
        dqn.learn(1_000)
    assert any("disk gone" in note for note in stopped.value.__notes__)


@pytest.mark.parametrize(("stopped_in", "num_envs"), [("update", 2), ("save_checkpoint", 2), ("evaluate", 2),
                                                     ("evaluate", 3)])
def test_a_learn_stopped_after_its_last_step_finishes_the_runs_end_next_time(tmp_path, stopped_in, num_envs):
    """Stopped in the last round of updates, the final checkpoint or the final evaluation:
    learn() again goes to the same total (not the config's), owes nothing at the end, and
    leaves one metrics row, one checkpoint and one evaluation at the last step (402 for
    three envs, past the total of 400), also when resumed from that checkpoint."""
    from fastdqn.checkpoint import latest_checkpoint, load_checkpoint

    last = math.ceil(400 / num_envs) * num_envs
    dqn = agent(tmp_path, config=tiny(total_steps=5_000, checkpoint_interval=10**6, eval_interval=10**6,
                                      num_envs=num_envs, save_buffer=True))
    target = dqn.learner if stopped_in == "update" else dqn
    due = dqn.updates_due(last)  # the last one is made at the last step
    setattr(target, stopped_in, failing_on_call(getattr(target, stopped_in), due if stopped_in == "update" else 1,
                                                KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        dqn.learn(400)
    assert dqn.env_steps == last and dqn.scheduled_total_steps == dqn.unfinished_total_steps == 400
    delattr(target, stopped_in)
    if stopped_in == "evaluate":  # the checkpoint at the end was written: resume from it instead
        dqn = DQN.resume(tmp_path / "run", progress=False, tensorboard=False)
        assert dqn.scheduled_total_steps == 400
    dqn.learn()
    assert dqn.env_steps == last and dqn.learner.num_updates == due and dqn.unfinished_total_steps is None
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))["counters"]["env_steps"] == last
    assert [row["step"] for row in read_csv(tmp_path / "run" / "metrics.csv")][-1:] == [last]
    assert [row["step"] for row in read_csv(tmp_path / "run" / "eval.csv")] == [last]
    with pytest.warns(UserWarning, match="nothing to do"):  # a finished run: nothing more
        dqn.learn(400)
    assert len(read_csv(tmp_path / "run" / "eval.csv")) == 1 and dqn.learner.num_updates == due


def test_a_round_of_updates_computes_its_targets_once_per_target_network(tmp_path):
    """Rounds of 8 updates, a target copy every 5: the targets of each stretch between copies
    in one forward pass (8 = 5 + 3, then 2 + 5 + 1, ...), and the same learning as updates
    that compute their own."""
    config = tiny(gradient_steps=8, train_frequency=16, target_update_interval=5, eval_episodes=0)
    stretched, one_by_one = agent(tmp_path / "a", config=config), agent(tmp_path / "b", config=config)
    one_by_one._stretch_batches = lambda: None
    rows = []
    target_values = stretched.learner.target_values
    stretched.learner.target_values = lambda next_obs: (rows.append(len(next_obs)), target_values(next_obs))[1]
    for dqn in (stretched, one_by_one):
        dqn.learn(600)
    updates = stretched.learner.num_updates
    assert updates == one_by_one.learner.num_updates == stretched.updates_due(600) == 8 * ((600 - 64) // 16 + 1)
    expected, done = [], 0
    while done < updates:  # each round of 8, cut after every fifth update overall
        round_end = done + 8
        while done < round_end:
            stretch = min(round_end - done, 5 - done % 5)
            expected.append(stretch * config.batch_size)
            done += stretch
    assert rows == expected
    for a, b in zip(stretched.learner.q_network.parameters(), one_by_one.learner.q_network.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_prioritized_replay_anneals_beta_to_one(tmp_path):
    dqn = agent(tmp_path, config=tiny(prioritized=True, per_beta=0.4, num_envs=4, learning_starts=100,
                                      train_frequency=4, gradient_steps=1, eval_episodes=0))
    dqn.learn(400)
    assert dqn.buffer.prioritized
    # beta = 0.4 + 0.6 * step / total at the last update (step 400 of 400).
    assert dqn.buffer.beta == pytest.approx(1.0)
    assert dqn.learner.num_updates > 0


def test_options_reach_learner_and_buffer(tmp_path):
    dqn = agent(tmp_path, config=tiny(double_dqn=True, n_step=2, dueling=True, tau=0.5, loss="mse",
                                      eval_episodes=0))
    dqn.learn(200)
    assert dqn.learner.double_dqn and dqn.learner.tau == 0.5 and dqn.learner.loss == "mse"
    assert dqn.buffer.n_step == 2
    assert hasattr(dqn.q_network.head, "advantage")


def test_custom_q_network_is_trained(tmp_path):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    before = [p.detach().clone() for p in net.parameters()]
    dqn = agent(tmp_path, q_network=net, config=tiny(eval_episodes=0))
    dqn.learn(300)
    assert dqn.q_network is net
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))


def test_a_custom_q_network_must_give_a_q_value_per_action(tmp_path):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))  # CartPole has 2 actions
    with pytest.raises(ValueError, match="q_network must output one Q-value per action: CartPole-v1 has 2 actions, "
                                         "q_network outputs 3"):
        agent(tmp_path, q_network=net)


def test_a_custom_q_networks_run_is_loaded_and_resumed_with_a_network_of_its_architecture(tmp_path):
    def network():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

    trained = agent(tmp_path, q_network=network(), config=tiny(eval_episodes=0, checkpoint_interval=200,
                                                               save_buffer=True))
    trained.learn(200)
    trained.save(tmp_path / "saved.pt")
    for load in (lambda **kw: DQN.load(tmp_path / "saved.pt", **kw), lambda **kw: DQN.load(tmp_path / "run", **kw),
                 lambda **kw: DQN.resume(tmp_path / "run", **kw)):
        with pytest.raises(ValueError, match=r"was trained with a custom q_network \(torch.nn.modules.container."
                                             r"Sequential\): pass q_network="):
            load(progress=False, tensorboard=False)
        other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        with pytest.raises(ValueError, match=r"the saved q_network does not fit this one: Unexpected key\(s\) in "
                                             r"state_dict: \"3\.weight\", \"3\.bias\"; size mismatch for 1\.weight: "
                                             r"copying a param with shape torch\.Size\(\[8, 4\]\)"):
            load(q_network=other, progress=False, tensorboard=False)
        loaded = load(q_network=network(), progress=False, tensorboard=False)
        for a, b in zip(loaded.q_network.parameters(), trained.q_network.parameters(), strict=True):
            assert torch.equal(a, b)
        loaded.close()
    resumed = DQN.resume(tmp_path / "run", q_network=network(), progress=False, tensorboard=False)
    resumed.learn(300)
    assert resumed.env_steps >= 300 and resumed.custom_q_network
    unsaved = DQN("CartPole-v1", tiny(checkpoint_on_stop=False), q_network=network(), run_dir=tmp_path / "unsaved",
                  progress=False, tensorboard=False)
    unsaved.request_stop()
    with pytest.raises(KeyboardInterrupt):
        unsaved.learn(200)
    with pytest.raises(ValueError, match="was trained with a custom q_network"):  # starting it over needs one too
        DQN.resume(tmp_path / "unsaved", progress=False, tensorboard=False)


def test_learn_to_a_total_already_reached_says_what_total_steps_counts(tmp_path):
    dqn = agent(tmp_path, config=tiny(eval_episodes=0))
    dqn.learn(200)
    steps, updates = dqn.env_steps, dqn.learner.num_updates
    with pytest.warns(UserWarning, match=rf"learn\({steps}\) has nothing to do: this agent has taken {steps} steps "
                                         rf".*learn\({2 * steps}\) takes {steps} more"):
        dqn.learn(steps)
    with pytest.warns(UserWarning, match=rf"learn\(100\) has nothing to do: this agent has taken {steps} steps"):
        dqn.learn(100)
    assert (dqn.env_steps, dqn.learner.num_updates) == (steps, updates)
    dqn.learn(2 * steps)
    assert dqn.env_steps >= 2 * steps


def test_predict_is_greedy_argmax(tmp_path):
    dqn = agent(tmp_path)
    obs = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    with torch.no_grad():
        expected = dqn.q_network(torch.as_tensor(obs)).argmax(1).numpy()
    np.testing.assert_array_equal(dqn.predict(obs), expected)
    assert dqn.predict(obs[0]) == expected[0] and isinstance(dqn.predict(obs[0]), int)
    with pytest.raises(ValueError, match="obs must have shape"):
        dqn.predict(np.zeros((5, 3), np.float32))
    for epsilon in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\]"):
            dqn.predict(obs, epsilon=epsilon)


def test_save_and_load_round_trip(tmp_path):
    dqn = agent(tmp_path, config=tiny(eval_episodes=0))
    dqn.learn(300)
    dqn.save(tmp_path / "agent.pt")
    loaded = DQN.load(tmp_path / "agent.pt", progress=False, tensorboard=False, run_dir=tmp_path / "other")
    assert loaded.config == dqn.config and loaded.env_steps == 300
    for a, b in zip(dqn.q_network.state_dict().values(), loaded.q_network.state_dict().values()):
        assert torch.equal(a, b)
    obs = np.random.default_rng(1).normal(size=(16, 4)).astype(np.float32)
    np.testing.assert_array_equal(dqn.predict(obs), loaded.predict(obs))


def test_evaluate_counts_every_env_equally_and_is_seeded(tmp_path):
    dqn = agent(tmp_path)
    first = dqn.evaluate(6, epsilon=0.3, seed=7)
    again = dqn.evaluate(6, epsilon=0.3, seed=7)
    assert first == again
    assert first["episodes"] == 6 and len(first["returns"]) == 6
    assert first["mean_return"] == pytest.approx(np.mean(first["returns"]))
    assert first["std_return"] == pytest.approx(np.std(first["returns"]))
    assert all(1 <= r <= 500 and r == int(r) for r in first["returns"])


def test_bad_arguments_raise_before_any_work(tmp_path):
    with pytest.raises(TypeError, match="config must be a DQNConfig"):
        DQN("CartPole-v1", {"batch_size": 3})
    with pytest.raises(ValueError, match="unknown env_id"):
        DQN("CartPoel-v1", tiny(), progress=False)
    dqn = agent(tmp_path)
    with pytest.raises(ValueError, match="total_steps"):
        dqn.learn(0)
    with pytest.raises(ValueError, match="episodes"):
        dqn.evaluate(0)
    with pytest.raises(ValueError, match="epsilon"):
        dqn.evaluate(1, epsilon=1.5)
    with pytest.raises(ValueError, match=r"\.gif or \.mp4"):
        dqn.evaluate(1, video=tmp_path / "x.avi")
    obs = np.zeros((2, 4), np.float32)
    with pytest.raises(TypeError, match="epsilon must be a number, got str"):
        dqn.predict(obs, epsilon="0.1")
    with pytest.raises(TypeError, match="rng must be a numpy Generator"):
        dqn.predict(obs, epsilon=0.5, rng=0)
    with pytest.raises(TypeError, match="obs must have dtype float32"):
        dqn.predict(obs.astype(str))
    assert not (tmp_path / "run").exists()
    np.testing.assert_array_equal(dqn.predict(obs.astype(np.float64)), dqn.predict(obs))  # a float obs is cast
    assert dqn.evaluate(np.int64(1), epsilon=0.0)["episodes"] == 1


def test_predict_takes_image_frames_only_as_integers_the_env_gives(tmp_path):
    from fastdqn.config import DQNConfig

    pong = DQN("Pong-v5", DQNConfig.preset("atari", buffer_size=1_000), run_dir=tmp_path / "run", progress=False,
               tensorboard=False)
    frames = np.random.default_rng(0).integers(0, 256, (2, 4, 84, 84), dtype=np.uint8)
    assert pong.predict(frames).shape == (2,)
    with pytest.raises(TypeError, match="obs must have dtype uint8, as the env gives it, got float32"):
        pong.predict(frames.astype(np.float32) / 255)  # scaled twice, silently, if it were taken
    np.testing.assert_array_equal(pong.predict(frames.astype(np.int64)), pong.predict(frames))  # as a list gives them
    assert pong.predict(frames[0].tolist()) == pong.predict(frames[0])
    with pytest.raises(ValueError, match="obs values must fit the env's dtype uint8, got values from 0 to 256"):
        pong.predict(frames.astype(np.int64) + (frames == frames.max()))
    pong.close()


def test_learning_that_ends_before_learning_starts_says_it_makes_no_update(tmp_path):
    dqn = agent(tmp_path, config=tiny(learning_starts=500))
    with pytest.warns(UserWarning, match=r"learn\(300\) makes no update: learning starts after learning_starts=500"):
        dqn.learn(300)
    assert dqn.learner.num_updates == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ending at learning_starts makes the first update: no warning
        dqn.learn(500)
    assert dqn.learner.num_updates > 0


def test_an_agent_keeps_its_own_copy_of_the_config(tmp_path):
    config = tiny(eval_episodes=0)
    dqn = agent(tmp_path, config=config)
    config.num_envs, config.batch_size = 4, 32  # the caller reuses its object for the next agent
    dqn.learn(200)
    assert (dqn.config.num_envs, dqn.config.batch_size) == (TINY["num_envs"], TINY["batch_size"])
    assert dqn.env_steps == 200 and dqn.learner.num_updates > 0
    config.num_envs = 0  # checked when an agent is made from it
    with pytest.raises(ValueError, match="num_envs must be >= 1"):
        agent(tmp_path / "next", config=config)


def test_config_validation_and_overrides():
    with pytest.raises(ValueError, match="batch_size"):
        DQNConfig(batch_size=0)
    with pytest.raises(ValueError, match="gamma"):
        DQNConfig(gamma=1.5)
    with pytest.raises(TypeError, match="learning_rate"):
        DQNConfig(learning_rate="fast")
    with pytest.raises(ValueError, match="optimizer"):
        DQNConfig(optimizer="sgd")
    config = DQNConfig().with_overrides(["batch_size=32", "double_dqn=true", "hidden_sizes=32,16", "tau=0.5"])
    assert (config.batch_size, config.double_dqn, config.hidden_sizes, config.tau) == (32, True, (32, 16), 0.5)
    with pytest.raises(ValueError, match="did you mean batch_size"):
        DQNConfig().with_overrides(["batchsize=3"])
    with pytest.raises(ValueError, match="batch_size expects an integer"):
        DQNConfig().with_overrides(["batch_size=lots"])
    with pytest.raises(ValueError, match="unknown preset"):
        DQNConfig.preset("pong")
    assert DQNConfig.from_dict(config.to_dict()) == config
    assert set(DQNConfig.field_docs()) == set(config.to_dict())
    with pytest.raises(TypeError, match="assignments must be a list of 'key=value' strings, got 'seed=1'"):
        DQNConfig().with_overrides("seed=1")  # (not read letter by letter)
    assert DQNConfig().with_overrides(f"{k}={v}" for k, v in {"seed": 5, "batch_size": 7}.items()) == \
        DQNConfig(seed=5, batch_size=7)  # (a generator, read once)
    with pytest.raises(TypeError, match="from_dict expects a dict of config fields, got list"):
        DQNConfig.from_dict([("seed", 1)])
    with pytest.raises(TypeError, match=r"hidden_sizes must be a tuple of ints, got tuple \(True,\)"):
        DQNConfig(hidden_sizes=(True,))
    for field, value, match in [("seed", 2**31 - 1, "seed must be <= 2147483646"),
                                ("max_grad_norm", math.inf, "max_grad_norm must be >= 0 and finite"),
                                ("adam_eps", math.inf, "adam_eps must be a positive finite number"),
                                ("per_eps", 0.0, "per_eps must be a positive finite number"),
                                ("device", "cuda:x", "device must be one of")]:
        with pytest.raises(ValueError, match=match):
            DQNConfig(**{field: value})
    numpy_config = DQNConfig(batch_size=np.int64(32), learning_rate=np.float32(0.5), seed=np.uint8(3))
    assert numpy_config.to_dict() == DQNConfig(batch_size=32, learning_rate=0.5, seed=3).to_dict()
    assert type(numpy_config.batch_size) is int and type(numpy_config.learning_rate) is float
    numpy_config.batch_size, numpy_config.dueling = np.int64(16), np.True_  # assigned later: validate converts
    numpy_config.hidden_sizes = tuple(np.array([8, 8]))
    numpy_config.validate()
    assert (type(numpy_config.batch_size), type(numpy_config.dueling)) == (int, bool)
    assert numpy_config.hidden_sizes == (8, 8) and type(numpy_config.hidden_sizes[0]) is int


def test_torch_threads_are_capped_at_the_cores_the_process_may_use(monkeypatch, torch_threads_restored, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert DQNConfig(torch_threads=2).effective_torch_threads == 1
    assert DQNConfig(torch_threads=0).effective_torch_threads == 0  # torch's default stays
    torch.set_num_threads(3)  # the caller's own torch work's setting
    agent = DQN("CartPole-v1", DQNConfig(torch_threads=2, total_steps=300, num_envs=2, learning_starts=100,
                                         eval_episodes=0, hidden_sizes=(8,)), run_dir=tmp_path, progress=False,
                tensorboard=False)
    assert torch.get_num_threads() == 3
    seen = set()
    update = agent.learner.update
    agent.learner.update = lambda *args, **kwargs: (seen.add(torch.get_num_threads()), update(*args, **kwargs))[1]
    agent.learn()
    assert seen == {1} and torch.get_num_threads() == 3  # learn() used the capped count, then put the caller's back
    seen.clear()
    predict = agent.predict
    agent.predict = lambda *args, **kwargs: (seen.add(torch.get_num_threads()), predict(*args, **kwargs))[1]
    agent.evaluate(2)
    assert seen == {1} and torch.get_num_threads() == 3  # and so does evaluate()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert DQNConfig(torch_threads=2).effective_torch_threads == 2
    assert DQNConfig(torch_threads=8).effective_torch_threads == 4


def test_presets_follow_env():
    assert preset_for_env("CartPole-v1") == "cartpole"
    assert preset_for_env("gymnasium.envs.classic_control:CartPole-v1") == "cartpole"  # gymnasium's module:id
    assert preset_for_env("Pong-v5") == "atari" and preset_for_env("ALE/Pong-v5") == "atari"
    # CleanRL's own ids, which the gymnasium fallback plays as Atari, get its dqn_atari settings too.
    assert preset_for_env("BreakoutNoFrameskip-v4") == preset_for_env("Breakout-v4") == "atari"
    assert preset_for_env("LunarLander-v3") == "classic"
    assert preset_for_env("MiniGrid-Empty-5x5-v0") == preset_for_env("NotAnEnv-v0") == "classic"
    atari = DQNConfig.preset("atari")
    # CleanRL dqn_atari: a target copy every 1000 env steps at one update per 4 steps.
    assert atari.target_update_interval / atari.replay_ratio == 1000
    assert (atari.batch_size, atari.buffer_size, atari.learning_rate) == (32, 1_000_000, 1e-4)
    assert atari.eval_epsilon == 0.05  # CleanRL's evaluation (cleanrl_utils/evals/dqn_eval.py), Mnih et al. 2015's
    # One-step returns, as in CleanRL's dqn_atari.py and dqn.py and RL Zoo's DQN settings.
    assert atari.n_step == DQNConfig.preset("classic").n_step == DQNConfig.preset("acrobot").n_step == 1


ATARI_TINY = dict(hidden_sizes=(16,), batch_size=8, buffer_size=400, learning_starts=64, train_frequency=4,
                  gradient_steps=1, log_interval=100, eval_episodes=0, save_buffer=False, num_envs=2)


@pytest.mark.parametrize("env_id, backend", [("Breakout-v5", "envpool"), ("ALE/Breakout-v5", "gymnasium")])
def test_short_atari_run(tmp_path, env_id, backend):
    dqn = agent(tmp_path, env_id=env_id, config=DQNConfig(**ATARI_TINY, backend=backend))
    assert dqn.env.backend == backend and dqn.obs_shape == (4, 84, 84)
    before = [p.detach().clone() for p in dqn.q_network.parameters()]
    dqn.learn(300)
    assert dqn.env_steps == 300
    assert dqn.learner.num_updates == (300 - 64) // 4 + 1
    assert len(dqn.buffer) > 0 and dqn.buffer.frame_stack == 4
    assert any(not torch.equal(b, p) for b, p in zip(before, dqn.q_network.parameters()))
    assert type(dqn.q_network).__name__ == "NatureCNN"


def test_the_keras_rl_example_runs_again_into_a_directory_of_its_own(tmp_path):
    example = Path(__file__).parent.parent / "examples" / "keras_rl_cartpole.py"
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(example)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert len(re.findall(r"Episode \d: reward: [\d.]+", proc.stdout)) == 5
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((run / "dqn_CartPole-v0_weights.pt").is_file() for run in runs)


@pytest.mark.slow
def test_the_own_loop_example_solves_cartpole_from_the_pieces(tmp_path):
    """examples/own_loop.py: make_env, the buffer and the Learner composed by hand (seeded) reach
    the 475 bar in 50k steps, as DQN does; its prioritized variant runs too."""
    example = Path(__file__).parent.parent / "examples" / "own_loop.py"
    for flags, bar in (([], 475.0), (["--steps", "3000", "--prioritized"], 0.0)):
        proc = subprocess.run([sys.executable, str(example), *flags], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        score = float(re.search(r"evaluation: mean return ([\d.]+) over 10 episodes", proc.stdout).group(1))
        assert score >= bar, proc.stdout


def test_evaluating_an_env_without_a_time_limit_warns_that_it_may_never_end(own_env_module):
    own_env_module("fastdqn_test_unlimited", "FastdqnUnlimited-v0", max_episode_steps=None)
    agent = DQN("fastdqn_test_unlimited:FastdqnUnlimited-v0", DQNConfig(num_envs=2, hidden_sizes=(8,)),
                progress=False, tensorboard=False)
    with pytest.warns(UserWarning, match="FastdqnUnlimited-v0 has no time limit"):
        result = agent.evaluate(2, epsilon=1.0)  # random actions end the 3-step chain soon
    assert result["returns"] == [1.0, 1.0]
    limited = DQN("CartPole-v1", DQNConfig(num_envs=2, hidden_sizes=(8,)), progress=False, tensorboard=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        limited.evaluate(2)


def test_evaluate_records_the_first_episode_on_the_gymnasium_backend(tmp_path):
    from PIL import Image, ImageSequence

    dqn = agent(tmp_path, config=tiny(backend="gymnasium"))
    result = dqn.evaluate(4, epsilon=0.5, seed=3, video=tmp_path / "cartpole.gif")
    with Image.open(tmp_path / "cartpole.gif") as gif:
        assert gif.size == (600, 400)
        played_ms = sum(frame.info["duration"] for frame in ImageSequence.Iterator(gif))
    assert played_ms == round((result["returns"][0] + 1) * 1000 / 50, -1)  # its frames at CartPole's 50 fps


def test_numpy_integers_are_integers(tmp_path):
    dqn = agent(tmp_path, config=tiny(eval_episodes=0))
    dqn.learn(np.int64(100))
    assert dqn.env_steps == 100 and len(dqn.evaluate(np.int64(2))["returns"]) == 2


def test_saving_into_a_missing_folder_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no such folder: '{tmp_path / 'missing'}'"):
        agent(tmp_path).save(tmp_path / "missing" / "agent.pt")


def test_a_users_network_with_batch_norm_and_dropout_learns_acts_and_predicts_one_observation(tmp_path):
    """Eval mode for acting: batch norm takes a batch of one (num_envs=1, predict), dropout is off."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                  torch.nn.Dropout(0.5), torch.nn.Linear(16, 2))
    dqn = agent(tmp_path, config=tiny(num_envs=1, eval_episodes=0), q_network=network)
    dqn.learn(300)
    obs = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    first = dqn.predict(obs)
    assert all(np.array_equal(dqn.predict(obs), first) for _ in range(5))  # dropout off: the same actions
    assert [dqn.predict(o) for o in obs] == first.tolist()  # one at a time, batch norm on its statistics
    assert len(dqn.evaluate(2)["returns"]) == 2


def test_checkpoints_too_close_for_a_whole_episode_are_warned_of(tmp_path):
    """Each checkpoint ends the running episodes: 1,000 steps over 8 envs leave CartPole 125 of its 500."""
    with pytest.warns(UserWarning, match=r"checkpoint_interval=1000 with 8 envs cuts every episode at 125 steps or "
                                         r"fewer \(CartPole-v1's last up to 500\).*an interval of 4000 or more"):
        agent(tmp_path / "a", config=tiny(num_envs=8, checkpoint_interval=1000, eval_episodes=0)).learn(5000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agent(tmp_path / "b", config=tiny(num_envs=8, checkpoint_interval=4000, eval_episodes=0)).learn(5000)
        agent(tmp_path / "c", config=tiny(num_envs=8, checkpoint_interval=1000, eval_episodes=0)).learn(1000)
    with pytest.warns(UserWarning, match="cuts every episode at 125 steps"):  # cuts at 1,000, 2,000 and 3,000
        agent(tmp_path / "d", config=tiny(num_envs=8, checkpoint_interval=1000, eval_episodes=0)).learn(4000)
