"""Helpers shared by the graph exporters: ONNX writing with external data, and the self-check against PyTorch."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

# The graph types an export can be written in (`--dtype`); int8 / int4 are quantised from float32.
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ExportError(Exception):
    """What the exporter refuses or cannot do, in one line. Library code raises these; only
    `python -m export` turns them into a message on stderr and exit status 1."""


class UsageError(ExportError):
    """An option value the exporter does not take (a dtype, a template name)."""


class CheckpointError(ExportError):
    """The checkpoint is missing, malformed, or of a kind this exporter does not support."""


class OutputError(ExportError):
    """The output cannot be written without replacing something the user has."""


class ExportCheckError(ExportError):
    """An exported graph disagrees with PyTorch beyond its stated tolerance."""


def export_onnx(module: torch.nn.Module, args: tuple, out: Path, input_names: list[str],
                output_names: list[str], dynamic_axes: dict) -> None:
    """Export `module` to `out`, weights in one external-data file `<out>.data` beside it.

    TorchScript tracing (dynamo=False): it keeps the query length dynamic in our decoder and ONNX Runtime
    fuses more of the graph it produces (see shared/notes). The 2 GiB protobuf limit is side-stepped by
    always writing weights as external data, so the fp32 decoder of a 0.5B LLM and larger ones work alike.
    """
    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(
                module, args, str(raw), input_names=input_names, output_names=output_names,
                dynamic_axes=dynamic_axes, opset_version=17, do_constant_folding=True, dynamo=False,
                custom_opsets={"com.microsoft": 1},
            )
        save_onnx(onnx.load(str(raw), load_external_data=True), out)
    onnx.checker.check_model(str(out))


def save_onnx(model: onnx.ModelProto, out: Path) -> None:
    """`out` plus all its weights in one external-data file `<out>.data` (replacing both if present)."""
    data = out.parent / (out.name + ".data")
    for stale in (out, data):
        if stale.exists():
            stale.unlink()
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


def ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or max(1, os.cpu_count() or 1)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_close(what: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float = 0.0) -> float:
    """Max abs difference between ONNX Runtime and PyTorch; raises when it exceeds
    `atol + rtol * max|want|` (float32 rounding grows with the magnitude of what is compared)."""
    if got.shape != want.shape:
        raise ExportCheckError(f"{what}: shape {got.shape} from ONNX Runtime, {want.shape} from PyTorch")
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if got.size else 0.0
    limit = atol + rtol * (float(np.max(np.abs(want))) if want.size else 0.0)
    if not np.isfinite(diff) or diff > limit:
        raise ExportCheckError(f"{what}: max abs diff {diff:.3g} to PyTorch exceeds tolerance {limit:.3g}")
    return diff
