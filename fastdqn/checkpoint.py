"""Checkpoints: atomic, code-free, and complete enough that a resumed run continues exactly.

A checkpoint is a pair of files in ``RUN_DIR/checkpoints/``::

    step-000000050000.pt       torch.save of plain data: config, counters, learner state
                               (online and target networks, optimizer, update counter,
                               the exploration generator)
                               and every RNG state (python, numpy, torch, CUDA)
    step-000000050000.replay   the replay buffer, written by ``buf.save`` (optional)

The buffer is written first and the .pt last, each through a temporary file that is
fsynced and renamed, so a .pt on disk always has its complete buffer beside it: a run
killed at any moment (SIGKILL included) resumes from the newest .pt. Older pairs are
removed only after the new pair is in place. Loading uses ``torch.load(weights_only=True)``
and the buffer's own loader, so a checkpoint can never execute code.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from fastdqn.metrics import atomic_replace, atomic_write_bytes

FORMAT = "fastdqn-checkpoint"
VERSION = 1
_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` is (or would be) in ``directory``."""
    return Path(directory) / f"step-{step:012d}.pt"


def save_checkpoint(directory: str | os.PathLike, step: int, state: dict, buffer=None, keep: int = 1) -> Path:
    """Write ``state`` (plain data and tensors) and ``buffer`` as the checkpoint for ``step``;
    keep the newest ``keep`` checkpoints. Returns the .pt path."""
    path = checkpoint_path(directory, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path.parent)
    state = dict(state, format=FORMAT, version=VERSION, step=step, buffer_file=None)
    try:
        if buffer is not None:
            state["buffer_file"] = path.with_suffix(".replay").name
            _save_buffer_atomically(buffer, path.with_suffix(".replay"))
        data = io.BytesIO()
        torch.save(state, data)
        atomic_write_bytes(path, data.getvalue())
    except BaseException:  # stopped (a second Ctrl-C) or failed: no buffer file without its .pt
        if not path.is_file():
            path.with_suffix(".replay").unlink(missing_ok=True)
        raise
    for old in list_checkpoints(path.parent)[:-keep] if keep > 0 else []:
        _remove_pair(old)
    return path


def _remove_leftovers(directory: Path) -> None:
    """What a save killed halfway (SIGKILL, a power cut) left: temporary files (hidden, named
    after the file they were to become) and buffer files whose .pt was never written. A
    buffer file is as large as the buffer, so each would waste gigabytes."""
    for entry in directory.iterdir():
        temporary = entry.name.startswith(".step-")
        orphan = entry.suffix == ".replay" and _NAME.match(entry.with_suffix(".pt").name) is not None \
            and not entry.with_suffix(".pt").is_file()
        if temporary and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif temporary or orphan:
            with contextlib.suppress(OSError):  # best effort: never a reason to lose this save
                entry.unlink()


def _save_buffer_atomically(buffer, path: Path) -> None:
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        staged = tmp / path.name
        buffer.save(str(staged))
        atomic_replace(staged, path)
    finally:
        for leftover in tmp.iterdir():
            leftover.unlink()
        tmp.rmdir()


def _remove_pair(pt_path: Path) -> None:
    buffer_path = pt_path.with_suffix(".replay")
    pt_path.unlink(missing_ok=True)  # the .pt first: a .replay without its .pt is never used
    buffer_path.unlink(missing_ok=True)


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step of a checkpoint .pt, read from its name (``checkpoint_path``'s)."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named as a checkpoint (step-<step>.pt)")
    return int(match.group(1))


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint .pt files in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if _NAME.match(p.name)), key=checkpoint_step)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(checkpoint_dir(run_dir))
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A .pt file as given, or the newest checkpoint of a run directory; ValueError otherwise."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"{path} holds no checkpoint (expected {checkpoint_dir(path)}/step-*.pt)")
        return latest
    raise ValueError(f"{path} is neither a checkpoint file nor a run directory")


def load_newest(path: str | os.PathLike, with_buffer: bool = True) -> tuple[Path, dict, object]:
    """``resolve_checkpoint``, ``load_checkpoint`` and, ``with_buffer``, the replay buffer it names
    (None if it names none). A run that is still going keeps only its newest checkpoint, and may
    remove the one found here before it and its buffer are read: then the one that replaced it is
    read."""
    from fastdqn.replay import PrioritizedReplayBuffer, ReplayBuffer

    attempts = 10
    while True:
        found = resolve_checkpoint(path)
        try:
            state = load_checkpoint(found, with_buffer=with_buffer)
            buffer = None
            if with_buffer and state["buffer_path"]:
                loader = PrioritizedReplayBuffer if state["config"].get("prioritized") else ReplayBuffer
                buffer = loader.load(state["buffer_path"])
            return found, state, buffer
        except (OSError, ValueError):
            attempts -= 1
            if found.exists() or not Path(path).is_dir() or not attempts:
                raise


def load_checkpoint(path: str | os.PathLike, map_location="cpu", with_buffer: bool = True) -> dict:
    """The state saved by ``save_checkpoint`` (or ``DQN.save``), loaded without running code.
    ``state["buffer_path"]`` is the buffer file's full path, or None; ``with_buffer``: that file
    must be there (a ValueError otherwise; without it, the .pt alone is read, as to evaluate)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:  # the file could not be read at all: that error as it is
        raise
    except Exception as e:  # torch raises several types for files that are not checkpoints
        first = (str(e).splitlines() or [""])[0]
        # Not torch's advice to load with weights_only=False, which would run code from the file.
        reason = type(e).__name__ if not first or "weights_only" in first.lower() or "weights only" in first.lower() \
            else f"{type(e).__name__}: {first}"
        raise ValueError(f"{path} is not a fastdqn checkpoint (torch.load could not read it: {reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastdqn checkpoint")
    if state.get("version") != VERSION:
        raise ValueError(f"{path} has checkpoint version {state.get('version')}, this fastdqn reads {VERSION}")
    buffer_file = state.get("buffer_file")
    state["buffer_path"] = str(path.parent / buffer_file) if buffer_file else None
    if with_buffer and buffer_file and not os.path.exists(state["buffer_path"]):
        raise ValueError(f"{path} names replay buffer {buffer_file}, which is missing")
    return state


def encode_state(state: dict) -> bytes:
    """``state`` serialized as a checkpoint file's bytes (for ``DQN.save``)."""
    data = io.BytesIO()
    torch.save(dict(state, format=FORMAT, version=VERSION, buffer_file=None), data)
    return data.getvalue()


def capture_rng(np_rng: np.random.Generator) -> dict:
    """Every RNG the training loop draws from, as plain data."""
    rng = {"python": random.getstate(), "numpy": np_rng.bit_generator.state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict, np_rng: np.random.Generator) -> None:
    random.setstate(_as_tuple(rng["python"]))
    np_rng.bit_generator.state = rng["numpy"]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
