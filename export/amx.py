"""Graph variants that call the runtime's own AMX kernels (src/kernels) instead of ONNX Runtime's attention.

`vision-amx.onnx` swaps each `com.microsoft::MultiHeadAttention` for `ai.internvl::AmxAttention`, and
`decoder-amx.onnx` each `com.microsoft::GroupQueryAttention` for `ai.internvl::AmxGroupQueryAttention`:
same inputs, outputs and attributes, nothing else changed, initializers still pointing at the original
graph's `.data` file so the weights are stored once. ONNX Runtime alone cannot run them (the kernels live
in the `internvl` binary), so their numbers are checked by the runtime's tests (tests/kernels.rs).

Written for int8 / int4 exports only: those already trade exactness for speed, and the kernels compute
in bf16 on AMX tiles (a decode step's attention is fp32); fp32 exports stay token-exact with PyTorch.
The runtime opens a variant only on CPUs with AMX-BF16 and keeps the portable graph elsewhere.
"""

from __future__ import annotations

from pathlib import Path

DOMAIN = "ai.internvl"
HEAD_DIMS = (64, 128)  # the kernels' tile layouts


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _vision_node(node) -> bool:
    return len(node.input) == 3 and set(_attrs(node)) <= {"num_heads", "scale"}


def _decoder_node(node) -> bool:
    a = _attrs(node)
    plain = a.get("do_rotary") == 1 and a.get("rotary_interleaved", 0) == 0 and a.get("local_window_size", -1) == -1
    return len(node.input) == 9 and plain and not a.get("softcap") and not a.get("smooth_softmax")


GRAPHS = {  # graph -> (ONNX Runtime op, our op, which nodes the kernel can take)
    "vision.onnx": ("MultiHeadAttention", "AmxAttention", _vision_node),
    "decoder.onnx": ("GroupQueryAttention", "AmxGroupQueryAttention", _decoder_node),
}


def write_variant(graph: Path, head_dim: int, layers: int) -> dict | None:
    """`<name>-amx.onnx` beside `graph` when every attention node of its `layers` can move to the kernel;
    None when the head size or a node's options do not fit (the portable graph is then the only one)."""
    import onnx

    theirs, ours, fits = GRAPHS[graph.name]
    if head_dim not in HEAD_DIMS:
        return None
    model = onnx.load(str(graph), load_external_data=False)
    nodes = [n for n in model.graph.node if (n.domain, n.op_type) == ("com.microsoft", theirs)]
    if len(nodes) != layers or not all(fits(n) for n in nodes):
        return None
    for node in nodes:
        node.domain, node.op_type = DOMAIN, ours
    model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    out = graph.with_name(graph.stem + "-amx.onnx")
    onnx.save_model(model, str(out))  # initializers keep pointing at <graph>.data
    return {"file": out.name, "op": f"{DOMAIN}::{ours}", "attention_layers": len(nodes)}
