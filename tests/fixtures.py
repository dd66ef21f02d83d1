"""Builds what the Rust end-to-end tests compare against, in one run, from nothing but this repo:

  build/fixtures/checkpoint/   tiny random-weight InternVL checkpoint (-hf layout, Qwen2 LLM)
  build/fixtures/model/        its export (python -m export)
  build/fixtures/images/       test images (PNG)
  build/fixtures/cases.json    requests: image, prompt, tile limit
  build/fixtures/golden.json   PyTorch greedy token ids for each request (export/testing/golden.py)

Rebuilt when any exporter or fixture source changes (a stamp holds their hash).
Usage: .venv/bin/python tests/fixtures.py [OUT_DIR]   (from any folder: it imports only `export`, which
scripts/setup.sh installs in .venv; also `python -m tests.fixtures` from the root, or `from tests import fixtures`)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent  # `export` is installed in .venv (scripts/setup.sh)

IMAGES = {"a": ((448, 448), 1), "b": ((448, 448), 2), "c": ((800, 600), 3), "d": ((600, 900), 4),
          "e": ((1600, 1000), 5)}

# name, images, prompt, extra case fields. The default model: -hf layout, Qwen2 LLM, InternViT-300M.
CASES = [
    ("one_tile", ["a"], "Describe the image.", {}),
    ("one_tile_other_prompt", ["a"], "What colour is the sky in this picture?", {}),
    ("one_tile_other_image", ["b"], "Describe the image.", {}),
    ("grid_thumbnail", ["c"], "Describe the image.", {}),
    ("grid_max6_own_placeholder", ["d"], "Look at <image> and list the objects.", {"max_tiles": 6}),
    ("max_tiles_40", ["e"], "Describe the image in detail.", {"max_tiles": 40}),
    ("text_only", [], "Write a short poem about the sea.", {}),
    ("two_images", ["a", "c"], "What is different between the two images?", {"max_tiles": 4}),
    ("history", ["a"], "And what colour is it?",
     {"history": [["<image>\nWhat is in the picture?", "A small red boat on a lake."]]}),
    ("system_replaced", ["a"], "Describe the image.", {"system": "You are a terse assistant."}),
]

# Other LLM families and InternViT-6B, each written in the original OpenGVLab layout (and, from the same
# weights, in the -hf layout that transformers runs as the reference). name: (family, vision, seed).
FAMILIES = {
    "qwen2-original": ("qwen2", "300m", 11),
    "llama-original": ("llama", "300m", 12),
    "qwen3-original": ("qwen3", "6b", 13),
    "internlm2-original": ("internlm2", "6b", 14),
    "phi3-original": ("phi3", "300m", 15),
}


PHI3_TEXT = "Write a short poem about the sea."


def text_prompt_length(tokenizer_dir: Path, template: str, question: str) -> int:
    """Token count of a text-only prompt as the reference builds it."""
    import tempfile

    from tokenizers import Tokenizer

    from export import templates
    from export.testing.golden import reference_query
    from export.tokenizer import write_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer.from_file(str(write_tokenizer(tokenizer_dir, Path(tmp) / "tokenizer.json")))
    return len(tok.encode(reference_query(templates.template(template), question, None, [], [], 256)).ids)


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
    from export.testing.golden import write_goldens
    from export.testing.tiny import (
        SP_TOKENIZER,
        TEMPLATE,
        make_model,
        make_tokenizer,
        save_hf,
        save_original,
    )

    stamp = out / "stamp"
    digest = source_hash()
    if stamp.is_file() and stamp.read_text() == digest:
        print(f"fixtures in {out} are up to date", file=sys.stderr)
        return
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    images = {}
    for key, (size, seed) in IMAGES.items():
        path = out / "images" / f"{size[0]}x{size[1]}_{seed}.png"
        make_image(size, seed).save(path)
        images[key] = str(path.relative_to(out))

    save_hf(make_model("tiny", "qwen2", "300m", seed=0), out / "checkpoint")
    convert(str(out / "checkpoint"), out / "model")
    # The same checkpoint for GPUs: float16 runs on the CPU provider too, bfloat16 only on GPUs.
    for dtype in ("float16", "bfloat16"):
        convert(str(out / "checkpoint"), out / f"model-{dtype}", dtype=dtype)
    cases = [{"name": name, "prompt": prompt, "images": [images[i] for i in imgs], "max_new_tokens": 40,
              "checkpoint": "checkpoint", "model": "model", **extra}
             for name, imgs, prompt, extra in CASES]
    for name, (family, vision, seed) in FAMILIES.items():
        tok_dir = out / "tokenizers" / family
        tokens = make_tokenizer(family, tok_dir)
        sp = tok_dir if family in SP_TOKENIZER else None
        # Phi-3's LongRoPE switches factor sets past a prompt length: put that length inside the text-only
        # case's answer, so that one case crosses it while decoding and the image case starts past it.
        after = text_prompt_length(tok_dir, TEMPLATE[family], PHI3_TEXT) + 20 if family == "phi3" else 4096
        model = make_model("tiny", family, vision, seed=seed, long_rope_after=after, tokens=tokens)
        save_hf(model, out / "checkpoints" / f"{name}-reference-hf", sp)
        save_original(model, out / "checkpoints" / name, family, sp)
        convert(str(out / "checkpoints" / name), out / "models" / name)
        common = {"max_new_tokens": 40, "checkpoint": f"checkpoints/{name}-reference-hf",
                  "template": TEMPLATE[family], "model": f"models/{name}"}
        cases.append({"name": name, "prompt": "Describe the image.", "images": [images["c"]], **common})
        if family == "phi3":
            cases.append({"name": f"{name}-text-crossing-long-rope", "prompt": PHI3_TEXT, "images": [], **common})
    # The qwen2-original weights again, with pixel shuffle v1 and the features of the second-to-last
    # ViT layer (InternVL 1.5-era settings): checked graph-level by tests/python/test_export.py.
    variant = out / "checkpoints" / "qwen2-v1-layer-2"
    shutil.copytree(out / "checkpoints" / "qwen2-original", variant)
    cfg = json.loads((variant / "config.json").read_text())
    cfg.update(ps_version="v1", select_layer=-2)
    (variant / "config.json").write_text(json.dumps(cfg, indent=2))
    convert(str(variant), out / "models" / "qwen2-v1-layer-2")
    # int8 with 64- and 128-wide attention heads: the export writes the AMX attention graphs too
    # (tests/kernels.rs, amx_*).
    for shape, name in (("tiny-amx", "qwen2-amx"), ("tiny-amx128", "qwen2-amx128")):
        save_hf(make_model(shape, "qwen2", "300m", seed=7), out / "checkpoints" / name)
        convert(str(out / "checkpoints" / name), out / "models" / f"{name}-int8", dtype="int8")
    (out / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")
    write_goldens(out / "cases.json", out / "golden.json")
    stamp.write_text(digest)
    print(f"fixtures written to {out}", file=sys.stderr)


if __name__ == "__main__":
    import importlib.util

    if importlib.util.find_spec("export") is None:
        sys.exit(f"tests/fixtures.py: `export` is not installed in {sys.prefix} (run scripts/setup.sh)")
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "fixtures")
