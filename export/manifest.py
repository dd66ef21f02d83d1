"""manifest.json: everything the runtime needs to drive the graphs, in one versioned schema.

src/manifest.rs reads exactly this (FORMAT_VERSION must match) and validates it once at load.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

FORMAT = "internvl-onnx"
FORMAT_VERSION = 1


def token_id(tokenizer_json: Path, token: str) -> int:
    from tokenizers import Tokenizer

    tid = Tokenizer.from_file(str(tokenizer_json)).token_to_id(token)
    if tid is None:
        raise SystemExit(f"{tokenizer_json}: token {token!r} missing")
    return tid


def token_id_or_none(tokenizer_json: Path, token: str) -> int | None:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_json)).token_to_id(token)


def special_ids(tokenizer_json: Path) -> dict:
    """Ids of the tokens the runtime treats specially, looked up in the tokenizer that ships with the model."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = {name: token_id(tokenizer_json, s)
           for name, s in (("img_start", "<img>"), ("img_end", "</img>"), ("img_context", "<IMG_CONTEXT>"))}
    return {**ids, "vocab_size": tok.get_vocab_size(with_added_tokens=True)}


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
