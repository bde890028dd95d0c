"""Evaluation videos: an episode's rendered frames, as an animated GIF (Pillow) or an MP4 (H.264, imageio-ffmpeg)."""

from __future__ import annotations

import importlib.util
import io
import os
import secrets
import subprocess
from pathlib import Path

import numpy as np

from fastdqn.metrics import atomic_write_bytes

VIDEO_SUFFIXES = (".gif", ".mp4")


def check_video_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path, or a ValueError naming what is wrong with it: found out before any game is played."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"video must be a .gif or .mp4 file, got {path}")
    if path.suffix.lower() == ".mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise ValueError("an .mp4 video needs imageio-ffmpeg: pip install imageio-ffmpeg (the train extra has it), "
                         "or record a .gif")
    if not path.parent.is_dir():
        raise ValueError(f"video's folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"video's folder {path.parent} is not writable")
    return path


class VideoWriter:
    """Frames in, one video file out, which appears whole or not at all.

    An MP4 streams its frames to ffmpeg, into a temporary file beside ``path`` that ``close``
    renames; a long game never sits in memory. A GIF is written by Pillow at ``close``; its
    frames are kept in palette form (a third of their RGB size), as Pillow would convert them.
    Leaving the ``with`` block by an exception leaves no file behind.
    """

    def __init__(self, path: str | os.PathLike, fps: float) -> None:
        self.path = check_video_path(path)
        self.fps = fps
        self.frames = 0
        self._gif_frames: list | None = None
        self._ffmpeg = None
        self._tmp: Path | None = None
        self._finished = False
        if self.path.suffix.lower() == ".gif":
            self._gif_frames = []

    def add(self, frame: np.ndarray) -> None:
        """Append one (H, W, 3) RGB or (H, W) grayscale uint8 frame."""
        frame = np.asarray(frame, dtype=np.uint8)
        if frame.ndim == 2:
            frame = np.repeat(frame[:, :, None], 3, axis=2)
        if self._gif_frames is not None:
            from PIL import Image

            self._gif_frames.append(Image.fromarray(frame).convert("P", palette=Image.Palette.ADAPTIVE))
        else:
            # H.264 in yuv420p needs even sides: odd ones repeat their last row or column.
            frame = np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)), mode="edge")
            if self._ffmpeg is None:
                self._open_ffmpeg(frame.shape[1], frame.shape[0])
            self._ffmpeg.send(np.ascontiguousarray(frame))
        self.frames += 1

    def close(self) -> Path:
        """Finish the file and put it in place; returns its path."""
        if self._finished:
            return self.path
        if self.frames == 0:
            raise RuntimeError("a video needs at least one frame")
        try:
            if self._gif_frames is not None:
                data = io.BytesIO()
                first, *rest = self._gif_frames
                first.save(data, format="GIF", save_all=True, append_images=rest, duration=round(1000 / self.fps),
                           loop=0)
                atomic_write_bytes(self.path, data.getvalue())
            else:
                self._ffmpeg.close()
                self._ffmpeg = None
                os.replace(self._tmp, self.path)
                self._tmp = None
        finally:
            self.discard()
        return self.path

    def discard(self) -> None:
        """Drop what was written so far."""
        self._finished = True
        self._gif_frames = []
        if self._ffmpeg is not None:
            try:
                self._ffmpeg.close()
            except (OSError, RuntimeError, subprocess.SubprocessError):
                pass  # the file goes anyway
            self._ffmpeg = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def _open_ffmpeg(self, width: int, height: int) -> None:
        import imageio_ffmpeg

        self._tmp = self.path.with_name(f".{self.path.stem}.{secrets.token_hex(4)}.tmp.mp4")
        # yuv420p and +faststart: the file plays in browsers and notebooks, not only in VLC.
        self._ffmpeg = imageio_ffmpeg.write_frames(
            str(self._tmp), (width, height), fps=self.fps, codec="libx264", pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p", macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-movflags", "+faststart"])
        self._ffmpeg.send(None)  # starts ffmpeg

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()
