"""checkpoint -> model folder: the whole export, each graph checked against PyTorch as it is written."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import checkpoint, manifest, templates
from .common import ExportCheckError
from .decoder import export_decoder
from .embed import export_embedding
from .vision import export_vision


def log(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


def convert(source: str, out: Path, template: str | None = None, force: bool = False) -> Path:
    ckpt = checkpoint.inspect(source, template)
    tpl = templates.template(ckpt.template)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise SystemExit(f"output folder {out} is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp folder and move into place at the end: a failed export never leaves a
    # half-written model folder, and never damages the one already there.
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        t0 = time.time()
        log(f"loading {ckpt.path}")
        model = checkpoint.load_model(ckpt)
        log("vision.onnx")
        vision = export_vision(model, work / "vision.onnx")
        log(f"  max abs diff to PyTorch {vision['max_abs_diff']:.2e} (tolerance {vision['tolerance']:g})")
        log("embed_tokens.bin")
        embed = export_embedding(model, work / "embed_tokens.bin")
        log("decoder.onnx")
        decoder = export_decoder(model, work / "decoder.onnx")
        log(f"  max abs diff to PyTorch {decoder['max_abs_diff']:.2e} (tolerance {decoder['tolerance']:g})")
        shutil.copyfile(ckpt.path / "tokenizer.json", work / "tokenizer.json")
        ids = manifest.special_ids(work / "tokenizer.json")
        stop_ids = sorted({ids_of(work / "tokenizer.json", tpl["stop"]), *eos_ids(ckpt)})
        tokenizer = {"file": "tokenizer.json", "img_start": "<img>", "img_end": "</img>",
                     "img_context": "<IMG_CONTEXT>", "img_start_id": ids["img_start"], "img_end_id": ids["img_end"],
                     "img_context_id": ids["img_context"], "vocab_size": ids["vocab_size"], "stop_ids": stop_ids}
        image = {"image_size": vision["image_size"], "min_tiles": 1, "max_tiles": 12, "use_thumbnail": True,
                 "mean": vision.pop("mean"), "std": vision.pop("std")}
        manifest.write(
            work, name=out.name, source={"checkpoint": ckpt.source, "layout": "hf", "llm_arch": ckpt.llm_arch},
            vision=vision, embed=embed, decoder=decoder, tokenizer=tokenizer, template=tpl, image=image,
            generation={"max_new_tokens": 1024},
        )
        work.chmod(0o755)
        for f in work.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
        log(f"wrote {out} in {time.time() - t0:.1f} s")
        return out
    except ExportCheckError as e:
        raise SystemExit(f"export check failed: {e}") from e
    finally:
        if work.exists():
            shutil.rmtree(work)


def ids_of(tokenizer_json: Path, token: str) -> int:
    from tokenizers import Tokenizer

    tid = Tokenizer.from_file(str(tokenizer_json)).token_to_id(token)
    if tid is None:
        raise SystemExit(f"{tokenizer_json}: token {token!r} missing")
    return tid


def eos_ids(ckpt: checkpoint.Checkpoint) -> list[int]:
    """eos ids from generation_config.json (what `generate` stops on), else from the LLM config."""
    import json

    gen = ckpt.path / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    if eos is None:
        eos = (ckpt.config.get("text_config") or {}).get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
