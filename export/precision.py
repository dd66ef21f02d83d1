"""How far a lower-precision graph is from float32: the figures the manifest records and the gate on them.

float16 / bfloat16 graphs (`--dtype float16|bfloat16`, for GPUs) are traced from the same modules as the
float32 ones, in that type (see `vision.py` and `decoder.py` for what stays float32); int8 / int4 ones are
quantised as they are written (`quantize.py`). `check.py` runs each against float32 on the same input and
reports cosine, relative L2, max abs difference and top-1 agreement of the first output. A vision graph
past MIN_COSINE fails the export; the decoder's figures are recorded and a drift past it is reported
(random-weight test models have chaotic logits).
"""

from __future__ import annotations

import sys

import numpy as np

from .common import ExportCheckError

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
