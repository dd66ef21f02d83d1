"""Lower-precision variants of the exported fp32 graphs (`python -m export --dtype int8|int4`).

- int8: weights int8 per output channel, activations quantised on the fly (ONNX Runtime's dynamic
  quantisation: MatMulInteger / DynamicQuantizeMatMul, which use the VNNI / AMX int8 paths), for the
  vision graph and the decoder.
- int4: the decoder's weights as 4-bit blocks (MatMulNBits, block 32 or 128 (`--int4-block`), symmetric, int8 compute), the
  vision graph as int8. Decode is memory-bound, so fewer bytes per weight is what makes it faster.

Each quantised graph is compared with the fp32 graph it came from on random input, and the figures go
into the manifest. A vision graph that drifts past MIN_COSINE fails the export; for the decoder the
figures are recorded and a drift past it is reported: on small random-weight test models (weights
widened so greedy output varies) the logits are chaotic enough that int4 rounding alone moves them far,
which says nothing about real checkpoints; `scripts/quality.py` measures the decoder on real prompts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

from .common import ExportCheckError, ort_session, save_onnx

DTYPES = ("float32", "int8", "int4")
# Lowest cosine similarity to fp32 accepted (measured on random-weight models: > 0.999 for int8 vision).
MIN_COSINE = 0.98


def replace(src: Path, dst: Path) -> None:
    """Move a graph and its external data to `dst` (the data file is renamed inside the graph too)."""
    model = onnx.load(str(src))  # external data loaded into memory
    save_onnx(model, dst)
    for f in (src, src.parent / (src.name + ".data")):
        f.unlink(missing_ok=True)


def int8_dynamic(src: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = out.parent / (out.stem + ".q8tmp.onnx")
    quantize_dynamic(src, tmp, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                     weight_type=QuantType.QInt8, use_external_data_format=True,
                     extra_options={"MatMulConstBOnly": True})
    save_onnx(onnx.load(str(tmp)), out)
    for f in tmp.parent.glob(tmp.name + "*"):
        f.unlink()


def int4_weights(src: Path, out: Path, block: int = 32) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=block, is_symmetric=True, accuracy_level=4)
    q.process()
    save_onnx(q.model.model, out)


def compare(ref: Path, quant: Path, feeds: list[dict], strict: bool = True) -> dict:
    """cosine, relative L2 and max abs difference of the first output, and top-1 agreement of its rows."""
    a, b = ort_session(ref), ort_session(quant)
    name = a.get_outputs()[0].name
    cos, rel, mad, agree, rows = 1.0, 0.0, 0.0, 0, 0
    for feed in feeds:
        x = a.run([name], feed)[0].astype(np.float64)
        y = b.run([name], feed)[0].astype(np.float64)
        cos = min(cos, float((x * y).sum() / (np.linalg.norm(x) * np.linalg.norm(y))))
        rel = max(rel, float(np.linalg.norm(x - y) / np.linalg.norm(x)))
        mad = max(mad, float(np.abs(x - y).max()))
        xr, yr = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        agree += int((xr.argmax(-1) == yr.argmax(-1)).sum())
        rows += xr.shape[0]
    if cos < MIN_COSINE:
        msg = f"{quant.name}: cosine similarity to fp32 {cos:.4f} below {MIN_COSINE}"
        if strict:
            raise ExportCheckError(msg)
        print(f"[export] warning: {msg}", file=sys.stderr)
    return {"cosine_vs_fp32": cos, "rel_l2_vs_fp32": rel, "max_abs_diff_vs_fp32": mad,
            "top1_agreement_vs_fp32": agree / max(rows, 1)}
