"""Replay-buffer benchmark: fastdqn against SB3, cpprb and TorchRL, side by side in one run.

    python benchmarks/buffer.py            # or: fastdqn bench buffer
    python benchmarks/buffer.py --quick    # a smoke run in seconds

Every buffer is fed the same synthetic Atari stream (observations (4, 84, 84) uint8 with
frame_stack=4, 8 envs adding together, episodes ending at random) and asked for batches the
way a learner needs them: as torch tensors. Each implementation runs in its own fresh
process, one after another, so that no buffer's memory, threads or allocator state disturb
another's numbers. All rates are medians over ``--repeats`` timed repeats after a warmup.
The stream and the implementations under test are in ``fastdqn.bench.buffer_subjects``.

Sections (``--sections``):
- uniform: add throughput (transitions/s, steady state: the buffer is full and overwriting),
  sample throughput at each batch size (batches/s, from the call until the learner holds torch
  tensors of obs, actions, rewards, next_obs, ...), and memory (growth of the process's
  resident set while filling, per transition held). fastdqn is measured four ways: ``sample``,
  ``sample(out=)`` into arrays preallocated once and shared with torch tensors, ``prefetch``
  (batches/s the C++ worker sustains while the caller does nothing else), and
  ``sample_frames(out=)`` (obs and next_obs sharing their frames).
  The memory-copy limit is this machine's single-thread copy speed for the same bytes in the
  same pattern: a numpy gather of the sampled frame rows into preallocated arrays.
- prioritized: proportional prioritized replay, sample and sample plus update_priorities.
- save: fastdqn's save and load throughput for a large buffer, against raw disk speed.

The report goes to ``--out``/buffer-<machine>.json and .md (ratios fastdqn/peer computed
within the run); ``--json`` also prints the JSON. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import gc
import importlib.util
import itertools
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from time import perf_counter

import numpy as np

from fastdqn.bench.buffer_subjects import (FRAME_BYTES, FRAME_SIDE, FRAME_STACK, NUM_ENVS, SUBJECTS, AtariStream,
                                          FastDQN, Subject)
from fastdqn.bench.report import busy_lines, check_out_dir, command_line, machine_info, report_stem, slug, write_report
from fastdqn.config import int_at_least
from fastdqn.signals import die_with_parent

SCHEMA = 1
IMPLS = ("fastdqn", "sb3", "cpprb", "torchrl")
SECTIONS = ("uniform", "prioritized", "save")
VARIANT_NAMES = {"sample": "`sample`", "sample_out": "`sample(out=)`", "prefetch": "`prefetch`",
                 "frames_out": "`sample_frames(out=)`"}  # the ways fastdqn is sampled


def payload_bytes(batch_size: int) -> int:
    """Bytes of obs plus next_obs in a batch: what GB/s figures count."""
    return 2 * batch_size * FRAME_STACK * FRAME_BYTES


@dataclass
class Settings:
    """What one benchmark run measures, and how long it spends on each number."""

    capacity: int = 100_000
    """Transitions each buffer holds."""
    fill: int | None = None
    """Transitions added before sampling starts (default: capacity)."""
    batch_sizes: tuple[int, ...] = (32, 256)
    """Batch sizes sampled."""
    repeats: int = 5
    """Timed repeats per measurement; the report gives their median, min and max."""
    repeat_seconds: float = 0.5
    """Approximate length of one timed repeat."""
    warmup_seconds: float = 0.3
    """Untimed calls before the repeats (they also size the repeats)."""
    mean_episode: int = 500
    """Mean episode length in agent steps; episodes end at random, one end in ten a truncation."""
    impls: tuple[str, ...] = IMPLS
    """Implementations to run; peers that are not installed are skipped."""
    sections: tuple[str, ...] = SECTIONS
    """Sections to run: uniform, prioritized, save."""
    save_capacity: int = 200_000
    """Transitions in the buffer that is saved and loaded (about 7 KB each)."""
    save_repeats: int = 3
    """Timed saves and loads."""
    tmpdir: str | None = None
    """Directory for the save/load file (default: the system's temporary directory)."""
    seed: int = 0
    """Seeds the synthetic stream and every buffer's sampler."""
    torch_threads: int = 0
    """torch.set_num_threads in each worker; 0 keeps torch's default (SB3 and TorchRL copy with torch)."""

    def __post_init__(self):
        if self.fill is None:
            self.fill = self.capacity
        self.batch_sizes = tuple(self.batch_sizes)
        self.impls = tuple(self.impls)
        self.sections = tuple(self.sections)
        for name in ("capacity", "save_capacity"):
            value = getattr(self, name)
            if value <= 0 or value % NUM_ENVS:
                raise ValueError(f"{name} must be a positive multiple of {NUM_ENVS} (the envs), got {value}")
        if not 2 * NUM_ENVS * FRAME_STACK <= self.fill <= self.capacity or self.fill % NUM_ENVS:
            raise ValueError(
                f"fill must be a multiple of {NUM_ENVS} between {2 * NUM_ENVS * FRAME_STACK} and "
                f"capacity={self.capacity}, got {self.fill}"
            )
        if not self.batch_sizes or min(self.batch_sizes) <= 0:
            raise ValueError(f"batch_sizes must be positive integers, got {self.batch_sizes}")
        if self.repeats <= 0 or self.save_repeats <= 0:
            raise ValueError(f"repeats and save_repeats must be positive, got {self.repeats}, {self.save_repeats}")
        if not (0 < self.repeat_seconds < math.inf and 0 <= self.warmup_seconds < math.inf):
            raise ValueError(f"repeat_seconds must be > 0 and warmup_seconds >= 0, both finite; got "
                             f"{self.repeat_seconds} and {self.warmup_seconds}")
        if self.tmpdir is not None and not os.path.isdir(self.tmpdir):
            raise ValueError(f"tmpdir {self.tmpdir!r} is not a directory")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0 (0: torch's default), got {self.torch_threads}")
        if self.mean_episode < 1:
            raise ValueError(f"mean_episode must be >= 1, got {self.mean_episode}")
        for name, allowed in (("impls", IMPLS), ("sections", SECTIONS)):
            unknown = set(getattr(self, name)) - set(allowed)
            if unknown:
                raise ValueError(f"{name}: unknown {sorted(unknown)}; choose from {list(allowed)}")


QUICK = dict(capacity=4096, fill=4000, repeats=2, repeat_seconds=0.05, warmup_seconds=0.02,
             save_capacity=4096, save_repeats=1)


class Log:
    """Progress lines on stderr, prefixed with the clock and who is speaking."""

    def __init__(self, who: str):
        self.who = who

    def __call__(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {self.who}: {message}", file=sys.stderr, flush=True)


# --- measuring ----------------------------------------------------------------------------


def measure(call, settings: Settings, per_call: float = 1.0) -> dict:
    """Rate of call() in calls/s times per_call: median, min and max over the timed repeats."""
    start, calls = perf_counter(), 0
    while calls < 2 or perf_counter() - start < settings.warmup_seconds:
        call()
        calls += 1
    per_repeat = max(1, round(settings.repeat_seconds * calls / (perf_counter() - start)))
    rates = []
    for _ in range(settings.repeats):
        start = perf_counter()
        for _ in range(per_repeat):
            call()
        rates.append(per_repeat * per_call / (perf_counter() - start))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "repeats": settings.repeats, "calls_per_repeat": per_repeat}


def frame_bytes(batch) -> int:
    """Bytes of uint8 arrays (the frames) in a sampled batch, whatever containers it comes in."""
    if batch is None or isinstance(batch, (str, bytes, int, float)):
        return 0
    if str(getattr(batch, "dtype", "")) in ("uint8", "torch.uint8"):
        return int(batch.nbytes)
    if type(batch).__module__.startswith("tensordict"):
        return sum(frame_bytes(leaf) for leaf in batch.values(include_nested=True, leaves_only=True))
    if isinstance(batch, dict):
        return sum(frame_bytes(value) for value in batch.values())
    if dataclasses.is_dataclass(batch):
        return sum(frame_bytes(getattr(batch, field.name)) for field in dataclasses.fields(batch))
    if isinstance(batch, (list, tuple)):
        return sum(frame_bytes(item) for item in batch)
    return 0


def _with_bandwidth(stats: dict, batch_size: int) -> dict:
    return {**stats, "transitions_per_s": stats["median"] * batch_size,
            "gbps": stats["median"] * payload_bytes(batch_size) / 1e9}


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _memory_shortfall(needed_bytes: float) -> str | None:
    available = _meminfo("MemAvailable")
    if available is not None and needed_bytes > 0.85 * available:
        return f"needs about {needed_bytes / 1e9:.1f} GB, {available / 1e9:.1f} GB available"
    return None


def _fill(subject: Subject, transitions: int, log: Log) -> dict:
    steps = transitions // NUM_ENVS
    start = perf_counter()
    next_report = start + 5.0
    for i in range(steps):
        subject.add(i)
        if i % 64 == 0 and perf_counter() > next_report:
            log(f"filling {i * NUM_ENVS:,}/{transitions:,} transitions")
            next_report += 5.0
    seconds = perf_counter() - start
    return {"steps": steps, "seconds": seconds, "per_s": steps * NUM_ENVS / seconds}


def _bench_uniform(subject: Subject, settings: Settings, log: Log) -> dict:
    rss_before = _rss_bytes()
    subject.build(settings.capacity, prioritized=False, seed=settings.seed)
    fill = _fill(subject, settings.fill, log)
    rss_after = _rss_bytes()
    result = {"status": "ok", "config": subject.config, "held": subject.held(),
              "fill_per_s": fill["per_s"], "fill_seconds": fill["seconds"]}
    result["bytes_per_transition"] = None if rss_before is None else (rss_after - rss_before) / result["held"]
    log(f"filled {result['held']:,} transitions in {fill['seconds']:.1f} s; "
        f"{_fmt_bytes(result['bytes_per_transition'])} per transition (RSS growth)")
    step = itertools.count(fill["steps"])
    result["add"] = measure(lambda: subject.add(next(step)), settings, per_call=NUM_ENVS)
    log(f"add: {_fmt_rate(result['add']['median'])} transitions/s")
    result["sample"] = {}
    for variant, sampler in subject.samplers().items():
        result["sample"][variant] = {}
        for batch_size in settings.batch_sizes:
            with sampler(batch_size) as call:
                returned = frame_bytes(call())  # what a batch carries: the GB/s below assume obs + next_obs
                stats = {**_with_bandwidth(measure(call, settings), batch_size), "frame_bytes": returned}
            result["sample"][variant][str(batch_size)] = stats
            log(f"{variant}({batch_size}): {_fmt_rate(stats['median'])} batches/s "
                f"[{_fmt_rate(stats['min'])}..{_fmt_rate(stats['max'])}], {stats['gbps']:.2f} GB/s")
    return result


def _bench_prioritized(subject: Subject, settings: Settings, log: Log) -> dict:
    subject.build(settings.capacity, prioritized=True, seed=settings.seed)
    fill = _fill(subject, settings.fill, log)
    result = {"status": "ok", "config": subject.prioritized_config, "held": subject.held(),
              "fill_per_s": fill["per_s"]}
    step = itertools.count(fill["steps"])
    result["add"] = measure(lambda: subject.add(next(step)), settings, per_call=NUM_ENVS)
    log(f"prioritized add: {_fmt_rate(result['add']['median'])} transitions/s")
    rng = np.random.default_rng(settings.seed)
    result["sample"], result["sample_update"] = {}, {}
    for batch_size in settings.batch_sizes:
        # |TD errors| of a learner: positive, spread over a few orders of magnitude.
        priorities = np.abs(rng.standard_normal(batch_size)).astype(np.float32) + 1e-3
        sample, sample_and_update = subject.prioritized_calls(batch_size, priorities)
        for key, call in (("sample", sample), ("sample_update", sample_and_update)):
            stats = _with_bandwidth(measure(call, settings), batch_size)
            result[key][str(batch_size)] = stats
            log(f"prioritized {key}({batch_size}): {_fmt_rate(stats['median'])} batches/s")
    return result


def _evict_from_page_cache(directory: str) -> bool:
    """Drops the files' clean pages from the page cache so that the next read comes from disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


def _directory_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(directory) for name in files)


def _disk_speed(directory: str, nbytes: int, repeats: int) -> dict:
    """Raw write (with fsync) and cold read speed of a file of nbytes: the limit for save and load."""
    chunk = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8)
    path = os.path.join(directory, "disk-speed.bin")
    writes, reads = [], []
    for _ in range(repeats):
        start = perf_counter()
        with open(path, "wb") as f:
            for offset in range(0, nbytes, chunk.nbytes):
                f.write(chunk[: min(chunk.nbytes, nbytes - offset)])
            f.flush()
            os.fsync(f.fileno())
        writes.append(nbytes / (perf_counter() - start) / 1e9)
        with tempfile.TemporaryDirectory(dir=directory) as only:
            os.replace(path, os.path.join(only, "f"))
            _evict_from_page_cache(only)
            start = perf_counter()
            with open(os.path.join(only, "f"), "rb", buffering=0) as f:
                while f.readinto(chunk):
                    pass
            reads.append(nbytes / (perf_counter() - start) / 1e9)
    return {"write_gbps": statistics.median(writes), "read_gbps": statistics.median(reads)}


def _bench_save_load(stream: AtariStream, settings: Settings, log: Log) -> dict:
    import fastdqn

    buffer_bytes = settings.save_capacity * FastDQN.bytes_estimate
    shortfall = _memory_shortfall(buffer_bytes)
    free_disk = shutil.disk_usage(settings.tmpdir or tempfile.gettempdir()).free
    if not shortfall and free_disk < 2.5 * buffer_bytes:  # the saved file and the raw-disk reference file
        shortfall = f"needs about {2.5 * buffer_bytes / 1e9:.1f} GB of disk, {free_disk / 1e9:.1f} GB free"
    if shortfall:
        return {"status": f"skipped: {shortfall}"}
    subject = FastDQN(stream)
    subject.build(settings.save_capacity, prioritized=False, seed=settings.seed)
    _fill(subject, settings.save_capacity, log)
    held = subject.held()
    saves, loads = [], []
    with tempfile.TemporaryDirectory(prefix="fastdqn-bench-", dir=settings.tmpdir) as tmp:
        target = os.path.join(tmp, "saved")
        os.mkdir(target)
        path = os.path.join(target, "buffer.fastdqn")
        for _ in range(settings.save_repeats):
            start = perf_counter()
            subject.buf.save(path)
            saves.append(perf_counter() - start)
        file_bytes = _directory_bytes(target)
        log(f"saved {held:,} transitions, {file_bytes / 1e9:.2f} GB, in {statistics.median(saves):.2f} s")
        subject.release()  # load without holding the original: a 7 GB buffer must not need twice the memory
        cold = True
        for _ in range(settings.save_repeats):
            cold = _evict_from_page_cache(target) and cold
            start = perf_counter()
            loaded = fastdqn.ReplayBuffer.load(path)
            loads.append(perf_counter() - start)
            if len(loaded) != held:
                raise RuntimeError(f"loaded buffer holds {len(loaded)} transitions, saved {held}")
            del loaded
            gc.collect()
        log(f"loaded in {statistics.median(loads):.2f} s ({'cold' if cold else 'warm'} page cache)")
        disk = _disk_speed(tmp, file_bytes, settings.save_repeats)
    save_gbps, load_gbps = file_bytes / statistics.median(saves) / 1e9, file_bytes / statistics.median(loads) / 1e9
    log(f"save {save_gbps:.2f} GB/s, load {load_gbps:.2f} GB/s; disk write {disk['write_gbps']:.2f}, "
        f"read {disk['read_gbps']:.2f} GB/s")
    return {"status": "ok", "transitions": held, "file_bytes": file_bytes, "save_seconds": saves,
            "load_seconds": loads, "save_gbps": save_gbps, "load_gbps": load_gbps,
            "load_page_cache": "cold (evicted with posix_fadvise)" if cold else "warm",
            "disk_write_gbps": disk["write_gbps"], "disk_read_gbps": disk["read_gbps"]}


def _bench_compression(settings: Settings, log: Log) -> dict:
    """Uncompressed against zstd files of a buffer of real Breakout frames (synthetic noise does not compress)."""
    try:
        import zstandard  # noqa: F401
        from fastdqn.envs import make_env
    except ImportError as error:
        return {"status": f"skipped: {error}"}
    import fastdqn

    transitions = max(NUM_ENVS * 64, settings.save_capacity // 10)
    buf = fastdqn.ReplayBuffer(transitions, (FRAME_STACK, FRAME_SIDE, FRAME_SIDE), frame_stack=FRAME_STACK,
                               num_envs=NUM_ENVS, seed=settings.seed)
    rng = np.random.default_rng(settings.seed)
    with make_env("Breakout-v5", NUM_ENVS, seed=settings.seed) as env:
        obs = env.reset()
        for _ in range(transitions // NUM_ENVS):  # fills the ring (each episode's first frame takes a slot too)
            actions = rng.integers(0, env.num_actions, NUM_ENVS)
            step = env.step(actions)
            ids = np.flatnonzero(step.valid)
            buf.add(obs[ids], actions[ids], step.rewards[ids], step.next_obs[ids], step.terminated[ids],
                    step.truncated[ids], env_ids=ids)
            obs = step.obs
    log(f"compression: {len(buf):,} transitions of random-policy Breakout")
    result = {"status": "ok", "transitions": len(buf)}
    with tempfile.TemporaryDirectory(prefix="fastdqn-bench-", dir=settings.tmpdir) as tmp:
        for compression in ("none", "zstd"):
            path = os.path.join(tmp, compression)
            start = perf_counter()
            buf.save(path, compression=compression)
            saved = perf_counter() - start
            _evict_from_page_cache(tmp)
            start = perf_counter()
            fastdqn.ReplayBuffer.load(path)
            result[compression] = {"file_bytes": os.path.getsize(path), "save_seconds": saved,
                                   "load_seconds": perf_counter() - start}
            log(f"compression={compression}: {result[compression]}")
    return result


def _run_section(log: Log, run):
    try:
        return run()
    except Exception as error:  # a peer's failure is recorded and the run goes on
        log("".join(traceback.format_exception(error)).rstrip())
        return {"status": f"failed: {type(error).__name__}: {error}"}


def _run_implementation(name: str, settings: Settings) -> dict:
    """Runs one implementation's sections in this (fresh) process and returns their results."""
    import torch  # every implementation hands the learner torch tensors

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    log = Log(name)
    stream = AtariStream(settings.mean_episode, settings.seed)
    subject_class = SUBJECTS[name]
    subject = subject_class(stream)
    results = {"torch_threads": torch.get_num_threads()}
    for section in settings.sections:
        if section == "save":
            if name == "fastdqn":
                results["save"] = _run_section(log, lambda: _bench_save_load(stream, settings, log))
                results["save"]["compression"] = _run_section(log, lambda: _bench_compression(settings, log))
            continue
        if section == "prioritized" and not subject_class.prioritized_config:
            results[section] = {"status": f"skipped: {subject_class.label} has no prioritized replay buffer"}
            continue
        shortfall = _memory_shortfall(settings.capacity * subject_class.bytes_estimate)
        if shortfall:
            results[section] = {"status": f"skipped: {shortfall}"}
            log(results[section]["status"])
            continue
        bench = _bench_uniform if section == "uniform" else _bench_prioritized
        try:  # a small probe tells a missing feature (a skip) from a failure while measuring
            subject.build(1024, prioritized=section == "prioritized", seed=settings.seed)
        except Exception as error:  # a missing feature: say why and go on
            results[section] = {"status": f"skipped: cannot build: {type(error).__name__}: {error}"}
            log(results[section]["status"])
            continue
        finally:
            subject.release()
        results[section] = _run_section(log, lambda: bench(subject, settings, log))
        subject.release()
    return results


def _run_memcopy(settings: Settings) -> dict:
    """This machine's copy speed for the bytes a batch carries, in the same gather pattern."""
    log = Log("memcopy")
    # A frame table as large as the buffers' (content does not change copy speed; full() touches it).
    frames = np.full((settings.fill + FRAME_STACK, FRAME_BYTES), 7, dtype=np.uint8)
    block = frames[: max(1, min(len(frames), (256 << 20) // FRAME_BYTES))]
    target = np.empty_like(block)
    contiguous = measure(lambda: np.copyto(target, block), settings)
    result = {"status": "ok", "contiguous_gbps": contiguous["median"] * block.nbytes / 1e9, "gather": {}}
    log(f"contiguous copy: {result['contiguous_gbps']:.2f} GB/s")
    del target
    rng = np.random.default_rng(settings.seed)
    offsets = np.arange(FRAME_STACK)
    for batch_size in settings.batch_sizes:
        rows = [np.add.outer(rng.integers(0, settings.fill, batch_size), offsets).ravel() for _ in range(64)]
        next_rows = [r + 1 for r in rows]
        obs = np.empty((batch_size * FRAME_STACK, FRAME_BYTES), np.uint8)
        next_obs = np.empty_like(obs)
        which = itertools.cycle(range(len(rows)))

        def gather():
            k = next(which)
            # mode="clip": with the default mode="raise" numpy buffers `out` (an extra copy).
            np.take(frames, rows[k], axis=0, out=obs, mode="clip")
            np.take(frames, next_rows[k], axis=0, out=next_obs, mode="clip")

        stats = _with_bandwidth(measure(gather, settings), batch_size)
        result["gather"][str(batch_size)] = stats
        log(f"gather({batch_size}): {_fmt_rate(stats['median'])} batches/s, {stats['gbps']:.2f} GB/s")
    return result


def _combine_memcopy(runs: list[dict]) -> dict:
    """The memory-copy limit from runs before and after the implementations: the faster of each number."""
    done = [run for run in runs if run.get("status") == "ok"]
    if not done:
        return runs[0] if runs else {"status": "skipped: not selected"}
    return {"status": "ok", "runs": runs, "contiguous_gbps": max(run["contiguous_gbps"] for run in done),
            "gather": {size: max((run["gather"][size] for run in done), key=lambda stats: stats["median"])
                       for size in done[0]["gather"]}}


def _start_worker(parent_pid: int) -> None:
    """Sends a worker's stdout (peers log there) to stderr, keeping the parent's stdout for
    --json; the worker dies with the parent (stopped by SIGTERM, it runs no cleanup)."""
    die_with_parent(parent_pid)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


def _in_fresh_process(function, *args):
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_start_worker,
                                                initargs=(os.getpid(),)) as pool:
        return pool.submit(function, *args).result()


# --- the report ---------------------------------------------------------------------------


def _median(section: dict | None, *keys) -> float | None:
    node = section
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node["median"] if isinstance(node, dict) else node


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _best_sample(entry: dict, size: str) -> float | None:
    rates = [_median(entry, "sample", variant, size) for variant in VARIANT_NAMES]
    return max((rate for rate in rates if rate is not None), default=None)


def compute_ratios(report: dict) -> dict:
    """fastdqn/peer ratios (above 1: fastdqn is faster or smaller) from the run's own numbers."""
    uniform, prioritized = report["uniform"], report["prioritized"]
    ours = uniform.get("fastdqn", {})
    sizes = [str(b) for b in report["settings"]["batch_sizes"]]
    ratios = {"uniform": {}, "prioritized": {}, "memcopy_fraction": {}}
    for peer in IMPLS[1:]:
        theirs = uniform.get(peer, {})
        entry = {"add": _ratio(_median(ours, "add"), _median(theirs, "add")),
                 "memory": _ratio(theirs.get("bytes_per_transition"), ours.get("bytes_per_transition"))}
        for size in sizes:
            entry[f"sample_{size}"] = _ratio(_median(ours, "sample", "sample", size),
                                             _median(theirs, "sample", "sample", size))
            entry[f"best_sample_{size}"] = _ratio(_best_sample(ours, size), _best_sample(theirs, size))
        ratios["uniform"][peer] = entry
        theirs = prioritized.get(peer, {})
        ratios["prioritized"][peer] = {
            f"{key}_{size}": _ratio(_median(prioritized.get("fastdqn"), key, size), _median(theirs, key, size))
            for key in ("sample", "sample_update") for size in sizes}
    for variant in VARIANT_NAMES:
        ratios["memcopy_fraction"][variant] = {
            size: _ratio(_median(ours, "sample", variant, size), _median(report["memcopy"], "gather", size))
            for size in sizes}
    save = report.get("save", {})
    ratios["save_vs_disk"] = _ratio(save.get("save_gbps"), save.get("disk_write_gbps"))
    ratios["load_vs_disk"] = _ratio(save.get("load_gbps"), save.get("disk_read_gbps"))
    return ratios


def check_targets(report: dict) -> list[dict]:
    """The issues' targets, each with the measured value and whether it is met (None: not measured)."""
    ratios, sizes = report["ratios"], [str(b) for b in report["settings"]["batch_sizes"]]
    targets = []

    def target(text, value, threshold):
        targets.append({"target": text, "measured": value, "threshold": threshold,
                        "met": None if value is None else value >= threshold})

    for size in ("256", "32"):
        if size in sizes:
            target(f"plain sample({size}) >= 2x SB3", ratios["uniform"]["sb3"][f"sample_{size}"], 2.0)
            target(f"plain sample({size}) >= 3x cpprb", ratios["uniform"]["cpprb"][f"sample_{size}"], 3.0)
    for size in sizes:
        target(f"sample(out=) at batch {size} >= 80% of the memory-copy limit",
               ratios["memcopy_fraction"]["sample_out"][size], 0.8)
    target("add >= 3x SB3", ratios["uniform"]["sb3"]["add"], 3.0)
    if "256" in sizes:
        peers = [r["sample_256"] for r in ratios["prioritized"].values() if r["sample_256"] is not None]
        target("prioritized sample(256) >= 2x the best peer", min(peers) if peers else None, 2.0)
    target("save at disk speed (>= 80% of raw write)", ratios["save_vs_disk"], 0.8)
    target("load at disk speed (>= 80% of raw read)", ratios["load_vs_disk"], 0.8)
    return targets


def _fmt_rate(value: float | None) -> str:
    if value is None:
        return "–"
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _fmt_bytes(value: float | None) -> str:
    return "–" if value is None else f"{value / 1e3:.1f} KB"


def _fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def render_markdown(report: dict) -> str:
    machine, settings, versions = report["machine"], report["settings"], report["machine"]["versions"]
    sizes = [str(b) for b in settings["batch_sizes"]]
    uniform, prioritized = report["uniform"], report["prioritized"]
    labels = {cls.name: cls.label for cls in SUBJECTS.values()}
    lines = [
        f"# Replay-buffer benchmark: {machine['cpu_slug']}",
        "",
        f"{report['started']}; {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB; "
        f"Python {machine['python']}, numpy {versions['numpy']}, torch {versions['torch']} "
        f"(torch threads: {report.get('torch_threads')}); fastdqn {versions['fastdqn']} ({machine['git']}); "
        + ", ".join(f"{label} {versions[name] or 'not installed'}" for label, name in
                    (("SB3", "stable-baselines3"), ("cpprb", "cpprb"), ("TorchRL", "torchrl"))) + ".",
        "",
        *busy_lines(machine),
        f"Atari shapes: obs (4, 84, 84) uint8, frame_stack 4, {NUM_ENVS} envs adding together, mean episode "
        f"{settings['mean_episode']} steps. Each buffer holds {settings['capacity']:,} transitions and is filled with "
        f"{settings['fill']:,}. Rates are medians of {settings['repeats']} timed repeats of about "
        f"{settings['repeat_seconds']} s after a warmup; each implementation runs alone in a fresh process. "
        "Sample rates include handing the learner torch tensors; GB/s counts obs + next_obs.",
        "",
        "## Uniform replay",
        "",
        "| buffer | add (transitions/s) | " + " | ".join(f"sample({s}) batches/s (GB/s)" for s in sizes)
        + " | memory per transition |",
        "|---|---:|" + "---:|" * len(sizes) + "---:|",
    ]
    for name in settings["impls"]:
        entry = uniform.get(name, {})
        if entry.get("status") != "ok":
            lines.append(f"| {labels[name]} | {entry.get('status', 'not run')} |" + " |" * (len(sizes) + 1))
            continue
        for i, (variant, by_size) in enumerate(entry["sample"].items()):
            label = labels[name] + (f" {VARIANT_NAMES[variant]}" if len(entry["sample"]) > 1 else "")
            first = i == 0
            cells = [f"{_fmt_rate(by_size[s]['median'])} ({by_size[s]['gbps']:.2f})" for s in sizes]
            lines.append(f"| {label} | {_fmt_rate(entry['add']['median']) if first else ''} | " + " | ".join(cells)
                         + f" | {_fmt_bytes(entry['bytes_per_transition']) if first else ''} |")
    memcopy = report["memcopy"]
    if memcopy.get("status") == "ok":
        cells = [f"{_fmt_rate(memcopy['gather'][s]['median'])} ({memcopy['gather'][s]['gbps']:.2f})" for s in sizes]
        lines.append("| memory-copy limit (numpy gather) | | " + " | ".join(cells) + " | |")
        lines += ["", f"Contiguous memory copy on this machine: {memcopy['contiguous_gbps']:.2f} GB/s."]
    ratios = report["ratios"]
    lines += ["", "### fastdqn / peer, same run", "",
              "| peer | add | " + " | ".join(f"`sample({s})`" for s in sizes) + " | "
              + " | ".join(f"best way / best way, batch {s}" for s in sizes) + " | memory (peer / fastdqn) |",
              "|---|---:|" + "---:|" * (2 * len(sizes)) + "---:|"]
    for peer in IMPLS[1:]:
        if peer not in settings["impls"]:
            continue
        r = ratios["uniform"][peer]
        lines.append(f"| {labels[peer]} | {_fmt_ratio(r['add'])} | "
                     + " | ".join(_fmt_ratio(r[f"sample_{s}"]) for s in sizes) + " | "
                     + " | ".join(_fmt_ratio(r[f"best_sample_{s}"]) for s in sizes) + f" | {_fmt_ratio(r['memory'])} |")
    lines += ["", "### fastdqn as a fraction of the memory-copy limit", "",
              "| fastdqn | " + " | ".join(f"batch {s}" for s in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for variant, by_size in ratios["memcopy_fraction"].items():
        lines.append(f"| {VARIANT_NAMES[variant]} | "
                     + " | ".join("–" if by_size[s] is None else f"{by_size[s]:.0%}" for s in sizes) + " |")

    lines += ["", "## Prioritized replay", "",
              "| buffer | add (transitions/s) | "
              + " | ".join(f"sample({s}) | sample+update({s})" for s in sizes) + " |",
              "|---|---:|" + "---:|" * (2 * len(sizes))]
    for name in settings["impls"]:
        entry = prioritized.get(name, {})
        if entry.get("status") != "ok":
            lines.append(f"| {labels[name]} | {entry.get('status', 'not run')} |" + " |" * (2 * len(sizes)))
            continue
        cells = [_fmt_rate(entry[key][s]["median"]) for s in sizes for key in ("sample", "sample_update")]
        lines.append(f"| {labels[name]} | {_fmt_rate(entry['add']['median'])} | " + " | ".join(cells) + " |")
    for peer in ("cpprb", "torchrl"):
        if peer in settings["impls"]:
            r = ratios["prioritized"][peer]
            lines.append(f"| fastdqn / {labels[peer]} | | "
                         + " | ".join(_fmt_ratio(r[f"{key}_{s}"]) for s in sizes
                                      for key in ("sample", "sample_update")) + " |")
    lines.append("")
    lines.append("Batches/s; sample+update is one `sample` plus one `update_priorities` of the batch.")

    save = report.get("save", {"status": "not run"})
    lines += ["", "## Save and load (fastdqn)", ""]
    if save.get("status") == "ok":
        lines += [f"{save['transitions']:,} transitions, {save['file_bytes'] / 1e9:.2f} GB on disk; load from a "
                  f"{save['load_page_cache']} page cache.", "",
                  "| | fastdqn GB/s | raw disk GB/s | fraction |", "|---|---:|---:|---:|",
                  f"| save (fsync) | {save['save_gbps']:.2f} | {save['disk_write_gbps']:.2f} | "
                  f"{_fmt_ratio(ratios['save_vs_disk'])} |",
                  f"| load | {save['load_gbps']:.2f} | {save['disk_read_gbps']:.2f} | "
                  f"{_fmt_ratio(ratios['load_vs_disk'])} |"]
    else:
        lines.append(save["status"])
    compression = save.get("compression", {"status": "not run"})
    if compression.get("status") == "ok":
        none, zstd = compression["none"], compression["zstd"]
        lines += ["", f"Compression, on {compression['transitions']:,} transitions of real (random-policy) Breakout "
                  "frames; the synthetic frames above are noise and do not compress:", "",
                  "| compression | file MB | save s | load s |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {c['file_bytes'] / 1e6:.1f} | {c['save_seconds']:.2f} | {c['load_seconds']:.2f} |"
                  for name, c in (("none", none), ("zstd (level 1)", zstd))]

    lines += ["", "## Targets", ""]
    defaults = dataclasses.asdict(Settings())
    resized = [name for name in ("capacity", "fill", "repeats", "repeat_seconds", "warmup_seconds")
               if settings[name] != defaults[name]]
    if resized:
        lines += [f"Measured with other sizes than the targets were set for ({', '.join(resized)}): the verdicts "
                  "below are only indicative.", ""]
    lines += ["| target | measured | met |", "|---|---:|:---:|"]
    for t in report["targets"]:
        measured = "–" if t["measured"] is None else (
            f"{t['measured']:.0%}" if "%" in t["target"] else _fmt_ratio(t["measured"]))
        lines.append(f"| {t['target']} | {measured} | {'–' if t['met'] is None else 'yes' if t['met'] else 'NO'} |")

    lines += ["", "## How each buffer is used", ""]
    for name in settings["impls"]:
        lines.append(f"- {labels[name]}: {SUBJECTS[name].config}.")
        if SUBJECTS[name].prioritized_config:
            lines.append(f"  Prioritized: {SUBJECTS[name].prioritized_config}.")
    lines += ["", "## Notes", "", *(f"- {note}" for note in NOTES), ""]
    return "\n".join(lines)


NOTES = (
    "add: transitions/s in steady state (buffer full, overwriting), each buffer fed prebuilt inputs in its own "
    "format, so input preparation is not timed. The first fill (which also pays first-touch page faults) is in "
    "the JSON as fill_per_s.",
    "memory: growth of the process's resident set while filling, divided by the transitions held "
    "(everything the buffer touched, metadata and allocator overhead included).",
    "fastdqn `sample` returns fresh numpy arrays wrapped with torch.from_numpy; `sample(out=)` fills arrays made "
    "once by empty_batch and already shared with torch tensors; `prefetch` (depth 2) times pf.next() while the "
    "caller does nothing else, the rate its C++ worker sustains (on 2 cores it shares the machine with the caller); "
    "`sample_frames(out=)` returns the shared-frame layout (k + 1 frames per sample instead of 2k, the next "
    "observation gathered later on the learner's device), so it copies 5/8 of the bytes its GB/s column counts.",
    "memory-copy limit: single-thread np.take (mode='clip', into preallocated arrays) of the rows a batch needs "
    "(4 consecutive frames for obs and the 4 shifted by one for next_obs, from a frame table the size of the fill), "
    "measured in its own process before and after the implementations; the faster run counts. The JSON records "
    "the uint8 bytes each implementation's batch actually carried (frame_bytes) next to each rate.",
    "SB3: optimize_memory_usage stores next_obs in the following slot, so an episode's final observation is "
    "overwritten by the next episode's first; without timeout handling a truncation counts as termination. "
    "Its sample copies into new torch tensors (th.tensor), which SB3 users pay too.",
    "cpprb: stack_compress wants the stack on the last axis, so cpprb gets channels-last copies (made untimed) and "
    "its batches go to torch as they come (channels-last, no permute or copy). cpprb's compression assumes one "
    "sequential stream: the 8 envs' rows go in one add call, as cpprb accepts them, and on_episode_end() is "
    "called at steps where any env's episode ends; its stacks are then not exact across envs (speed only; exact "
    "use needs one buffer per env).",
    "TorchRL: LazyTensorStorage in RAM (its DQN example uses the file-backed LazyMemmapStorage; in a short check "
    "neither was consistently faster); it stores "
    "observation and next observation in full (no frame sharing). Step TensorDicts are built untimed, as a "
    "collector would deliver them. Batches are already torch tensors. Its `prefetch` row is a second "
    "TensorDictReplayBuffer over the same storage with prefetch=2 (TorchRL prefetches only with a fixed batch "
    "size), timed like fastdqn's. Most of its sampling time is tensordict's "
    "advanced indexing of the uint8 storage (torch's index kernel, much slower than index_select for whole "
    "rows). Its PrioritizedSampler needs torchrl's C++ extension, built for one torch version: where it does not "
    "load, the prioritized row says so.",
)


def run(settings: Settings) -> dict:
    """Runs every selected implementation and section; returns the report (ratios included)."""
    log = Log("bench")
    started = time.time()
    report = {"schema": SCHEMA, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(("stable-baselines3", "cpprb", "torchrl", "tensordict")), "settings": dataclasses.asdict(settings), "uniform": {},
              "prioritized": {}, "save": {"status": "skipped: not selected"}}
    log(f"{report['machine']['cpu_slug']}: capacity {settings.capacity:,}, fill {settings.fill:,}, "
        f"batches {list(settings.batch_sizes)}, impls {list(settings.impls)}")
    measure_limit = "uniform" in settings.sections
    memcopy_runs = [_run_section(log, lambda: _in_fresh_process(_run_memcopy, settings))] if measure_limit else []
    for name in IMPLS:
        if name not in settings.impls:
            results = {}
        elif importlib.util.find_spec(SUBJECTS[name].module) is None:
            results = {section: {"status": f"skipped: {SUBJECTS[name].module} is not installed"}
                       for section in settings.sections}
        else:
            log(f"running {name} in a fresh process")
            results = _run_section(log, lambda: _in_fresh_process(_run_implementation, name, settings))
            if "status" in results:  # the worker itself failed: every section shares its fate
                results = {section: results for section in settings.sections}
        report["torch_threads"] = report.get("torch_threads") or results.get("torch_threads")
        for section in ("uniform", "prioritized"):
            report[section][name] = results.get(section, {"status": "skipped: not selected"})
        if name == "fastdqn" and "save" in results:
            report["save"] = results["save"]
    if measure_limit:  # measured again at the end: noise from other work only slows, so the faster run counts
        memcopy_runs.append(_run_section(log, lambda: _in_fresh_process(_run_memcopy, settings)))
    report["memcopy"] = _combine_memcopy(memcopy_runs)
    report["seconds"] = time.time() - started
    report["ratios"] = compute_ratios(report)
    report["targets"] = check_targets(report)
    return report


integer = int_at_least(-sys.maxsize, "an integer")  # as in 1e6; Settings checks the range


def build_parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="fastdqn bench buffer", description=__doc__.split("\n")[0])
    parser.add_argument("--capacity", type=integer, help=f"transitions each buffer holds (default {defaults.capacity:,})")
    parser.add_argument("--fill", type=integer, help="transitions added before sampling (default: capacity)")
    parser.add_argument("--batch-sizes", type=integer, nargs="+", help=f"default {list(defaults.batch_sizes)}")
    parser.add_argument("--repeats", type=integer, help=f"timed repeats per number (default {defaults.repeats})")
    parser.add_argument("--repeat-seconds", type=float, help=f"length of a repeat (default {defaults.repeat_seconds})")
    parser.add_argument("--warmup-seconds", type=float, help=f"default {defaults.warmup_seconds}")
    parser.add_argument("--mean-episode", type=integer, help=f"mean episode length (default {defaults.mean_episode})")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, help="implementations to run (default: all installed)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, help="sections to run (default: all)")
    parser.add_argument("--save-capacity", type=integer,
                        help=f"transitions in the saved buffer (default {defaults.save_capacity:,})")
    parser.add_argument("--save-repeats", type=integer, help=f"default {defaults.save_repeats}")
    parser.add_argument("--tmpdir", help="where the save/load file goes (default: system temp dir)")
    parser.add_argument("--seed", type=integer, help="default 0")
    parser.add_argument("--torch-threads", type=integer,
                        help="torch threads in each worker (default 0: torch's default); on a busy machine "
                             "torch's thread pool contends and slows the peers that copy with torch")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny sizes and short repeats, for a smoke run ({QUICK}); explicit options win")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"),
                        help="directory for buffer-<machine>.json and .md, buffer-<machine>-quick.* with --quick "
                             "(default benchmarks/results; '' writes none)")
    parser.add_argument("--machine", help="machine name in the file names (default: CPU model and core count)")
    parser.add_argument("--json", action="store_true", help="also print the JSON report on stdout")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    chosen = {field.name: getattr(args, field.name) for field in dataclasses.fields(Settings)
              if getattr(args, field.name, None) is not None}
    base = dict(QUICK) if args.quick else {}
    return Settings(**{**base, **chosen})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
        if args.out:
            check_out_dir(args.out)
    except ValueError as error:
        parser.error(str(error))
    started = datetime.datetime.now(datetime.timezone.utc)
    report = run(settings)
    report["command"] = command_line("buffer", argv)
    log = Log("bench")
    failed = [f"{section}/{name}" for section in ("uniform", "prioritized") for name, entry
              in report[section].items() if entry.get("status", "").startswith("failed")]
    failed += ["save"] if report["save"].get("status", "").startswith("failed") else []
    failed += ["memcopy"] if report["memcopy"].get("status", "").startswith("failed") else []
    if args.out:
        name = slug(args.machine) if args.machine else report["machine"]["cpu_slug"]  # CPU-bound, on any machine
        name += "-quick" if args.quick else ""  # a smoke run never replaces a real run's report
        changed = [field.name for field in dataclasses.fields(Settings) if getattr(args, field.name, None) is not None]
        changed += [impl for impl in settings.impls if importlib.util.find_spec(SUBJECTS[impl].module) is None]
        changed += failed  # a report missing some figures is not the full run's
        base = write_report(args.out, report_stem("buffer", name, changed, started), report, render_markdown(report))
        log(f"wrote {base}.json and {base}.md ({report['seconds']:.0f} s)")
    if args.json:
        print(json.dumps(report, indent=2))
    if failed:
        log(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
