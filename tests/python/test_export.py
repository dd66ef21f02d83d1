"""The exporter against PyTorch: each graph's numbers, the manifest, and how it treats bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export.checkpoint import inspect, map_original
from export.common import ort_session
from export.decoder import empty_past, step_feed
from export.testing.pytorch import load

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def torch_model(fixtures):
    return load(inspect(str(fixtures / "checkpoint")), 151667)


def manifest(fixtures) -> dict:
    return json.loads((fixtures / "model" / "manifest.json").read_text())


def test_vision_graph_matches_pytorch(fixtures, torch_model):
    m = manifest(fixtures)["vision"]
    sess = ort_session(fixtures / "model" / m["file"])
    for tiles in (1, 5):
        pv = torch.randn(tiles, 3, 448, 448, generator=torch.Generator().manual_seed(tiles))
        with torch.no_grad():
            want = torch_model.model.get_image_features(pixel_values=pv, vision_feature_layer=-1,
                                                        vision_feature_select_strategy="default").pooler_output
        got = sess.run([m["output"]], {m["input"]: pv.numpy()})[0]
        assert got.shape == (tiles, 256, m["embed_dim"])
        diff = np.abs(got - want.numpy()).max()
        print(f"vision tiles={tiles}: max abs diff {diff:.2e}")
        assert diff < 1e-4


def test_decoder_graph_matches_pytorch_over_steps(fixtures, torch_model):
    """Prefill 20 positions, then 8 single-token steps chaining ONNX Runtime's own cache."""
    from transformers import DynamicCache

    m = manifest(fixtures)["decoder"]
    sess = ort_session(fixtures / "model" / m["file"])
    names_in = [i.name for i in sess.get_inputs()]
    names_out = [o.name for o in sess.get_outputs()]
    lm, head = torch_model.model.language_model, torch_model.lm_head
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randn(1, 20, m["hidden"], generator=gen)
    cache = DynamicCache(config=torch_model.config.text_config)
    past_names = [n for n in names_in if n.startswith("past_key_values.")]
    feed = step_feed(set(names_in), prompt.numpy(), empty_past(m["layers"], m["kv_heads"], m["head_dim"]), 0)
    worst = 0.0
    x = prompt
    for step in range(9):
        with torch.no_grad():
            h = lm(inputs_embeds=x, past_key_values=cache, use_cache=True).last_hidden_state
            want = head(h[:, -1]).numpy()
        res = sess.run(names_out, feed)
        diff = float(np.abs(res[0] - want).max())
        worst = max(worst, diff)
        assert res[0].argmax() == want.argmax()
        x = torch.randn(1, 1, m["hidden"], generator=gen)
        feed = step_feed(set(names_in), x.numpy(), dict(zip(past_names, res[1:], strict=True)), 20 + step)
    print(f"decoder logits: max abs diff {worst:.2e} over prefill + 8 steps")
    assert worst < 1e-3


def test_embedding_table_is_the_checkpoints(fixtures, torch_model):
    m = manifest(fixtures)["embed"]
    table = np.fromfile(fixtures / "model" / m["file"], dtype="<f4").reshape(m["vocab"], m["hidden"])
    assert np.array_equal(table, torch_model.get_input_embeddings().weight.detach().numpy())


def test_manifest_describes_the_model(fixtures, torch_model):
    m = manifest(fixtures)
    cfg = torch_model.config
    assert m["format_version"] == 1
    assert m["decoder"]["layers"] == cfg.text_config.num_hidden_layers
    assert m["decoder"]["kv_heads"] == cfg.text_config.num_key_value_heads
    assert m["tokenizer"]["img_context_id"] == cfg.image_token_id
    assert 151645 in m["tokenizer"]["stop_ids"]  # <|im_end|>
    assert m["template"]["name"] == "internvl2_5" and "书生" in m["template"]["system_message"]
    for key in ("exporter", "onnx", "onnxruntime", "torch", "transformers"):
        assert m["versions"][key]
    for graph in ("vision", "decoder"):
        assert m[graph]["max_abs_diff"] <= m[graph]["tolerance"]
        assert (fixtures / "model" / (m[graph]["file"] + ".data")).is_file(), "weights go in external data"


def export_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *map(str, args)], check=False, cwd=ROOT,
                          capture_output=True, text=True)


def test_export_never_overwrites_without_force(fixtures, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    r = export_cli("--checkpoint", fixtures / "checkpoint", "--out", out)
    assert r.returncode != 0 and "not empty" in r.stderr
    assert (out / "mine.txt").read_text() == "user data"


def test_force_replaces_only_an_earlier_export(fixtures, tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    r = export_cli("--checkpoint", fixtures / "checkpoint", "--out", mine, "--force")
    assert r.returncode != 0 and "not a model folder" in r.stderr
    assert (mine / "holiday.jpg").read_bytes() == b"precious"
    r = export_cli("--checkpoint", fixtures / "checkpoint", "--out", fixtures / "checkpoint", "--force")
    assert r.returncode != 0 and (fixtures / "checkpoint" / "config.json").is_file()
    (tmp_path / "file").write_text("x")
    r = export_cli("--checkpoint", fixtures / "checkpoint", "--out", tmp_path / "file")
    assert r.returncode != 0 and "not a folder" in r.stderr and "Traceback" not in r.stderr


def test_rejects_what_it_does_not_support(tmp_path):
    cases = {
        "phi3-sliding": ({"model_type": "internvl_chat", "template": "phi3-chat",
                          "llm_config": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
                                         "sliding_window": 2047, "max_position_embeddings": 4096}},
                         "sliding-window attention (window 2047) is not supported"),
        "mistral-llm": ({"model_type": "internvl_chat", "template": "Hermes-2",
                         "llm_config": {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}},
                        "'mistral' is not supported"),
        "gpt2-llm": ({"model_type": "internvl", "text_config": {"model_type": "gpt2"}}, "'gpt2' is not supported"),
        "other": ({"model_type": "bert"}, "not an InternVL checkpoint"),
    }
    for name, (cfg, msg) in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        r = export_cli("--checkpoint", d, "--out", tmp_path / f"out-{name}")
        assert r.returncode != 0 and msg in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    r = export_cli("--checkpoint", tmp_path / "missing", "--out", tmp_path / "o")
    assert r.returncode != 0 and "no such folder" in r.stderr


def test_original_layout_mapping_matches_an_independent_construction(fixtures):
    """The exporter's original->canonical mapping, applied to the original-layout file that
    export/testing/tiny.py wrote from a transformers model, must give back that model's tensors exactly
    (InternLM2's packed wqkv and InternViT's fused qkv included)."""
    from safetensors.torch import load_file

    for name in ("internlm2-original", "qwen2-original"):
        ckpt = inspect(str(fixtures / "checkpoints" / name))
        mapped = map_original(ckpt, load_file(ckpt.path / "model.safetensors"))
        ref = load(inspect(str(fixtures / "checkpoints" / f"{name}-reference-hf")), 151667).state_dict()
        for key, tensor in mapped.items():
            assert torch.equal(tensor.float(), ref[key]), f"{name}: {key}"
        tied = ref["lm_head.weight"].data_ptr() == ref["model.language_model.embed_tokens.weight"].data_ptr()
        assert set(ref) - set(mapped) <= ({"lm_head.weight"} if tied else set()), name


def test_pixel_shuffle_v1_and_select_layer(fixtures):
    """ps_version v1 and select_layer -2, against transformers' vision tower (hidden_states[-2]) followed
    by the model card's v1 pixel shuffle written out here and transformers' projector."""
    ref = load(inspect(str(fixtures / "checkpoints" / "qwen2-original-reference-hf")), 151667)
    m = json.loads((fixtures / "models" / "qwen2-v1-layer-2" / "manifest.json").read_text())["vision"]
    assert (m["ps_version"], m["select_layer"]) == ("v1", -2)
    pv = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        x = ref.model.vision_tower(pixel_values=pv, output_hidden_states=True).hidden_states[-2][:, 1:]
        n, _, c = x.shape
        x = x.reshape(n, 32, 32, c)
        # InternVLChatModel.pixel_shuffle with ps_version 'v1': no final permute.
        x = x.view(n, 32, 16, c * 2).permute(0, 2, 1, 3).contiguous().view(n, 16, 16, c * 4)
        want = ref.model.multi_modal_projector(x.reshape(n, -1, c * 4)).numpy()
    vision = ort_session(fixtures / "models" / "qwen2-v1-layer-2" / "vision.onnx")
    got = vision.run(None, {"pixel_values": pv.numpy()})[0]
    diff = float(np.abs(got - want).max())
    print(f"vision v1 / layer -2: max abs diff {diff:.2e}")
    assert diff < 1e-4
    # and it is not the v2 / last-layer output
    v2 = ort_session(fixtures / "models" / "qwen2-original" / "vision.onnx").run(None, {"pixel_values": pv.numpy()})[0]
    assert float(np.abs(got - v2).max()) > 1e-2


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_export_runs(fixtures, tmp_path, dtype):
    out = tmp_path / f"model-{dtype}"
    r = export_cli("--checkpoint", fixtures / "checkpoint", "--out", out, "--dtype", dtype)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["dtype"] == dtype and m["decoder"]["dtype"] == dtype and m["vision"]["dtype"] == "int8"
    assert m["vision"]["quantization"]["cosine_vs_fp32"] > 0.99
    assert "amx" not in m["vision"]  # head size 16: the AMX kernel's layout does not fit
    fp32_bytes = (fixtures / "model" / "decoder.onnx.data").stat().st_size
    assert (out / "decoder.onnx.data").stat().st_size < fp32_bytes / (3 if dtype == "int8" else 5)
    binary = ROOT / "target" / "release" / "internvl"
    run = subprocess.run([str(binary), "run", "--model", str(out),
                          "--image", str(fixtures / "images" / "448x448_1.png"),
                          "--prompt", "Describe the image.", "--max-new-tokens", "8", "--json"],
                         check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["generated_tokens"] == 8


def test_ids_past_the_tokenizer_are_never_generated(fixtures, tmp_path):
    """A model whose vocabulary is padded past its tokenizer (Qwen2.5's 151936 rows over 151665 ids; the
    8B-shaped benchmark checkpoint's 92553 over a small tokenizer) only ever generates ids the tokenizer has:
    here the tokenizer's size in the manifest is cut below an id the full model picks greedily."""
    import shutil

    def ids(model):
        out = subprocess.run([str(ROOT / "target" / "release" / "internvl"), "run", "--model", str(model), "--image",
                              str(fixtures / "images" / "448x448_1.png"), "--prompt", "Describe the image.",
                              "--max-new-tokens", "12", "--json"],
                             check=False, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["token_ids"]

    full = ids(fixtures / "model")
    limit = max(full)
    model = tmp_path / "m"
    shutil.copytree(fixtures / "model", model)
    m = json.loads((model / "manifest.json").read_text())
    m["tokenizer"]["vocab_size"] = limit
    (model / "manifest.json").write_text(json.dumps(m))
    cut = ids(model)
    assert cut and max(cut) < limit, (full, cut)


@pytest.mark.parametrize("folder", ["qwen2-amx-int8", "qwen2-amx128-int8"])
def test_amx_graphs_are_the_quantized_graphs_with_their_attention_swapped(fixtures, folder):
    """vision-amx.onnx / decoder-amx.onnx (int8 exports, 64- and 128-wide heads): every MultiHeadAttention /
    GroupQueryAttention, and nothing else, replaced by the runtime's kernel; weights shared with the portable
    graph. Their numbers are checked in tests/kernels.rs."""
    import onnx

    folder = fixtures / "models" / folder
    m = json.loads((folder / "manifest.json").read_text())
    for stage, theirs, ours in (("vision", "MultiHeadAttention", "AmxAttention"),
                                ("decoder", "GroupQueryAttention", "AmxGroupQueryAttention")):
        entry = m[stage]
        assert entry["amx"] == {"file": f"{stage}-amx.onnx", "op": f"ai.internvl::{ours}", "attention_layers": 2}
        base = onnx.load(str(folder / entry["file"]), load_external_data=False)
        amx = onnx.load(str(folder / entry["amx"]["file"]), load_external_data=False)
        assert len(base.graph.node) == len(amx.graph.node)
        swapped = 0
        for a, b in zip(base.graph.node, amx.graph.node, strict=True):
            if (a.domain, a.op_type) == ("com.microsoft", theirs):
                assert (b.domain, b.op_type) == ("ai.internvl", ours)
                swapped += 1
                a.domain, a.op_type = b.domain, b.op_type
            assert a == b
        assert swapped == 2
        assert {(o.domain, o.version) for o in amx.opset_import} >= {("ai.internvl", 1)}
        locations = {e.value for t in amx.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {f"{stage}.onnx.data"}
        assert not list(folder.glob(f"{stage}-amx.onnx.data"))



def assert_exports_the_same(checkpoint: Path, out: Path, model: Path) -> None:
    """`checkpoint` exports to the graphs and table of `model`, byte for byte."""
    r = export_cli("--checkpoint", checkpoint, "--out", out)
    assert r.returncode == 0, r.stderr
    ours = json.loads((out / "manifest.json").read_text())["files"]
    want = json.loads((model / "manifest.json").read_text())["files"]
    for f in ("vision.onnx.data", "decoder.onnx.data", "embed_tokens.bin"):
        assert ours[f]["sha256"] == want[f]["sha256"], f


@pytest.mark.parametrize(("checkpoint", "model"), [("checkpoint", "model"),
                                                   ("checkpoints/qwen2-original", "models/qwen2-original")])
def test_pytorch_bin_checkpoints_export_the_same_model(fixtures, tmp_path, checkpoint, model):
    """A checkpoint shipped as PyTorch .bin shards (as some InternVL 1.5 / 2 releases are; -hf and original
    layouts) exports to the same graphs, byte for byte, as the same weights in safetensors."""
    import shutil

    from safetensors.torch import load_file

    src = fixtures / checkpoint
    ck = tmp_path / "ck"
    shutil.copytree(src, ck, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    keys = sorted(tensors)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(shards, 1):
        name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save({k: tensors[k].clone() for k in part}, ck / name)
        weight_map.update(dict.fromkeys(part, name))
    (ck / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_exports_the_same(ck, tmp_path / "m", fixtures / model)


@pytest.mark.parametrize(("checkpoint", "model"), [("checkpoint", "model"),
                                                   ("checkpoints/internlm2-original", "models/internlm2-original")])
def test_sharded_safetensors_export_the_same_model(fixtures, tmp_path, checkpoint, model):
    """The hub's sharded safetensors (model-0000N-of-0000M + index), read tensor by tensor, export to the
    same graphs, byte for byte, as the one-file checkpoint."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = fixtures / checkpoint
    ck = tmp_path / "ck"
    shutil.copytree(src, ck, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(src / "model.safetensors")
    keys = sorted(tensors)
    shards = [keys[i::3] for i in range(3)]
    weight_map = {}
    for i, part in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in part}, ck / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (ck / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_exports_the_same(ck, tmp_path / "m", fixtures / model)


def test_streamed_tensors_are_the_ones_transformers_loads(fixtures, torch_model):
    """The exporter's own reading of a -hf checkpoint (names renamed as transformers' conversion mapping
    does, one tensor at a time) gives exactly the state dict transformers' from_pretrained builds."""
    from export.checkpoint import reference_config, tied
    from export.weights import Weights

    ck = inspect(str(fixtures / "checkpoint"))
    weights = Weights(ck, tied(reference_config(ck, 151667)))
    want = torch_model.state_dict()
    assert set(weights.names()) == set(want)
    for name, t in want.items():
        assert torch.equal(weights.get(name), t.float()), name


def _initializers(path: Path):
    """The graph's weights as a multiset of (dims, type, bytes), and its operator counts."""
    import collections
    import hashlib

    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    weights = collections.Counter((tuple(t.dims), t.data_type, hashlib.sha256(numpy_helper.to_array(t).tobytes())
                                   .hexdigest()) for t in m.graph.initializer)
    return weights, collections.Counter((n.domain, n.op_type) for n in m.graph.node)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_weights_are_onnxruntime_quantizer_bytes(fixtures, tmp_path, dtype):
    """Quantised tensor by tensor as the export streams them, the weights and operators are exactly what ONNX
    Runtime's own quantisers (which load the whole model) make of the float32 graphs: quantize_dynamic
    (per channel, int8) and MatMulNBitsQuantizer (4 bits, symmetric, block 32, int8 compute)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out = tmp_path / dtype
    r = export_cli("--checkpoint", fixtures / "checkpoint", "--out", out, "--dtype", dtype)
    assert r.returncode == 0, r.stderr
    for graph in ("vision.onnx", "decoder.onnx"):
        theirs = tmp_path / f"ort-{graph}"
        if dtype == "int4" and graph == "decoder.onnx":
            q = MatMulNBitsQuantizer(onnx.load(str(fixtures / "model" / graph)), bits=4, block_size=32,
                                     is_symmetric=True, accuracy_level=4)
            q.process()
            onnx.save_model(q.model.model, str(theirs), save_as_external_data=True, location=theirs.name + ".data")
        else:
            quantize_dynamic(fixtures / "model" / graph, theirs, op_types_to_quantize=["MatMul", "Gemm"],
                             per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=True,
                             extra_options={"MatMulConstBOnly": True})
        (ours_w, ours_ops), (their_w, their_ops) = _initializers(out / graph), _initializers(theirs)
        assert ours_ops == their_ops, graph
        assert ours_w == their_w, graph


def test_checkpoints_without_readable_weights_are_refused(fixtures, tmp_path):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(fixtures / "checkpoint", ck, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    (ck / "model.gguf").write_bytes(b"GGUF")
    r = export_cli("--checkpoint", ck, "--out", tmp_path / "m")
    assert r.returncode == 1 and "no weights this exporter reads" in r.stderr and "model.gguf" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    (ck / "model.gguf").unlink()
    (ck / "pytorch_model.bin").write_bytes(b"not a pickle")
    r = export_cli("--checkpoint", ck, "--out", tmp_path / "m")
    assert r.returncode == 1 and "pytorch_model.bin" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_damaged_safetensors_are_refused_before_any_work(fixtures, tmp_path):
    """A cut-short shard, a header that lies about a tensor's size, an absurd header length and a FIFO in
    place of a shard: each one line naming the file, exit 1, no traceback, no hang, no output folder."""
    import os
    import shutil
    import struct

    src = fixtures / "checkpoint" / "model.safetensors"
    cases = {
        "truncated": lambda f: f.write_bytes(src.read_bytes()[: src.stat().st_size // 2]),
        "lying": lambda f: f.write_bytes(struct.pack("<Q", 80) + json.dumps(
            {"x": {"dtype": "F32", "shape": [10**9, 10**6], "data_offsets": [0, 4]}}).encode().ljust(80) + bytes(4)),
        "header": lambda f: f.write_bytes(struct.pack("<Q", 2**63 - 1) + b"{}"),
        "fifo": lambda f: os.mkfifo(f),
    }
    for name, damage in cases.items():
        ck = tmp_path / name
        shutil.copytree(fixtures / "checkpoint", ck, ignore=shutil.ignore_patterns("*.safetensors"))
        damage(ck / "model.safetensors")
        r = subprocess.run([sys.executable, "-m", "export", "--checkpoint", str(ck), "--out", str(tmp_path / "m")],
                           check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and "model.safetensors" in last and "Traceback" not in r.stderr, (name, r.stderr)
        assert not (tmp_path / "m").exists(), name


def test_family_registry_is_consistent():
    """One entry per LLM family: its template exists, its reference model type is one transformers builds,
    and detection works by model_type and by architecture alone; anything else is refused by name."""
    from transformers import AutoConfig

    from export import templates
    from export.common import CheckpointError
    from export.families import FAMILIES, detect

    for name, fam in FAMILIES.items():
        templates.template(fam.template)
        AutoConfig.for_model(fam.reference)
        assert detect({"model_type": name}, "x") is fam
        assert detect({"architectures": [fam.architecture]}, "x") is fam
    with pytest.raises(CheckpointError, match="'mistral' is not supported"):
        detect({"model_type": "mistral"}, "x")


def test_the_exporter_never_imports_the_test_oracles():
    """export/testing/ is test oracles, not shipped behaviour: no module `python -m export` runs imports it,
    at module level or inside a function, so what a user's export does cannot depend on a golden or a tiny
    checkpoint."""
    import ast

    for path in sorted((ROOT / "export").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level == 1:  # `from .testing import x`, `from . import testing`
                    names = [f"export.{module}"] if module else [f"export.{a.name}" for a in node.names]
                else:
                    names = [module]
            else:
                continue
            bad = [n for n in names if n == "export.testing" or n.startswith("export.testing.")]
            assert not bad, f"{path.relative_to(ROOT)}:{node.lineno} imports {bad[0]}"
