"""What every benchmark records about its machine, and how it writes its results."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
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
    naming the machine: the GPU where there is one, else the CPU and its core count."""
    cpu, cores = cpu_model(), os.cpu_count()
    info = {"cpu": cpu, "cores": cores, "memory_gb": _memory_gb(), "load_avg_1m": round(os.getloadavg()[0], 2),
            "platform": platform.platform(), "python": platform.python_version(), "git": _git_describe(),
            "versions": {name: _version(name) for name in ("fastdqn", "numpy", "torch", *packages)},
            "slug": f"{slug(cpu)}-{cores}c"}
    try:
        import torch
    except ImportError:
        return info
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, slug=slug(torch.cuda.get_device_name()))
    return info


def busy_warning(machine: dict) -> str | None:
    """A line for the report when other work was running as the benchmark started: its
    systems then get unequal shares of the cores, and their ratios can be far off."""
    load, cores = machine.get("load_avg_1m"), machine.get("cores")
    if load is None or not cores or load <= 0.25 * cores:
        return None
    return (f"**The machine was busy:** a 1-min load average of {load} on {cores} cores at the start. The systems "
            "compete with other work for the cores, unequally, so their rates and ratios may be far off; rerun "
            "on a quiet machine.")


def report_stem(benchmark: str, machine: str, changed: list[str], started: datetime.datetime) -> str:
    """The file stem of a run's report: ``benchmark-machine`` for a run of the benchmark's
    default settings (the run the README quotes). A run that ``changed`` some (their flags)
    also gets its start time, so that it never replaces a full run's report."""
    stem = f"{benchmark}-{machine}"
    return f"{stem}-{started.strftime('%Y%m%dT%H%M%SZ')}" if changed else stem


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """Makes ``out_dir`` and checks that a file can be written there, before any work is
    done: raises ValueError naming it otherwise."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise ValueError(f"--out {str(out)!r} cannot hold the report: {error.strerror or error}") from None


def write_report(out_dir: str | os.PathLike, stem: str, report: dict, markdown: str) -> Path:
    """Writes ``stem.json`` and ``stem.md`` into ``out_dir`` atomically; returns their common base."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = out / stem
    atomic_write_bytes(base.with_suffix(".json"), (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(base.with_suffix(".md"), markdown.encode())
    return base
