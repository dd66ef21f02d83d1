"""The reference's video frames: the model card's `load_video` (decord, tests/oracle/model_card.py) for
each case of a JSON list {"video", "frames", "bound" (optional [start, end] s), "out" (.npy)}; writes the
pixel values to "out" and prints one JSON line per case with the frame indices, decord's frame count and
average fps. Animated GIF / WebP cases ("pillow": true) read the frames with Pillow (decord's FFmpeg has
no animated WebP): every frame `convert('RGB')`, the rate from the frames' durations, the same
`get_index` and transform. A codec decord's bundled FFmpeg 4 cannot open (AV1) is read through PyAV
(a current FFmpeg) behind decord's interface: frames by index in presentation order, the packet count,
the stream's average rate. Runs in .venv-ref437 (torchvision for the card's transform), from the root:

    python -m tests.oracle.video_frames cases.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tests.oracle.model_card import build_transform, dynamic_preprocess, get_index, load_video


def pillow_frames(case: dict) -> tuple[np.ndarray, list[int], int, float]:
    import torch
    from PIL import Image, ImageSequence

    im = Image.open(case["video"])
    frames = [f.convert("RGB") for f in ImageSequence.Iterator(im)]
    durations = []
    for i in range(len(frames)):
        im.seek(i)
        im.load()  # WebP sets a frame's duration when it is loaded
        durations.append(im.info.get("duration", 0))
    fps = len(frames) * 1000.0 / sum(durations) if sum(durations) else 0.0
    idx = get_index(case.get("bound"), fps, len(frames) - 1, num_segments=case["frames"])
    transform = build_transform(448)
    tiles = [transform(t) for i in idx for t in dynamic_preprocess(frames[i], image_size=448, use_thumbnail=True,
                                                                   max_num=1)]
    return torch.stack(tiles).numpy(), [int(i) for i in idx], len(frames), fps


class PyAVReader:
    """decord.VideoReader's interface over PyAV: len = packets of the stream, as decord counts."""

    def __init__(self, path, ctx=None, num_threads=1):
        import av

        with av.open(path) as c:
            s = c.streams.video[0]
            self.fps = float(s.average_rate or 0)
            self.count = sum(1 for p in c.demux(s) if p.size)
        self.path = path

    def __len__(self):
        return self.count

    def get_avg_fps(self):
        return self.fps

    def __getitem__(self, i):
        import av

        with av.open(self.path) as c:
            for k, frame in enumerate(c.decode(video=0)):
                if k == i:
                    a = frame.to_ndarray(format="rgb24")
                    return type("Frame", (), {"asnumpy": lambda self, a=a: a})()
        raise IndexError(i)


def main() -> None:
    import decord
    from decord import VideoReader, cpu

    for case in json.loads(Path(sys.argv[1]).read_text()):
        reader = "decord"
        if case.get("pillow"):
            pixels, idx, total, fps = pillow_frames(case)
            reader = "pillow"
        else:
            try:
                vr = VideoReader(case["video"], ctx=cpu(0), num_threads=1)
            except decord.DECORDError:
                decord.VideoReader = VideoReader = PyAVReader
                vr, reader = VideoReader(case["video"]), "pyav"
            total, fps = len(vr), float(vr.get_avg_fps())
            idx = [int(i) for i in get_index(case.get("bound"), fps, total - 1, num_segments=case["frames"])]
            pv, patches = load_video(case["video"], bound=case.get("bound"), num_segments=case["frames"])
            assert patches == [1] * case["frames"], patches
            pixels = pv.numpy()
            decord.VideoReader = VideoReader = decord.video_reader.VideoReader
        np.save(case["out"], pixels.astype(np.float32))
        print(json.dumps({"video": case["video"], "frame_indices": idx, "frames_total": total, "fps": fps,
                          "reader": reader}))


if __name__ == "__main__":
    main()
