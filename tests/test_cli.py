"""The fastdqn command line: train, eval --json, plot, bench dispatch, and bad arguments."""

import io
import json
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from faults import default_ctrl_c, failing_on_call

from fastdqn.cli import main
from fastdqn.config import DQNConfig
from fastdqn.metrics import read_csv

pytestmark = pytest.mark.filterwarnings("ignore:.*Box (low|high)'s precision lowered.*")

QUICK = ["--total-steps", "600", "--no-progress", "--no-tensorboard", "--set", "hidden_sizes=16",
         "--set", "learning_starts=100", "--set", "log_interval=200", "--set", "eval_episodes=2",
         "--set", "buffer_size=1000", "--set", "save_buffer=false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--run-dir", str(path), "--seed", "4", *QUICK]) == 0
    return path


def test_integer_flags_read_as_set_does():
    from fastdqn.cli import build_parser

    args = build_parser().parse_args(["train", "--total-steps", "1e3", "--num-envs", "1_0", "--seed", "7"])
    assert (args.total_steps, args.num_envs, args.seed) == (1000, 10, 7)
    assert DQNConfig().with_overrides(["total_steps=1e3"]).total_steps == 1000


def test_train_writes_a_run_directory(run_dir):
    record = json.loads((run_dir / "config.json").read_text())
    assert record["env_id"] == "CartPole-v1" and record["config"]["seed"] == 4
    assert record["config"]["total_steps"] == 600 and record["config"]["hidden_sizes"] == [16]
    assert [r["step"] for r in read_csv(run_dir / "metrics.csv")] == [200.0, 400.0, 600.0]
    assert len(read_csv(run_dir / "eval.csv")) == 1
    assert (run_dir / "checkpoints" / "step-000000000600.pt").is_file()


def test_the_progress_bar_shows_dashes_then_the_newest_loss_and_nan_only_when_it_is_one():
    from fastdqn.progress import ProgressPostfix

    nan, postfix = math.nan, ProgressPostfix()
    row = lambda updates, loss, recent=12.5: dict(updates=updates, loss=loss, episode_return_100=recent,  # noqa: E731
                                                  epsilon=0.5)
    assert postfix(row(0, nan, nan)) == "return -, eps 0.50, loss -"  # nothing yet
    assert postfix(row(0, nan)) == "return 12.5, eps 0.50, loss -"
    assert postfix(row(32, 0.25)) == "return 12.5, eps 0.50, loss 0.25"
    assert postfix(row(32, nan)) == "return 12.5, eps 0.50, loss 0.25"  # no update since: the last loss
    assert postfix(row(64, nan)) == "return 12.5, eps 0.50, loss nan"  # updates made, and a NaN loss
    resumed = ProgressPostfix()
    assert resumed(row(64, nan)) == "return 12.5, eps 0.50, loss -"  # no update since the resume


def test_the_train_progress_bar_never_shows_nan_in_a_healthy_run(tmp_path, monkeypatch):
    """With rows more often than rounds of updates (NaN losses in metrics.csv between them)."""
    from fastdqn import metrics

    shown = []

    class Recorded(metrics.ProgressPostfix):
        def __call__(self, row):
            shown.append(super().__call__(row))
            return shown[-1]

    monkeypatch.setattr(metrics, "ProgressPostfix", Recorded)
    argv = [a for a in QUICK if a != "--no-progress"]
    assert main(["train", "--run-dir", str(tmp_path / "run"), *argv, "--set", "num_envs=1",
                 "--set", "log_interval=5", "--set", "eval_episodes=0"]) == 0
    losses = [row["loss"] for row in read_csv(tmp_path / "run" / "metrics.csv")]
    assert len(shown) == len(losses) == 120 and np.isnan(losses).any() and not np.isnan(losses).all()
    assert shown[0].startswith("return -,") and shown[0].endswith("loss -")
    assert not any("nan" in text for text in shown), shown


def test_progress_lines_come_every_interval_and_at_the_end_with_the_recent_rate():
    from fastdqn.progress import ProgressLines

    now, out = [100.0], io.StringIO()
    lines = ProgressLines(10_000, 2_000, "Pong-v5", interval_s=10.0, file=out, clock=lambda: now[0])
    for step, t in [(3_000, 104.0), (4_000, 110.0), (5_000, 115.0), (6_000, 120.0), (10_000, 121.0)]:
        now[0] = t
        lines.show(step, "return -, eps 0.50, loss -")
    lines.write("eval @ 10000: mean return 3.0")
    assert out.getvalue().splitlines() == [
        # 2,000 steps in the 10 s since the start; 6,000 to go at 200 steps/s.
        "Pong-v5: 4,000/10,000 steps (40%), 200 steps/s, ETA 0:00:30, return -, eps 0.50, loss -",
        "Pong-v5: 6,000/10,000 steps (60%), 200 steps/s, ETA 0:00:20, return -, eps 0.50, loss -",
        "Pong-v5: 10,000/10,000 steps (100%), 4,000 steps/s, ETA 0:00:00, return -, eps 0.50, loss -",  # the end
        "eval @ 10000: mean return 3.0"]
    now[0], out = 100.0, io.StringIO()
    lines = ProgressLines(10_000, 0, "Pong-v5", interval_s=10.0, file=out, clock=lambda: now[0])
    for step, t in [(5_000, 131.0), (10_000, 131.5)]:  # the end half a second after a line: the run's rate
        now[0] = t
        lines.show(step, "x")
    assert out.getvalue().splitlines()[-1] == "Pong-v5: 10,000/10,000 steps (100%), 317 steps/s, ETA 0:00:00, x"


def test_progress_lines_count_other_units_with_the_rate_of_slow_ones():
    from fastdqn.progress import ProgressLines

    now, out = [0.0], io.StringIO()
    lines = ProgressLines(10, 0, "Pong-v5 evaluation", "episode", interval_s=10.0, file=out, clock=lambda: now[0])
    for episodes, t in [(2, 5.0), (3, 12.0), (10, 40.0)]:
        now[0] = t
        lines.show(episodes, "mean return -20.0")
    assert out.getvalue().splitlines() == [
        "Pong-v5 evaluation: 3/10 episodes (30%), 0.25 episodes/s, ETA 0:00:28, mean return -20.0",
        "Pong-v5 evaluation: 10/10 episodes (100%), 0.25 episodes/s, ETA 0:00:00, mean return -20.0"]


def test_eval_shows_the_episodes_played_unless_told_not_to(run_dir, capsys):
    assert main(["eval", str(run_dir), "--episodes", "3", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout holds the JSON alone; progress goes to stderr
    assert captured.err.splitlines()[-1].startswith("CartPole-v1 evaluation: 3/3 episodes (100%)")
    assert captured.err.splitlines()[-1].endswith(f"mean return {result['mean_return']:.1f}")
    assert main(["eval", str(run_dir), "--episodes", "3", "--json", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_the_progress_display_moves_between_metrics_rows_with_the_last_rows_figures(tmp_path, monkeypatch):
    from fastdqn import metrics

    now, shown = [0.0], []

    class Display:
        def show(self, step, text):
            shown.append((step, text))

        def close(self):
            pass

    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(metrics, "make_progress", lambda *args: Display())
    logger = metrics.RunLogger(tmp_path, {"env_id": "CartPole-v1"}, total_steps=1_000, tensorboard=False)
    for step, t in [(8, 0.1), (16, 0.6), (24, 0.7)]:
        now[0] = t
        logger.progress(step)
    now[0] = 0.8
    logger.log(32, {"episode_return_100": 20.0, "epsilon": 0.5, "loss": 0.25, "updates": 4})
    for step, t in [(40, 1.0), (48, 1.3), (56, 1.4)]:
        now[0] = t
        logger.progress(step)
    logger.close()
    row_text = "return 20.0, eps 0.50, loss 0.25"
    assert shown == [(16, ""), (32, row_text), (48, row_text)]  # at most every PROGRESS_INTERVAL_S between rows
    assert metrics.PROGRESS_INTERVAL_S == 0.5


def test_training_moves_the_progress_display_every_stored_step(tmp_path, monkeypatch):
    from fastdqn.agent import DQN
    from fastdqn.config import DQNConfig
    from fastdqn.metrics import RunLogger

    for pipeline, actor in [("sync", "auto"), ("async", "thread"), ("async", "process")]:
        steps = []
        monkeypatch.setattr(RunLogger, "progress", lambda self, step: steps.append(step))
        config = DQNConfig(num_envs=2, learning_starts=50, log_interval=10**6, eval_episodes=0, pipeline=pipeline,
                           actor=actor, save_buffer=False, hidden_sizes=(16,), buffer_size=1_000)
        DQN("CartPole-v1", config, run_dir=tmp_path / pipeline / actor, progress=False, tensorboard=False).learn(200)
        # (the thread actor's first envpool batch is the envs' resets: no step yet)
        assert [step for step in steps if step] == list(range(2, 201, 2)), (pipeline, actor)


class NotebookStream(io.StringIO):
    """What Jupyter puts in sys.stderr: not a terminal, but it redraws a bar in place."""


NotebookStream.__module__ = "ipykernel.iostream"


@pytest.mark.parametrize(("stderr", "bar"), [("terminal", True), ("notebook", True), ("file", False), (None, False)])
def test_a_terminal_or_notebook_gets_the_bar_and_anything_else_lines(monkeypatch, stderr, bar):
    from fastdqn.progress import ProgressBar, ProgressLines, make_progress

    if stderr == "terminal":
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    elif stderr == "notebook":
        monkeypatch.setattr(sys, "stderr", NotebookStream())
    elif stderr == "file":
        monkeypatch.setattr(sys, "stderr", io.StringIO())
    else:
        monkeypatch.setattr(sys, "stderr", None)  # pythonw
    progress = make_progress(100, 0, "CartPole-v1")
    progress.close()
    assert type(progress) is (ProgressBar if bar else ProgressLines)


@pytest.mark.filterwarnings("ignore:this checkpoint holds no replay buffer")
def test_a_run_stopped_in_its_final_evaluation_is_finished_by_resume(tmp_path, monkeypatch, capsys):
    """The Ctrl-C message says to resume; that must work when only the final evaluation is left."""
    from fastdqn.agent import DQN

    path = tmp_path / "run"
    evaluate = DQN._evaluate_and_log
    monkeypatch.setattr(DQN, "_evaluate_and_log", failing_on_call(evaluate, 1, KeyboardInterrupt()))
    argv = [*QUICK, "--set", "eval_interval=0"]
    assert main(["train", "--run-dir", str(path), *argv]) == 130
    assert "continue with: fastdqn train --resume" in capsys.readouterr().err
    assert not (path / "eval.csv").read_text().strip().count("\n")  # its header only
    monkeypatch.setattr(DQN, "_evaluate_and_log", evaluate)
    assert main(["train", "--resume", str(path), "--no-progress", "--no-tensorboard"]) == 0
    assert [row["step"] for row in read_csv(path / "eval.csv")] == [600]
    assert main(["train", "--resume", str(path), "--no-progress", "--no-tensorboard"]) == 2  # nothing left
    assert "already has 600 steps" in capsys.readouterr().err


def ctrl_c_on_call(function, calls: set[int]):
    """``function``, with a real Ctrl-C (SIGINT to this process) on entering each of its ``calls``-th calls."""
    count = [0]

    def with_ctrl_c(*args, **kwargs):
        count[0] += 1
        if count[0] in calls:
            signal.raise_signal(signal.SIGINT)
        return function(*args, **kwargs)

    return with_ctrl_c


@pytest.mark.filterwarnings("ignore:this checkpoint holds no replay buffer")
@pytest.mark.parametrize(("checkpoint_interval", "checkpoint_on_stop", "second_ctrl_c"),
                         [(200, True, False), (200, False, False), (0, False, False), (200, True, True)])
def test_ctrl_c_stops_at_the_next_step_with_its_checkpoint(tmp_path, monkeypatch, capfd, checkpoint_interval,
                                                           checkpoint_on_stop, second_ctrl_c):
    """So --resume loses no step; without checkpoint_on_stop, or with a second Ctrl-C during
    that checkpoint, it goes on from the periodic one (or there is none)."""
    from fastdqn.agent import DQN
    from fastdqn.checkpoint import list_checkpoints, load_checkpoint
    from fastdqn.learner import Learner

    path = tmp_path / "run"
    act, save = Learner.act, DQN.save_checkpoint
    monkeypatch.setattr(Learner, "act", ctrl_c_on_call(act, {45}))
    if second_ctrl_c:  # during the stop's checkpoint (the first save after the periodic ones)
        monkeypatch.setattr(DQN, "save_checkpoint", ctrl_c_on_call(save, {3}))
    argv = [*QUICK, "--set", f"checkpoint_interval={checkpoint_interval}",
            "--set", f"checkpoint_on_stop={checkpoint_on_stop}"]
    with default_ctrl_c():
        assert main(["train", "--run-dir", str(path), *argv]) == 130
    err = capfd.readouterr().err
    stopped = int(re.search(r"stopped at step ([\d,]+)", err)[1].replace(",", ""))
    assert 400 < stopped < 600, stopped
    assert "stopping at the next step (the same signal again stops at once)" in err
    rows = read_csv(path / "metrics.csv")
    assert rows[-1]["step"] == stopped  # the stop's cut has its metrics row, as a checkpoint's step has
    checkpoints = list_checkpoints(path / "checkpoints")
    if not checkpoint_interval and not checkpoint_on_stop:  # resume starts the run over
        assert not checkpoints and f"--resume {path} (it has no checkpoint: that starts it over)" in err
        monkeypatch.setattr(Learner, "act", act)
        assert main(["train", "--resume", str(path), "--no-progress", "--no-tensorboard"]) == 0
        assert "holds no checkpoint: the run starts over from step 0" in capfd.readouterr().err
        assert [r["step"] for r in read_csv(path / "metrics.csv")] == [200.0, 400.0, 600.0]
        assert load_checkpoint(list_checkpoints(path / "checkpoints")[-1])["counters"]["env_steps"] == 600
        return
    stop_checkpoint = checkpoint_on_stop and not second_ctrl_c
    assert load_checkpoint(checkpoints[-1])["counters"]["env_steps"] == (stopped if stop_checkpoint else 400)
    assert f"continue with: fastdqn train --resume {path}" in err
    assert ("(from its checkpoint at step 400)" in err) != stop_checkpoint
    assert ("writing its checkpoint (the same signal again skips it)" in err) == checkpoint_on_stop
    assert not [p for p in (path / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written file
    monkeypatch.setattr(Learner, "act", act)
    monkeypatch.setattr(DQN, "save_checkpoint", save)
    assert main(["train", "--resume", str(path), "--no-progress", "--no-tensorboard"]) == 0
    assert load_checkpoint(list_checkpoints(path / "checkpoints")[-1])["counters"]["env_steps"] == 600


def test_eval_json_prints_exactly_one_object(run_dir, capsys):
    assert main(["eval", str(run_dir), "--episodes", "4", "--seed", "11", "--json"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    result = json.loads(out)
    assert {"env", "episodes", "mean_return", "std_return", "returns", "protocol"} <= set(result)
    assert result["env"] == "CartPole-v1" and result["episodes"] == 4 and len(result["returns"]) == 4
    assert result["mean_return"] == pytest.approx(np.mean(result["returns"]))
    assert result["std_return"] == pytest.approx(np.std(result["returns"]))
    assert all(1 <= r <= 500 for r in result["returns"])
    # The same checkpoint, seed and epsilon play the same games.
    assert main(["eval", str(run_dir / "checkpoints" / "step-000000000600.pt"), "--episodes", "4", "--seed", "11",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == result
    assert result["epsilon"] == DQNConfig().eval_epsilon and result["protocol"].endswith(
        f"epsilon-greedy, epsilon {DQNConfig().eval_epsilon:g}")
    assert main(["eval", str(run_dir), "--episodes", "2", "--epsilon", "0.25", "--json"]) == 0
    named = json.loads(capsys.readouterr().out)
    assert named["epsilon"] == 0.25 and named["protocol"].endswith("epsilon-greedy, epsilon 0.25")


def test_eval_records_a_gif_of_an_atari_game_in_colour(tmp_path, capsys):
    from fastdqn.agent import DQN
    from fastdqn.config import DQNConfig

    agent = DQN("Pong-v5", DQNConfig.preset("atari", hidden_sizes=(16,), buffer_size=1_000),
                run_dir=tmp_path / "run", progress=False, tensorboard=False)
    agent.save(tmp_path / "pong.pt")
    video = tmp_path / "episode.gif"
    # An untrained agent loses Pong 0-21 within a few thousand steps: one short, full game.
    assert main(["eval", str(tmp_path / "pong.pt"), "--episodes", "1", "--epsilon", "0", "--video", str(video)]) == 0
    from PIL import Image

    with Image.open(video) as gif:
        assert gif.format == "GIF" and gif.size == (160, 210) and gif.n_frames > 100  # the console's screen
        gif.seek(gif.n_frames // 2)
        rgb = np.asarray(gif.convert("RGB"))
    assert (rgb[..., 0] != rgb[..., 1]).any()  # in colour, not the agent's 84x84 grayscale
    assert "mean return" in capsys.readouterr().out


def test_eval_records_an_mp4_of_env_0s_whole_first_episode(run_dir, tmp_path, capsys):
    """One frame after the reset and one per step of env 0's first episode, whose return (CartPole's: 1
    a step) comes first; the other envs play on after it, unrecorded."""
    import imageio_ffmpeg

    video = tmp_path / "cartpole.mp4"
    assert main(["eval", str(run_dir), "--episodes", "8", "--epsilon", "0.5", "--json", "--video", str(video)]) == 0
    returns = json.loads(capsys.readouterr().out)["returns"]
    assert returns[0] < max(returns)  # (so that frames of the longer episodes would show)
    decoded = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(video), "-f", "rawvideo", "-pix_fmt",
                              "rgb24", "-"], capture_output=True, check=True)
    assert "600x400" in decoded.stderr.decode() and "50 fps" in decoded.stderr.decode()  # gymnasium's renderer
    assert len(decoded.stdout) == (returns[0] + 1) * 400 * 600 * 3


def test_a_run_directory_on_a_read_only_file_system_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "run"))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    assert main(["train", "--run-dir", str(tmp_path / "run"), *QUICK]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastdqn train: error: [Errno 30] Read-only file system") and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "config.json").exists()


def test_eval_refuses_a_video_folder_it_cannot_write_before_the_games(run_dir, tmp_path, monkeypatch, capsys):
    import os

    from fastdqn.agent import DQN

    played = []
    monkeypatch.setattr(DQN, "_play", lambda *args: played.append(args))
    monkeypatch.setattr(os, "access", lambda path, mode: not (str(path) == str(tmp_path) and mode == os.W_OK))
    assert main(["eval", str(run_dir), "--video", str(tmp_path / "game.gif")]) == 2  # as on a read-only mount
    assert f"video's folder {tmp_path} is not writable" in capsys.readouterr().err and not played


def test_plot_writes_a_png(run_dir, tmp_path):
    out = tmp_path / "curve.png"
    assert main(["plot", str(run_dir), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_run_with_nothing_to_plot_yet_is_an_error_not_an_empty_png(run_dir, tmp_path, capsys):
    young = tmp_path / "young"  # stopped before its first metrics row
    young.mkdir()
    (young / "config.json").write_bytes((run_dir / "config.json").read_bytes())
    (young / "metrics.csv").write_text((run_dir / "metrics.csv").read_text().splitlines()[0] + "\n")
    assert main(["plot", str(young)]) == 2
    assert "has no returns to plot yet" in capsys.readouterr().err
    assert not (young / "learning_curve.png").exists()


def test_run_dir_is_not_overwritten(run_dir, capsys):
    assert main(["train", "--run-dir", str(run_dir), *QUICK]) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--env", "CartPoel-v1"], "did you mean 'CartPole-v1'"),
    (["train", "--preset", "pongg"], "unknown preset"),
    (["train", "--preset", ""], "unknown preset ''"),
    (["train", "--env", ""], "--env must name an environment"),
    (["train", "--total-steps", "0"], "positive integer"),
    (["train", "--num-envs", "many"], "positive integer"),
    (["train", "--total-steps", "1.5e0"], "positive integer, got '1.5e0'"),
    (["train", "--set", "gamma=2"], "gamma must be in [0, 1]"),
    (["train", "--set", "batch_size=big"], "batch_size expects an integer"),
    (["train", "--set", "buffer_size=9"], "buffer_size=9 does not fit this run: capacity must be >= 80"),
    (["train", "--set", "seed=-1"], "seed must be >= 0, got -1"),
    (["train", "--run-dir", "FILE"], "run_dir must be a directory, got"),
    (["train", "--run-dir", "FILE/run"], "Not a directory"),
    (["train", "--env", "Blackjack-v1", "--set", "backend=gymnasium"], "numeric Box observation space"),
    (["train", "--set", "learnig_rate=1"], "did you mean learning_rate"),
    (["train", "--set", "nokey"], "key=value"),
    (["train", "--device", "tpu"], "device must be one of"),
    (["train", "--resume", "/nonexistent/run"], "not a fastdqn run directory"),
    (["train", "--resume", "/tmp", "--env", "Pong-v5"], "drop --env"),
    (["eval", "/nonexistent/ckpt.pt"], "neither a checkpoint file nor a run directory"),
    (["eval", "/tmp", "--epsilon", "3"], "[0, 1]"),
    (["eval", "RUN_DIR", "--video", "/nonexistent/dir/game.gif"], "folder /nonexistent/dir does not exist"),
    (["eval", "FILE"], "is not a fastdqn checkpoint (torch.load could not read it"),
    (["plot", "/nonexistent/run"], "not a fastdqn run directory"),
    (["plot", "RUN_DIR", "--out", "/nonexistent/dir/curve.png"], "No such file or directory"),
    (["bench", "nosuch"], "unknown benchmark"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_give_one_line_and_exit_2(argv, message, capsys, request, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.touch()
    argv = [a.replace("FILE", str(a_file)) for a in argv]
    if "RUN_DIR" in argv:  # a real run, so that the argument checked is the only thing wrong
        argv = [str(request.getfixturevalue("run_dir")) if a == "RUN_DIR" else a for a in argv]
        capsys.readouterr()  # what making the run printed
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err and "Traceback" not in err
    assert re.match(r"fastdqn( [a-z]+)?: error: ", err), err  # one form for every usage error, as argparse's


def test_console_entry_point_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastdqn.cli", "train", "--env", "NoSuchEnv-v0"],
                          capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)  # outside the checkout: import the installed package, extension included
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown env_id" in proc.stderr


def _cli(args, pythonpath=None, cwd=None):
    """``python -m fastdqn.cli ARGS`` in a new process, with ``pythonpath`` before the caller's PYTHONPATH."""
    paths = [str(pythonpath)] if pythonpath is not None else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    return subprocess.run([sys.executable, "-m", "fastdqn.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def test_your_own_env_trains_and_evaluates_from_the_command_line(tmp_path, own_env_module):
    envs, run = own_env_module("fastdqn_cli_chain", "FastdqnCliChain-v0"), tmp_path / "run"
    assert main(["train", "--env", "fastdqn_cli_chain:FastdqnCliChain-v0", "--run-dir", str(run), *QUICK]) == 0
    assert json.loads((run / "config.json").read_text())["run_name"].startswith(
        "fastdqn_cli_chain-FastdqnCliChain-v0__dqn__")  # no ':' in a name that may become a folder's
    # A new process imports the module again, as the run's env id names it.
    proc = _cli(["eval", str(run), "--episodes", "3", "--json"], pythonpath=envs, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["env"] == "fastdqn_cli_chain:FastdqnCliChain-v0"
    assert len(result["returns"]) == 3 and set(result["returns"]) <= {0.0, 1.0}  # the chain's only returns
    proc = _cli(["eval", str(run)], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no module named 'fastdqn_cli_chain' (is its folder on PYTHONPATH?)" in proc.stderr


def test_gym_packages_imports_the_modules_that_register_a_runs_env(tmp_path, own_env_module):
    from fastdqn import DQN

    envs, run = own_env_module("fastdqn_cli_chain2", "FastdqnCliChain2-v0"), tmp_path / "run"
    import fastdqn_cli_chain2  # noqa: F401 - registers the env, as a user's script does before DQN(...)

    agent = DQN("FastdqnCliChain2-v0", DQNConfig(total_steps=200, num_envs=2, learning_starts=50, buffer_size=500,
                                                 eval_episodes=0, hidden_sizes=(8,)), run_dir=run, progress=False,
                tensorboard=False)
    agent.learn()
    proc = _cli(["eval", str(run), "--episodes", "2"], pythonpath=envs, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "name the module that registers it: 'module:FastdqnCliChain2-v0'" in proc.stderr
    proc = _cli(["eval", str(run), "--episodes", "2", "--json", "--gym-packages", "fastdqn_cli_chain2"],
                pythonpath=envs, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["episodes"] == 2
    proc = _cli(["eval", str(run), "--gym-packages", "fastdqn_no_such_module"], pythonpath=envs, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--gym-packages: no module named 'fastdqn_no_such_module'" in proc.stderr


def test_a_missing_training_dependency_is_named_with_the_extra_that_brings_it(tmp_path):
    code = "import sys; sys.modules['torch'] = None; from fastdqn.cli import main; sys.exit(main(['train']))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "needs the train extra: pip install 'fastdqn[train]'" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("missing, one_line", [("tensorboard", True), ("fastdqn.learner", False)])
def test_a_missing_third_party_module_is_one_line_and_fastdqns_own_a_traceback(tmp_path, missing, one_line):
    code = (f"import sys; sys.modules[{missing!r}] = None; from fastdqn.cli import main; "
            "sys.exit(main(['train', '--run-dir', 'run']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert ("Traceback" not in proc.stderr) == one_line and proc.returncode == (2 if one_line else 1)
    assert f"import of {missing} halted" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "run" / "config.json").exists()


class ClosedPipe(io.TextIOBase):
    """stderr after the reader of its pipe has gone (``| tee log`` after a Ctrl-C, which tee gets too)."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.filterwarnings("ignore:this checkpoint holds no replay buffer")
def test_a_console_that_is_gone_does_not_cost_the_checkpoint(tmp_path, monkeypatch):
    from fastdqn.checkpoint import checkpoint_step, list_checkpoints
    from fastdqn.learner import Learner

    path = tmp_path / "run"
    monkeypatch.setattr(Learner, "act", ctrl_c_on_call(Learner.act, {45}))
    monkeypatch.setattr(sys, "stderr", ClosedPipe())
    with default_ctrl_c():
        assert main(["train", "--run-dir", str(path), *QUICK, "--set", "checkpoint_interval=200"]) == 130
    stopped = read_csv(path / "metrics.csv")[-1]["step"]
    assert 400 < stopped < 600 and checkpoint_step(list_checkpoints(path / "checkpoints")[-1]) == stopped


def test_ctrl_c_outside_training_is_a_line_not_a_traceback(monkeypatch, capsys):
    from fastdqn.agent import DQN

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DQN, "load", interrupted)
    assert main(["eval", "/some/run"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted"


def test_bench_dispatches_to_the_named_module(monkeypatch):
    import types

    seen = {}
    fake = types.ModuleType("fastdqn.bench.train")

    def fake_main(args):
        seen["args"] = args
        return 0

    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "fastdqn.bench.train", fake)
    assert main(["bench", "train", "--env", "CartPole-v1", "--steps", "10"]) == 0
    assert seen["args"] == ["--env", "CartPole-v1", "--steps", "10"]


def test_an_error_while_training_or_benchmarking_keeps_its_traceback(tmp_path, monkeypatch):
    """Only bad arguments become one line; a ValueError from inside a run is a failure to debug."""
    from fastdqn.agent import DQN

    def learn(self, total_steps):
        raise ValueError("deep inside a run")

    monkeypatch.setattr(DQN, "learn", learn)
    with pytest.raises(ValueError, match="deep inside a run"):
        main(["train", "--run-dir", str(tmp_path / "run"), *QUICK])

    def bench_main(args):
        raise TypeError("deep inside a benchmark")

    monkeypatch.setattr("fastdqn.bench.learner.main", bench_main)
    with pytest.raises(TypeError, match="deep inside a benchmark"):
        main(["bench", "learner"])
