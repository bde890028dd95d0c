"""Run directories: config.json, metrics.csv, eval.csv, TensorBoard events; progress on screen.

A run directory is everything a person needs to see what a run did::

    RUN_DIR/config.json     env id, run name, protocol and every DQNConfig field
    RUN_DIR/metrics.csv     one row per log interval (see METRIC_COLUMNS)
    RUN_DIR/eval.csv        one row per evaluation (see EVAL_COLUMNS)
    RUN_DIR/tb/             TensorBoard events with the same scalars
    RUN_DIR/checkpoints/    see fastdqn.checkpoint
    RUN_DIR/.lock           held while a run writes the directory (see RunDirectoryLock)
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import secrets
import time
import warnings
import weakref
from pathlib import Path

from fastdqn.progress import ProgressPostfix, make_progress, show_line

METRIC_COLUMNS = ["step", "wall_time", "steps_per_s", "updates", "episodes", "episode_return",
                  "episode_return_100", "episode_length", "loss", "q_mean", "epsilon"]
EVAL_COLUMNS = ["step", "wall_time", "episodes", "mean_return", "std_return", "min_return", "max_return",
                "protocol"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    if not path.parent.is_dir():  # named now: the error would name the temporary file
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(path.parent))
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # os.open, not mkstemp: the file gets the permissions the umask gives (mkstemp's are 0600,
    # which would hide a run's results from the group, or from a TensorBoard run by another user).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_replace(finished: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put the file ``finished``, written beside ``path``, at ``path`` durably: its data, then its name."""
    with open(finished, "rb") as f:
        os.fsync(f.fileno())
    os.replace(finished, path)
    _fsync_dir(Path(path).parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_config(run_dir: str | os.PathLike) -> dict:
    """The parsed config.json of a run directory; ValueError if it is not one."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a fastdqn run directory (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_csv(path: str | os.PathLike) -> list[dict[str, float | str]]:
    """Rows of a metrics/eval CSV, numbers parsed (empty cells become NaN)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: _number(v) for k, v in row.items()})
    return rows


def _number(text: str):
    try:
        return float(text) if text != "" else math.nan
    except ValueError:
        return text


class RunDirectoryInUse(RuntimeError):
    """Another run is writing the run directory."""


class RunDirectoryLock:
    """Held while a run writes its directory: an advisory lock (flock) on ``RUN_DIR/.lock``.

    Two runs writing one directory (a second ``--resume`` of a run still going, the same
    ``--run-dir`` twice) would interleave their CSV rows and remove each other's checkpoint
    files as leftovers of killed saves. So the second one fails at once with
    ``RunDirectoryInUse``, before it writes anything. The kernel drops the lock when its
    holder dies, however it dies: a killed run leaves no stale lock behind, and the file
    itself (which names the holder's process id) stays. Where no lock can be taken (Windows,
    a file system without flock, a lock file of another user's that this one cannot open),
    the run goes on unlocked, with a warning.
    """

    NAME = ".lock"
    _UNSUPPORTED = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EACCES, errno.EPERM, errno.EROFS)

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self._fd: int | None = None
        try:
            import fcntl
        except ImportError:
            return
        self._fcntl = fcntl
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = self._open(run_dir / self.NAME)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BaseException:
                os.close(fd)
                raise
        except BlockingIOError:
            holder = self._holder(run_dir / self.NAME)
            raise RunDirectoryInUse(f"{run_dir} is in use by another run (process {holder}); "
                                    "wait for it to end, or choose another run directory") from None
        except OSError as error:
            if error.errno not in self._UNSUPPORTED:
                raise
            warnings.warn(f"could not lock {run_dir} ({error.strerror}): another run writing it at the same time "
                          "would go unnoticed", stacklevel=3)
            return
        with contextlib.suppress(OSError):  # read-only where another user's lock file is (see _open)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        self._close = weakref.finalize(self, os.close, fd)  # a lock never released is dropped with this object

    @staticmethod
    def _open(path: Path) -> int:
        """The lock file, writable if it may be (the umask gives its permissions, as for the run's
        other files), else read-only: flock needs no write access."""
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except PermissionError:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    @staticmethod
    def _holder(path: Path) -> str:
        with contextlib.suppress(OSError):
            return path.read_text()[:32].strip() or "unknown"
        return "unknown"

    def release(self) -> None:
        if self._fd is not None:
            # Unlocked explicitly: a forked actor process shares the descriptor, and the lock
            # would outlive this close while the child lives.
            self._fcntl.flock(self._fd, self._fcntl.LOCK_UN)
            self._close()
            self._fd = None


PROGRESS_INTERVAL_S = 0.5
"""Seconds between two moves of the progress display between metrics rows."""


class RunLogger:
    """Writes one run's files. Resumed (``resume``), rows past ``start_step`` (written after the
    checkpoint the run restarts from) are dropped, so the CSVs read as one uninterrupted run."""

    def __init__(self, run_dir: str | os.PathLike, config_record: dict, *, total_steps: int,
                 start_step: int = 0, wall_time_offset: float = 0.0, resume: bool = False,
                 tensorboard: bool = True, progress: bool = True):
        self.run_dir = Path(run_dir)
        # What close() closes, in reverse order of opening: the lock, taken before anything is
        # written, goes last. A failure while opening closes what was opened.
        self._opened = contextlib.ExitStack()
        try:
            self._opened.callback(RunDirectoryLock(self.run_dir).release)
            self._check_it_is_this_run(config_record)
            self._open(config_record, total_steps=total_steps, start_step=start_step,
                       wall_time_offset=wall_time_offset, resume=resume, tensorboard=tensorboard, progress=progress)
        except BaseException:
            self._opened.close()
            raise

    def _check_it_is_this_run(self, config_record: dict) -> None:
        """ValueError if the directory holds another run (its config.json names another run):
        writing into it would mix the two runs' rows and checkpoints."""
        if not (self.run_dir / "config.json").exists():
            return
        try:
            existing = read_config(self.run_dir).get("run_name")
        except ValueError:
            existing = None
        if existing != config_record["run_name"]:
            raise ValueError(f"{self.run_dir} holds another run ({existing or 'unreadable config.json'}); "
                             "continue it with DQN.resume (fastdqn train --resume), or choose another run directory")

    def _open(self, config_record: dict, *, total_steps: int, start_step: int, wall_time_offset: float,
              resume: bool, tensorboard: bool, progress: bool) -> None:
        if tensorboard:  # imported first: a missing tensorboard leaves the directory untouched
            from torch.utils.tensorboard import SummaryWriter
        self._progress = make_progress(total_steps, start_step, config_record.get("env_id", "train")) \
            if progress else None
        if self._progress is not None:
            self._opened.callback(self._progress.close)
        write_json(self.run_dir / "config.json", config_record)
        self._metrics, logged = self._open_csv("metrics.csv", METRIC_COLUMNS, resume, start_step)
        self.last_log_step: int | None = int(float(logged[-1]["step"])) if logged else None
        """The step of the newest metrics row, one written before a resume included."""
        self._eval, evaluations = self._open_csv("eval.csv", EVAL_COLUMNS, resume, start_step)
        self.last_eval_step: int | None = int(float(evaluations[-1]["step"])) if evaluations else None
        """The step of the newest evaluation row, one written before a resume included."""
        self._wall_offset = wall_time_offset
        self._t0 = time.perf_counter()
        self._last_step, self._last_time = start_step, self._t0
        # As in the CSVs, what was logged after the step resumed from is dropped; that step's own stays.
        # A run that starts over (resumed with no checkpoint) drops all.
        self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1 if resume else 0) \
            if tensorboard else None
        if self._tb is not None:
            self._opened.callback(self._tb.close)
        self._postfix = ProgressPostfix()
        self._postfix_text = ""  # the newest row's figures, shown until the next row
        self._progress_shown = self._t0

    def _open_csv(self, name: str, columns: list[str], resume: bool, start_step: int):
        """The CSV open for appending, and the rows kept from before a resume."""
        path = self.run_dir / name
        kept = []
        if resume and path.is_file():
            with open(path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if float(row["step"]) <= start_step]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_bytes(path, text.getvalue().encode())
        f = self._opened.enter_context(open(path, "a", newline=""))
        return (f, csv.DictWriter(f, fieldnames=columns)), kept

    def wall_time(self) -> float:
        """Seconds of training so far, across resumes."""
        return self._wall_offset + time.perf_counter() - self._t0

    def log(self, step: int, row: dict) -> None:
        """Append a metrics row; ``steps_per_s`` and ``wall_time`` are filled in here."""
        now = time.perf_counter()
        row = dict(row, step=step, wall_time=round(self.wall_time(), 3),
                   steps_per_s=round((step - self._last_step) / max(now - self._last_time, 1e-9), 1))
        self._last_step, self._last_time = step, now
        self.last_log_step = step
        self._write(self._metrics, row)
        self._scalars("train", step, row)
        if self._progress is not None:
            self._postfix_text = self._postfix(row)
            self._show_progress(step, now)

    def progress(self, step: int) -> None:
        """Move the progress display to ``step`` between metrics rows (cheap enough to call every
        env step: it draws at most every PROGRESS_INTERVAL_S), so that a slow run's bar and ETA
        move although rows come only every log_interval steps."""
        if self._progress is not None:
            now = time.perf_counter()
            if now - self._progress_shown >= PROGRESS_INTERVAL_S:
                self._show_progress(step, now)

    def _show_progress(self, step: int, now: float) -> None:
        self._progress_shown = now
        self._progress.show(step, self._postfix_text)

    def log_eval(self, step: int, returns: list[float], protocol: str) -> dict:
        n = len(returns)
        mean = sum(returns) / n
        std = math.sqrt(sum((r - mean) ** 2 for r in returns) / n)
        row = dict(step=step, wall_time=round(self.wall_time(), 3), episodes=n, mean_return=mean,
                   std_return=std, min_return=min(returns), max_return=max(returns), protocol=protocol)
        self._write(self._eval, row)
        self.last_eval_step = step
        self._scalars("eval", step, {"mean_return": mean, "std_return": std})
        if self._progress is not None:
            self._progress.write(f"eval @ {step}: mean return {mean:.1f} +- {std:.1f} over {n} episodes ({protocol})")
        return row

    def message(self, text: str) -> None:
        """A line for whoever watches the run, shown even without a progress display (above a bar)."""
        if self._progress is not None:
            self._progress.write(text)
        else:
            show_line(text)

    def _write(self, handle, row: dict) -> None:
        f, writer = handle
        writer.writerow({k: _cell(v) for k, v in row.items()})
        f.flush()

    def _scalars(self, prefix: str, step: int, row: dict) -> None:
        if self._tb is None:
            return
        for key, value in row.items():
            if key not in ("step", "protocol") and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def flush(self) -> None:
        """Make everything written so far durable (called before each checkpoint)."""
        for f, _ in (self._metrics, self._eval):
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        with self._opened:
            self.flush()


def _cell(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value
