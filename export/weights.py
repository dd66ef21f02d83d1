"""The checkpoint's tensors under canonical names, read one at a time.

Canonical names are transformers' InternVL module names (`model.vision_tower.*`, `model.multi_modal_projector.*`,
`model.language_model.*`, `lm_head.weight`), with packed projections split (InternLM2's `wqkv`, InternViT's
`qkv`, Phi-3's `qkv_proj` / `gate_up_proj`), so every graph is written from the same names whatever the
checkpoint's layout.

Nothing is loaded up front: the index is built from the files' headers (safetensors) or from memory-mapped
PyTorch pickles, and `get` reads the one source tensor a name comes from. That is what keeps the export's
memory at the size of the largest tensor rather than of the model: an 8B checkpoint is 16 GB in bf16 and
would be 32 GB in float32.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from .common import CheckpointError

# safetensors' dtype names
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
# -hf checkpoints saved by transformers 4.x name the LLM `language_model.model.*` and the head
# `language_model.lm_head`; transformers 5 renames them on load (its llava conversion mapping), as here.
_HF_RENAMES = (("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
               ("language_model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
               ("multi_modal_projector.", "model.multi_modal_projector."))


def hf_name(name: str) -> str:
    if name.startswith(("model.", "lm_head.")):
        return name
    for old, new in _HF_RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def split_packed(name: str, t: torch.Tensor, heads: int, kv: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Phi-3's fused `qkv_proj` (rows q, k, v) and `gate_up_proj` (rows gate, up) as the separate projections
    the graphs are written with; any other tensor as it is."""
    if name.endswith("self_attn.qkv_proj.weight"):
        pre = name[: -len("qkv_proj.weight")]
        parts = t.split([heads * head_dim, kv * head_dim, kv * head_dim])
        return dict(zip((pre + n + ".weight" for n in ("q_proj", "k_proj", "v_proj")), parts, strict=True))
    if name.endswith("mlp.gate_up_proj.weight"):
        pre = name[: -len("gate_up_proj.weight")]
        gate, up = t.chunk(2, dim=0)
        return {pre + "gate_proj.weight": gate, pre + "up_proj.weight": up}
    return {name: t}


class Weights:
    """Canonical name -> float32 tensor, each read from the checkpoint when asked for (`get`), never kept."""

    def __init__(self, ckpt, tie_word_embeddings: bool):
        from .checkpoint import weight_files

        self.ckpt = ckpt
        llm = ckpt.config.get("llm_config") or ckpt.config.get("text_config") or {}
        self._heads = llm.get("num_attention_heads", 1)
        self._kv = llm.get("num_key_value_heads") or self._heads
        self._head_dim = llm.get("head_dim") or llm.get("hidden_size", self._heads) // self._heads
        self._sources: dict[str, tuple[Path, object]] = {}  # source name -> (file, handle or mmap'd tensor)
        self._bins: dict[Path, dict] = {}
        metas: dict[str, torch.Tensor] = {}
        for f in weight_files(ckpt.path):
            for name, meta in self._scan(f):
                metas[name] = meta
        self._from: dict[str, str] = {}  # canonical -> source
        self.shapes: dict[str, tuple[int, ...]] = {}
        for src, meta in metas.items():
            for name, t in self._map(src, meta).items():
                self._from[name] = src
                self.shapes[name] = tuple(t.shape)
        embed = "model.language_model.embed_tokens.weight"
        if tie_word_embeddings and embed in self._from:
            # transformers ties the head to the embedding table and ignores a stored head
            self._from["lm_head.weight"] = self._from[embed]
            self.shapes["lm_head.weight"] = self.shapes[embed]
            self._alias = {"lm_head.weight": embed}
        else:
            self._alias = {}
        self._cached: tuple[str, dict[str, torch.Tensor]] | None = None

    def _scan(self, f: Path) -> Iterator[tuple[str, torch.Tensor]]:
        if f.suffix == ".safetensors":
            reader = _Safetensors(f)
            for name, (dtype, shape, _, _) in reader.tensors.items():
                self._sources[name] = (f, reader)
                yield name, torch.empty(shape, dtype=dtype, device="meta")
            return
        try:  # tensors only (no pickled code), memory-mapped: nothing is read until a tensor is used
            tensors = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"checkpoint {f}: cannot read PyTorch weights ({type(e).__name__}: {e})") from e
        if not isinstance(tensors, dict):
            raise CheckpointError(f"checkpoint {f}: not a PyTorch state dict")
        for name, t in tensors.items():
            if isinstance(t, torch.Tensor):
                self._sources[name] = (f, tensors)
                yield name, torch.empty(t.shape, dtype=t.dtype, device="meta")

    def _map(self, src: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        from .checkpoint import map_original

        mapped = map_original(self.ckpt, {src: t}) if self.ckpt.layout == "original" else {hf_name(src): t}
        out = {}
        for name, x in mapped.items():
            out.update(split_packed(name, x, self._heads, self._kv, self._head_dim))
        return out

    def names(self) -> list[str]:
        return list(self._from)

    def __contains__(self, name: str) -> bool:
        return name in self._from

    def get(self, name: str) -> torch.Tensor:
        """The tensor in float32, contiguous and owned (the source file's pages are not kept)."""
        name = self._alias.get(name, name)
        try:
            src = self._from[name]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.ckpt.path}: tensor {name} missing") from None
        if self._cached is not None and self._cached[0] == src:
            mapped = self._cached[1]
        else:
            f, handle = self._sources[src]
            mapped = self._map(src, handle.read(src) if f.suffix == ".safetensors" else handle[src])
            # A packed source (q, k, v in one tensor) is asked for once per part: keep it for the next call.
            self._cached = (src, mapped) if len(mapped) > 1 else None
        t = mapped[name]
        return t.to(torch.float32, copy=True).contiguous() if t.dtype != torch.float32 else t.clone().contiguous()


class _Safetensors:
    """A safetensors file read with plain reads, one tensor at a time. Not memory-mapped: pages of a mapped
    checkpoint stay in the process's resident set as long as the mapping lives, so reading every tensor
    once through a map would count the whole checkpoint against the export's memory."""

    def __init__(self, path: Path):
        import json
        import struct

        self.path = path
        if not path.is_file():  # a FIFO or a device would block or never end
            raise CheckpointError(f"checkpoint {path}: not a regular file")
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > 100 << 20 or size > path.stat().st_size:
                    raise ValueError(f"header size {size}")
                header = json.loads(f.read(size))
            self.start = 8 + size
            size_on_disk = path.stat().st_size
            self.tensors = {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise CheckpointError(f"checkpoint {path}: tensor {name} has dtype {info['dtype']}, which "
                                          f"this exporter does not read")
                dtype, shape = _DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
                # Checked here, before any work: a cut-short shard or a header that lies about a size.
                if not 0 <= begin <= end <= size_on_disk - self.start:
                    raise CheckpointError(f"checkpoint {path}: tensor {name} lies past the end of the file "
                                          f"(file truncated?)")
                if end - begin != math.prod(shape) * dtype.itemsize or min(shape, default=0) < 0:
                    raise CheckpointError(f"checkpoint {path}: tensor {name} has {end - begin} bytes for shape "
                                          f"{list(shape)} of {info['dtype']}")
                self.tensors[name] = (dtype, shape, begin, end)
        except CheckpointError:
            raise
        except Exception as e:  # truncated, not safetensors, bad JSON: one line naming the file
            raise CheckpointError(f"checkpoint {path}: cannot read safetensors ({type(e).__name__}: {e})") from e

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.tensors[name]
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"checkpoint {self.path}: tensor {name} is cut short (file truncated)")
        t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        if t.numel() != math.prod(shape):
            raise CheckpointError(f"checkpoint {self.path}: tensor {name} has {t.numel()} values for shape {shape}")
        return t.reshape(shape)
