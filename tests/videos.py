"""Test videos and animations made with PyAV (PyPI's FFmpeg build) and Pillow: frames that differ from
their neighbours everywhere, so a wrong frame index shows in the pixels."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np


def frame_pixels(i: int, w: int, h: int) -> np.ndarray:
    """A frame that differs from its neighbours everywhere: a moving bar, a colour that follows the
    frame number, and texture for the resize and chroma subsampling to act on."""
    y, x = np.mgrid[0:h, 0:w]
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = (x * 255 // max(w - 1, 1) + i * 9) % 256
    a[..., 1] = (y * 255 // max(h - 1, 1)) ^ (i * 37 % 256)
    a[..., 2] = ((x // 8 + y // 8 + i) % 2) * 180
    bar = (i * 7) % w
    a[:, bar:bar + max(w // 10, 2)] = (250, 250, 20)
    return a


def make_video(path: Path, encoder: str, frames: int, rate: Fraction, size: tuple[int, int]) -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream(encoder, rate=rate)
        s.width, s.height = size
        s.pix_fmt = "yuv420p"
        if encoder == "libx265":
            s.options = {"x265-params": "log-level=error"}
        for i in range(frames):
            for p in s.encode(av.VideoFrame.from_ndarray(frame_pixels(i, *size), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def make_animation(path: Path, frames: int, durations: list[int]) -> Path:
    from PIL import Image

    imgs = [Image.fromarray(frame_pixels(i, 200, 150)) for i in range(frames)]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=durations, loop=0, lossless=True)
    return path
