"""The whole checkpoint as transformers' InternVL in float32 (eager attention): the reference the tests and
the goldens compare the exported graphs with. Holds the model, which the exporter itself never does
(`export/weights.py`); -hf checkpoints go through transformers' own loading, so the exporter's reading of
them is checked against an independent one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import Checkpoint, hf_config, map_original, weight_files
from ..common import CheckpointError


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in weight_files(path):
        if f.suffix == ".safetensors":
            out.update(load_file(f))
            continue
        try:  # tensors only (no pickled code); memory-mapped, so a shard is not copied whole first
            out.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # a truncated or non-PyTorch file: one line naming it
            raise CheckpointError(f"checkpoint {f}: cannot read PyTorch weights ({type(e).__name__}: {e})") from e
    return out


def load(ckpt: Checkpoint, image_token_id: int):
    """(transformers reference model in float32 with eager attention, its canonical state dict)."""
    from transformers import InternVLForConditionalGeneration

    if ckpt.layout == "hf":
        try:
            model = InternVLForConditionalGeneration.from_pretrained(ckpt.path, dtype=torch.float32,
                                                                     attn_implementation="eager")
        except Exception as e:  # damaged or foreign weight files: one line naming the checkpoint
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(f"checkpoint {ckpt.path}: transformers cannot load its weights "
                                  f"({', '.join(f.name for f in weight_files(ckpt.path))}: {type(e).__name__}: "
                                  f"{first})") from e
    else:
        cfg = hf_config(ckpt, image_token_id)
        cfg._attn_implementation = "eager"
        weights = {k: v.float() for k, v in map_original(ckpt, _read_weights(ckpt.path)).items()}
        with torch.device("meta"):
            model = InternVLForConditionalGeneration(cfg)
        if cfg.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
        missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {ckpt.path}: tensors missing {missing[:5]} / unexpected {unexpected[:5]}")
        if cfg.tie_word_embeddings:
            model.tie_weights()
        # Buffers (the rotary frequencies) were made on the meta device: build that module for real.
        lm = model.model.language_model
        lm.rotary_emb = type(lm.rotary_emb)(config=cfg.text_config)
    return model.eval()
