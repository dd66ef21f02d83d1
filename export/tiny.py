"""Random-weight InternVL checkpoints of the real architecture, saved exactly as a downloaded `-hf` one looks.

Tests need a model small enough to export and run in seconds, benchmarks one of the real size (cost does
not depend on the weight values). Both are written the way `save_pretrained` writes a hub checkpoint:
config.json, generation_config.json, bf16 safetensors, tokenizer files, processor configs.

Weights at their default init collapse greedy decoding into one repeated token, which would make a
token-parity test prove nothing; `scale_for_diverse_output` widens them so the answer depends on the
image and the prompt (the tests assert that it does).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets"
QWEN2_TOKENIZER = ASSETS / "tokenizer" / "qwen2"

# Ids of the InternVL 2.5 / 3 tokenizer (Qwen2.5 vocabulary + InternVL's added tokens).
QWEN2_VOCAB = 151674
IMG_CONTEXT_ID = 151667

SHAPES = {
    # A few MB: every dimension small, but every structural feature of the real model kept
    # (448 px tiles, patch 14, 256 tokens per tile, GQA, qkv bias, tied embeddings, the full vocabulary).
    "tiny": {
        "llm_gain": 4.0,
        "vision": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
        "text": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "intermediate_size": 64},
    },
    # InternVL2.5-1B: InternViT-300M + Qwen2.5-0.5B.
    # Speed and memory do not depend on the values, so the usual init scale (no gain) is kept.
    "internvl2_5-1b": {
        "llm_gain": 1.0,
        "vision": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
        "text": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                  "intermediate_size": 4864},
    },
}


def build_config(shape: str):
    from transformers import InternVLConfig

    dims = SHAPES[shape]
    vision = dict(
        image_size=448, patch_size=14, hidden_act="gelu", norm_type="layer_norm", layer_norm_eps=1e-6,
        use_qk_norm=False, attention_bias=True, layer_scale_init_value=0.1, use_mean_pooling=True,
        **dims["vision"],
    )
    text = dict(
        model_type="qwen2", vocab_size=QWEN2_VOCAB, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=151643, eos_token_id=151645, **dims["text"],
    )
    return InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=IMG_CONTEXT_ID, image_seq_length=256,
        downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=True,
    )


@torch.no_grad()
def scale_for_diverse_output(model, seed: int, llm_gain: float = 4.0) -> None:
    """Give every parameter (class token and position embeddings included, which init leaves at zero and
    which would hide errors there) a random value wide enough that activations do not wash out.

    With tied embeddings and weak layers the last hidden state stays close to the input token's embedding,
    so greedy decoding just repeats the previous token. A gain of 4 on the LLM's matrices (measured: 2 still
    collapses, 4 gives ~30 distinct tokens out of 32 that change with the image and the prompt) fixes that."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1 and ("norm" in name or name.endswith(("lambda_1", "lambda_2"))):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        elif p.ndim == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        else:
            fan_in = p.shape[-1] if p.ndim == 2 else p[0].numel()
            std = 1.0 / fan_in**0.5
            if "language_model" in name:
                std *= llm_gain
            if "embed_tokens" in name or "embeddings" in name or "cls_token" in name:
                std = 1.0
            p.copy_(std * torch.randn(p.shape, generator=gen))


def write_tokenizer(out: Path) -> None:
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(QWEN2_TOKENIZER / f, out / f)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # What the -hf checkpoints add so that InternVLProcessor finds its image tokens.
    cfg.update(
        start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
        video_token="<video>", model_max_length=32768,
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    )
    cfg["processor_class"] = "InternVLProcessor"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def write_processor_configs(out: Path) -> None:
    (out / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": None, "crop_to_patches": False, "do_convert_rgb": True, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
        "image_processor_type": "GotOcr2ImageProcessorFast", "image_std": [0.229, 0.224, 0.225],
        "max_patches": 12, "min_patches": 1, "processor_class": "InternVLProcessor",
        "resample": 3, "rescale_factor": 1 / 255, "size": {"height": 448, "width": 448},
    }, indent=2))
    (out / "processor_config.json").write_text(json.dumps({
        "image_seq_length": 256, "processor_class": "InternVLProcessor"}, indent=2))


def make_checkpoint(out: Path, shape: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight checkpoint to `out` (created; refuses to overwrite a non-empty folder)."""
    from transformers import GenerationConfig, InternVLForConditionalGeneration

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"refusing to overwrite non-empty folder {out}")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = build_config(shape)
    model = InternVLForConditionalGeneration(config).eval()
    scale_for_diverse_output(model, seed, llm_gain=SHAPES[shape]["llm_gain"])
    model.to(torch.bfloat16)  # hub checkpoints are stored in bf16
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643).save_pretrained(out)
    write_tokenizer(out)
    write_processor_configs(out)
    return out
