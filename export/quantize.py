"""Lower-precision weights (`python -m export --dtype int8|int4|int4-float16|int4-bfloat16`), one tensor at a
time as `writer.py` writes them (`writer.Int8` / `writer.Int4` say which graph nodes they become).

- int8: weights int8 per output channel, activations quantised on the fly (ONNX Runtime's dynamic
  quantisation pattern: DynamicQuantizeLinear + MatMulInteger, which use the VNNI / AMX int8 paths), for
  the vision graph and the decoder.
- int4: the decoder's weights as 4-bit blocks (MatMulNBits, block 32 or 128 (`--int4-block`), symmetric,
  int8 compute), the vision graph as int8. Decode is memory-bound, so fewer bytes per weight is what makes
  it faster.
- int4-float16 / int4-bfloat16 (for GPUs): the float16 / bfloat16 decoder with its matmul weights as 4-bit
  blocks (MatMulNBits with float16 / bfloat16 activations, which ONNX Runtime's CUDA provider runs on the
  GPU), the vision graph float16 / bfloat16. The GPU's small-memory option: the int8 folders'
  dynamic-quantisation operators exist on the CPU only.

Written here rather than with ONNX Runtime's quantisers, which load the whole model (and read weights
through numpy, which has no bfloat16); the values are theirs, byte for byte (the tests compare them). The
drift each export causes is measured by `check.py` and recorded in the manifest; `scripts/quality.py`
measures the decoder on real prompts.
"""

from __future__ import annotations

import numpy as np
import onnx

DTYPES = ("float32", "int8", "int4")
# GPU int4: `int4-<activation type>`.
HALF_INT4 = ("int4-float16", "int4-bfloat16")


def int8_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] fp32 -> (int8 [K, N], fp32 scales [N]): one symmetric scale per output column, computed and
    rounded as ONNX Runtime's `quantize_dynamic(per_channel=True)` does (range [-127, 127], the scale in
    float64 then rounded to float32, values divided in float32 and rounded half to even; the tests compare
    the bytes)."""
    absmax = np.abs(weight).max(axis=0) if weight.size else np.zeros(weight.shape[1], np.float32)
    scale = (absmax.astype(np.float64) * 2 / 254).astype(np.float32)
    scale = np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), scale)
    q = np.clip(np.round(weight / scale[None, :]), -128, 127).astype(np.int8)
    return q, scale


HALF_TYPES = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def int4_blocks(weight: np.ndarray, block: int, data_type: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [K, N] fp32 -> (packed uint8 [N, blocks, block / 2], scales fp32 [N * blocks] already rounded to the
    activation type, the dequantised W [K, N])."""
    k, n = weight.shape
    blocks = -(-k // block)
    wt = np.zeros((n, blocks * block), np.float32)
    wt[:, :k] = weight.T
    wt = wt.reshape(n, blocks, block)
    # The block's largest magnitude, the negative one on a tie: as ONNX Runtime's quantiser (MLAS) picks it.
    hi, lo = wt.max(-1), wt.min(-1)
    at = np.where(np.abs(hi) > np.abs(lo), hi, lo)
    scale = round_to_half(at / -8.0, data_type)
    safe = np.where(scale == 0, 1.0, scale)[..., None]
    # Half away from zero, through the reciprocal: as ONNX Runtime's quantiser rounds (same bytes).
    q = np.where(scale[..., None] == 0, 8, np.clip(np.floor(wt * (1 / safe) + 8.5), 0, 15)).astype(np.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    dequant = ((q.astype(np.float32) - 8) * scale[..., None]).reshape(n, -1)[:, :k].T
    return packed, scale.reshape(-1), dequant


def round_to_half(x: np.ndarray, data_type: int) -> np.ndarray:
    """x rounded to float16 / bfloat16 (nearest even), as fp32; float32 as it is."""
    if data_type == onnx.TensorProto.FLOAT:
        return x.astype(np.float32)
    if data_type == onnx.TensorProto.FLOAT16:
        return x.astype(np.float16).astype(np.float32)
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)
