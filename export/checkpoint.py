"""Open a checkpoint as a user downloads it (local folder or hub id) and say what it is.

Supported now: the Hugging Face layout that transformers loads natively (`InternVLForConditionalGeneration`,
the "-hf" repos) with a Qwen2 / Qwen2.5 LLM: InternVL 2.5 and 3. Anything else is rejected with a message
naming what is not supported, before any heavy work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_LLMS = {"qwen2"}


@dataclass
class Checkpoint:
    path: Path
    source: str  # what the user passed
    config: dict
    llm_arch: str
    template: str


def resolve(source: str) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (needs network; not exercised offline)."""
    p = Path(source)
    if p.exists():
        if not p.is_dir():
            raise SystemExit(f"checkpoint {source}: not a folder")
        return p
    if source.count("/") == 1 and not source.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as e:  # network, auth, unknown repo: one clear line
            raise SystemExit(f"checkpoint {source}: cannot download from the hub ({type(e).__name__}: {e})") from e
    raise SystemExit(f"checkpoint {source}: no such folder")


def inspect(source: str, template: str | None = None) -> Checkpoint:
    path = resolve(source)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise SystemExit(f"checkpoint {path}: config.json missing")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"checkpoint {cfg_file}: invalid JSON ({e})") from e
    model_type = config.get("model_type")
    if model_type == "internvl_chat":
        raise SystemExit(
            f"checkpoint {path}: original OpenGVLab layout (InternVLChatModel, remote code) is not supported yet; "
            "use the '-hf' release of the same model"
        )
    if model_type != "internvl":
        raise SystemExit(f"checkpoint {path}: model_type {model_type!r} is not an InternVL checkpoint")
    llm = (config.get("text_config") or {}).get("model_type", "qwen2")
    if llm not in SUPPORTED_LLMS:
        raise SystemExit(f"checkpoint {path}: LLM {llm!r} is not supported yet (supported: {sorted(SUPPORTED_LLMS)})")
    vision = config.get("vision_config") or {}
    if vision.get("norm_type", "layer_norm") != "layer_norm" or vision.get("use_qk_norm"):
        raise SystemExit(f"checkpoint {path}: InternViT-6B vision (RMSNorm / qk-norm) is not supported yet")
    for f in ("tokenizer.json",):
        if not (path / f).is_file():
            raise SystemExit(f"checkpoint {path}: {f} missing")
    return Checkpoint(path=path, source=source, config=config, llm_arch=llm, template=template or "internvl2_5")


def load_model(ckpt: Checkpoint):
    """The PyTorch model in float32 with eager attention: the exact math we export and check against."""
    import torch
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(
        ckpt.path, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()
