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

from pathlib import Path

import onnx

from .common import ort_session, save_onnx
from .precision import check, stats

DTYPES = ("float32", "int8", "int4")


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
    """The quantised graph against the fp32 one on `feeds` (see `precision.stats`)."""
    a, b = ort_session(ref), ort_session(quant)
    name = a.get_outputs()[0].name
    pairs = [(a.run([name], feed)[0], b.run([name], feed)[0]) for feed in feeds]
    return check(stats(pairs), quant.name, strict)
