"""fastdqn.video: frames in, a GIF or MP4 out, whole or not at all; checked by decoding the files."""

import re
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image, ImageSequence

from fastdqn.video import VideoWriter, check_video_path


def frames(count, height, width, seed=0):
    """Frames of few flat colours (as games draw them), distinct from one another."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(8, 3), dtype=np.uint8)
    out = []
    for i in range(count):
        blocks = rng.integers(0, 8, size=(height // 8 + 1, width // 8 + 1))
        out.append(palette[np.kron(blocks, np.ones((8, 8), int))[:height, :width]])
        out[-1][0, 0] = palette[i % 8]  # consecutive frames differ, so GIF merges none
    return out


def decode_mp4(path):
    """(codec, (width, height), fps), and the frames, as ffmpeg decodes the file."""
    run = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True)
    stream = re.search(r"Video: (\w+).*?, (\d+)x(\d+).*?, ([\d.]+) fps", run.stderr.decode())
    codec, width, height, fps = stream[1], int(stream[2]), int(stream[3]), float(stream[4])
    return (codec, (width, height), fps), list(np.frombuffer(run.stdout, np.uint8).reshape(-1, height, width, 3))


def test_gif_holds_every_frame_exactly(tmp_path):
    expected = frames(12, 50, 40)
    with VideoWriter(tmp_path / "a.gif", fps=20) as video:
        for f in expected:
            video.add(f)
    with Image.open(tmp_path / "a.gif") as gif:
        got = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)]
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)  # eight colours fit a GIF's palette: lossless


def test_mp4_is_h264_at_the_frame_rate_with_every_frame(tmp_path):
    expected = frames(30, 64, 48)
    with VideoWriter(tmp_path / "a.mp4", fps=15) as video:
        for f in expected:
            video.add(f)
    meta, got = decode_mp4(tmp_path / "a.mp4")
    assert meta == ("h264", (48, 64), 15)
    assert len(got) == 30
    for a, b in zip(got, expected):
        assert np.abs(a.astype(int) - b).mean() < 12  # lossy, but the same picture


def test_odd_sizes_and_grayscale_frames(tmp_path):
    gray = [np.full((21, 15), 10 * i, np.uint8) for i in range(5)]
    with VideoWriter(tmp_path / "g.mp4", fps=10) as video:
        for f in gray:
            video.add(f)
    meta, got = decode_mp4(tmp_path / "g.mp4")
    assert meta[1] == (16, 22) and len(got) == 5  # yuv420p needs even sides: one row/column repeated
    for a, b in zip(got, gray):
        assert abs(a.mean() - b.mean()) < 3
    with VideoWriter(tmp_path / "g.gif", fps=10) as video:
        for f in gray:
            video.add(f)
    with Image.open(tmp_path / "g.gif") as gif:
        assert gif.size == (15, 21) and gif.n_frames == 5


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_an_error_leaves_no_file_and_the_old_one_in_place(tmp_path, suffix):
    path = tmp_path / f"game{suffix}"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(path, fps=10) as video:
            for f in frames(3, 16, 16):
                video.add(f)
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_bad_paths_are_refused_before_recording(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"\.gif or \.mp4 file, got .*game\.avi"):
        check_video_path(tmp_path / "game.avi")
    (tmp_path / "folder.mp4").mkdir()
    with pytest.raises(ValueError, match="folder.mp4 is a folder"):
        check_video_path(tmp_path / "folder.mp4")
    with pytest.raises(ValueError, match="folder .*missing does not exist"):
        check_video_path(tmp_path / "missing" / "game.gif")
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "imageio_ffmpeg" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="pip install imageio-ffmpeg"):
        check_video_path(tmp_path / "game.mp4")
    check_video_path(tmp_path / "game.gif")  # a GIF needs only Pillow


def test_a_video_without_frames_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="at least one frame"):
        with VideoWriter(tmp_path / "empty.gif", fps=10):
            pass
    assert not (tmp_path / "empty.gif").exists()


@pytest.mark.parametrize("fps", [15, 30, 50])
def test_a_gif_plays_at_its_frame_rate(tmp_path, fps):
    """GIF delays are whole centiseconds; the frames' total must still be frames / fps."""
    count = 3 * fps
    with VideoWriter(tmp_path / "a.gif", fps=fps) as video:
        for f in frames(count, 8, 8):
            video.add(f)
    with Image.open(tmp_path / "a.gif") as gif:
        delays = [f.info["duration"] for f in ImageSequence.Iterator(gif)]
    assert len(delays) == count and sum(delays) == 3000
    assert max(delays) - min(delays) <= 10  # spread evenly, not one long frame


def fake_ffmpeg(tmp_path, monkeypatch, script):
    exe = tmp_path / "ffmpeg"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(exe))


@pytest.mark.parametrize("size", [8, 512])  # frames that fit the pipe's buffer, and frames that do not
def test_an_ffmpeg_that_fails_leaves_the_old_file_and_says_why(tmp_path, monkeypatch, size):
    fake_ffmpeg(tmp_path, monkeypatch, "echo \"Unknown encoder 'libx264'\" >&2; exit 1\n")
    path = tmp_path / "game.mp4"
    path.write_bytes(b"old")
    with pytest.raises(OSError, match=r"ffmpeg could not write .*game\.mp4 \(exit status 1\): Unknown encoder"):
        with VideoWriter(path, fps=10) as video:
            for f in frames(20, size, size):
                video.add(f)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["ffmpeg", "game.mp4"]


def test_an_mp4_that_ffmpeg_cut_short_is_not_published(tmp_path, monkeypatch):
    """ffmpeg stopped by a full disk: part of a file and a non-zero exit; the old video stays."""
    real = imageio_ffmpeg.get_ffmpeg_exe()
    fake_ffmpeg(tmp_path, monkeypatch, f'ulimit -f 20; exec "{real}" "$@"\n')
    path = tmp_path / "game.mp4"
    path.write_bytes(b"old")
    rng = np.random.default_rng(0)
    with pytest.raises(OSError, match="ffmpeg could not write"):
        with VideoWriter(path, fps=10) as video:
            for _ in range(30):
                video.add(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))  # noise: it does not compress
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["ffmpeg", "game.mp4"]


def test_frames_that_do_not_fit_are_refused(tmp_path):
    with VideoWriter(tmp_path / "a.mp4", fps=10) as video:
        video.add(np.zeros((6, 4, 3), np.uint8))
        for bad, match in [(np.zeros((6, 4, 4), np.uint8), r"\(H, W, 3\) or \(H, W\) uint8 array, got uint8 \(6, 4, 4\)"),
                           (np.zeros((6, 4, 3), np.float32), "got float32"),
                           (np.zeros((4, 6, 3), np.uint8), r"first frame's shape \(6, 4, 3\), got \(4, 6, 3\)")]:
            with pytest.raises(ValueError, match=match):
                video.add(bad)
        video.add(np.zeros((6, 4), np.uint8))  # grayscale of the same size
    assert decode_mp4(tmp_path / "a.mp4")[1].__len__() == 2
    with pytest.raises(RuntimeError, match="finished"):
        video.add(np.zeros((6, 4, 3), np.uint8))
