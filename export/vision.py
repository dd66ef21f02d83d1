"""vision.onnx: pixel_values [tiles,3,448,448] -> image embeddings [tiles,256,llm_hidden].

InternViT, drop of the class token, pixel shuffle (0.5) and the MLP projector in one graph, so the
runtime hands tiles in and gets rows to splice into the LLM's input embeddings out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .common import check_close, export_onnx, ort_session

INPUT = "pixel_values"
OUTPUT = "image_embeds"
TOLERANCE = 1e-3


class VisionEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner = model.model
        cfg = model.config
        self.layer = cfg.vision_feature_layer
        self.strategy = cfg.vision_feature_select_strategy
        emb = self.inner.vision_tower.embeddings
        # Tiles are always image_size square, so the position table applies as is; the HF code would
        # otherwise trace a (no-op) bicubic interpolation of it into the graph.
        emb.interpolate_pos_encoding = lambda embeddings, height, width: emb.position_embeddings

    def forward(self, pixel_values):
        out = self.inner.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=self.layer, vision_feature_select_strategy=self.strategy
        )
        return out.pooler_output


def export_vision(model, out: Path, seed: int = 0) -> dict:
    cfg = model.config
    size = cfg.vision_config.image_size[0]
    enc = VisionEncoder(model).eval()
    # Two tiles: a batch-1 example can pin the tile dimension (shared/notes).
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    export_onnx(enc, (example,), out, [INPUT], [OUTPUT], {INPUT: {0: "tiles"}, OUTPUT: {0: "tiles"}})

    # Self-check on a tile count other than the traced one.
    check = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        want = enc(check).numpy()
    got = ort_session(out).run([OUTPUT], {INPUT: check.numpy()})[0]
    diff = check_close("vision.onnx", got, want, TOLERANCE)
    tokens = int(want.shape[1])
    return {
        "file": out.name, "input": INPUT, "output": OUTPUT, "image_size": int(size),
        "patch_size": int(cfg.vision_config.patch_size[0]), "tokens_per_tile": tokens,
        "embed_dim": int(want.shape[2]), "max_abs_diff": diff, "tolerance": TOLERANCE,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
    }


def vision_reference(model, pixel_values: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return VisionEncoder(model).eval()(torch.from_numpy(pixel_values)).numpy()
