"""What every benchmark records about its machine, and how it writes its results."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from fastdqn.metrics import atomic_write_bytes


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def slug(text: str) -> str:
    """A short file-name form of a CPU or GPU name: "AMD EPYC 7B13" -> "amd-epyc-7b13"."""
    text = re.sub(r"\(r\)|\(tm\)|\bcpu\b|processor|nvidia|@.*", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_describe() -> str | None:
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError):
        return None


def machine_info(packages: tuple[str, ...] = ()) -> dict:
    """CPU, cores, memory, load, GPU (when torch sees one), software versions and a slug
    naming the machine: the GPU where there is one, else the CPU and its core count (which
    ``cpu_slug`` always is)."""
    cpu, cores = cpu_model(), os.cpu_count()
    cpu_slug = f"{slug(cpu)}-{cores}c"
    info = {"cpu": cpu, "cores": cores, "memory_gb": _memory_gb(), "load_avg_1m": round(os.getloadavg()[0], 2),
            "platform": platform.platform(), "python": platform.python_version(), "git": _git_describe(),
            "versions": {name: _version(name) for name in ("fastdqn", "numpy", "torch", *packages)},
            "slug": cpu_slug, "cpu_slug": cpu_slug}
    try:
        import torch
    except ImportError:
        return info
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, slug=slug(torch.cuda.get_device_name()))
    return info


def busy_lines(machine: dict) -> list[str]:
    """A paragraph for the report when other work was running as the benchmark started (its
    systems then get unequal shares of the cores, and their ratios can be far off), else []."""
    load, cores = machine.get("load_avg_1m"), machine.get("cores")
    if load is None or not cores or load <= 0.25 * cores:
        return []
    return [f"**The machine was busy:** a 1-min load average of {load} on {cores} cores at the start. The systems "
            "compete with other work for the cores, unequally, so their rates and ratios may be far off; rerun "
            "on a quiet machine.", ""]


def machine_name(machine: dict, device: str, given: str | None) -> str:
    """The machine's name in a report's file name: ``given`` (``--machine``), else the GPU's
    for a run on CUDA and the CPU's (model and cores) for a run on the CPU, also on a GPU
    machine, so that the two never share a name."""
    if given:
        return slug(given)
    if str(device).startswith("cuda:"):
        import torch

        return slug(torch.cuda.get_device_name(torch.device(device)))  # cuda:N's own, on a mixed machine
    return machine["slug"] if str(device) == "cuda" else machine["cpu_slug"]


def command_line(benchmark: str, argv: list[str] | None) -> str:
    """The command that ran the benchmark, for its report."""
    return shlex.join(["fastdqn", "bench", benchmark, *(sys.argv[1:] if argv is None else argv)])


def device_error(device: str) -> str | None:
    """Why ``--device`` cannot be used here, or None."""
    import torch

    if device != "auto" and not re.fullmatch(r"cpu|cuda(:[0-9]+)?", device):
        return f"--device must be auto, cpu, cuda or cuda:N, got {device!r}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"--device {device}: no CUDA device is available"
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def report_stem(benchmark: str, machine: str, changed: list[str], started: datetime.datetime) -> str:
    """The file stem of a run's report: ``benchmark-machine`` for a run of the benchmark's
    default settings (the run the README quotes). A run that ``changed`` some (their flags,
    a peer that is not installed, a system that failed) also gets its start time, so that it
    never replaces a full run's report."""
    stem = f"{benchmark}-{machine}"
    return f"{stem}-{started.strftime('%Y%m%dT%H%M%S%fZ')}" if changed else stem


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """Makes ``out_dir`` and checks that a file can be written there, before any work is
    done: raises ValueError naming it otherwise. ``""`` asks for no report: nothing to check."""
    if str(out_dir) == "":
        return
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise ValueError(f"--out {str(out)!r} cannot hold the report: {error.strerror or error}") from None


def write_report(out_dir: str | os.PathLike, stem: str, report: dict, markdown: str, complete: bool = True,
                 started_as: str | None = None) -> Path | None:
    """Writes ``stem.json`` and ``stem.md`` into ``out_dir`` atomically; returns their common
    base. A report written while the run goes on (``complete=False``, so that a run cut short
    keeps what it measured) is ``stem-incomplete.*``: it replaces no finished run's report,
    and the complete one removes it (``started_as``'s, if the run's stem changed at the end).
    ``out_dir=""`` writes nothing (returns None)."""
    if str(out_dir) == "":
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = out / (stem if complete else f"{stem}-incomplete")
    atomic_write_bytes(base.with_name(base.name + ".json"), (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(base.with_name(base.name + ".md"), markdown.encode())
    if complete:
        partial = out / f"{started_as or stem}-incomplete"
        for suffix in (".json", ".md"):
            partial.with_name(partial.name + suffix).unlink(missing_ok=True)
    return base
