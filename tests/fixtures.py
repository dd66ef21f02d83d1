"""Builds what the Rust end-to-end tests compare against, in one run, from nothing but this repo:

  build/fixtures/checkpoint/   tiny random-weight InternVL checkpoint (-hf layout, Qwen2 LLM)
  build/fixtures/model/        its export (python -m export)
  build/fixtures/images/       test images (PNG)
  build/fixtures/cases.json    requests: image, prompt, tile limit
  build/fixtures/golden.json   PyTorch greedy token ids for each request (python -m export golden)

Rebuilt when any exporter or fixture source changes (a stamp holds their hash).
Usage: .venv/bin/python tests/fixtures.py [OUT_DIR]
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = [
    # name, image (size, seed) or None, prompt, max_tiles
    ("one_tile", ((448, 448), 1), "Describe the image.", None),
    ("one_tile_other_prompt", ((448, 448), 1), "What colour is the sky in this picture?", None),
    ("one_tile_other_image", ((448, 448), 2), "Describe the image.", None),
    ("grid_thumbnail", ((800, 600), 3), "Describe the image.", None),
    ("grid_max6_own_placeholder", ((600, 900), 4), "Look at <image> and list the objects.", 6),
    ("max_tiles_40", ((1600, 1000), 5), "Describe the image in detail.", 40),
    ("text_only", None, "Write a short poem about the sea.", None),
]


def make_image(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth colour fields plus noise and a few shapes: varied content at every scale."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 6, 3)
        img[..., c] = 127 + 100 * np.sin(2 * np.pi * (fx * x / w + fy * y / h) + ph)
    img += rng.normal(0, 20, img.shape)
    for _ in range(6):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        img[y0:y0 + h // 5, x0:x0 + w // 5] = rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def source_hash() -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / "export").rglob("*.py")) + [Path(__file__).resolve()]:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def main(out: Path) -> None:
    from export.convert import convert
    from export.golden import write_goldens
    from export.tiny import make_checkpoint

    stamp = out / "stamp"
    digest = source_hash()
    if stamp.is_file() and stamp.read_text() == digest:
        print(f"fixtures in {out} are up to date", file=sys.stderr)
        return
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    make_checkpoint(out / "checkpoint", shape="tiny", seed=0)
    convert(str(out / "checkpoint"), out / "model")
    cases = []
    for name, image, prompt, max_tiles in CASES:
        case = {"name": name, "prompt": prompt, "max_new_tokens": 40}
        if image:
            (size, seed) = image
            path = out / "images" / f"{size[0]}x{size[1]}_{seed}.png"
            if not path.exists():
                make_image(size, seed).save(path)
            case["image"] = str(path.relative_to(out))
        if max_tiles:
            case["max_tiles"] = max_tiles
        cases.append(case)
    (out / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")
    write_goldens(out / "checkpoint", out / "cases.json", out / "golden.json")
    stamp.write_text(digest)
    print(f"fixtures written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "fixtures")
