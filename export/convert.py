"""checkpoint -> model folder: the whole export, each graph checked against PyTorch as it is written."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from onnx import TensorProto

from . import (
    amx,
    check,
    checkpoint,
    manifest,
    precision,
    quantize,
    templates,
    tensorrt,
    writer,
)
from .common import OutputError, UsageError, lean_allocator, release_memory
from .decoder import export_decoder, rope_of
from .embed import export_embedding
from .families import FAMILIES
from .tokenizer import write_tokenizer
from .vision import export_vision, layers_run
from .weights import Weights

DTYPES = ("float32", *precision.DTYPES, *quantize.DTYPES[1:], *quantize.HALF_INT4)


def log(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


def convert(source: str, out: Path, template: str | None = None, force: bool = False, dtype: str = "float32",
            int4_block: int = 32) -> Path:
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    ckpt = checkpoint.inspect(source, template)
    tpl = templates.template(ckpt.template)
    lean_allocator()
    out = check_output_folder(Path(out), ckpt.path, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp folder and move into place at the end: a failed export never leaves a
    # half-written model folder, and never damages the one already there.
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        t0 = time.time()
        tokenizer_json = write_tokenizer(ckpt.path, work / "tokenizer.json")
        ids = manifest.special_ids(tokenizer_json)
        log(f"reading {ckpt.path} ({ckpt.layout} layout, {ckpt.llm_family} LLM, template {ckpt.template})")
        cfg = checkpoint.reference_config(ckpt, ids["img_context"])
        vspec, lspec = checkpoint.specs(ckpt, cfg)
        weights = Weights(ckpt, checkpoint.tied(cfg))
        vision, decoder = export_graphs(work, dtype, int4_block, vspec, lspec, cfg, weights)
        log("embed_tokens.bin")
        embed = export_embedding(weights, work / "embed_tokens.bin")
        if dtype in ("int8", "int4"):
            for entry, graph, head_dim, layers in (
                    (vision, "vision.onnx", vspec.hidden // vspec.heads, layers_run(vspec)),
                    (decoder, "decoder.onnx", lspec.head_dim, lspec.layers)):
                variant = amx.write_variant(work / graph, head_dim, layers)
                if variant:
                    entry["amx"] = variant
                    log(f"{variant['file']}: {layers} attention layers on the runtime's AMX kernel")
        if vision["dtype"] in ("float32", *precision.DTYPES):
            vt = vision["dtype"]
            trt = tensorrt.write_variant(work / "vision.onnx", vt, vspec.hidden, vspec.heads)
            trt["max_abs_diff_vs_vision"] = tensorrt.self_check(work / "vision.onnx", work / trt["file"], vt,
                                                                vision["image_size"], 1e-2 if vt != "float32" else 1e-4)
            vision["tensorrt"] = trt
            log(f"{trt['file']}: attention in plain operators for TensorRT")
        pin_shapes(work, vision, decoder)
        tokenizer = {"file": "tokenizer.json", "img_start": "<img>", "img_end": "</img>",
                     "img_context": "<IMG_CONTEXT>", "img_start_id": ids["img_start"], "img_end_id": ids["img_end"],
                     "img_context_id": ids["img_context"], "vocab_size": ids["vocab_size"],
                     **answer_spec(ckpt, tokenizer_json, tpl)}
        image = {"image_size": vision["image_size"], **checkpoint.tiling(ckpt),
                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
        manifest.write(
            work, name=out.name, dtype=dtype,
            source={"checkpoint": ckpt.source, "layout": ckpt.layout, "llm_family": ckpt.llm_family},
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
    finally:
        if work.exists():
            shutil.rmtree(work)


def pin_shapes(work: Path, vision: dict, decoder: dict) -> None:
    """The fixed output sizes in every graph file (portable and AMX), for the runtime's load-time check."""
    kv = ["batch", decoder["kv_heads"], "total", decoder["head_dim"]]
    present = {decoder["outputs"][f"present_{x}"].replace("{}", str(i)): kv
               for i in range(decoder["layers"]) for x in ("key", "value")}
    for entry, shapes in ((vision, {vision["output"]: ["tiles", vision["tokens_per_tile"], vision["embed_dim"]]}),
                          (decoder, {decoder["outputs"]["logits"]: ["batch", decoder["vocab"]], **present})):
        variants = [entry[k]["file"] for k in ("amx", "tensorrt") if k in entry]
        for f in [entry["file"], *variants]:
            manifest.pin_output_shapes(work / f, shapes)


def check_output_folder(out: Path, checkpoint_dir: Path, force: bool) -> Path:
    """Never overwrite what the user has: a non-empty `--out` needs --force, and even then only a model
    folder this exporter wrote (its manifest.json) is replaced, never the checkpoint or a folder holding it."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise OutputError(f"output folder {out} is not empty; pass --force to replace it")
        m = out / "manifest.json"
        try:
            ours = json.loads(m.read_text()).get("format") == manifest.FORMAT
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise OutputError(f"output folder {out} is not a model folder written by this exporter; not replacing it")
    o, c = out.resolve(), checkpoint_dir.resolve()
    if o == c or o in c.parents:
        raise OutputError(f"output folder {out} would replace the checkpoint {checkpoint_dir}")
    return out


def export_graphs(work: Path, dtype: str, int4_block: int, vspec, lspec, cfg, weights) -> tuple[dict, dict]:
    """vision.onnx and decoder.onnx in `dtype`, each checked as `check.py` says: first against transformers
    on the first layers (float32), then the written graph against our module over every layer."""
    half = dtype.removeprefix("int4-") if dtype in (*precision.DTYPES, *quantize.HALF_INT4) else "float32"
    vquant = writer.Int8() if dtype in ("int8", "int4") else None
    scale_type = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}.get(half)
    dquant = {"int8": writer.Int8(), "int4": writer.Int4(int4_block),
              "int4-float16": writer.Int4(int4_block, scale_type, None),
              "int4-bfloat16": writer.Int4(int4_block, scale_type, None)}.get(dtype)

    vl, tl = check.prefix_layers(vspec, lspec)
    log(f"checking the first layers against transformers (vision {vl}, LLM {tl} of {lspec.layers})")
    reference = checkpoint.reference_model(cfg, weights, vl, tl)
    rope = rope_of(reference)
    vref = check.vision_prefix(vspec, weights, reference, work, half)
    dref = check.decoder_prefix(lspec, weights, reference, rope, work, half, dquant)
    del reference
    release_memory()
    log(f"  max abs diff: vision {vref['max_abs_diff']:.2e}, decoder {dref['max_abs_diff']:.2e}")
    checked = {"tolerance": check.TOLERANCE, "rtol": check.RTOL}

    log(f"vision.onnx: {'int8' if vquant else half}")
    vision = export_vision(vspec, weights, work / "vision.onnx", half, vquant)
    vision.update(**vref, **checked, reference_layers=vl)
    if half == "float32":
        vfull = check.vision_full(vspec, weights, work / "vision.onnx", quantized=vquant is not None)
        (vision if vquant is None else vision["quantization"]).update(vfull)
    release_memory()
    log(f"decoder.onnx: {dtype if dquant else half}")
    decoder = export_decoder(lspec, weights, rope, work / "decoder.onnx", half, dquant)
    decoder.update(**dref, **checked, reference_layers=tl)
    if half == "float32":
        dfull = check.decoder_full(lspec, weights, rope, work / "decoder.onnx", quantized=dquant is not None)
        (decoder if dquant is None else decoder["quantization"]).update(dfull)
    release_memory()
    for entry in (vision, decoder):
        figures = {**entry.get("quantization", {}), **entry.get("precision", {})}
        figures.update({k: entry[k] for k in ("max_abs_diff_full",) if k in entry})
        log(f"  {entry['file']}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in figures.items()))
    if isinstance(dquant, writer.Int4):
        decoder.update(dtype="int4", int4_block=int4_block)
        if half != "float32":
            decoder["activations"] = half
        if half == "bfloat16":  # measured through the module, which has no int4 weights
            decoder["quantization"]["drift_measured_without_int4"] = True
    elif isinstance(dquant, writer.Int8):
        decoder["dtype"] = "int8"
    return vision, decoder


def answer_spec(ckpt: checkpoint.Checkpoint, tokenizer_json: Path, tpl: dict) -> dict:
    """Where generation stops and how the answer text is made from the ids, as the reference does it.

    Original layout: the remote code's `chat()` sets `eos_token_id` to the id of `template.sep.strip()` only,
    decodes with the slow tokenizer (`skip_special_tokens=True` in the `internvl_chat` code; False in the
    InternVL3.5 code, i.e. Qwen3 LLMs), then returns `text.split(sep.strip())[0].strip()`. The slow tokenizer
    skips its `all_special_ids` (bos / eos / unk / sep / pad / cls / mask and additional_special_tokens),
    which is not the set tokenizer.json marks special (InternVL's `<img>` tokens are special there only).
    -hf layout: transformers' `generate` stops on generation_config's eos ids; the fast tokenizer skips the
    tokens tokenizer.json marks special."""
    from .tokenizer import reference_added_tokens, reference_special_tokens

    tok = json.loads(tokenizer_json.read_text())
    separate, spaces, clean_runs, clean_text = [], False, False, False
    if ckpt.layout == "original":
        stop = [manifest.token_id(tokenizer_json, tpl["stop"])]
        stop_why = "chat(): eos_token_id = id of template.sep.strip()"
        keep_special = FAMILIES[ckpt.llm_family].keeps_special_tokens
        names = [] if keep_special else reference_special_tokens(ckpt.path)
        skip = sorted({i for i in (manifest.token_id_or_none(tokenizer_json, n) for n in names) if i is not None})
        why = ("InternVL3.5 chat(): batch_decode(skip_special_tokens=False)" if keep_special else
               "chat(): batch_decode(skip_special_tokens=True) with the slow tokenizer's all_special_ids")
        split = tpl["stop"]
        # The slow sentencepiece classes decode each run between non-special added tokens on its own and
        # join the pieces with spaces (`spaces_between_special_tokens=True`; Qwen2Tokenizer turns it off).
        added, sp_class, clean_runs, clean_text = reference_added_tokens(ckpt.path)
        if sp_class:
            spaces = True
            separate = sorted({i for i in (manifest.token_id_or_none(tokenizer_json, n)
                                           for n in added if n not in names) if i is not None} - set(skip))
    else:
        stop = eos_ids(ckpt) or [manifest.token_id(tokenizer_json, tpl["stop"])]
        stop_why = "generate(): generation_config.json eos_token_id"
        skip = sorted(t["id"] for t in tok.get("added_tokens", []) if t.get("special"))
        why = "decode(skip_special_tokens=True) with the fast tokenizer"
        split = None
    return {"stop_ids": stop, "stop_ids_source": stop_why,
            "answer": {"skip_ids": skip, "skip_ids_source": why, "split_at": split, "separate_ids": separate,
                       "spaces_between_separate": spaces, "clean_up_runs": clean_runs, "clean_up_text": clean_text}}


def eos_ids(ckpt: checkpoint.Checkpoint) -> list[int]:
    """eos ids from generation_config.json (what `generate` stops on), else from the LLM config."""
    gen = ckpt.path / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    if eos is None:
        llm = ckpt.config.get("text_config") or ckpt.config.get("llm_config") or {}
        eos = llm.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
