"""Graphs written without holding the model: traced over placeholder weights, then filled tensor by tensor.

The graph modules (`vision.py`, `decoder.py`) are traced with every weight a placeholder that costs no
memory (one value broadcast to the weight's shape, a different value per weight so the tracer's
de-duplication of equal constants cannot merge two of them) and `export_params=False`, so the traced file
holds the operators only and each weight is a named graph input. `write` then turns those inputs into
initializers stored in `<graph>.data`, reading each weight from the checkpoint, converting it to the graph's
layout and type and, for quantised exports, quantising it as it goes, then dropping it: peak memory is the
largest tensor, not the model.

Matmul weights are stored the way the graphs multiply by them, `[in, out]` (the modules call
`torch.matmul(x, w)`, not `linear`), so no transpose is left for the tracer to fold into anonymous
constants: every initializer keeps its checkpoint name.

Quantisation happens here too, on the same pass (`Int8` / `Int4`): each `MatMul` by a 2-D weight becomes
ONNX Runtime's dynamic int8 pattern (DynamicQuantizeLinear, MatMulInteger, scales) or `MatMulNBits`, with
the weight quantised as ONNX Runtime's own quantisers do it (the tests compare the bytes).
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from .weights import Weights

ONNX_TYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
              torch.bfloat16: TensorProto.BFLOAT16, torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8,
              torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32}
INLINE_BELOW = 1024  # bytes: smaller tensors stay inside the .onnx file
ALIGN = 4096  # offsets of larger tensors in the .data file: page-aligned, so ONNX Runtime can map them
_LAYER = re.compile(r"\.layers?\.(\d+)\.")


def layer_of(name: str) -> int:
    """The layer index in a tensor name, -1 for tensors outside the layer stack."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else -1


def is_matmul_weight(name: str, ndim: int) -> bool:
    """Linear-layer weights (2-D `*.weight`) are stored transposed, `[in, out]`."""
    return ndim == 2 and name.endswith(".weight")


class GraphWeights:
    """The checkpoint's weights as one graph uses them: `[in, out]` for matmuls, in the graph's type except
    where `keep_fp32(name)` (norms and what the fp32 residual stream adds)."""

    def __init__(self, weights: Weights, dtype: torch.dtype, keep_fp32: Callable[[str], bool]):
        self.weights, self.dtype, self.keep_fp32 = weights, dtype, keep_fp32
        self.progress = None  # a `progress` bar, advanced by each weight read

    def dtype_of(self, name: str) -> torch.dtype:
        return torch.float32 if self.keep_fp32(name) else self.dtype

    def shape(self, name: str) -> tuple[int, ...]:
        s = self.weights.shapes[name]
        return (s[1], s[0]) if is_matmul_weight(name, len(s)) else s

    def names(self) -> list[str]:
        return self.weights.names()

    def __contains__(self, name: str) -> bool:
        return name in self.weights

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.weights.get(name)
        if self.progress is not None:
            self.progress.update(t.numel())
        if is_matmul_weight(name, t.ndim):
            t = t.T.contiguous()
        return t.to(self.dtype_of(name))

    def optional(self, name: str) -> torch.Tensor | None:
        if name not in self.weights:
            return None
        return self[name]

    def placeholder(self, name: str, index: int) -> torch.Tensor:
        return _fill(index, self.dtype_of(name)).expand(self.shape(name))


def progress(desc: str, total: int):
    """A bar over weights for the long steps, on a terminal only (logs get the step's one line)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=f"[export] {desc}", unit=" weights", unit_scale=True, file=sys.stderr,
                disable=None, leave=False)


def _fill(index: int, dtype: torch.dtype) -> torch.Tensor:
    """A scalar unique to `index` in `dtype` (consecutive bit patterns from 1.0: 16384 of them in 16 bits)."""
    if dtype == torch.float32:
        return torch.tensor(float(index + 1))
    base = {torch.float16: 0x3C00, torch.bfloat16: 0x3F80}[dtype]
    if index >= 0x4000:
        raise ValueError(f"more than {0x4000} weights in one graph")
    return torch.tensor([base + index], dtype=torch.int16).view(dtype)[0]


def parameters(names: list[str], graph_weights: GraphWeights) -> torch.nn.ParameterDict:
    """Placeholders for `names`, keyed as ParameterDicts want (no dots)."""
    return torch.nn.ParameterDict({
        n.replace(".", "__"): torch.nn.Parameter(graph_weights.placeholder(n, i), requires_grad=False)
        for i, n in enumerate(names)})


@dataclass(frozen=True)
class Int8:
    """ONNX Runtime's dynamic quantisation (`quantize_dynamic`, per channel, MatMulConstBOnly): weights int8
    per output column, symmetric; activations quantised per call (uint8) by DynamicQuantizeLinear."""


@dataclass(frozen=True)
class Int4:
    """MatMulNBits: 4-bit symmetric blocks of `block` along K, scales in `scale_type`; `accuracy_level` 4
    (int8 compute) for the CPU graphs, None for the GPU ones (float16 / bfloat16 activations)."""

    block: int
    scale_type: int = TensorProto.FLOAT
    accuracy_level: int | None = 4


class _Data:
    """`<graph>.data`, appended to tensor by tensor."""

    def __init__(self, path: Path):
        self.path, self.f, self.pos = path, open(path, "wb"), 0  # noqa: SIM115 (closed by `close`)

    def tensor(self, name: str, t: torch.Tensor | np.ndarray, data_type: int | None = None) -> TensorProto:
        if isinstance(t, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(t))
        t = t.contiguous()
        data_type = data_type or ONNX_TYPES[t.dtype]
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
        proto = TensorProto(name=name, data_type=data_type, dims=list(t.shape))
        if raw.nbytes < INLINE_BELOW:
            proto.raw_data = raw.tobytes()
            return proto
        pad = -self.pos % ALIGN
        self.f.write(b"\0" * pad)
        self.pos += pad
        self.f.write(memoryview(raw))
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", self.pos), ("length", raw.nbytes)):
            entry = proto.external_data.add()
            entry.key, entry.value = key, str(value)
        self.pos += raw.nbytes
        return proto

    def close(self) -> None:
        self.f.close()


_TRACING = False


def tracing() -> bool:
    """Whether a graph is being traced: the big products then skip their arithmetic (`MatMul`)."""
    return _TRACING


def trace(module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str],
          dynamic_axes: dict, where: Path) -> onnx.ModelProto:
    """The operators of `module` (weights as graph inputs named by their parameter paths)."""
    global _TRACING
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        raw = Path(tmp) / "raw.onnx"
        _TRACING = True
        try:
            with torch.no_grad():
                torch.onnx.export(module, args, str(raw), input_names=input_names, output_names=output_names,
                                  dynamic_axes=dynamic_axes, opset_version=17, do_constant_folding=True,
                                  dynamo=False, export_params=False, custom_opsets={"com.microsoft": 1})
        finally:
            _TRACING = False
        return onnx.load(str(raw))


class MatMul(torch.autograd.Function):
    """x @ w, as ONNX `MatMul`. While a graph is traced the product's values are never used (the operators
    are all that is kept), so it is not computed: torch's float16 matmul on the CPU is a plain loop
    (measured: 33 s for a 2050x1024 by 1024x4096 product, 0.09 s in float32), which would make tracing
    a float16 InternViT over its two example tiles take more than an hour."""

    @staticmethod
    def forward(ctx, x, w):
        if _TRACING:
            return x.new_zeros((*x.shape[:-1], w.shape[-1]))
        return torch.matmul(x, w)

    @staticmethod
    def symbolic(g, x, w):
        return g.op("MatMul", x, w)


def write(module: torch.nn.Module, args: tuple, out: Path, input_names: list[str], output_names: list[str],
          dynamic_axes: dict, graph_weights: GraphWeights, quant: Int8 | Int4 | None = None) -> dict:
    """Trace `module` (built over `graph_weights` placeholders) and write `out` + `out.data` with the real
    weights; returns what quantisation did ({} without it)."""
    out = Path(out)
    model = trace(module, args, input_names, output_names, dynamic_axes, out.parent)
    g = model.graph
    params = {path: path.rsplit(".", 1)[-1].replace("__", ".") for path, _ in module.named_parameters()}
    buffers = dict(module.named_buffers())
    sources = [i.name for i in g.input if i.name in params or i.name in buffers]
    unknown = [i.name for i in g.input if i.name not in input_names and i.name not in sources]
    if unknown:
        raise ValueError(f"{out.name}: graph inputs {unknown[:3]} are neither inputs nor weights")
    keep_inputs = [i for i in g.input if i.name in input_names]
    del g.input[:]
    g.input.extend(keep_inputs)

    jobs, figures = _plan(g, sources, params, graph_weights, quant)
    data = _Data(out.parent / (out.name + ".data"))
    try:
        inits = []
        sizes = [graph_weights.weights.shapes.get(params.get(s, ""), buffers[s].shape if s in buffers else ())
                 for s, _ in jobs]
        total = sum(int(np.prod(s)) for s in sizes)
        with progress(f"writing {out.name}", total) as bar:
            for (source, emit), size in zip(jobs, sizes, strict=True):
                t = graph_weights[params[source]] if source in params else buffers[source].detach()
                inits.extend(emit(t, data))
                bar.update(int(np.prod(size)))
                del t
        g.initializer.extend(inits)
    finally:
        data.close()
    model.opset_import.extend([helper.make_opsetid("com.microsoft", 1)]
                              if quant and not any(o.domain == "com.microsoft" for o in model.opset_import) else [])
    onnx.save_model(model, str(out))
    onnx.checker.check_model(str(out))
    return figures


def _plan(g, sources: list[str], params: dict, graph_weights: GraphWeights, quant):
    """(source, emit(tensor, data) -> initializers) for each weight, rewriting the quantised matmuls' nodes;
    and the figures quantisation reports."""
    consumers: dict[str, list] = {s: [] for s in sources}
    for node in g.node:
        for i in node.input:
            if i in consumers:
                consumers[i].append(node)

    def plain(name):
        return lambda t, data: [data.tensor(name, t)]

    if quant is None:
        return [(s, plain(s)) for s in sources], {}
    figures = {"matmuls": 0}
    if isinstance(quant, Int4):
        figures.update(block=quant.block, worst_weight_rel_l2=0.0)
    nodes, activations = [], {}
    quantised = {s for s in sources if s in params and consumers[s]
                 and len(graph_weights.shape(params[s])) == 2
                 and all(n.op_type == "MatMul" and n.domain == "" and list(n.input).index(s) == 1
                         for n in consumers[s])}
    for node in g.node:
        w = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w not in quantised:
            nodes.append(node)
            continue
        figures["matmuls"] += 1
        k, n = graph_weights.shape(params[w])
        base = node.name or node.output[0]
        if isinstance(quant, Int4):
            attrs = {"K": k, "N": n, "bits": 4, "block_size": quant.block}
            if quant.accuracy_level is not None:
                attrs["accuracy_level"] = quant.accuracy_level
            nodes.append(helper.make_node("MatMulNBits", [node.input[0], f"{w}_Q4", f"{w}_scales"],
                                          list(node.output), name=f"{base}_Q4", domain="com.microsoft", **attrs))
        else:
            a = node.input[0]
            if a not in activations:
                activations[a] = (f"{a}_quantized", f"{a}_scale", f"{a}_zero_point")
                nodes.append(helper.make_node("DynamicQuantizeLinear", [a], list(activations[a]),
                                              name=f"{a}_QuantizeLinear"))
            aq, ascale, azp = activations[a]
            y = node.output[0]
            nodes += [
                helper.make_node("MatMulInteger", [aq, f"{w}_quantized", azp, f"{w}_zero_point"],
                                 [f"{y}_output_quantized"], name=f"{base}_quant"),
                helper.make_node("Cast", [f"{y}_output_quantized"], [f"{y}_output_quantized_cast_output"],
                                 name=f"{base}_quant_cast", to=TensorProto.FLOAT),
                helper.make_node("Mul", [ascale, f"{w}_scale"], [f"{y}_scales_mul"], name=f"{base}_scales_mul"),
                helper.make_node("Mul", [f"{y}_output_quantized_cast_output", f"{y}_scales_mul"], [y],
                                 name=f"{base}_output_scale_mul"),
            ]
    del g.node[:]
    g.node.extend(nodes)

    def quantise(name):
        def emit(t, data):
            w = t.float().numpy()
            if isinstance(quant, Int4):
                packed, scales, err, norm = _int4_columns(w, quant)
                rel = float(np.sqrt(err) / max(np.sqrt(norm), 1e-30))
                figures["worst_weight_rel_l2"] = max(figures["worst_weight_rel_l2"], rel)
                scale = (data.tensor(f"{name}_scales", scales) if quant.scale_type == TensorProto.FLOAT else
                         data.tensor(f"{name}_scales", _half(scales, quant.scale_type), quant.scale_type))
                return [data.tensor(f"{name}_Q4", packed), scale]
            q, scale = _int8_columns(w)
            return [data.tensor(f"{name}_quantized", q), data.tensor(f"{name}_scale", scale),
                    data.tensor(f"{name}_zero_point", np.zeros(q.shape[1], np.int8))]
        return emit

    return [(s, quantise(s) if s in quantised else plain(s)) for s in sources], figures


CHUNK = 1 << 24  # values quantised at once: the arithmetic's temporaries are a few times this, not the weight


def _columns(w: np.ndarray) -> int:
    """Output columns per chunk (quantisation is per column, or per block of a column, so chunks are exact)."""
    return max(1, CHUNK // max(w.shape[0], 1))


def _int8_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`quantize.int8_columns` of W [K, N], a chunk of columns at a time."""
    from .quantize import int8_columns

    parts = [int8_columns(w[:, c:c + _columns(w)]) for c in range(0, w.shape[1], _columns(w))]
    return np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts])


def _int4_columns(w: np.ndarray, quant: Int4):
    """(packed [N, blocks, block / 2], scales [N, blocks], squared error, squared norm) of W [K, N]."""
    from .quantize import int4_blocks

    packed, scales, err, norm = [], [], 0.0, 0.0
    for c in range(0, w.shape[1], _columns(w)):
        part = w[:, c:c + _columns(w)]
        p, s, dequant = int4_blocks(part, quant.block, quant.scale_type)
        err += float(np.square(dequant - part, dtype=np.float64).sum())
        norm += float(np.square(part, dtype=np.float64).sum())
        packed.append(p)
        scales.append(s.reshape(p.shape[0], -1))  # [N, blocks], as ONNX Runtime's quantiser writes
    return np.concatenate(packed), np.concatenate(scales), err, norm


def _half(x: np.ndarray, data_type: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    return t.to(torch.float16 if data_type == TensorProto.FLOAT16 else torch.bfloat16)

