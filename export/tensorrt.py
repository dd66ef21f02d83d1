"""`vision-trt.onnx`: the vision graph with its attention in plain ONNX operators, for TensorRT.

TensorRT parses ONNX-domain operators only; `com.microsoft::MultiHeadAttention` is not one, so under the
TensorRT provider every attention node of `vision.onnx` would fall back to another provider and the tower
be cut into one engine per layer. Here each such node becomes Reshape / Transpose / MatMul / Softmax (the
pattern TensorRT fuses into its own attention kernels), nothing else changed, and the initializers keep
pointing at `vision.onnx.data`, so the weights are stored once. Written for float32 / float16 /
bfloat16 exports (the int8 graphs' dynamic quantisation is a CPU artefact), and checked against
`vision.onnx` on ONNX Runtime's CPU provider where it has the kernels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import ExportCheckError, ort_session

FILE = "vision-trt.onnx"
ELEM = {"float32": 1, "float16": 10, "bfloat16": 16}  # onnx.TensorProto element types


def write_variant(graph: Path, dtype: str, hidden: int, heads: int) -> dict:
    import onnx
    from onnx import helper

    model = onnx.load(str(graph), load_external_data=False)
    nodes = list(model.graph.node)
    mha = [n for n in nodes if (n.domain, n.op_type) == ("com.microsoft", "MultiHeadAttention")]
    if not mha:
        raise ExportCheckError(f"{graph.name} has no MultiHeadAttention node to rewrite for TensorRT")
    d = hidden // heads
    consts = [
        helper.make_tensor("trt_split_heads", onnx.TensorProto.INT64, [4], [0, 0, heads, d]),
        helper.make_tensor("trt_merge_heads", onnx.TensorProto.INT64, [3], [0, 0, hidden]),
        helper.make_tensor("trt_scale", ELEM[dtype], [], [float(d) ** -0.5]),
    ]
    model.graph.initializer.extend(consts)
    out_nodes = []
    for node in nodes:
        if node not in mha:
            out_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("num_heads") != heads or len(node.input) != 3 or "scale" in attrs:
            raise ExportCheckError(f"{graph.name}: attention node {node.name} is not the plain one this rewrite knows")
        q, k, v = node.input
        p = f"{node.name or node.output[0]}/trt"

        def op(kind, ins, out, p=p, **kw):
            out_nodes.append(helper.make_node(kind, ins, [f"{p}/{out}"], name=f"{p}/{out}", **kw))
            return f"{p}/{out}"

        qh = op("Transpose", [op("Mul", [op("Reshape", [q, "trt_split_heads"], "q4"), "trt_scale"], "qs")], "qt",
                perm=[0, 2, 1, 3])
        kh = op("Transpose", [op("Reshape", [k, "trt_split_heads"], "k4")], "kt", perm=[0, 2, 3, 1])
        vh = op("Transpose", [op("Reshape", [v, "trt_split_heads"], "v4")], "vt", perm=[0, 2, 1, 3])
        probs = op("Softmax", [op("MatMul", [qh, kh], "scores")], "probs", axis=-1)
        ctx = op("Transpose", [op("MatMul", [probs, vh], "ctx")], "ctxt", perm=[0, 2, 1, 3])
        out_nodes.append(helper.make_node("Reshape", [ctx, "trt_merge_heads"], list(node.output), name=f"{p}/out"))
    del model.graph.node[:]
    model.graph.node.extend(out_nodes)
    out = graph.with_name(FILE)
    onnx.save_model(model, str(out))  # initializers keep pointing at <graph>.data
    onnx.checker.check_model(str(out))
    return {"file": out.name, "attention": "MatMul+Softmax", "attention_layers": len(mha)}


def self_check(graph: Path, variant: Path, dtype: str, image_size: int, tolerance: float) -> float | None:
    """Max abs difference of the variant to the graph on two random tiles (None for bfloat16: no CPU kernels)."""
    if dtype == "bfloat16":
        return None
    x = np.random.default_rng(3).standard_normal((2, 3, image_size, image_size)).astype(np.float32)
    want, got = (_run(g, x) for g in (graph, variant))  # one session at a time: both map the same weights
    diff = float(np.abs(want.astype(np.float64) - got).max())
    limit = tolerance * max(1.0, float(np.abs(want).max()))
    if not np.isfinite(diff) or diff > limit:
        raise ExportCheckError(f"{variant.name}: max abs diff {diff:.3g} to {graph.name} exceeds {limit:.3g}")
    return diff


def _run(graph: Path, x: np.ndarray) -> np.ndarray:
    sess = ort_session(graph)
    return sess.run([sess.get_outputs()[0].name], {sess.get_inputs()[0].name: x})[0]
