"""Save and load: exact round trips, atomic writes, and bad files rejected cleanly."""

import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdqn import PrioritizedReplayBuffer, ReplayBuffer
from fastdqn import replay_file
from fastdqn.replay_file import FOOTER, ReplayFileError
from reference_buffer import ReferenceBuffer
from test_replay import play


def filled(kind=ReplayBuffer, steps=40, capacity=90, **kw):
    """A buffer after `steps` random steps, and a function that adds more steps to it and to `mirrors`."""
    buf = kind(capacity, (4, 3, 2), frame_stack=4, num_envs=3, n_step=3, seed=11, **kw)
    mirrors = []
    game = play(buf, ReferenceBuffer(capacity, 3, 4, 3, 0.99), np.random.default_rng(0), 10**9, p_end=0.1,
                mirrors=mirrors)

    def more(steps, also=()):
        mirrors[:] = also
        for _ in range(steps):
            next(game)

    more(steps)
    return buf, more


def assert_same_batches(a, b):
    x, y = a.sample(16), b.sample(16)
    for name, array in x.arrays().items():
        np.testing.assert_array_equal(array, getattr(y, name))


def same_future(original, loaded, more):
    """Both sample the same batches now, and after the same further steps (episodes continue)."""
    for _ in range(3):
        assert_same_batches(original, loaded)
    more(15, also=[loaded])
    np.testing.assert_array_equal(original.valid_indices(), loaded.valid_indices())
    assert_same_batches(original, loaded)


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("steps", [0, 3, 40, 200])  # empty, mid-episode, wrapped many times
def test_round_trip_is_exact(tmp_path, compression, steps):
    if compression == "zstd":
        pytest.importorskip("zstandard")
    buf, more = filled(steps=steps)
    if steps:
        buf.sample(8)
    buf.save(tmp_path / "buf", compression=compression)
    loaded = ReplayBuffer.load(tmp_path / "buf")
    assert type(loaded) is ReplayBuffer and len(loaded) == len(buf)
    assert loaded._core.state() == buf._core.state()
    if steps:
        same_future(buf, loaded, more)


def test_prioritized_round_trip_keeps_priorities_and_weights(tmp_path):
    buf, more = filled(PrioritizedReplayBuffer, steps=60, alpha=0.7, beta=0.5)
    batch = buf.sample(32)
    buf.update_priorities(batch.indices, np.arange(32) / 4.0)
    buf.save(tmp_path / "per.fdqn")
    loaded = PrioritizedReplayBuffer.load(tmp_path / "per.fdqn")
    assert (loaded.alpha, loaded.beta, loaded.eps) == (0.7, 0.5, buf.eps)
    np.testing.assert_array_equal(loaded._core.priority_leaves(), buf._core.priority_leaves())
    assert loaded._core.max_priority() == buf._core.max_priority()
    same_future(buf, loaded, more)


def test_kind_is_checked(tmp_path):
    uniform, _ = filled()
    uniform.save(tmp_path / "u")
    with pytest.raises(ReplayFileError, match="not a PrioritizedReplayBuffer"):
        PrioritizedReplayBuffer.load(tmp_path / "u")


def test_interrupted_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    old, _ = filled(steps=20)
    old.save(tmp_path / "buf")
    before = (tmp_path / "buf").read_bytes()
    new, _ = filled(steps=60)
    calls = []

    def failing_crc(data, value=0):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return zlib.crc32(data, value)

    monkeypatch.setattr(replay_file.zlib, "crc32", failing_crc)
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path / "buf")
    monkeypatch.undo()
    assert (tmp_path / "buf").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["buf"]
    np.testing.assert_array_equal(ReplayBuffer.load(tmp_path / "buf").valid_indices(), old.valid_indices())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "buf"
    buf, _ = filled(steps=50)
    buf.save(path)
    return path.read_bytes()


def load_bytes(tmp_path, data):
    path = tmp_path / "bad"
    path.write_bytes(data)
    return ReplayBuffer.load(path)


@pytest.mark.parametrize("keep", [0, 10, 16, 100, 0.5, 0.99, -1])
def test_truncated_files(tmp_path, saved, keep):
    cut = int(len(saved) * keep) if isinstance(keep, float) else keep % len(saved)
    with pytest.raises(ReplayFileError):
        load_bytes(tmp_path, saved[:cut])


def test_corrupted_array_byte(tmp_path, saved):
    data = bytearray(saved)
    data[200] ^= 0x40  # inside the frames
    with pytest.raises(ReplayFileError, match="frames.*CRC"):
        load_bytes(tmp_path, bytes(data))


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n" + bytes(100), b"{}" * 40, bytes(range(256)) * 3])
def test_foreign_files(tmp_path, data):
    with pytest.raises(ReplayFileError):
        load_bytes(tmp_path, data)


def test_other_version(tmp_path, saved):
    data = bytearray(saved)
    data[8:12] = struct.pack("<I", 99)
    with pytest.raises(ReplayFileError, match="version 99"):
        load_bytes(tmp_path, bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzzed_headers_are_rejected(tmp_path_factory, saved, data):
    """Any change to the prefix, the header or the footer is caught before anything is allocated."""
    header_offset = FOOTER.unpack(saved[-FOOTER.size:])[0]
    regions = [(0, 16), (header_offset, len(saved))]
    start, stop = data.draw(st.sampled_from(regions))
    position = data.draw(st.integers(start, stop - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != saved[position]))
    mutated = bytearray(saved)
    mutated[position] = value
    with pytest.raises(ReplayFileError):
        load_bytes(tmp_path_factory.mktemp("fuzz"), bytes(mutated))


def rewrite_header(saved, change):
    """A well-formed file (valid CRCs) whose header says something else."""
    header_offset, header_len, _, version, magic = FOOTER.unpack(saved[-FOOTER.size:])
    header = json.loads(saved[header_offset:header_offset + header_len])
    change(header)
    raw = json.dumps(header).encode()
    return saved[:header_offset] + raw + FOOTER.pack(header_offset, len(raw), zlib.crc32(raw), version, magic)


@pytest.mark.parametrize(("change", "match"), [
    (lambda h: h["config"].update(capacity=10**15), "memory"),
    (lambda h: h["config"].update(obs_shape=[4, 10**9, 10**9]), "memory"),
    (lambda h: h["config"].update(n_step=0), "configuration"),
    (lambda h: h["config"].update(obs_dtype="|O"), "configuration"),
    (lambda h: h["state"].update(end=[5, 5]), "state|row count"),
    (lambda h: h["state"].update(end=[10**6, 0, 0]), "row count|state"),
    (lambda h: h.update(rows=3), "row count"),
    (lambda h: h["arrays"][0].update(offset=10**12), "outside"),
    (lambda h: h["arrays"][0].update(shape=[1, 2]), "shape"),
    (lambda h: h["arrays"].pop(), "arrays"),
    (lambda h: h.update(kind="os.system"), "holds"),
    (lambda h: h.update(compression="rar"), "compression"),
    (lambda h: h.pop("config"), "configuration"),
])
def test_crafted_headers_are_rejected(tmp_path, saved, change, match):
    with pytest.raises(ReplayFileError, match=match):
        load_bytes(tmp_path, rewrite_header(saved, change))


def test_paths(tmp_path):
    buf, _ = filled(steps=5)
    with pytest.raises(FileNotFoundError):
        ReplayBuffer.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        buf.save(tmp_path / "no" / "such" / "dir" / "buf")
    with pytest.raises(IsADirectoryError):
        buf.save(tmp_path)
    with pytest.raises(ValueError, match="compression"):
        buf.save(tmp_path / "x", compression="gzip")


def test_the_same_adds_save_the_same_bytes_whatever_was_in_memory_before(tmp_path):
    """A frame-only row (an episode's first frames) has no action or reward: the file holds
    zeros there, not whatever the heap held (a freed buffer's values, here)."""
    def saved(path, dirty):
        if dirty:  # a freed buffer of the same size, its rows full of non-zero values
            old = ReplayBuffer(100, (3,), seed=1)
            for t in range(100):
                old.add(np.full((1, 3), t + 1, np.uint8), [7], [-3.5], np.full((1, 3), t + 2, np.uint8), [False], [False])
            del old
        buf = ReplayBuffer(100, (3,), seed=0)
        for t in range(30):
            buf.add(np.full((1, 3), t % 10, np.uint8), [1], [0.5], np.full((1, 3), t % 10 + 1, np.uint8), [False],
                    [t % 10 == 9])
        buf.save(path)
        return path.read_bytes()

    assert saved(tmp_path / "clean.fdqn", dirty=False) == saved(tmp_path / "dirty.fdqn", dirty=True)
