"""float16 / bfloat16 graphs (`python -m export --dtype float16|bfloat16`), for GPUs.

The graphs are traced from the same modules as the fp32 ones, in that type (see `vision.py` and
`decoder.py` for what stays fp32), and compared here with the fp32 graph they stand in for, on the same
random input: cosine, relative L2, max abs difference and top-1 agreement of the first output, recorded
in the manifest. A vision graph past MIN_COSINE fails the export; the decoder's figures are recorded and
a drift past it is reported (random-weight test models have chaotic logits).

float16 is run on ONNX Runtime's CPU provider, which has fp16 kernels for every operator these graphs
use. Its CPU provider has no bfloat16 kernels (MatMul, Add, attention: none), so a bfloat16 graph is
compared through the PyTorch module it was traced from, run in bfloat16; on a GPU, `scripts/gpu_check.sh`
runs the graph itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from .common import TORCH_DTYPES, ExportCheckError, ort_session

DTYPES = ("float16", "bfloat16")
# Lowest cosine similarity to fp32 accepted (measured on random-weight models: > 0.999 for int8 vision).
MIN_COSINE = 0.98


def stats(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """cosine, relative L2 and max abs difference (worst over the pairs) and top-1 agreement of the rows."""
    cos, rel, mad, agree, rows = 1.0, 0.0, 0.0, 0, 0
    for x, y in pairs:
        x, y = x.astype(np.float64), y.astype(np.float64)
        cos = min(cos, float((x * y).sum() / (np.linalg.norm(x) * np.linalg.norm(y))))
        rel = max(rel, float(np.linalg.norm(x - y) / np.linalg.norm(x)))
        mad = max(mad, float(np.abs(x - y).max()))
        xr, yr = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        agree += int((xr.argmax(-1) == yr.argmax(-1)).sum())
        rows += xr.shape[0]
    return {"cosine_vs_fp32": cos, "rel_l2_vs_fp32": rel, "max_abs_diff_vs_fp32": mad,
            "top1_agreement_vs_fp32": agree / max(rows, 1)}


def check(figures: dict, what: str, strict: bool) -> dict:
    cos = figures["cosine_vs_fp32"]
    if not np.isfinite(cos) or cos < MIN_COSINE:
        msg = f"{what}: cosine similarity to fp32 {cos:.4f} below {MIN_COSINE}"
        if strict:
            raise ExportCheckError(msg)
        print(f"[export] warning: {msg}", file=sys.stderr)
    return figures


def typed(feed: dict, sess) -> dict:
    """`feed` with each float array in the type the session's input declares (the KV cache is in the graph's
    type; inputs_embeds and pixels stay fp32)."""
    kinds = {i.name: i.type for i in sess.get_inputs()}
    return {k: v.astype(np.float16) if kinds.get(k) == "tensor(float16)" else v for k, v in feed.items()}


def drift(ref: Path, graph: Path, module: torch.nn.Module, feeds: list[dict], dtype: str, strict: bool) -> dict:
    """The `dtype` graph (or, for bfloat16, `module`, the module it was traced from) against the fp32 graph."""
    a = ort_session(ref)
    name = a.get_outputs()[0].name
    order = [i.name for i in a.get_inputs()]
    pairs = []
    if dtype == "float16":
        b = ort_session(graph)
        for feed in feeds:
            pairs.append((a.run([name], feed)[0], b.run([name], typed(feed, b))[0]))
        how = "onnxruntime-cpu"
    else:
        t = TORCH_DTYPES[dtype]
        for feed in feeds:
            args = [torch.from_numpy(feed[n]) for n in order]
            args = [x.to(t) if x.is_floating_point() and x.ndim == 4 and n.startswith("past_") else x
                    for x, n in zip(args, order, strict=True)]
            with torch.no_grad():
                out = module(*args)
            out = out[0] if isinstance(out, tuple) else out
            pairs.append((a.run([name], feed)[0], out.float().numpy()))
        how = "pytorch-module (ONNX Runtime's CPU provider has no bfloat16 kernels)"
    return {**check(stats(pairs), graph.name, strict), "measured_on": how}
