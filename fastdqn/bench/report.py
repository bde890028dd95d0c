"""What every benchmark records about its machine, and how it writes its results."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import subprocess
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


def write_report(out_dir: str | os.PathLike, stem: str, report: dict, markdown: str) -> Path:
    """Writes ``stem.json`` and ``stem.md`` into ``out_dir`` atomically; returns their common base."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = out / stem
    atomic_write_bytes(base.with_suffix(".json"), (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(base.with_suffix(".md"), markdown.encode())
    return base
