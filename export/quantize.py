"""Lower-precision variants of the exported fp32 graphs (`python -m export --dtype int8|int4`).

- int8: weights int8 per output channel, activations quantised on the fly (ONNX Runtime's dynamic
  quantisation: MatMulInteger / DynamicQuantizeMatMul, which use the VNNI / AMX int8 paths), for the
  vision graph and the decoder.
- int4: the decoder's weights as 4-bit blocks (MatMulNBits, block 32 or 128 (`--int4-block`), symmetric, int8 compute), the
  vision graph as int8. Decode is memory-bound, so fewer bytes per weight is what makes it faster.
- int4-float16 / int4-bfloat16 (for GPUs): the float16 / bfloat16 decoder with its matmul weights as 4-bit
  blocks (`int4_half`: MatMulNBits with float16 / bfloat16 activations, which ONNX Runtime's CUDA provider
  runs on the GPU), the vision graph float16 / bfloat16. The GPU's small-memory option: the int8 folders'
  dynamic-quantisation operators exist on the CPU only.

Each quantised graph is compared with the fp32 graph it came from on random input, and the figures go
into the manifest. A vision graph that drifts past MIN_COSINE fails the export; for the decoder the
figures are recorded and a drift past it is reported: on small random-weight test models (weights
widened so greedy output varies) the logits are chaotic enough that int4 rounding alone moves them far,
which says nothing about real checkpoints; `scripts/quality.py` measures the decoder on real prompts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from .common import ort_session, save_onnx
from .precision import check, stats

DTYPES = ("float32", "int8", "int4")
# GPU int4: `int4-<activation type>`.
HALF_INT4 = ("int4-float16", "int4-bfloat16")


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


def int4_half(src: Path, out: Path, block: int) -> dict:
    """`src` (a float16 / bfloat16 graph) with every MatMul by a 2-D weight replaced by MatMulNBits.

    Written here rather than with ONNX Runtime's MatMulNBitsQuantizer, which reads weights through numpy
    and so has no bfloat16. The layout is the contrib op's: for a weight W [K, N], each column's K values
    in blocks of `block` (zero-padded), symmetric with the default zero point 8 (q = round(w / s) + 8 in
    0..15, two per byte, low nibble first), one scale per block in the activation type, chosen and rounded
    as ONNX Runtime's own quantiser does (the block's largest-magnitude value maps to -8; the tests
    compare the bytes). Returns the worst
    relative L2 error of a dequantised weight, a figure that holds for any input."""
    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, int] = {}
    for node in model.graph.node:
        for i in node.input:
            users[i] = users.get(i, 0) + 1
    nodes, worst, count = [], 0.0, 0
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and node.domain == "" else None
        if w is None or len(w.dims) != 2 or w.data_type not in HALF_TYPES:
            nodes.append(node)
            continue
        k, n = w.dims
        weight = half_to_float32(w)
        packed, scales, dequant = int4_blocks(weight, block, w.data_type)
        worst = max(worst, float(np.linalg.norm(dequant - weight) / max(np.linalg.norm(weight), 1e-30)))
        base = node.name or node.output[0]
        b = onnx.numpy_helper.from_array(packed, f"{base}.int4")
        s = float32_to_half(scales, f"{base}.scales", w.data_type)
        model.graph.initializer.extend([b, s])
        users[w.name] -= 1
        nodes.append(onnx.helper.make_node(
            "MatMulNBits", [node.input[0], b.name, s.name], list(node.output), name=base, domain="com.microsoft",
            K=k, N=n, bits=4, block_size=block))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [t for t in model.graph.initializer if users.get(t.name, 1) > 0]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    save_onnx(model, out)
    return {"matmuls": count, "block": block, "worst_weight_rel_l2": worst}


HALF_TYPES = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def int4_blocks(weight: np.ndarray, block: int, data_type: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [K, N] fp32 -> (packed uint8 [N, blocks, block / 2], scales fp32 [N * blocks] already rounded to the
    activation type, the dequantised W [K, N])."""
    k, n = weight.shape
    blocks = -(-k // block)
    wt = np.zeros((n, blocks * block), np.float32)
    wt[:, :k] = weight.T
    wt = wt.reshape(n, blocks, block)
    at = np.take_along_axis(wt, np.abs(wt).argmax(-1)[..., None], -1)[..., 0]
    scale = round_to_half(at / -8.0, data_type)
    safe = np.where(scale == 0, 1.0, scale)[..., None]
    # Half away from zero, through the reciprocal: as ONNX Runtime's quantiser rounds (same bytes).
    q = np.where(scale[..., None] == 0, 8, np.clip(np.floor(wt * (1 / safe) + 8.5), 0, 15)).astype(np.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    dequant = ((q.astype(np.float32) - 8) * scale[..., None]).reshape(n, -1)[:, :k].T
    return packed, scale.reshape(-1), dequant


def half_to_float32(t: onnx.TensorProto) -> np.ndarray:
    if t.data_type == onnx.TensorProto.FLOAT16:
        return onnx.numpy_helper.to_array(t).astype(np.float32)
    raw = np.frombuffer(t.raw_data, np.uint16) if t.raw_data else np.asarray(t.int32_data, np.uint16)
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(tuple(t.dims))


def round_to_half(x: np.ndarray, data_type: int) -> np.ndarray:
    """x rounded to float16 / bfloat16 (nearest even), as fp32."""
    if data_type == onnx.TensorProto.FLOAT16:
        return x.astype(np.float16).astype(np.float32)
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def float32_to_half(x: np.ndarray, name: str, data_type: int) -> onnx.TensorProto:
    if data_type == onnx.TensorProto.FLOAT16:
        return onnx.numpy_helper.from_array(x.astype(np.float16), name)
    raw = (round_to_half(x, data_type).view(np.uint32) >> 16).astype(np.uint16)
    return onnx.helper.make_tensor(name, data_type, list(x.shape), raw.tobytes(), raw=True)


def compare(ref: Path, quant: Path, feeds: list[dict], strict: bool = True) -> dict:
    """The quantised graph against the fp32 one on `feeds` (see `precision.stats`)."""
    a, b = ort_session(ref), ort_session(quant)
    name = a.get_outputs()[0].name
    pairs = [(a.run([name], feed)[0], b.run([name], feed)[0]) for feed in feeds]
    return check(stats(pairs), quant.name, strict)
