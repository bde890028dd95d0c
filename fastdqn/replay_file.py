"""Saving and loading replay buffers: our own format, never pickle.

A file is::

    b"FASTDQN\\0" | version (u32) | 0 (u32)       16-byte prefix
    raw arrays, one after the other              frames, actions, rewards, flags[, priorities]
    header                                       JSON: config, scalar state, each array's place and CRC-32s
    header offset (u64) | header length (u64) | header CRC-32 (u32) | version (u32) | b"FASTDQN\\0"

All integers are little-endian. The header sits at the end so that arrays can be
streamed (and compressed) without knowing their size first. Only the filled rows of
each array are written: a 1M-transition buffer holding 10k transitions makes a small
file. An uncompressed array can be read with numpy alone, ``np.fromfile(path, dtype,
count, offset=...)``, with the dtype, shape and offset that the header gives.

Writes are atomic (a temporary file beside the target, fsync, rename): an interrupted
save leaves the previous file intact. Loading checks the magic, the version, the
header's CRC, every field, the memory the buffer would need and every chunk's CRC, and
reads arrays straight into the new buffer, so it needs no second copy in memory.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fastdqn import replay

MAGIC = b"FASTDQN\0"
VERSION = 1
PREFIX = struct.Struct("<8sII")
FOOTER = struct.Struct("<QQII8s")
MAX_HEADER_BYTES = 1 << 20
CHUNK = 16 << 20  # each chunk has its own CRC-32, computed on a second thread while the next is read or written
COMPRESSIONS = ("none", "zstd")


class ReplayFileError(ValueError):
    """The file is not a readable fastdqn replay buffer (truncated, corrupt, foreign or too new)."""


def _filled_rows(buf: replay.ReplayBuffer, state: dict) -> int:
    slots_per_env = buf.capacity // buf.num_envs
    return max(min(end, slots_per_env) for end in state["end"]) * buf.num_envs


def _arrays(buf: replay.ReplayBuffer, rows: int, priorities: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The arrays that make up a buffer's state, cut to its filled rows (views of its storage).

    A prioritized buffer's priorities are a copy of its tree's leaves, or `priorities`.
    """
    arrays = {name: view[:rows] for name, view in buf._core.storage().items()}
    if buf.prioritized:
        arrays["priorities"] = (buf._core.priority_leaves() if priorities is None else priorities)[:rows]
    return arrays


def _config(buf: replay.ReplayBuffer) -> dict:
    config = dict(capacity=buf.capacity, obs_shape=list(buf.obs_shape), frame_stack=buf.frame_stack,
                  num_envs=buf.num_envs, obs_dtype=buf.obs_dtype.str, action_dtype=buf.action_dtype.str,
                  n_step=buf.n_step, gamma=buf.gamma, seed=buf.seed)
    if buf.prioritized:
        config.update(alpha=buf.alpha, eps=buf.eps)
    return config


def save(buf: replay.ReplayBuffer, path: str | os.PathLike, compression: str = "none") -> None:
    """Writes ``buf`` to ``path`` atomically. Do not ``add`` to the buffer while it saves.

    ``compression="zstd"`` (needs the ``zstandard`` package) trades CPU for disk.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if compression == "zstd":
        import zstandard
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"path {str(path)!r} is a directory")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder of {str(path)!r} does not exist")
    state = buf._core.state()
    rows = _filled_rows(buf, state)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f, ThreadPoolExecutor(1) as checksums:
            f.write(PREFIX.pack(MAGIC, VERSION, 0))
            entries = []
            for name, array in _arrays(buf, rows).items():
                offset, crcs = f.tell(), []
                data = memoryview(_bytes(np.ascontiguousarray(array)))
                writer = zstandard.ZstdCompressor(level=1).stream_writer(f, closefd=False) \
                    if compression == "zstd" else f
                for start in range(0, len(data), CHUNK):
                    chunk = data[start:start + CHUNK]
                    crc = checksums.submit(zlib.crc32, chunk)
                    writer.write(chunk)
                    crcs.append(crc.result())
                if writer is not f:
                    writer.close()
                entries.append(dict(name=name, dtype=array.dtype.str, shape=list(array.shape), offset=offset,
                                    stored_bytes=f.tell() - offset, crc32=crcs))
            header = json.dumps(dict(format=VERSION, kind=type(buf).__name__, compression=compression,
                                     config=_config(buf), state=state, rows=rows, arrays=entries)).encode()
            header_offset = f.tell()
            f.write(header)
            f.write(FOOTER.pack(header_offset, len(header), zlib.crc32(header), VERSION, MAGIC))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _bytes(array: np.ndarray) -> np.ndarray:
    """A contiguous array's memory as flat bytes (a view)."""
    return array.reshape(-1).view(np.uint8)


def _read_header(f, size: int) -> dict:
    if size < PREFIX.size + FOOTER.size:
        raise ReplayFileError("the file is too short to be a fastdqn replay buffer (truncated?)")
    magic, version, reserved = PREFIX.unpack(f.read(PREFIX.size))
    if magic != MAGIC:
        raise ReplayFileError("not a fastdqn replay buffer file (bad magic)")
    if reserved != 0:
        raise ReplayFileError("the file's prefix is corrupt")
    f.seek(size - FOOTER.size)
    header_offset, header_len, header_crc, footer_version, footer_magic = FOOTER.unpack(f.read(FOOTER.size))
    if footer_magic != MAGIC:
        raise ReplayFileError("the file is truncated or corrupt: its footer is missing")
    if version != VERSION or footer_version != VERSION:
        raise ReplayFileError(f"the file has format version {version}; this fastdqn reads version {VERSION}")
    if header_len > MAX_HEADER_BYTES or header_offset + header_len + FOOTER.size != size:
        raise ReplayFileError("the file is truncated or corrupt: its header is out of place")
    f.seek(header_offset)
    raw = f.read(header_len)
    if zlib.crc32(raw) != header_crc:
        raise ReplayFileError("the file's header is corrupt (CRC mismatch)")
    try:
        header = json.loads(raw)
    except ValueError as error:
        raise ReplayFileError(f"the file's header is not valid JSON: {error}") from None
    if not isinstance(header, dict) or header.get("format") != VERSION:
        raise ReplayFileError("the file's header is malformed")
    return header


def _check_memory(config: dict) -> None:
    """Refuses a buffer larger than this machine's memory before allocating anything."""
    try:
        frame = np.prod(config["obs_shape"][1:] if config["frame_stack"] > 1 else config["obs_shape"])
        slot_bytes = int(frame) * np.dtype(config["obs_dtype"]).itemsize + np.dtype(config["action_dtype"]).itemsize + 5
        needed = int(config["capacity"]) * slot_bytes
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        raise ReplayFileError(f"the file's configuration is malformed: {error}") from None
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise ReplayFileError(f"the saved buffer needs {needed / 2**30:.1f} GiB of memory; this machine has "
                              f"{available / 2**30:.1f} GiB")


def load(path: str | os.PathLike, expected: type = replay.ReplayBuffer) -> replay.ReplayBuffer:
    """Reads a buffer written by ``save``. Raises ``ReplayFileError`` for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no replay buffer file at {str(path)!r}")
    try:
        return _load(path, expected)
    except ReplayFileError as error:  # named, for a run's checkpoint whose buffer file is the bad one
        raise ReplayFileError(f"{path}: {error}") from None


def _load(path: Path, expected: type) -> replay.ReplayBuffer:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header = _read_header(f, size)
        kinds = {cls.__name__: cls for cls in (replay.ReplayBuffer, replay.PrioritizedReplayBuffer)}
        kind = kinds.get(header.get("kind"))
        if kind is None or not issubclass(kind, expected):
            raise ReplayFileError(f"the file holds a {header.get('kind')!r}, not a {expected.__name__}")
        compression = header.get("compression")
        if compression not in COMPRESSIONS:
            raise ReplayFileError(f"the file uses an unknown compression {compression!r}")
        config = header.get("config")
        if not isinstance(config, dict):
            raise ReplayFileError("the file's header has no configuration")
        _check_memory(config)
        try:
            buf = kind(**{**config, "obs_shape": tuple(config["obs_shape"])})
        except (TypeError, ValueError) as error:
            raise ReplayFileError(f"the file's configuration is invalid: {error}") from None
        state, rows = header.get("state"), header.get("rows")
        leaves = np.zeros(buf.capacity if buf.prioritized else 0)
        try:
            if rows != _filled_rows(buf, state):
                raise ReplayFileError("the file's row count does not match its cursors")
            _read_arrays(f, header, _arrays(buf, rows, leaves), size)
            buf._core.restore(state, leaves)
        except ReplayFileError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise ReplayFileError(f"the file's state is invalid: {error}") from None
    return buf


def _read_arrays(f, header: dict, targets: dict[str, np.ndarray], size: int) -> None:
    entries = header.get("arrays")
    names = list(targets)
    if not isinstance(entries, list) or [e.get("name") for e in entries] != names:
        raise ReplayFileError(f"the file's arrays are {entries!r}; expected {names}")
    for entry in entries:
        target = targets[entry["name"]]
        if entry["dtype"] != target.dtype.str or tuple(entry["shape"]) != target.shape:
            raise ReplayFileError(f"array {entry['name']!r} has dtype {entry['dtype']} and shape {entry['shape']}; "
                                  f"expected {target.dtype.str} and {list(target.shape)}")
        offset, stored = int(entry["offset"]), int(entry["stored_bytes"])
        if offset < PREFIX.size or offset + stored > size - FOOTER.size:
            raise ReplayFileError(f"array {entry['name']!r} lies outside the file (truncated?)")
        f.seek(offset)
        view = memoryview(_bytes(target))
        if header["compression"] == "zstd":
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(f, read_size=CHUNK, closefd=False)
            errors = (zstandard.ZstdError,)
        else:
            if stored != target.nbytes:
                raise ReplayFileError(f"array {entry['name']!r} has {stored} bytes; expected {target.nbytes}")
            reader, errors = f, ()
        crcs, pending = [], None
        with ThreadPoolExecutor(1) as checksums:
            for start in range(0, len(view), CHUNK):
                chunk = view[start:start + CHUNK]
                try:
                    got = reader.readinto(chunk)
                except errors as error:
                    raise ReplayFileError(f"array {entry['name']!r} is corrupt: {error}") from None
                if got != len(chunk):
                    raise ReplayFileError(f"array {entry['name']!r} is truncated")
                if pending is not None:
                    crcs.append(pending.result())
                pending = checksums.submit(zlib.crc32, chunk)
            if pending is not None:
                crcs.append(pending.result())
        if crcs != entry["crc32"]:
            raise ReplayFileError(f"array {entry['name']!r} is corrupt (CRC mismatch)")
