"""What a training run shows while it runs: a tqdm bar on a terminal or in a notebook, plain
periodic lines elsewhere (a log file, a batch job, CI), where the bar's redraws would pile up."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Callable, TextIO

LINE_INTERVAL_S = 10.0
"""Seconds between two progress lines when stderr is not a terminal."""


def show_line(text: str, file: TextIO | None = None) -> None:
    """Print ``text`` to ``file`` (stderr) for whoever watches. A console that is gone (a closed
    pipe such as ``| tee`` after Ctrl-C, a hung-up terminal) never stops a run: the line is dropped."""
    try:
        print(text, file=file if file is not None else sys.stderr, flush=True)
    except (OSError, ValueError):  # ValueError: the stream was closed
        pass


class ProgressPostfix:
    """The text after the steps, ETA and rate, from each metrics row.

    A dash until there is a value: before the first episode ends, before the first update.
    A row with no update since the one before (its loss is NaN in metrics.csv) keeps the
    last loss shown, so that a NaN on screen always means a diverged loss."""

    def __init__(self) -> None:
        self._loss = "-"
        self._updates = None  # the previous row's update count

    def __call__(self, row: dict) -> str:
        loss, updates = row.get("loss", math.nan), row.get("updates")
        if not math.isnan(loss) or (self._updates is not None and updates != self._updates):
            self._loss = f"{loss:.3g}"
        self._updates = updates
        recent = row.get("episode_return_100", math.nan)
        recent = "-" if math.isnan(recent) else f"{recent:.1f}"
        return f"return {recent}, eps {row.get('epsilon', math.nan):.2f}, loss {self._loss}"


class ProgressBar:
    """tqdm's bar: steps (or other ``unit``s), rate and ETA, then the postfix."""

    def __init__(self, total_steps: int, start_step: int, name: str, unit: str = "step") -> None:
        from tqdm import tqdm

        self._tqdm = tqdm(total=total_steps, initial=start_step, unit=unit, unit_scale=True, dynamic_ncols=True,
                          desc=name)

    def show(self, step: int, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # as show_line
            self._tqdm.update(step - self._tqdm.n)
            self._tqdm.set_postfix_str(text, refresh=False)

    def write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._tqdm.write(text)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._tqdm.close()


class ProgressLines:
    """One line every ``interval_s`` seconds and one at the end, e.g.
    ``Pong-v5: 1,200,000/10,000,000 steps (12%), 8,123 steps/s, ETA 0:18:03, return -3.2, ...``
    (the rate since the previous line); counting other ``unit``s, ``episodes`` say."""

    def __init__(self, total_steps: int, start_step: int, name: str, unit: str = "step", *,
                 interval_s: float = LINE_INTERVAL_S, file: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.total_steps, self.name, self.unit, self.interval_s = total_steps, name, unit, interval_s
        self._file = file if file is not None else sys.stderr
        self._clock = clock
        self._start_step, self._start_time = start_step, clock()
        self._last_step, self._last_time = self._start_step, self._start_time

    def show(self, step: int, text: str) -> None:
        now = self._clock()
        if now - self._last_time < self.interval_s and step < self.total_steps:
            return
        if now - self._last_time < 1.0:  # the end, right after a line: the rate since the start
            self._last_step, self._last_time = self._start_step, self._start_time
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        eta = _clock_time((self.total_steps - step) / rate) if rate > 0 and step < self.total_steps else "0:00:00"
        self._last_step, self._last_time = step, now
        speed = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"
        self.write(f"{self.name}: {step:,}/{self.total_steps:,} {self.unit}s ({100 * step / self.total_steps:.0f}%), "
                   f"{speed} {self.unit}s/s, ETA {eta}" + (f", {text}" if text else ""))

    def write(self, text: str) -> None:
        show_line(text, self._file)

    def close(self) -> None:
        pass


def make_progress(total_steps: int, start_step: int, name: str, unit: str = "step") -> ProgressBar | ProgressLines:
    """A bar on a terminal or in a Jupyter notebook (which redraws it in place), lines
    anywhere else."""
    stream = sys.stderr
    interactive = stream is not None and (stream.isatty() or type(stream).__module__.startswith("ipykernel"))
    return (ProgressBar if interactive else ProgressLines)(total_steps, start_step, name, unit)


def _clock_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
