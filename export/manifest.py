"""manifest.json: everything the runtime needs to drive the graphs, in one versioned schema.

src/manifest.rs reads exactly this (FORMAT_VERSION must match) and validates it once at load.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

from .common import CheckpointError

FORMAT = "internvl-onnx"
FORMAT_VERSION = 1


def token_id(tokenizer_json: Path, token: str) -> int:
    from tokenizers import Tokenizer

    tid = Tokenizer.from_file(str(tokenizer_json)).token_to_id(token)
    if tid is None:
        raise CheckpointError(f"{tokenizer_json}: token {token!r} missing")
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


def write(out_dir: Path, *, name: str, dtype: str, source: dict, vision: dict, embed: dict, decoder: dict,
          tokenizer: dict, template: dict, image: dict, generation: dict) -> Path:
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
        "files": file_entries(out_dir),
    }
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return path


def file_entries(out_dir: Path) -> dict:
    """Size and SHA-256 of every file the folder holds (the runtime checks sizes at each load, digests on
    `internvl info --verify`)."""
    entries = {}
    for f in sorted(out_dir.iterdir()):
        if f.name == "manifest.json" or not f.is_file():
            continue
        digest = hashlib.sha256()
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        entries[f.name] = {"bytes": f.stat().st_size, "sha256": digest.hexdigest()}
    return entries


def pin_output_shapes(graph: Path, shapes: dict[str, list]) -> None:
    """Writes the fixed sizes of `graph`'s outputs (names -> dims, a str for a dynamic one) into the graph, so
    the runtime can compare them with the manifest at load instead of at the first run."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    outputs = {o.name: o for o in model.graph.output}
    for name, dims in shapes.items():
        shape = outputs[name].type.tensor_type.shape
        if len(shape.dim) != len(dims):
            raise ValueError(f"{graph.name}: output {name} has rank {len(shape.dim)}, expected {len(dims)}")
        for d, want in zip(shape.dim, dims, strict=True):
            if isinstance(want, int):
                d.Clear()
                d.dim_value = want
    onnx.save_model(model, str(graph))  # initializers keep pointing at their .data file
