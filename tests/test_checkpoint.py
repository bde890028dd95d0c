"""Checkpoints: atomic files, code-free loading, and resume that reproduces an uninterrupted run."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdqn import checkpoint as ckpt
from fastdqn.agent import DQN
from fastdqn.cli import main
from fastdqn.config import DQNConfig
from fastdqn.metrics import read_csv

pytestmark = pytest.mark.filterwarnings("ignore:.*Box (low|high)'s precision lowered.*")

RESUME = dict(hidden_sizes=(32,), batch_size=16, buffer_size=600, learning_starts=100, train_frequency=4,
              gradient_steps=1, target_update_interval=20, log_interval=100, checkpoint_interval=400,
              eval_episodes=0, num_envs=2, exploration_fraction=0.5)
COMPARED = ["step", "updates", "episodes", "episode_return", "episode_length", "loss", "q_mean", "epsilon"]


def make(run_dir, config):
    return DQN("CartPole-v1", config, run_dir=run_dir, progress=False, tensorboard=False)


def assert_same_learner(a, b):
    sa, sb = a.learner.state_dict(), b.learner.state_dict()
    for key in ("q_network", "target_network"):
        for name, tensor in sa[key].items():
            assert torch.equal(tensor, sb[key][name]), f"{key}.{name} differs"
    for slot, state in sa["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(sb["optimizer"]["state"][slot][name]))
    assert int(sa["num_updates"]) == int(sb["num_updates"])


@pytest.mark.parametrize("prioritized, total_given", [(False, True), (True, True), (False, False)])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, prioritized, total_given):
    """total_given=False: the resumed learn() goes on to the crashed call's 1,500 steps by itself
    (the config's total_steps is 50,000), with the schedules spanning those."""
    config = DQNConfig(**RESUME, prioritized=prioritized)
    straight = make(tmp_path / "straight", config)
    straight.learn(1_500)

    crashed = make(tmp_path / "crashed", config)
    update = crashed.learner.update

    def crash_midway(batch, **kwargs):  # dies between the checkpoints at 800 and 1200 steps
        if crashed.learner.num_updates == (1_000 - 100) // 4:
            raise KeyboardInterrupt
        update(batch, **kwargs)

    crashed.learner.update = crash_midway
    with pytest.raises(KeyboardInterrupt):
        crashed.learn(1_500)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "crashed" / "checkpoints")] == ["step-000000000800.pt"]

    resumed = DQN.resume(tmp_path / "crashed", progress=False, tensorboard=False)
    assert resumed.env_steps == 800
    resumed.learn(1_500 if total_given else None)
    assert resumed.env_steps == straight.env_steps == 1_500
    assert_same_learner(straight, resumed)
    a, b = straight.buffer.sample(64), resumed.buffer.sample(64)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.obs, b.obs)
    rows_a = read_csv(tmp_path / "straight" / "metrics.csv")
    rows_b = read_csv(tmp_path / "crashed" / "metrics.csv")
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b):
        for key in COMPARED:
            assert ra[key] == rb[key] or (np.isnan(ra[key]) and np.isnan(rb[key])), (key, ra, rb)


def test_sigkilled_cli_run_resumes_to_the_same_parameters(tmp_path):
    sets = [f"--set={k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in RESUME.items()]
    common = ["--total-steps", "2000", "--seed", "3", "--no-progress", "--no-tensorboard", *sets]
    assert main(["train", "--run-dir", str(tmp_path / "straight"), *common]) == 0

    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "fastdqn.cli", "train", "--run-dir", str(killed), *common],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=tmp_path)  # outside the checkout: import the installed package, extension included
    first = killed / "checkpoints" / "step-000000000400.pt"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists()
    if not still_running:
        pytest.skip("the run finished before it could be killed")
    assert ckpt.latest_checkpoint(killed).name != "step-000000002000.pt"

    assert main(["train", "--resume", str(killed), "--no-progress", "--no-tensorboard"]) == 0
    a = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "straight"))
    b = ckpt.load_checkpoint(ckpt.latest_checkpoint(killed))
    assert a["step"] == b["step"] == 2_000
    for key in ("q_network", "target_network"):
        for name, tensor in a["learner"][key].items():
            assert torch.equal(tensor, b["learner"][key][name])
    assert [r["step"] for r in read_csv(killed / "metrics.csv")] == [100.0 * k for k in range(1, 21)]


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loading_never_runs_code(tmp_path):
    exploit = _Exploit()
    exploit.marker = tmp_path / "pwned"
    path = tmp_path / "step-000000000001.pt"
    path.write_bytes(pickle.dumps({"format": ckpt.FORMAT, "x": exploit}))
    with pytest.raises(ValueError, match="not a fastdqn checkpoint"):
        ckpt.load_checkpoint(path)
    assert not exploit.marker.exists()


def test_older_checkpoints_are_pruned_and_no_temp_files_remain(tmp_path):
    class Buffer:
        def save(self, path):
            with open(path, "wb") as f:
                f.write(b"replay")

    for step in (10, 20, 30):
        ckpt.save_checkpoint(tmp_path, step, {"x": torch.arange(step)}, Buffer(), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-000000000020.pt", "step-000000000020.replay", "step-000000000030.pt", "step-000000000030.replay"]
    state = ckpt.load_checkpoint(tmp_path / "step-000000000030.pt")
    assert torch.equal(state["x"], torch.arange(30)) and state["step"] == 30
    assert Path(state["buffer_path"]).read_bytes() == b"replay"


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, {"x": torch.ones(3)})

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, {"x": torch.zeros(3)})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000000001.pt"]
    assert torch.equal(ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path)[-1])["x"], torch.ones(3))


def test_a_save_stopped_between_its_buffer_and_its_pt_leaves_no_buffer_file(tmp_path, monkeypatch):
    """A second Ctrl-C during the stop's checkpoint, once the (gigabytes of) buffer is written."""
    class Buffer:
        def save(self, path):
            Path(path).write_bytes(b"replay")

    ckpt.save_checkpoint(tmp_path, 1, {"x": torch.ones(3)}, Buffer())
    write = ckpt.atomic_write_bytes
    monkeypatch.setattr(ckpt, "atomic_write_bytes", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, {"x": torch.zeros(3)}, Buffer())
    monkeypatch.setattr(ckpt, "atomic_write_bytes", write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000000001.pt", "step-000000000001.replay"]


def test_what_a_killed_save_left_is_removed_by_the_next_save(tmp_path):
    """SIGKILL (or a power cut) in the middle of a save leaves temporary files and maybe a buffer
    file without its .pt; the next save of the run removes them, and only them."""
    ckpt.save_checkpoint(tmp_path, 1, {"x": torch.ones(3)})
    leftovers = [tmp_path / ".step-000000000002.replay.abc", tmp_path / ".step-000000000002.pt.xyz.tmp",
                 tmp_path / "step-000000000002.replay"]
    leftovers[0].mkdir()
    (leftovers[0] / "step-000000000002.replay.tmp-123").write_bytes(b"half a buffer")
    for path in leftovers[1:]:
        path.write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("a user's file")
    ckpt.save_checkpoint(tmp_path, 3, {"x": torch.zeros(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step-000000000003.pt"]


def test_rng_states_round_trip():
    rng = np.random.default_rng(5)
    random.seed(1)
    torch.manual_seed(2)
    saved = ckpt.capture_rng(rng)
    expected = (random.random(), rng.random(), torch.rand(3))
    random.seed(9)
    torch.manual_seed(9)
    other = np.random.default_rng(9)
    ckpt.restore_rng(saved, other)
    got = (random.random(), other.random(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(ValueError, match="neither a checkpoint file nor a run directory"):
        ckpt.resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no checkpoint"):
        ckpt.resolve_checkpoint(tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a fastdqn checkpoint"):
        ckpt.load_checkpoint(garbage)
    with pytest.raises(ValueError, match="not a fastdqn run directory"):
        DQN.resume(tmp_path)


def test_tensorboard_after_a_resume_reads_as_one_run_like_the_csvs(tmp_path):
    """A run checkpointed at 400 goes on to 600 and loses that part (killed before its next
    checkpoint, say); resumed from 400 to 800, TensorBoard has every step's scalars once,
    as the CSVs do: the lost part's dropped, the resumed step's own kept."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = DQNConfig(hidden_sizes=(16,), batch_size=16, buffer_size=2_000, learning_starts=64, num_envs=2,
                       log_interval=100, eval_interval=200, eval_episodes=1, n_step=1)
    run = tmp_path / "run"
    agent = DQN("CartPole-v1", config, run_dir=run, progress=False, tensorboard=True)
    agent.learn(400)
    shutil.copytree(run / "checkpoints", tmp_path / "at-400")
    agent.learn(600)
    agent.close()
    shutil.rmtree(run / "checkpoints")
    shutil.copytree(tmp_path / "at-400", run / "checkpoints")
    resumed = DQN.resume(run, progress=False, tensorboard=True)
    assert resumed.env_steps == 400
    resumed.learn(800)
    resumed.close()
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    train = [event.step for event in events.Scalars("train/updates")]
    evals = [event.step for event in events.Scalars("eval/mean_return")]
    assert train == [row["step"] for row in read_csv(run / "metrics.csv")] == list(range(100, 900, 100))
    assert evals == [row["step"] for row in read_csv(run / "eval.csv")] == [200, 400, 600, 800]


def test_a_checkpoint_without_its_replay_file_loads_to_evaluate(tmp_path, capsys):
    """An Atari .replay is gigabytes and its .pt megabytes: the .pt alone is what one copies to evaluate."""
    run = make(tmp_path / "run", DQNConfig(**RESUME))
    run.learn(400)
    pt = ckpt.latest_checkpoint(tmp_path / "run")
    assert pt.with_suffix(".replay").is_file()
    alone = tmp_path / "copied" / pt.name
    alone.parent.mkdir()
    alone.write_bytes(pt.read_bytes())
    agent = DQN.load(alone, load_buffer=False, progress=False, tensorboard=False)
    assert_same_learner(agent, run)
    assert main(["eval", str(alone), "--episodes", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["episodes"] == 2
    with pytest.raises(ValueError, match=f"names replay buffer {pt.with_suffix('.replay').name}, which is missing"):
        DQN.load(alone, progress=False, tensorboard=False)  # to go on learning exactly, the buffer is needed


def test_loading_a_run_that_replaces_its_checkpoint_meanwhile_reads_the_new_one(tmp_path, monkeypatch):
    """A run still going keeps its newest checkpoint only: the one found may be gone when read."""
    run = make(tmp_path / "run", DQNConfig(**RESUME))
    run.learn(800)
    newest = ckpt.latest_checkpoint(tmp_path / "run")
    older = newest.with_name("step-000000000400.pt")  # as it was found, just before the run replaced it
    found = []
    monkeypatch.setattr(ckpt, "resolve_checkpoint", lambda path: found.append(older if not found else newest)
                        or found[-1])
    agent = DQN.load(tmp_path / "run", load_buffer=False, progress=False, tensorboard=False)
    assert found == [older, newest] and agent.env_steps == 800

    # With its buffer: the .pt read, then the run checkpoints again (removing that pair) before the .replay is read.
    monkeypatch.undo()
    load_checkpoint, reads = ckpt.load_checkpoint, []

    def run_goes_on_after_reading(path, **kwargs):
        state = load_checkpoint(path, **kwargs)
        reads.append(ckpt.checkpoint_step(path))
        if len(reads) == 1:
            run.learn(1200)
        return state

    monkeypatch.setattr(ckpt, "load_checkpoint", run_goes_on_after_reading)
    agent = DQN.load(tmp_path / "run", progress=False, tensorboard=False)
    assert reads == [800, 1200] and agent.env_steps == 1200 and len(agent.buffer) == len(run.buffer)


def test_resume_of_a_run_still_going_is_refused_before_reading_it(tmp_path):
    from fastdqn.metrics import RunDirectoryInUse, RunDirectoryLock

    make(tmp_path / "run", DQNConfig(**RESUME)).learn(400)
    held = RunDirectoryLock(tmp_path / "run")
    try:
        with pytest.raises(RunDirectoryInUse, match="in use by another run"):
            DQN.resume(tmp_path / "run", progress=False, tensorboard=False)
    finally:
        held.release()
    assert DQN.resume(tmp_path / "run", progress=False, tensorboard=False).env_steps == 400
