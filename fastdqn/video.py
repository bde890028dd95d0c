"""Evaluation videos: an episode's rendered frames, as an animated GIF (Pillow) or an H.264 MP4 (ffmpeg)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import secrets
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from fastdqn.metrics import atomic_replace, atomic_write_bytes

VIDEO_SUFFIXES = (".gif", ".mp4")


def check_video_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path, or a ValueError naming what is wrong with it: found out before any game is played."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"video must be a .gif or .mp4 file, got {path}")
    if path.suffix.lower() == ".mp4":
        _ffmpeg_executable()
    if path.is_dir():
        raise ValueError(f"video {path} is a folder")
    if not path.parent.is_dir():
        raise ValueError(f"video's folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"video's folder {path.parent} is not writable")
    return path


def _ffmpeg_executable() -> str:
    """The ffmpeg that imageio-ffmpeg ships (or IMAGEIO_FFMPEG_EXE names)."""
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        raise ValueError("an .mp4 video needs imageio-ffmpeg: pip install imageio-ffmpeg (the train extra has it), "
                         "or record a .gif")
    import imageio_ffmpeg

    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as e:
        raise ValueError(f"an .mp4 video needs ffmpeg: {e}") from e


class VideoWriter:
    """Frames in, one video file out, which appears whole or not at all.

    An MP4 streams its frames to ffmpeg, into a temporary file beside ``path`` that ``close``
    renames once ffmpeg has finished without error; a long game never sits in memory. A GIF is
    written by Pillow at ``close``; its frames are kept in palette form (a third of their RGB
    size), as Pillow would convert them. Leaving the ``with`` block by an exception, or
    ``discard``, leaves no file behind and the one that was at ``path`` as it was.
    """

    def __init__(self, path: str | os.PathLike, fps: float) -> None:
        self.path = check_video_path(path)
        self.fps = fps
        self.frames = 0
        self._gif = self.path.suffix.lower() == ".gif"
        self._gif_frames: list = []
        self._shape: tuple[int, ...] | None = None
        self._ffmpeg: subprocess.Popen | None = None
        self._ffmpeg_log = None
        self._tmp: Path | None = None
        self._finished = False

    def add(self, frame: np.ndarray) -> None:
        """Append one (H, W, 3) RGB or (H, W) grayscale uint8 frame, of the first frame's size."""
        if self._finished:
            raise RuntimeError(f"the video {self.path} is finished")
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or not (frame.ndim == 2 or frame.ndim == 3 and frame.shape[2] == 3):
            raise ValueError(f"frame must be an (H, W, 3) or (H, W) uint8 array, got {frame.dtype} {frame.shape}")
        if frame.ndim == 2:
            frame = np.repeat(frame[:, :, None], 3, axis=2)
        if self._shape is None:
            self._shape = frame.shape
        elif frame.shape != self._shape:
            raise ValueError(f"frame must have the first frame's shape {self._shape}, got {frame.shape}")
        if self._gif:
            from PIL import Image

            self._gif_frames.append(Image.fromarray(frame).convert("P", palette=Image.Palette.ADAPTIVE))
        else:
            # H.264 in yuv420p needs even sides: odd ones repeat their last row or column.
            frame = np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)), mode="edge")
            if self._ffmpeg is None:
                self._start_ffmpeg(frame.shape[1], frame.shape[0])
            try:
                self._ffmpeg.stdin.write(np.ascontiguousarray(frame).data)
            except BrokenPipeError:
                raise self._ffmpeg_failure() from None
        self.frames += 1

    def close(self) -> Path:
        """Finish the file and put it in place; returns its path."""
        if self._finished:
            raise RuntimeError(f"the video {self.path} is finished")
        try:
            if self.frames == 0:
                raise RuntimeError("a video needs at least one frame")
            if self._gif:
                self._write_gif()
            else:
                try:
                    self._ffmpeg.stdin.close()  # flushes the last frames
                except BrokenPipeError:
                    raise self._ffmpeg_failure() from None
                if self._ffmpeg.wait() != 0:
                    raise self._ffmpeg_failure()
                atomic_replace(self._tmp, self.path)
                self._tmp = None
        finally:
            self.discard()
        return self.path

    def discard(self) -> None:
        """Drop what was written so far (nothing, once closed)."""
        self._finished = True
        self._gif_frames = []
        if self._ffmpeg is not None:
            self._ffmpeg.kill()  # at once: its output goes anyway (a no-op if it has exited)
            self._ffmpeg.wait()
            with contextlib.suppress(BrokenPipeError):  # frames still buffered for the killed ffmpeg
                self._ffmpeg.stdin.close()
            self._ffmpeg_log.close()
            self._ffmpeg = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def _write_gif(self) -> None:
        # GIF delays are whole centiseconds: each frame's is rounded so that the running total keeps to the
        # frame rate (15 fps as 6, 7, 7, ... cs; a flat 6 cs would play 11% fast).
        ends = np.round(np.arange(self.frames + 1) * 100 / self.fps)
        durations = (np.diff(ends) * 10).astype(int).tolist()
        data = io.BytesIO()
        first, *rest = self._gif_frames
        first.save(data, format="GIF", save_all=True, append_images=rest, duration=durations, loop=0)
        atomic_write_bytes(self.path, data.getvalue())

    def _start_ffmpeg(self, width: int, height: int) -> None:
        self._tmp = self.path.with_name(f".{self.path.stem}.{secrets.token_hex(4)}.tmp.mp4")
        self._ffmpeg_log = tempfile.TemporaryFile()
        # yuv420p and +faststart: the file plays in browsers and notebooks, not only in VLC. A session of its
        # own: a Ctrl-C reaches this process, which then discards the file, and not ffmpeg mid-write.
        self._ffmpeg = subprocess.Popen(
            [_ffmpeg_executable(), "-nostdin", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
             "-s", f"{width}x{height}", "-r", f"{self.fps:g}", "-i", "pipe:0", "-an", "-c:v", "libx264",
             "-pix_fmt", "yuv420p", "-movflags", "+faststart", "-y", str(self._tmp)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._ffmpeg_log, start_new_session=True)

    def _ffmpeg_failure(self) -> OSError:
        code = self._ffmpeg.wait()
        self._ffmpeg_log.seek(0)
        lines = self._ffmpeg_log.read().decode(errors="replace").strip().splitlines()
        return OSError(f"ffmpeg could not write {self.path} (exit status {code})"
                       + (f": {lines[-1]}" if lines else ""))

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is not None:
            self.discard()
        elif not self._finished:
            self.close()
