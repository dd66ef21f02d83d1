"""manifest.json: everything the runtime needs to drive the graphs, in one versioned schema.

src/manifest.rs reads exactly this (FORMAT_VERSION must match) and validates it once at load.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

FORMAT = "internvl-onnx"
FORMAT_VERSION = 1


def special_ids(tokenizer_json: Path) -> dict:
    """Ids of the tokens the runtime treats specially, looked up in the tokenizer that ships with the model."""
    tok = json.loads(tokenizer_json.read_text())
    added = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab = tok.get("model", {}).get("vocab", {})

    def lookup(s):
        if s in added:
            return added[s]
        if s in vocab:
            return vocab[s]
        raise SystemExit(f"{tokenizer_json}: token {s!r} missing")

    return {"img_start": lookup("<img>"), "img_end": lookup("</img>"), "img_context": lookup("<IMG_CONTEXT>"),
            "vocab_size": max([*added.values(), *vocab.values()]) + 1}


def versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    from . import EXPORTER_VERSION

    return {"exporter": EXPORTER_VERSION, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def write(out_dir: Path, *, name: str, dtype: str, source: dict, vision: dict, embed: dict, decoder: dict, tokenizer: dict,
          template: dict, image: dict, generation: dict) -> Path:
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "dtype": dtype,
        "versions": versions(),
        "source": source,
        "image": image,
        "vision": vision,
        "embed": embed,
        "decoder": decoder,
        "tokenizer": tokenizer,
        "template": template,
        "generation": generation,
    }
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return path
