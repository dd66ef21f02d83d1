"""Each graph checked as it is written, without ever holding the model twice (or once, in float32).

- First layers (`vision_prefix`, `decoder_prefix`): a graph of the first PREFIX layers plus everything
  around them (embeddings, projector, final norm, head), written by the same code as the real one, on ONNX
  Runtime against transformers' InternVL built with those layers only (`checkpoint.reference_model`),
  which is independent of our modules. Tiny test models have no more layers than that, so for them this is
  the whole model. For float16 / bfloat16 exports the same prefix is also written in that type and its
  drift from the float32 prefix is what the manifest records: ONNX Runtime's CPU provider runs a float16
  graph by converting every weight to float32 (2.2 GB resident for the 0.99 GB 1B decoder; 30 GB for an
  8B one) and has no bfloat16 kernels, so a whole half-precision graph is not run here
  (`scripts/gpu_check.sh` runs it on a GPU).
- Every layer (`vision_full`, `decoder_full`, float32-activation graphs: float32, int8, int4): the graph as
  written on ONNX Runtime (weights mapped from the file, not copied) against our module run in PyTorch
  over the checkpoint's weights read one at a time: exact for float32 (every weight in its place), the
  drift from float32 for int8 / int4.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from . import precision, writer
from .common import check_close, ort_session
from .decoder import (
    LlmSpec,
    Rope,
    empty_past,
    export_decoder,
    graph_module,
    io_names,
    step_feed,
)
from .decoder import graph_weights as decoder_weights
from .vision import PREFIXES, VisionEncoder, VisionSpec, export_vision, layers_run
from .vision import graph_weights as vision_weights

PREFIX = 2  # layers of the reference check
TOLERANCE, RTOL = 1e-3, 1e-5  # float32 graph vs PyTorch: 1e-3 plus 1e-5 of the largest value compared
EMBED = "model.language_model.embed_tokens.weight"


def prefix_layers(vspec: VisionSpec, lspec: LlmSpec) -> tuple[int, int]:
    """Layers of the reference model: vision, text."""
    return min(PREFIX, layers_run(vspec)), min(PREFIX, lspec.layers)


def _drop(path: Path) -> None:
    for f in (path, path.parent / (path.name + ".data")):
        f.unlink(missing_ok=True)


def vision_prefix(vspec: VisionSpec, weights, reference, work: Path, dtype: str = "float32") -> dict:
    """{"max_abs_diff": the float32 prefix graph vs transformers (vs our module for pixel shuffle v1, which
    transformers does not implement)} plus, for a `dtype` other than float32, {"precision": its drift}."""
    spec = dataclasses.replace(vspec, layers=min(PREFIX, layers_run(vspec)), select_layer=-1)
    f32, half = work / "check-vision.onnx", work / f"check-vision-{dtype}.onnx"
    try:
        export_vision(spec, weights, f32)
        pv = torch.randn(3, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(1))
        got = _run(f32, {"pixel_values": pv.numpy()})
        with torch.no_grad():
            if spec.ps_version == "v2":
                want = reference.model.get_image_features(pixel_values=pv, vision_feature_layer=-1,
                                                          vision_feature_select_strategy="default").pooler_output
            else:
                want = VisionEncoder(spec, vision_weights(weights, "float32"))(pv)
        out = {"max_abs_diff": check_close("vision.onnx (first layers) vs transformers", got, want.numpy(),
                                           TOLERANCE, RTOL)}
        if dtype != "float32":
            if dtype == "bfloat16":
                with torch.no_grad():
                    lower = VisionEncoder(spec, vision_weights(weights, dtype))(pv).float().numpy()
            else:
                export_vision(spec, weights, half, dtype)
                lower = _run(half, {"pixel_values": pv.numpy()})
            out["precision"] = {**_drift([(got, lower)], "vision.onnx", dtype, strict=True), "layers": spec.layers}
        return out
    finally:
        _drop(f32)
        _drop(half)


def _run(path: Path, feed: dict):
    sess = ort_session(path)
    names = {i.name for i in sess.get_inputs()}
    return sess.run([sess.get_outputs()[0].name], precision.typed({k: v for k, v in feed.items() if k in names},
                                                                  sess))[0]


def vision_full(vspec: VisionSpec, weights, path: Path, quantized: bool = False) -> dict:
    """The written graph vs our float32 module over the streamed weights, on two random tiles: exact for a
    float32 graph, the drift of an int8 one (past MIN_COSINE the export fails)."""
    x = torch.randn(2, 3, vspec.image_size, vspec.image_size, generator=torch.Generator().manual_seed(2))
    gw = vision_weights(weights, "float32")
    with torch.no_grad(), writer.progress("checking vision.onnx", _used(weights, PREFIXES, layers_run(vspec))) as bar:
        gw.progress = bar
        want = VisionEncoder(vspec, gw)(x).numpy()
    got = _run(path, {"pixel_values": x.numpy()})
    if not quantized:
        return {"max_abs_diff_full": check_close(f"{path.name} (all layers) vs PyTorch", got, want, TOLERANCE, RTOL)}
    return _drift([(want, got)], path.name, "int8", strict=True)


def _drift(pairs, what: str, dtype: str, strict: bool) -> dict:
    how = ("pytorch-module (ONNX Runtime's CPU provider has no bfloat16 kernels)" if dtype == "bfloat16"
           else "onnxruntime-cpu")
    return {**precision.check(precision.stats(pairs), what, strict), "measured_on": how}


def decoder_prefix(lspec: LlmSpec, weights, reference, rope: Rope, work: Path, dtype: str = "float32",
                   quant=None) -> dict:
    """{"max_abs_diff": the float32 prefix graph vs transformers, on a prefill from an empty cache and a
    decode step fed with ONNX Runtime's own present tensors, the way the runtime chains them (LongRoPE models
    with both factor sets, the reference made to use the long ones throughout for the second pass)} plus,
    for a `dtype` other than float32, {"precision": the drift of the prefix in that type (with `quant`'s
    int4 weights where ONNX Runtime can run it: float16)}."""
    spec = dataclasses.replace(lspec, layers=min(PREFIX, lspec.layers))
    f32, half = work / "check-decoder.onnx", work / f"check-decoder-{dtype}.onnx"
    try:
        export_decoder(spec, weights, rope, f32)
        sess = ort_session(f32)
        rot = reference.model.language_model.rotary_emb
        diff = _check_pair(spec, reference, sess, long=False)
        if rope.long_inv_freq is not None:
            short = rot.original_inv_freq.clone()
            try:
                rot.original_inv_freq.copy_(rope.long_inv_freq)
                diff = max(diff, _check_pair(spec, reference, sess, long=True))
            finally:
                rot.original_inv_freq.copy_(short)
                rot.inv_freq.copy_(short)
        del sess
        out = {"max_abs_diff": diff}
        if dtype != "float32":
            feeds = _prefill_feeds(spec, weights, rope)
            wants = [_run(f32, f) for f in feeds]
            if dtype == "bfloat16":
                gots = _module_logits(spec, decoder_weights(weights, dtype), rope, feeds)
            else:
                export_decoder(spec, weights, rope, half, dtype, quant)
                gots = [_run(half, f) for f in feeds]
            out["precision"] = {**_drift(list(zip(wants, gots, strict=True)), "decoder.onnx", dtype, strict=False),
                                "layers": spec.layers}
        return out
    finally:
        _drop(f32)
        _drop(half)


def _check_pair(spec: LlmSpec, model, sess, long: bool) -> float:
    from transformers import DynamicCache

    inputs, outputs = io_names(spec.layers)
    have = {i.name for i in sess.get_inputs()}
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randn(1, 9, spec.hidden, generator=gen)
    step = torch.randn(1, 1, spec.hidden, generator=gen)
    lm = model.model.language_model
    with torch.no_grad():
        cache = DynamicCache(config=model.config.text_config)
        h = lm(inputs_embeds=prompt, past_key_values=cache, use_cache=True).last_hidden_state
        want_prefill = model.lm_head(h[:, -1]).numpy()
        h = lm(inputs_embeds=step, past_key_values=cache, use_cache=True).last_hidden_state
        want_step = model.lm_head(h[:, -1]).numpy()
    res = sess.run(outputs, step_feed(have, prompt.numpy(), empty_past(spec.layers, spec.kv_heads, spec.head_dim),
                                      0, int(long)))
    what = "long-factor " if long else ""
    d1 = check_close(f"decoder.onnx (first layers) {what}prefill logits vs transformers", res[0], want_prefill,
                     TOLERANCE, RTOL)
    res = sess.run(outputs, step_feed(have, step.numpy(), dict(zip(inputs[6:], res[1:], strict=True)), 9, int(long)))
    d2 = check_close(f"decoder.onnx (first layers) {what}decode-step logits vs transformers", res[0], want_step,
                     TOLERANCE, RTOL)
    return max(d1, d2)


def decoder_full(lspec: LlmSpec, weights, rope: Rope, path: Path, quantized: bool = False) -> dict:
    """The written graph vs our float32 module over the streamed weights: a prefill of four 16-token prompts
    of real token embeddings (both factor sets for LongRoPE models), one pass over the weights each. Exact
    for a float32 graph; for int8 / int4 the drift, reported (random-weight test models have chaotic logits,
    so a decoder past MIN_COSINE warns rather than fails)."""
    feeds = _prefill_feeds(lspec, weights, rope)
    # The module first, the session after: never the streamed weights and the mapped graph at once.
    wants = _module_logits(lspec, decoder_weights(weights, "float32"), rope, feeds)
    gots = [_run(path, f) for f in feeds]
    if not quantized:
        return {"max_abs_diff_full": max(check_close(f"{path.name} (all layers) vs PyTorch", got, want, TOLERANCE, RTOL)
                                         for want, got in zip(wants, gots, strict=True))}
    return _drift(list(zip(wants, gots, strict=True)), path.name, "int8", strict=False)


def _prefill_feeds(spec: LlmSpec, weights, rope: Rope) -> list[dict]:
    gen = torch.Generator().manual_seed(5)
    table = weights.get(EMBED)
    embeds = table[torch.randint(0, table.shape[0], (4, 16), generator=gen)].numpy()
    del table
    have = set(io_names(spec.layers)[0])
    past = empty_past(spec.layers, spec.kv_heads, spec.head_dim, batch=len(embeds))
    return [step_feed(have, embeds, past, 0, flag) for flag in ((0, 1) if rope.long_inv_freq is not None else (0,))]


def _module_logits(spec: LlmSpec, gw, rope: Rope, feeds: list[dict]) -> list:
    """Our decoder over the streamed weights (`gw`, in its type) on each prefill feed; logits in float32."""
    module = graph_module(spec, gw, rope)
    order = [n for n in io_names(spec.layers)[0] if n in _inputs(module)]
    out = []
    total = len(feeds) * _used(gw.weights, ("model.language_model.", "lm_head."), spec.layers)
    with writer.progress(f"checking decoder ({spec.layers} layers)", total) as bar:
        gw.progress = bar
        for feed in feeds:
            args = [torch.from_numpy(feed[n]) for n in order]
            args = [a.to(gw.dtype) if a.ndim == 4 else a for a in args]  # the cache is in the graph's type
            with torch.no_grad():
                out.append(module(*args)[0].float().numpy())
    gw.progress = None
    return out


def _used(weights, prefixes: tuple[str, ...], layers: int) -> int:
    """Values of the weights a module of `layers` layers reads (the progress bars' total)."""
    return sum(math.prod(s) for n, s in weights.shapes.items()
               if n.startswith(prefixes) and writer.layer_of(n) < layers and n != EMBED)


def _inputs(graph) -> set[str]:
    """The graph inputs `graph` (decoder._Graph) takes, in io_names order."""
    fused = graph.dec.fused
    names = {"inputs_embeds",
             *(("seqlens_k", "total_sequence_length") if fused else ("attention_mask", "position_ids"))}
    if graph.long_rope:
        names.add("long_rope")
    return names | set(io_names(graph.dec.spec.layers)[0][6:])
