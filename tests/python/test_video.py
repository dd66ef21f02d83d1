"""Video against the model card's `load_video` (decord: FFmpeg's decoders) run in the reference
environment: frame indices, frame counts and rates for several codecs, containers, lengths and rates,
and the pixels of the tiles the vision graph gets (difference measured and asserted); animated GIF /
WebP against Pillow's frames; and the errors. The videos are made here with PyAV (PyPI's FFmpeg build).
The official chat() on a video is in test_official_chat.py."""

from __future__ import annotations

import json
import os
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from tests.videos import make_animation, make_video

ROOT = Path(__file__).resolve().parents[2]
BINARY = ROOT / "target" / "release" / "internvl"
ORACLE = "tests.oracle.video_frames"  # run with -m from ROOT, in .venv-ref437

# name -> (encoder, container suffix, frames, rate, size)
CODECS = {
    "h264-mp4": ("libx264", "mp4", 50, Fraction(25), (320, 240)),
    "hevc-mov": ("libx265", "mov", 37, Fraction(30000, 1001), (320, 240)),
    "vp9-webm": ("libvpx-vp9", "webm", 61, Fraction(24), (256, 144)),
    "av1-mkv": ("libsvtav1", "mkv", 45, Fraction(30), (320, 240)),
}
LENGTHS = [(n, rate) for n in (1, 7, 30, 121) for rate in (Fraction(10), Fraction(30000, 1001), Fraction(60))]


def ours(video: Path, frames: int, out: Path, bound=None, env=None) -> subprocess.CompletedProcess:
    cmd = [str(BINARY), "preprocess", "--video", str(video), "--frames", str(frames), "--out", str(out), "--force"]
    if bound:
        cmd += ["--video-start", str(bound[0]), "--video-end", str(bound[1])]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env=env)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Every video and animation, our reading and the reference's, computed once."""
    subprocess.run([str(ROOT / "scripts" / "reference_env.sh")], check=True, timeout=900)
    subprocess.run(["cargo", "build", "--release", "--bin", "internvl"], cwd=ROOT, check=True)
    work = tmp_path_factory.mktemp("video")
    todo = []
    for name, (enc, ext, n, rate, size) in CODECS.items():
        v = make_video(work / f"{name}.{ext}", enc, n, rate, size)
        todo += [{"name": name, "video": str(v), "frames": 8},
                 {"name": f"{name}-window", "video": str(v), "frames": 5, "bound": [0.4, 1.3]}]
    for n, rate in LENGTHS:
        v = make_video(work / f"len{n}-{float(rate):.2f}.mp4", "libx264", n, rate, (64, 48))
        todo.append({"name": v.stem, "video": str(v), "frames": 8})
    todo.append({"name": "len121-window", "video": str(work / "len121-10.00.mp4"), "frames": 6, "bound": [2.25, 9.5]})
    for suffix in ("gif", "webp"):
        v = make_animation(work / f"anim.{suffix}", 23, [40, 80, 120] * 7 + [40, 60])
        todo.append({"name": f"animated-{suffix}", "video": str(v), "frames": 6, "pillow": True})
    for c in todo:
        c["out"] = str(work / f"{c['name']}-ref.npy")
    (work / "cases.json").write_text(json.dumps(todo))
    r = subprocess.run([str(ROOT / ".venv-ref437" / "bin" / "python"), "-m", ORACLE, str(work / "cases.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    refs = [json.loads(line) for line in r.stdout.splitlines()]
    results = {}
    for c, ref in zip(todo, refs, strict=True):
        got = ours(Path(c["video"]), c["frames"], work / f"{c['name']}-ours.npy", c.get("bound"))
        assert got.returncode == 0, got.stderr
        results[c["name"]] = (c, ref, json.loads(got.stdout), np.load(c["out"]),
                              np.load(work / f"{c['name']}-ours.npy"))
    return results


def check(results, name) -> float:
    case, ref, got, want, pixels = results[name]
    assert got["frame_indices"] == ref["frame_indices"], name
    assert got["frames_total"] == ref["frames_total"], name
    assert abs(got["fps"] - ref["fps"]) < 1e-9, name
    assert pixels.shape == want.shape == (case["frames"], 3, 448, 448)
    return float(np.abs(pixels - want).max())


@pytest.mark.parametrize("name", [n + w for n in CODECS for w in ("", "-window")])
def test_codecs_and_containers_equal_load_video(cases, name):
    diff = check(cases, name)
    print(f"{name}: indices {cases[name][1]['frame_indices']}, max abs diff of the normalised tiles {diff:.3g}")
    # The same FFmpeg decoders and the same Pillow-exact resize: equal, up to float rounding of the
    # normalisation (and no more than one level of 8-bit colour, 1/255/0.225 = 0.0174, were the two
    # FFmpeg builds' RGB conversion to differ).
    assert diff <= 0.018, f"{name}: pixels differ from decord's by {diff}"


@pytest.mark.parametrize(("n", "rate"), LENGTHS)
def test_lengths_and_rates_pick_the_reference_frames(cases, n, rate):
    name = f"len{n}-{float(rate):.2f}"
    assert check(cases, name) <= 0.018
    got = cases[name][2]["frame_indices"]
    assert len(got) == 8 and got == sorted(got) and got[-1] < n


def test_a_window_of_a_long_video(cases):
    assert check(cases, "len121-window") <= 0.018
    assert cases["len121-window"][2]["frame_indices"][0] >= 22


@pytest.mark.parametrize("kind", ["gif", "webp"])
def test_animations_equal_pillows_frames(cases, kind):
    diff = check(cases, f"animated-{kind}")
    print(f"animated {kind}: max abs diff {diff:.3g}")
    # GIF: equal. WebP: the image crate's frame compositing is off by one 8-bit level on most pixels of
    # the frames after the first (lossless file; Pillow's libwebp frames equal the source), which the
    # resize to 448 spreads to at most 3 levels (3 / 255 / 0.225 = 0.052 normalised); measured 0.0523.
    assert diff <= (0.018 if kind == "gif" else 0.055)


def test_frames_differ_so_the_checks_mean_something(cases):
    _, _, _, _, pixels = cases["h264-mp4"]
    assert min(float(np.abs(pixels[i] - pixels[i + 1]).max()) for i in range(len(pixels) - 1)) > 0.5


def test_video_errors_are_one_line(tmp_path, fixtures):
    v = make_video(tmp_path / "v.mp4", "libx264", 10, Fraction(10), (64, 48))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    model = str(fixtures / "model")
    for args, code, says in [
        (["--video", str(junk)], 3, "junk.mp4"),
        (["--video", str(empty)], 3, "empty"),
        (["--video", str(tmp_path / "missing.mp4")], 3, "missing.mp4"),
        (["--video", str(v), "--frames", "0"], 2, "--frames"),
        (["--video", str(v), "--frames", "65"], 2, "--frames"),
        (["--video", str(v), "--image", str(fixtures / "images" / "448x448_1.png")], 2, "--video"),
        (["--video", str(v), "--max-tiles", "2"], 2, "--max-tiles"),
        (["--video", str(v), "--video-start", "5", "--video-end", "9"], 3, "starts after"),
        (["--video", str(v), "--video-start", "2", "--video-end", "1"], 2, "start < end"),
        (["--video", str(v), "--video-start", "1"], 2, "--video-end"),
    ]:
        r = subprocess.run([str(BINARY), "run", "--model", model, "--prompt", "What happens?", *args],
                           capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == code, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, (args, r.stderr)
    # Without FFmpeg the binary still runs, and a video says what it needs.
    env = {**os.environ, "PATH": str(tmp_path), "INTERNVL_FFMPEG_DIR": str(tmp_path)}
    r = ours(v, 4, tmp_path / "x.npy", env=env)
    assert r.returncode == 3 and "ffprobe" in r.stderr and "apt install ffmpeg" in r.stderr, r.stderr
    gif = make_animation(tmp_path / "a.gif", 5, [100] * 5)
    assert ours(gif, 4, tmp_path / "g.npy", env=env).returncode == 0  # animations need no FFmpeg
    r = subprocess.run([str(BINARY), "run", "--model", model, "--prompt", "Hi", "--max-new-tokens", "2"],
                       capture_output=True, text=True, timeout=120, check=False, env=env)
    assert r.returncode == 0, r.stderr
