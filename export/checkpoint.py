"""Open a checkpoint as a user downloads it (local folder or hub id) and say what it is.

Two layouts:
- "hf": what transformers loads natively (`InternVLForConditionalGeneration`, the "-hf" repos);
- "original": OpenGVLab's `InternVLChatModel` repos (remote code; tensors `vision_model.*`, `mlp1.*`,
  `language_model.*`; a `template` name in config.json). Its code is never imported: the tensors are
  mapped onto canonical names (transformers' module names, `map_original`) and its config onto
  transformers' InternVL with the matching LLM class (`hf_config`), which serves as the PyTorch reference
  the export is checked against (`reference_model`: just the layers a check needs).

Every family is decided from config.json before any heavy work, and anything unsupported is rejected
with a message naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import CheckpointError
from .decoder import LlmSpec
from .families import FAMILIES, detect
from .vision import VisionSpec


@dataclass
class Checkpoint:
    path: Path
    source: str  # what the user passed
    config: dict
    layout: str  # "hf" | "original"
    llm_family: str
    template: str


def resolve(source: str) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (needs network; not exercised offline)."""
    p = Path(source)
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"checkpoint {source}: not a folder")
        return p
    if source.count("/") == 1 and not source.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            got = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
            if not list(got.glob("*.safetensors")):  # a release with PyTorch .bin weights only
                got = Path(snapshot_download(source, allow_patterns=["*.json", "pytorch_model*.bin", "*.model",
                                                                     "*.txt"]))
            return got
        except Exception as e:  # network, auth, unknown repo: one clear line
            raise CheckpointError(f"checkpoint {source}: cannot download from the hub ({type(e).__name__}: {e})") from e
    raise CheckpointError(f"checkpoint {source}: no such folder")


def inspect(source: str, template: str | None = None) -> Checkpoint:
    path = resolve(source)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint {path}: config.json missing")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {cfg_file}: invalid JSON ({e})") from e
    model_type = config.get("model_type")
    if model_type == "internvl_chat":
        layout, llm = "original", config.get("llm_config") or {}
        template = template or config.get("template")
    elif model_type == "internvl":
        layout, llm = "hf", config.get("text_config") or {"model_type": "qwen2"}
    else:
        raise CheckpointError(f"checkpoint {path}: model_type {model_type!r} is not an InternVL checkpoint")
    family = detect(llm, str(path)).name
    window = llm.get("sliding_window") if FAMILIES[family].sliding_window else None
    if window and window < llm.get("max_position_embeddings", 4096):
        raise CheckpointError(f"checkpoint {path}: sliding-window attention (window {window}) is not supported")
    weight_files(path)  # refuses a folder without weights this exporter reads
    from . import templates

    template = template or FAMILIES[family].template
    templates.template(template)  # unknown names fail here
    return Checkpoint(path=path, source=source, config=config, layout=layout, llm_family=family, template=template)


def tiling(ckpt: Checkpoint) -> dict:
    """Tile limits the model was trained with: the original config's max/min_dynamic_patch and
    use_thumbnail (dynamic_image_size off: one tile); the -hf processor's defaults otherwise."""
    c = ckpt.config
    if ckpt.layout == "hf":
        return {"min_tiles": 1, "max_tiles": 12, "use_thumbnail": True}
    if not c.get("dynamic_image_size", True):
        return {"min_tiles": 1, "max_tiles": 1, "use_thumbnail": False}
    return {"min_tiles": int(c.get("min_dynamic_patch", 1)), "max_tiles": int(c.get("max_dynamic_patch", 12)),
            "use_thumbnail": bool(c.get("use_thumbnail", True))}


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: `*.safetensors` (one or the hub's shards), else PyTorch's
    `pytorch_model.bin` / `pytorch_model-0000N-of-0000M.bin` (some InternVL 1.5 / 2 releases ship only
    those); anything else is refused, naming what the folder holds."""
    for found in (sorted(path.glob("*.safetensors")), sorted(path.glob("pytorch_model*.bin"))):
        if found:
            odd = [f.name for f in found if not f.is_file()]
            if odd:  # a FIFO or a device would block the read or never end
                raise CheckpointError(f"checkpoint {path}: {odd[0]} is not a regular file")
            return found
    other = sorted(f.name for f in path.iterdir() if f.suffix in (".gguf", ".pt", ".pth", ".ckpt", ".bin", ".h5",
                                                                    ".msgpack", ".onnx"))
    found = f" (found {', '.join(other[:5])})" if other else ""
    raise CheckpointError(f"checkpoint {path}: no weights this exporter reads: expected *.safetensors or "
                          f"pytorch_model*.bin{found}")


def _split_rows(t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(t, sizes, dim=0))


def map_original(ckpt: Checkpoint, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original InternVLChatModel tensor names -> transformers' InternVL module names."""
    vcfg, lcfg = ckpt.config["vision_config"], ckpt.config["llm_config"]
    hidden = vcfg["hidden_size"]
    out: dict[str, torch.Tensor] = {}
    vis_names = {
        "embeddings.class_embedding": "embeddings.cls_token",
        "embeddings.position_embedding": "embeddings.position_embeddings",
        "embeddings.patch_embedding.weight": "embeddings.patch_embeddings.projection.weight",
        "embeddings.patch_embedding.bias": "embeddings.patch_embeddings.projection.bias",
    }
    layer_names = {"attn.proj": "attention.projection_layer", "attn.q_norm": "attention.q_norm",
                   "attn.k_norm": "attention.k_norm", "norm1": "layernorm_before", "norm2": "layernorm_after",
                   "ls1": "lambda_1", "ls2": "lambda_2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    proj_names = {"mlp1.0": "layer_norm", "mlp1.1": "linear_1", "mlp1.3": "linear_2"}
    family = ckpt.llm_family
    heads, kv = lcfg["num_attention_heads"], lcfg.get("num_key_value_heads", lcfg["num_attention_heads"])
    head_dim = lcfg.get("head_dim") or lcfg["hidden_size"] // heads
    for name, t in tensors.items():
        if name.startswith("vision_model."):
            rest = name[len("vision_model."):]
            if rest in vis_names:
                out["model.vision_tower." + vis_names[rest]] = t
                continue
            parts = rest.split(".")  # encoder.layers.{i}.<module>.<param>
            if parts[:2] != ["encoder", "layers"]:
                raise CheckpointError(f"checkpoint {ckpt.path}: unexpected vision tensor {name}")
            pre = f"model.vision_tower.encoder.layer.{parts[2]}."
            module, param = ".".join(parts[3:-1]), parts[-1]
            if module == "attn.qkv":  # rows: q, k, v
                for n, piece in zip(("q_proj", "k_proj", "v_proj"), _split_rows(t, [hidden] * 3), strict=True):
                    out[f"{pre}attention.{n}.{param}"] = piece
            elif module == "" and param in ("ls1", "ls2"):  # layer-scale vectors sit on the layer itself
                out[pre + layer_names[param]] = t
            elif module in layer_names:
                out[f"{pre}{layer_names[module]}.{param}"] = t
            else:
                raise CheckpointError(f"checkpoint {ckpt.path}: unexpected vision tensor {name}")
        elif name.startswith("mlp1."):
            idx, param = name.rsplit(".", 1)
            if idx not in proj_names:
                raise CheckpointError(f"checkpoint {ckpt.path}: unexpected projector tensor {name}")
            out[f"model.multi_modal_projector.{proj_names[idx]}.{param}"] = t
        elif name.startswith("language_model."):
            rest = name[len("language_model."):]
            try:
                out.update(FAMILIES[family].map_llm(rest, t, heads, kv, head_dim))
            except CheckpointError as e:
                raise CheckpointError(f"checkpoint {ckpt.path}: {e}") from e
        else:
            raise CheckpointError(f"checkpoint {ckpt.path}: unexpected tensor {name}")
    return out


def hf_config(ckpt: Checkpoint, image_token_id: int):
    """transformers' InternVLConfig equivalent to an original-layout config.json."""
    from transformers import AutoConfig, InternVLConfig

    c, v, llm = ckpt.config, ckpt.config["vision_config"], dict(ckpt.config["llm_config"])
    vision = {"hidden_size": v["hidden_size"], "num_hidden_layers": v["num_hidden_layers"],
              "num_attention_heads": v["num_attention_heads"], "intermediate_size": v["intermediate_size"],
              "attention_bias": v.get("qkv_bias", True), "use_qk_norm": v.get("qk_normalization", False),
              "norm_type": v.get("norm_type", "layer_norm"), "layer_norm_eps": v.get("layer_norm_eps", 1e-6),
              "image_size": c.get("force_image_size") or v.get("image_size", 448),
              "patch_size": v.get("patch_size", 14), "hidden_act": v.get("hidden_act", "gelu")}
    family = ckpt.llm_family
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
            "rope_scaling", "tie_word_embeddings", "attention_bias", "hidden_act", "bos_token_id", "eos_token_id",
            "original_max_position_embeddings", "pad_token_id")
    text = {k: llm[k] for k in keep if k in llm and llm[k] is not None}
    FAMILIES[family].fix_config(text, llm)
    text_cfg = AutoConfig.for_model(FAMILIES[family].reference, **text)
    return InternVLConfig(vision_config=vision, text_config=text_cfg.to_dict(), image_token_id=image_token_id,
                          image_seq_length=int(
                              (vision["image_size"] // vision["patch_size"] * c.get("downsample_ratio", 0.5)) ** 2),
                          downsample_ratio=c.get("downsample_ratio", 0.5), projector_hidden_act="gelu",
                          vision_feature_layer=c.get("select_layer", -1), vision_feature_select_strategy="default",
                          tie_word_embeddings=text_cfg.tie_word_embeddings)


def reference_config(ckpt: Checkpoint, image_token_id: int):
    """transformers' InternVLConfig for the checkpoint: its own (-hf), or the equivalent of an original one."""
    from transformers import InternVLConfig

    if ckpt.layout == "hf":
        try:
            return InternVLConfig.from_pretrained(ckpt.path)
        except Exception as e:
            raise CheckpointError(f"checkpoint {ckpt.path}: transformers cannot read config.json "
                                  f"({type(e).__name__}: {e})") from e
    return hf_config(ckpt, image_token_id)


def tied(cfg) -> bool:
    top = getattr(cfg, "tie_word_embeddings", None)
    return bool(cfg.text_config.tie_word_embeddings if top is None else top)


def reference_model(cfg, weights, vision_layers: int, text_layers: int):
    """transformers' InternVL (float32, eager attention) with the first `vision_layers` / `text_layers` layers
    of the checkpoint and everything around them (embeddings, projector, final norm, head): the independent
    reference a graph of that many layers is checked against, without ever holding the whole model."""
    import copy

    from transformers import InternVLForConditionalGeneration

    cfg = copy.deepcopy(cfg)
    cfg.vision_config.num_hidden_layers = vision_layers
    cfg.text_config.num_hidden_layers = text_layers
    for c in (cfg, cfg.vision_config, cfg.text_config):
        c._attn_implementation = "eager"
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(cfg)
    want = [n for n in model.state_dict() if not (n == "lm_head.weight" and tied(cfg))]
    state = {n: _reference_tensor(weights, n) for n in want}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and tied(cfg))]
    if missing or unexpected:
        raise CheckpointError(f"reference model: tensors missing {missing[:5]} / unexpected {unexpected[:5]}")
    if tied(cfg):
        model.tie_weights()
    # Buffers (the rotary frequencies) were made on the meta device: build that module for real.
    lm = model.model.language_model
    lm.rotary_emb = type(lm.rotary_emb)(config=cfg.text_config)
    return model.eval()


def _reference_tensor(weights, name: str) -> torch.Tensor:
    """A reference-model tensor: Phi-3's transformers model keeps q/k/v and gate/up packed, which `weights`
    holds split (as the graphs use them)."""
    packed = {"self_attn.qkv_proj.weight": ("q_proj", "k_proj", "v_proj"),
              "mlp.gate_up_proj.weight": ("gate_proj", "up_proj")}
    for suffix, parts in packed.items():
        if name.endswith(suffix) and name not in weights:
            pre = name[: -len(suffix)] + suffix.split(".")[0] + "."
            return torch.cat([weights.get(pre + p + ".weight") for p in parts])
    return weights.get(name)


def specs(ckpt: Checkpoint, cfg) -> tuple[VisionSpec, LlmSpec]:
    v, t = cfg.vision_config, cfg.text_config
    c = ckpt.config
    size = v.image_size if isinstance(v.image_size, int) else v.image_size[0]
    patch = v.patch_size if isinstance(v.patch_size, int) else v.patch_size[0]
    vision = VisionSpec(hidden=v.hidden_size, layers=v.num_hidden_layers, heads=v.num_attention_heads,
                        norm=v.norm_type, eps=v.layer_norm_eps, qk_norm=bool(v.use_qk_norm),
                        image_size=size, patch_size=patch, downsample_ratio=cfg.downsample_ratio,
                        # InternVLChatConfig's own default is v1 (early InternVL 1.5); -hf is always v2.
                        ps_version=c.get("ps_version", "v1") if ckpt.layout == "original" else "v2",
                        select_layer=cfg.vision_feature_layer)
    heads = t.num_attention_heads
    llm = LlmSpec(arch=t.model_type, family=ckpt.llm_family, hidden=t.hidden_size, layers=t.num_hidden_layers,
                  heads=heads, kv_heads=t.num_key_value_heads,
                  head_dim=getattr(t, "head_dim", None) or t.hidden_size // heads, eps=t.rms_norm_eps,
                  vocab=t.vocab_size, max_context=t.max_position_embeddings)
    return vision, llm
