"""checkpoint -> model folder: the whole export, each graph checked against PyTorch as it is written."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from . import amx, checkpoint, manifest, precision, quantize, templates, tensorrt
from .common import OutputError, UsageError
from .decoder import empty_past, export_decoder, graph_module, step_feed
from .embed import export_embedding
from .families import FAMILIES
from .tokenizer import write_tokenizer
from .vision import VisionEncoder, export_vision, layers_run

DTYPES = ("float32", *precision.DTYPES, *quantize.DTYPES[1:], *quantize.HALF_INT4)


def log(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


def convert(source: str, out: Path, template: str | None = None, force: bool = False, dtype: str = "float32",
            int4_block: int = 32) -> Path:
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    ckpt = checkpoint.inspect(source, template)
    tpl = templates.template(ckpt.template)
    out = check_output_folder(Path(out), ckpt.path, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp folder and move into place at the end: a failed export never leaves a
    # half-written model folder, and never damages the one already there.
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        t0 = time.time()
        tokenizer_json = write_tokenizer(ckpt.path, work / "tokenizer.json")
        ids = manifest.special_ids(tokenizer_json)
        log(f"loading {ckpt.path} ({ckpt.layout} layout, {ckpt.llm_family} LLM, template {ckpt.template})")
        model = checkpoint.load(ckpt, ids["img_context"])
        vspec, lspec = checkpoint.specs(ckpt, model)
        weights = model.state_dict()

        def reference(pv):  # transformers' InternVL: independent of our vision module
            return model.model.get_image_features(pixel_values=pv, vision_feature_layer=vspec.select_layer,
                                                  vision_feature_select_strategy="default").pooler_output

        log("vision.onnx")
        # transformers implements pixel shuffle v2 only; v1 graphs are checked against our own module.
        vision = export_vision(vspec, weights, work / "vision.onnx", reference if vspec.ps_version == "v2" else None)
        log(f"  max abs diff to PyTorch {vision['max_abs_diff']:.2e}")
        log("embed_tokens.bin")
        embed = export_embedding(model, work / "embed_tokens.bin")
        log("decoder.onnx")
        decoder = export_decoder(lspec, model, work / "decoder.onnx")
        log(f"  max abs diff to PyTorch {decoder['max_abs_diff']:.2e}")
        table = weights["model.language_model.embed_tokens.weight"]
        if dtype in precision.DTYPES or dtype in quantize.HALF_INT4:
            half = dtype.removeprefix("int4-")
            vision, decoder = half_graphs(work, half, vspec, lspec, weights, model, vision, decoder, table,
                                          int4_block if dtype in quantize.HALF_INT4 else None)
        elif dtype != "float32":
            quantize_graphs(work, dtype, vision, decoder, table, lspec, int4_block)
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


def drift_feeds(work: Path, vision: dict, decoder: dict, embed_table, lspec) -> tuple[list[dict], list[dict]]:
    """Random input for comparing a graph with the fp32 one it replaces: two tiles; a 24-token prompt, and a
    decode step after it on the fp32 graph's cache (both LongRoPE factor sets where the model has them)."""
    import torch

    from .common import ort_session

    gen = torch.Generator().manual_seed(5)
    tiles = [{"pixel_values": torch.randn(2, 3, vision["image_size"], vision["image_size"], generator=gen).numpy()}]
    ids = torch.randint(0, embed_table.shape[0], (1, 25), generator=gen)
    embeds = embed_table[ids].detach().float().numpy()
    sess = ort_session(work / "decoder.onnx")
    have = {i.name for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    prompts = []
    for flag in (0, 1) if decoder["inputs"]["long_rope"] else (0,):
        prompt = step_feed(have, embeds[:, :24], empty_past(lspec.layers, lspec.kv_heads, lspec.head_dim), 0, flag)
        past = dict(zip(outputs[1:], sess.run(outputs, prompt)[1:], strict=True))
        past = {n.replace("present.", "past_key_values."): v for n, v in past.items()}
        prompts += [prompt, step_feed(have, embeds[:, 24:], past, 24, flag)]
    return tiles, prompts


def half_graphs(work: Path, dtype: str, vspec, lspec, weights, model, vision: dict, decoder: dict, embed_table,
                int4_block: int | None = None):
    """Replace the fp32 graphs in `work` by their `dtype` versions, recording the drift from fp32; with
    `int4_block`, the decoder's matmul weights as int4 blocks too (`quantize.int4_half`), and its drift is
    then that of the int4 graph wherever it can run here (float16; bfloat16 only on GPUs)."""
    tiles, prompts = drift_feeds(work, vision, decoder, embed_table, lspec)
    t = precision.TORCH_DTYPES[dtype]
    out = []
    for name, entry, export, module, feeds in (
            ("vision.onnx", vision, lambda p: export_vision(vspec, weights, p, dtype=dtype),
             lambda: VisionEncoder(vspec, weights, t).eval(), tiles),
            ("decoder.onnx", decoder, lambda p: export_decoder(lspec, model, p, dtype=dtype),
             lambda: graph_module(lspec, model, t), prompts)):
        log(f"{name}: {dtype}")
        half = work / f"{dtype}-{name}"
        new = export(half)
        if int4_block and name == "decoder.onnx":
            q = work / f"int4-{name}"
            new["quantization"] = quantize.int4_half(half, q, int4_block)
            new.update(dtype="int4", activations=dtype, int4_block=int4_block)
            log(f"  int4: {new['quantization']['matmuls']} matmuls, worst weight rel L2 "
                f"{new['quantization']['worst_weight_rel_l2']:.3g}")
            quantize.replace(q, half)
            if dtype == "bfloat16":  # measured through the module, which has no int4 weights
                new["quantization"]["drift_measured_without_int4"] = True
        new["precision"] = precision.drift(work / name, half, module() if dtype == "bfloat16" else None, feeds,
                                           dtype, strict=name == "vision.onnx")
        new["fp32_max_abs_diff_to_pytorch"] = entry["max_abs_diff"]
        log("  vs fp32: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in new["precision"].items()))
        quantize.replace(half, work / name)
        new["file"] = name
        out.append(new)
    return out[0], out[1]


def quantize_graphs(work: Path, dtype: str, vision: dict, decoder: dict, embed_table, lspec, int4_block: int = 32) -> None:
    """Replace the fp32 graphs in `work` by their `dtype` versions, recording the drift from fp32."""
    tiles, prompts = drift_feeds(work, vision, decoder, embed_table, lspec)
    jobs = [("vision.onnx", vision, quantize.int8_dynamic, tiles),
            ("decoder.onnx", decoder, partial(quantize.int4_weights, block=int4_block) if dtype == "int4"
             else quantize.int8_dynamic, prompts)]
    for name, entry, fn, feeds in jobs:
        log(f"{name}: {dtype if name == 'decoder.onnx' else 'int8'}")
        quant = work / ("quantized-" + name)
        fn(work / name, quant)
        entry["quantization"] = quantize.compare(work / name, quant, feeds, strict=name == "vision.onnx")
        entry["dtype"] = "int4" if name == "decoder.onnx" and dtype == "int4" else "int8"
        if entry["dtype"] == "int4":
            entry["int4_block"] = int4_block
        log("  vs fp32: " + ", ".join(f"{k} {v:.4g}" for k, v in entry["quantization"].items()))
        quantize.replace(quant, work / name)


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
