"""float16 / bfloat16 exports and the TensorRT vision variant, against PyTorch (fp32, transformers) on the
CPU provider. Tolerances are measured on the tiny fixture checkpoint and asserted with some room."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.checkpoint import inspect
from export.common import ort_session
from export.decoder import empty_past, step_feed
from export.precision import typed
from export.testing.pytorch import load

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def torch_model(fixtures):
    return load(inspect(str(fixtures / "checkpoint")), 151667)


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def cosine(a, b) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def rel_l2(got, want) -> float:
    got, want = got.astype(np.float64), want.astype(np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_float16_vision_matches_pytorch(fixtures, torch_model):
    m = manifest(fixtures / "model-float16")["vision"]
    assert m["dtype"] == "float16" and m["precision"]["measured_on"] == "onnxruntime-cpu"
    sess = ort_session(fixtures / "model-float16" / m["file"])
    pv = torch.randn(3, 3, 448, 448, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want = torch_model.model.get_image_features(pixel_values=pv, vision_feature_layer=-1,
                                                    vision_feature_select_strategy="default").pooler_output.numpy()
    got = sess.run([m["output"]], {m["input"]: pv.numpy()})[0]
    assert got.dtype == np.float32  # embeddings leave the graph in fp32
    cos, rel = cosine(got, want), rel_l2(got, want)
    print(f"float16 vision vs PyTorch fp32: cosine {cos:.7f}, rel L2 {rel:.2e}, max abs {np.abs(got - want).max():.2e}")
    assert cos > 0.9999 and rel < 2e-3  # measured: cosine 1 - 1e-8, rel L2 1.6e-4


def test_float16_decoder_matches_pytorch_over_steps(fixtures, torch_model):
    """Prefill 20 positions, then 12 steps on the graph's own fp16 cache, against transformers in fp32."""
    from transformers import DynamicCache

    m = manifest(fixtures / "model-float16")["decoder"]
    assert m["kv_dtype"] == "float16" and m["inputs"]["seqlens_k"] == "seqlens_k"
    sess = ort_session(fixtures / "model-float16" / m["file"])
    names_in = {i.name for i in sess.get_inputs()}
    assert "attention_mask" not in names_in  # the lengths are inputs: nothing computed on a device
    kv_types = {i.type for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    assert kv_types == {"tensor(float16)"}
    names_out = [o.name for o in sess.get_outputs()]
    past_names = [n for n in (i.name for i in sess.get_inputs()) if n.startswith("past_key_values.")]
    lm, head = torch_model.model.language_model, torch_model.lm_head
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 20, m["hidden"], generator=gen)
    cache = DynamicCache(config=torch_model.config.text_config)
    feed = step_feed(names_in, x.numpy(), empty_past(m["layers"], m["kv_heads"], m["head_dim"]), 0)
    worst_cos, worst_rel, agree = 1.0, 0.0, 0
    for step in range(13):
        with torch.no_grad():
            want = head(lm(inputs_embeds=x, past_key_values=cache, use_cache=True).last_hidden_state[:, -1]).numpy()
        res = sess.run(names_out, typed(feed, sess))
        assert res[0].dtype == np.float32 and res[1].dtype == np.float16
        worst_cos, worst_rel = min(worst_cos, cosine(res[0], want)), max(worst_rel, rel_l2(res[0], want))
        agree += int(res[0].argmax() == want.argmax())
        x = torch.randn(1, 1, m["hidden"], generator=gen)
        feed = step_feed(names_in, x.numpy(), dict(zip(past_names, res[1:], strict=True)), 20 + step)
    print(f"float16 decoder vs PyTorch fp32 over 13 calls: worst cosine {worst_cos:.6f}, worst rel L2 "
          f"{worst_rel:.2e}, top-1 equal {agree}/13")
    assert worst_cos > 0.999 and worst_rel < 0.05  # measured: cosine 0.99990, rel L2 1.4e-2
    assert agree >= 12


def test_bfloat16_graphs_are_the_float16_graphs_in_bfloat16(fixtures):
    """ONNX Runtime's CPU provider has no bfloat16 kernels, so the bfloat16 graphs cannot run here: check
    that they are node for node the float16 graphs (which run and are checked above), with bfloat16 where
    those have float16, and that the drift the exporter measured (on the module they were traced from) is
    bounded."""
    for graph in ("vision.onnx", "decoder.onnx"):
        a = onnx.load(str(fixtures / "model-float16" / graph), load_external_data=False)
        b = onnx.load(str(fixtures / "model-bfloat16" / graph), load_external_data=False)
        assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node], graph
        half = {i.name: i.data_type for i in a.graph.initializer}
        bf = {i.name: i.data_type for i in b.graph.initializer}
        assert half.keys() == bf.keys()
        for name, t in half.items():
            assert bf[name] == (onnx.TensorProto.BFLOAT16 if t == onnx.TensorProto.FLOAT16 else t), name
        assert sum(t == onnx.TensorProto.BFLOAT16 for t in bf.values()) > 0
    m = manifest(fixtures / "model-bfloat16")
    assert m["decoder"]["kv_dtype"] == "bfloat16"
    vision = m["vision"]["precision"]
    print(f"bfloat16 drift (PyTorch module): vision {vision}, decoder {m['decoder']['precision']}")
    assert vision["cosine_vs_fp32"] > 0.999 and vision["rel_l2_vs_fp32"] < 0.02
    assert m["decoder"]["precision"]["cosine_vs_fp32"] > 0.99


@pytest.mark.parametrize("folder", ["model", "model-float16"])
def test_tensorrt_vision_variant_is_plain_operators_with_the_same_numbers(fixtures, folder):
    m = manifest(fixtures / folder)["vision"]
    variant = m["tensorrt"]["file"]
    graph = onnx.load(str(fixtures / folder / variant), load_external_data=False)
    assert not [n for n in graph.graph.node if n.domain not in ("", "ai.onnx")], "TensorRT parses ONNX-domain ops only"
    assert m["tensorrt"]["attention_layers"] == 2
    # The weights are stored once: the variant points at the portable graph's data file.
    locations = {e.value for i in graph.graph.initializer for e in i.external_data if e.key == "location"}
    assert locations == {m["file"] + ".data"}
    x = np.random.default_rng(5).standard_normal((2, 3, 448, 448)).astype(np.float32)
    want = ort_session(fixtures / folder / m["file"]).run([m["output"]], {m["input"]: x})[0]
    got = ort_session(fixtures / folder / variant).run([m["output"]], {m["input"]: x})[0]
    diff = float(np.abs(got - want).max())
    print(f"{folder}: {variant} vs {m['file']}: max abs diff {diff:.2e}")
    assert diff < (1e-4 if folder == "model" else 2e-2) * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize(("k", "n", "block", "seed"),
                         [(64, 40, 32, 1), (72, 24, 32, 2), (256, 16, 128, 3), (96, 8, 32, 4)])
def test_int4_blocks_are_onnxruntime_quantizer_bytes_and_its_kernel_agrees(k, n, block, seed):
    """The GPU int4 weights (`quantize.int4_blocks`, written by hand for bfloat16's sake) against ONNX
    Runtime's own MatMulNBitsQuantizer on float16 (same scales, same nibbles within K; K = 72 and 96 pad
    the last block), and ONNX Runtime's MatMulNBits kernel computing with them equals the dequantised
    weight the exporter reports its error from."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from export.quantize import int4_blocks

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float16)
    w[:, 0] = 0  # an all-zero column: scale 0
    w[:2, 1], w[2:block, 1] = [0.75, -0.75], 0.5  # a tie of magnitudes: the negative value sets the scale
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"])], "g",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT16, [3, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [3, n])],
                              [numpy_helper.from_array(w, "W")])
    q = MatMulNBitsQuantizer(helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)]),
                             bits=4, block_size=block, is_symmetric=True)
    q.process()
    node = q.model.model.graph.node[0]
    theirs = {t.name: numpy_helper.to_array(t) for t in q.model.model.graph.initializer}
    packed, scales, dequant = int4_blocks(w.astype(np.float32), block, TensorProto.FLOAT16)
    assert packed.shape == theirs[node.input[1]].shape
    np.testing.assert_array_equal(scales, theirs[node.input[2]].astype(np.float32).ravel())

    def nibbles(b):
        return np.stack([b & 15, b >> 4], -1).reshape(n, -1)[:, :k]

    np.testing.assert_array_equal(nibbles(packed), nibbles(theirs[node.input[1]]))
    # ONNX Runtime's kernel (fp32 activations, no int8 compute) reads the bytes as the dequantised weight.
    kernel = helper.make_graph(
        [helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                          block_size=block)], "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, n])],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")])
    import onnxruntime as ort

    sess = ort.InferenceSession(helper.make_model(kernel, ir_version=9, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]).SerializeToString(),
        providers=["CPUExecutionProvider"])
    a = rng.standard_normal((3, k)).astype(np.float32)
    got = sess.run(None, {"A": a})[0]
    np.testing.assert_allclose(got, a @ dequant, rtol=1e-5, atol=1e-4)
    assert np.abs(dequant - w).max() > 0  # it is a quantisation


@pytest.mark.parametrize("dtype", ["int4-float16", "int4-bfloat16"])
def test_gpu_int4_export(fixtures, tmp_path, dtype):
    """int4 for GPUs: the float16 / bfloat16 export with every decoder matmul weight in 4 bits, run by
    MatMulNBits in the activation type; int4-float16 runs on the CPU provider, so the binary answers here."""
    import subprocess

    half = dtype.removeprefix("int4-")
    out = tmp_path / dtype
    r = subprocess.run([sys.executable, "-m", "export", "--checkpoint", str(fixtures / "checkpoint"), "--out", str(out),
                        "--dtype", dtype], check=False, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = manifest(out)
    v, d = m["vision"], m["decoder"]
    assert (m["dtype"], v["dtype"], d["dtype"], d["activations"], d["kv_dtype"]) == (dtype, half, "int4", half, half)
    assert "tensorrt" in v and d["int4_block"] == 32
    graph = onnx.load(str(out / d["file"]), load_external_data=False)
    weights = {t.name: t for t in graph.graph.initializer}
    assert not [n for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == d["quantization"]["matmuls"] == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer; lm_head
    want = onnx.TensorProto.FLOAT16 if half == "float16" else onnx.TensorProto.BFLOAT16
    assert {weights[n.input[2]].data_type for n in nbits} == {want}
    assert 0 < d["quantization"]["worst_weight_rel_l2"] < 0.12
    print(f"{dtype}: worst weight rel L2 {d['quantization']['worst_weight_rel_l2']:.4f}, drift {d['precision']}")
    fp16 = (fixtures / "model-float16" / "decoder.onnx.data").stat().st_size
    assert (out / "decoder.onnx.data").stat().st_size < fp16 / 3
    binary = ROOT / "target" / "release" / "internvl"
    run = subprocess.run([str(binary), "run", "--model", str(out),
                          "--image", str(fixtures / "images" / "448x448_1.png"),
                          "--prompt", "Describe the image.", "--max-new-tokens", "8", "--json", "--device", "cpu"],
                         check=False, capture_output=True, text=True)
    if half == "float16":
        assert d["precision"]["measured_on"] == "onnxruntime-cpu"
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["generated_tokens"] == 8
        assert "made for GPUs" in run.stderr
    else:
        assert d["quantization"]["drift_measured_without_int4"] is True
        assert run.returncode == 2 and "bfloat16" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_quantising_in_column_chunks_is_quantising_whole(monkeypatch):
    """The writer quantises a big weight a few columns at a time (bounded temporaries); per-column int8
    scales and per-column int4 blocks make that exact: the same bytes as the whole matrix at once."""
    from export import writer
    from export.quantize import int4_blocks, int8_columns

    rng = np.random.default_rng(9)
    w = rng.standard_normal((96, 37)).astype(np.float32)
    monkeypatch.setattr(writer, "CHUNK", 96 * 5)  # 5 columns a chunk, the last one short
    packed, scales, err, norm = writer._int4_columns(w, writer.Int4(32))
    whole_packed, whole_scales, dequant = int4_blocks(w, 32, onnx.TensorProto.FLOAT)
    np.testing.assert_array_equal(packed, whole_packed)
    np.testing.assert_array_equal(scales.ravel(), whole_scales)
    assert np.isclose(np.sqrt(err / norm), np.linalg.norm(dequant - w) / np.linalg.norm(w))
    q, s = writer._int8_columns(w)
    wq, ws = int8_columns(w)
    np.testing.assert_array_equal(q, wq)
    np.testing.assert_array_equal(s, ws)
