"""Faults for the pipelines' tests: a call that fails, a training run to interrupt, a time limit."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


def failing_on_call(function, call: int, error: BaseException):
    """``function``, except that its ``call``-th call raises ``error`` instead."""
    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise error
        return function(*args, **kwargs)

    return failing


def start_training(tmp_path: Path, actor: str, sigint_ignored: bool = False) -> tuple[subprocess.Popen, Path]:
    """``fastdqn train`` with the async pipeline on CartPole, in its own process group (as a
    terminal starts it, or with SIGINT ignored, as a shell starts a background job), returned
    once it is a second past its first checkpoint (step 2000)."""
    from fastdqn.checkpoint import list_checkpoints

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "fastdqn.cli", "train", "--env", "CartPole-v1", "--pipeline", "async",
               "--device", "cpu", "--total-steps", "1000000", "--run-dir", str(run_dir), "--no-progress",
               "--no-tensorboard", "--set", f"actor={actor}", "--set", "checkpoint_interval=2000",
               "--set", "log_interval=500", "--set", "eval_interval=0"]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_ignored_sigint if sigint_ignored else _default_sigint)
    deadline = time.monotonic() + 120
    while not list_checkpoints(run_dir / "checkpoints") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    if not list_checkpoints(run_dir / "checkpoints"):
        proc.kill()
        raise AssertionError(f"no checkpoint was written: {proc.communicate()[1]}")
    time.sleep(1.0)  # inside the next segment: actor and learner busy
    return proc, run_dir


def assert_stopped_by_ctrl_c(proc: subprocess.Popen, stderr: str, run_dir: Path,
                             stop: int = signal.SIGINT) -> None:
    """Exit status 128 + the signal (130 for Ctrl-C, 143 for SIGTERM), the resume hint, and the
    newest checkpoint the stop's own, past the periodic one."""
    from fastdqn.checkpoint import list_checkpoints, load_checkpoint

    assert proc.returncode == 128 + stop, stderr
    assert "continue with: fastdqn train --resume" in stderr
    stopped = int(re.search(r"stopped at step ([\d,]+)", stderr)[1].replace(",", ""))
    assert load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["counters"]["env_steps"] == stopped > 2_000


@contextlib.contextmanager
def default_ctrl_c():
    """Python's own SIGINT handler for the block. A suite started in the background by a
    non-interactive shell inherits SIGINT ignored, and Ctrl-C tests would test nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # then Python installs its handler at start


def _ignored_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # and Python keeps it ignored


@contextlib.contextmanager
def alarm_after(seconds: float):
    """Fail with TimeoutError if the block runs longer: for code that must run in the main
    thread (only it receives signals), where a watching thread cannot be used."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
