"""One run writes a run directory at a time (metrics.RunDirectoryLock)."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastdqn.cli import main
from fastdqn.metrics import RunDirectoryInUse, RunDirectoryLock, read_csv

pytestmark = pytest.mark.filterwarnings("ignore:.*Box (low|high)'s precision lowered.*")

HOLD = "import sys, time; from fastdqn.metrics import RunDirectoryLock; lock = RunDirectoryLock(sys.argv[1]); " \
       "print('held', flush=True); time.sleep(120)"


@contextlib.contextmanager
def held_by_another_process(run_dir):
    """The run directory's lock, held by a second Python process until the block ends (SIGKILL)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(run_dir).parent)  # outside the checkout: the installed package, extension included
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()


def test_a_second_holder_is_refused_until_the_first_releases(tmp_path):
    first = RunDirectoryLock(tmp_path / "run")
    with pytest.raises(RunDirectoryInUse, match=r"run is in use by another run \(process \d+\)"):
        RunDirectoryLock(tmp_path / "run")
    first.release()
    RunDirectoryLock(tmp_path / "run").release()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    with held_by_another_process(tmp_path) as pid:
        with pytest.raises(RunDirectoryInUse, match=rf"\(process {pid}\)"):
            RunDirectoryLock(tmp_path)
    RunDirectoryLock(tmp_path).release()  # SIGKILL dropped it


def test_learn_into_a_run_directory_in_use_changes_nothing(tmp_path):
    from fastdqn import DQN
    from test_agent import tiny

    run_dir = tmp_path / "run"
    agent = DQN("CartPole-v1", tiny(total_steps=200), run_dir=run_dir, progress=False, tensorboard=False)
    with held_by_another_process(run_dir):
        with pytest.raises(RunDirectoryInUse):
            agent.learn()
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
        assert agent.env_steps == 0 and agent.unfinished_total_steps is None
    agent.learn()  # and goes on once the directory is free
    assert agent.env_steps >= 200 and (run_dir / "config.json").is_file()
    agent.learn(400)  # the lock of the call before was released
    agent.close()


def test_release_frees_the_directory_while_a_forked_child_shares_the_descriptor(tmp_path):
    lock = RunDirectoryLock(tmp_path)
    child = os.fork()  # as the async pipeline's actor process is forked during learn()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    try:
        lock.release()
        RunDirectoryLock(tmp_path).release()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_resume_of_a_run_in_use_is_a_one_line_error(tmp_path, capsys):
    run_dir = tmp_path / "run"
    quick = ["--no-progress", "--no-tensorboard", "--set", "hidden_sizes=16", "--set", "learning_starts=100",
             "--set", "eval_episodes=2", "--set", "buffer_size=1000"]
    assert main(["train", "--run-dir", str(run_dir), "--total-steps", "300", *quick]) == 0
    capsys.readouterr()
    metrics_before = (run_dir / "metrics.csv").read_bytes()
    with held_by_another_process(run_dir) as pid:
        assert main(["train", "--resume", str(run_dir), "--total-steps", "600"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"fastdqn train: error: {run_dir} is in use by another run (process {pid}); " \
                      "wait for it to end, or choose another run directory"
    assert (run_dir / "metrics.csv").read_bytes() == metrics_before


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_run_files_get_the_permissions_the_umask_gives(tmp_path, umask):
    from fastdqn import DQN
    from test_agent import tiny

    previous = os.umask(umask)
    try:
        agent = DQN("CartPole-v1", tiny(total_steps=200, checkpoint_interval=100, save_buffer=True),
                    run_dir=tmp_path / "run", progress=False, tensorboard=False)
        agent.learn()
        agent.save(tmp_path / "agent.pt")
        agent.close()
    finally:
        os.umask(previous)
    files = [tmp_path / "agent.pt", tmp_path / "run" / ".lock", *(tmp_path / "run").glob("*.*"),
             *(tmp_path / "run" / "checkpoints").iterdir()]
    assert {p.suffix for p in files} >= {".pt", ".replay", ".json", ".csv"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o666 & ~umask) for p in files}


def test_a_new_agent_refuses_a_directory_that_holds_another_run(tmp_path):
    from fastdqn import DQN
    from test_agent import tiny

    run_dir = tmp_path / "run"
    first = DQN("CartPole-v1", tiny(total_steps=200, checkpoint_interval=200, save_buffer=True), run_dir=run_dir, progress=False,
                tensorboard=False)
    first.learn()
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    second = DQN("Acrobot-v1", tiny(total_steps=100), run_dir=run_dir, progress=False, tensorboard=False)
    assert second.run_name != first.run_name
    with pytest.raises(ValueError, match=rf"{run_dir} holds another run \({first.run_name}\); continue it with "
                                         r"DQN.resume"):
        second.learn()
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert second.env_steps == 0
    first.learn(300)  # its own directory, still
    DQN.resume(run_dir, progress=False, tensorboard=False).learn(400)
    first.close()
    second.close()


def test_resuming_a_run_with_no_checkpoint_starts_it_over_as_it_was_started(tmp_path):
    from fastdqn import DQN
    from test_agent import tiny

    config = tiny(total_steps=300, checkpoint_on_stop=False)
    assert config.checkpoint_interval == 0
    made = DQN("CartPole-v1", config, run_dir=tmp_path / "killed", progress=False, tensorboard=False)
    made.request_stop()
    with pytest.raises(KeyboardInterrupt):
        made.learn(200)  # stopped at its first step: the config and a row, but no checkpoint
    resumed = DQN.resume(tmp_path / "killed", progress=False, tensorboard=False)
    assert (resumed.env_steps, resumed.run_name, resumed.scheduled_total_steps) == (0, made.run_name, 200)
    resumed.learn()
    fresh = DQN("CartPole-v1", config, run_dir=tmp_path / "fresh", progress=False, tensorboard=False)
    fresh.learn(200)
    assert resumed.env_steps == fresh.env_steps
    for a, b in zip(resumed.learner.q_network.parameters(), fresh.learner.q_network.parameters(), strict=True):
        assert torch.equal(a, b)
    rows = {name: read_csv(tmp_path / name / "metrics.csv") for name in ("killed", "fresh")}
    assert [r["step"] for r in rows["killed"]] == [r["step"] for r in rows["fresh"]]


def test_where_no_lock_can_be_taken_the_run_goes_on_unlocked_with_a_warning(tmp_path, monkeypatch):
    import errno
    import fcntl

    def unsupported(fd, operation):  # Lustre without -o flock, some network file systems
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", unsupported)
    with pytest.warns(UserWarning, match=r"could not lock .*\(Function not implemented\): another run writing it"):
        lock = RunDirectoryLock(tmp_path)
    lock.release()


def test_a_lock_dropped_without_release_is_released_with_it(tmp_path):
    import gc

    lock = RunDirectoryLock(tmp_path)
    del lock
    gc.collect()
    RunDirectoryLock(tmp_path).release()


def test_a_finished_run_whose_checkpoints_are_gone_is_not_started_over(tmp_path):
    import shutil

    from fastdqn import DQN
    from test_agent import tiny

    run_dir = tmp_path / "run"
    DQN("CartPole-v1", tiny(total_steps=200), run_dir=run_dir, progress=False, tensorboard=False).learn()
    shutil.rmtree(run_dir / "checkpoints")
    logs = {name: (run_dir / name).read_bytes() for name in ("metrics.csv", "eval.csv", "config.json")}
    with pytest.raises(ValueError, match="finished its 200 steps and holds no checkpoint to go on from"):
        DQN.resume(run_dir, progress=False, tensorboard=False)
    assert {name: (run_dir / name).read_bytes() for name in logs} == logs


def test_resume_takes_the_same_arguments_with_or_without_a_checkpoint(tmp_path):
    from fastdqn import DQN
    from test_agent import tiny

    for name, checkpoint_on_stop in (("with", True), ("without", False)):
        agent = DQN("CartPole-v1", tiny(checkpoint_on_stop=checkpoint_on_stop, save_buffer=True),
                    run_dir=tmp_path / name, progress=False, tensorboard=False)
        agent.request_stop()
        with pytest.raises(KeyboardInterrupt):
            agent.learn(200)
        resumed = DQN.resume(tmp_path / name, load_buffer=False, device="cpu", progress=False, tensorboard=False)
        assert resumed.buffer is None and resumed.env_steps == (agent.env_steps if checkpoint_on_stop else 0)
