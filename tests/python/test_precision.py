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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from export.checkpoint import inspect, load
from export.common import ort_session
from export.decoder import empty_past, step_feed
from export.precision import typed


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
