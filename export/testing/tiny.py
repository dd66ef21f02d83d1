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

from ..common import OutputError

ASSETS = Path(__file__).parents[1] / "assets"  # export/assets
QWEN2_TOKENIZER = ASSETS / "tokenizer" / "qwen2"

# Ids of the InternVL 2.5 / 3 tokenizer (Qwen2.5 vocabulary + InternVL's added tokens).
QWEN2_TOKENS = {"vocab_size": 151674, "bos_id": 151643, "eos_id": 151645, "pad_id": 151643, "img_context_id": 151667}
# Families whose releases ship a sentencepiece tokenizer: the kind of tiny one (testing/tiny_tokenizer.py) they get.
SP_TOKENIZER = {"llama": "llama", "internlm2": "internlm2", "phi3": "phi3"}

SHAPES = {
    # A few MB: every dimension small, but every structural feature of the real model kept
    # (448 px tiles, patch 14, 256 tokens per tile, GQA, qkv bias, tied embeddings, the full vocabulary).
    "tiny": {
        "llm_gain": 4.0,
        "vision": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
        # head_dim 16: ONNX Runtime's fused GroupQueryAttention needs a multiple of 16 (the llama family is
        # built with head_dim 8, see build_config, so that the plain-operator attention is tested too).
        "text": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 128},
    },
    # tiny with the real head size (64) in both towers: the AMX attention graphs are written only for that.
    "tiny-amx": {
        "llm_gain": 4.0,
        "vision": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256},
        "text": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                 "intermediate_size": 256},
    },
    # The same with 128-wide heads (InternViT-6B's, and the LLMs' of InternVL 2B-8B).
    "tiny-amx128": {
        "llm_gain": 4.0,
        "vision": {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512},
        "text": {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                 "intermediate_size": 512},
    },
    # InternVL2.5-8B: InternViT-300M + InternLM2.5-7B (with --family internlm2, vocab 92553). Written sharded
    # and tensor by tensor (`make_sharded_checkpoint`): 16 GB of bf16, which never fit in memory at once.
    "internvl2_5-8b": {
        "llm_gain": 1.0, "vocab_size": 92553,
        "vision": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
        "text": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "intermediate_size": 14336},
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


FAMILIES = ("qwen2", "llama", "qwen3", "internlm2", "phi3")
# The conversation template each family's InternVL release uses.
TEMPLATE = {"qwen2": "internvl2_5", "llama": "Hermes-2", "qwen3": "internvl2_5", "internlm2": "internlm2-chat",
            "phi3": "phi3-chat"}
ARCHITECTURE = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "phi3": "Phi3ForCausalLM"}


def longrope(head_dim: int, after: int, seed: int) -> dict:
    """Phi-3-128k's rotary scaling: per-frequency rescale factors, short ones up to `after` positions and
    long ones past it (the real model: after 4096, near 1 short, up to ~60 long)."""
    gen = torch.Generator().manual_seed(seed)
    short = 1.0 + 0.3 * torch.rand(head_dim // 2, generator=gen)
    long = 1.0 + 7.0 * torch.rand(head_dim // 2, generator=gen)
    return {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short.tolist(),
            "long_factor": long.tolist(), "original_max_position_embeddings": after}


def build_config(shape: str, family: str = "qwen2", vision: str = "300m", long_rope_after: int = 4096,
                 tokens: dict | None = None):
    """transformers' InternVLConfig for a shape, an LLM family and an InternViT variant. InternLM2 has
    no transformers class; it is a Llama once its packed projections are split, so its reference is one."""
    from transformers import InternVLConfig

    dims = SHAPES[shape]
    v = dict(
        image_size=448, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, layer_scale_init_value=0.1,
        use_mean_pooling=True, **dims["vision"],
    )
    # InternViT-6B: RMSNorm, qk-normalisation, no qkv bias.
    v.update(norm_type="rms_norm", use_qk_norm=True, attention_bias=False) if vision == "6b" else v.update(
        norm_type="layer_norm", use_qk_norm=False, attention_bias=True)
    text = dict(
        model_type={"internlm2": "llama"}.get(family, family), max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
        tie_word_embeddings=family == "qwen2", **dims["text"],
    )
    tokens = tokens or QWEN2_TOKENS
    text.update(vocab_size=tokens["vocab_size"], bos_token_id=tokens["bos_id"], eos_token_id=tokens["eos_id"])
    if family == "qwen2":
        text["use_sliding_window"] = False
    if family == "qwen3":
        text["head_dim"] = 2 * text["hidden_size"] // text["num_attention_heads"]  # Qwen3: head_dim is its own
    if family in ("llama", "internlm2"):
        text["attention_bias"] = False
    if family == "phi3":  # Phi-3-mini-128k: fused qkv / gate_up projections, LongRoPE
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        del text["rope_theta"]
        text["pad_token_id"] = tokens["pad_id"]
        text.update(original_max_position_embeddings=long_rope_after,
                    rope_parameters=longrope(head_dim, long_rope_after, seed=head_dim))
    if family == "llama" and shape == "tiny":
        text["hidden_size"] = 32  # head_dim 8: the decoder is exported with plain-operator attention
    return InternVLConfig(
        vision_config=v, text_config=text, image_token_id=tokens["img_context_id"], image_seq_length=256,
        downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=text["tie_word_embeddings"],
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
        if p.ndim == 1 and "language_model" in name and ("q_norm" in name or "k_norm" in name):
            # Qwen3 normalises q and k per head: unit-scale weights leave attention nearly uniform and
            # greedy output falls into a 2-token cycle; wider weights sharpen it.
            p.copy_(4.0 + 1.0 * torch.randn(p.shape, generator=gen))
        elif p.ndim == 1 and ("norm" in name or name.endswith(("lambda_1", "lambda_2"))):
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


def make_tokenizer(family: str, out: Path) -> dict:
    """A sentencepiece family's tokenizer files, trained into `out`; returns the ids (vocab_size, bos_id,
    eos_id, pad_id, img_context_id) a model with that vocabulary needs (Qwen2's for the other families)."""
    if family not in SP_TOKENIZER:  # the Qwen2.5 tokenizer, which save_hf / save_original copy themselves
        return dict(QWEN2_TOKENS)
    from .tiny_tokenizer import make_sp_tokenizer

    return make_sp_tokenizer(Path(out), SP_TOKENIZER[family])


def write_tokenizer(out: Path, tokenizer_dir: Path | None = None) -> None:
    if tokenizer_dir is not None:  # a sentencepiece tokenizer as its release ships it
        for f in Path(tokenizer_dir).iterdir():
            shutil.copyfile(f, out / f.name)
        return
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(QWEN2_TOKENIZER / f, out / f)
    # The slow tokenizer's files, which releases ship beside tokenizer.json (the reference loads
    # Qwen2Tokenizer with use_fast=False, which reads only these).
    bpe = json.loads((QWEN2_TOKENIZER / "tokenizer.json").read_text())["model"]
    (out / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
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


def make_model(shape: str = "tiny", family: str = "qwen2", vision: str = "300m", seed: int = 0,
               long_rope_after: int = 4096, tokens: dict | None = None):
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(build_config(shape, family, vision, long_rope_after, tokens)).eval()
    scale_for_diverse_output(model, seed, llm_gain=SHAPES[shape]["llm_gain"])
    return model.to(torch.bfloat16)  # hub checkpoints are stored in bf16


def _fresh(out: Path) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise OutputError(f"refusing to overwrite non-empty folder {out}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _eos(text) -> list[int]:
    """generate's stop ids: the LLM's eos (Qwen2 releases add <|endoftext|>)."""
    return [text.eos_token_id, 151643] if text.eos_token_id == QWEN2_TOKENS["eos_id"] else [text.eos_token_id]


def save_hf(model, out: Path, tokenizer_dir: Path | None = None) -> Path:
    """The -hf layout, exactly as transformers' save_pretrained writes it."""
    from transformers import GenerationConfig

    out = _fresh(out)
    model.save_pretrained(out, safe_serialization=True)
    text = model.config.text_config
    GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=_eos(text),
                     pad_token_id=_eos(text)[-1]).save_pretrained(out)
    write_tokenizer(out, tokenizer_dir)
    write_processor_configs(out)
    return out


def save_original(model, out: Path, family: str, tokenizer_dir: Path | None = None) -> Path:
    """The original OpenGVLab layout (InternVLChatModel), written tensor by tensor the way its code names
    them: `vision_model.*` with fused qkv, `mlp1.{0,1,3}`, `language_model.*` in the LLM's own names
    (InternLM2: packed `wqkv`, `tok_embeddings`, `output`). Deliberately not derived from the exporter's
    mapping, so that the parity tests check that mapping against an independent construction."""
    from safetensors.torch import save_file

    out = _fresh(out)
    cfg = model.config
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(original_tensors(cfg, sd, family), out / "model.safetensors", metadata={"format": "pt"})
    write_original_config(out, cfg, family, tokenizer_dir)
    return out


def original_tensors(cfg, sd: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """The original layout's tensors from transformers' state dict `sd` (works on meta tensors too)."""
    t: dict[str, torch.Tensor] = {}
    vt = "model.vision_tower."
    t["vision_model.embeddings.class_embedding"] = sd[vt + "embeddings.cls_token"]
    t["vision_model.embeddings.position_embedding"] = sd[vt + "embeddings.position_embeddings"]
    for p in ("weight", "bias"):
        t[f"vision_model.embeddings.patch_embedding.{p}"] = sd[f"{vt}embeddings.patch_embeddings.projection.{p}"]
    for i in range(cfg.vision_config.num_hidden_layers):
        src, dst = f"{vt}encoder.layer.{i}.", f"vision_model.encoder.layers.{i}."
        for p in ("weight", "bias"):
            if f"{src}attention.q_proj.{p}" in sd:
                t[f"{dst}attn.qkv.{p}"] = torch.cat([sd[f"{src}attention.{n}_proj.{p}"] for n in "qkv"])
            t[f"{dst}attn.proj.{p}"] = sd[f"{src}attention.projection_layer.{p}"]
            t[f"{dst}mlp.fc1.{p}"] = sd[f"{src}mlp.fc1.{p}"]
            t[f"{dst}mlp.fc2.{p}"] = sd[f"{src}mlp.fc2.{p}"]
            for a, b in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
                if f"{src}{b}.{p}" in sd:
                    t[f"{dst}{a}.{p}"] = sd[f"{src}{b}.{p}"]
        if cfg.vision_config.use_qk_norm:
            t[f"{dst}attn.q_norm.weight"] = sd[f"{src}attention.q_norm.weight"]
            t[f"{dst}attn.k_norm.weight"] = sd[f"{src}attention.k_norm.weight"]
        t[f"{dst}ls1"] = sd[f"{src}lambda_1"]
        t[f"{dst}ls2"] = sd[f"{src}lambda_2"]
    for idx, name in (("0", "layer_norm"), ("1", "linear_1"), ("3", "linear_2")):
        for p in ("weight", "bias"):
            t[f"mlp1.{idx}.{p}"] = sd[f"model.multi_modal_projector.{name}.{p}"]
    text = cfg.text_config
    lm = "model.language_model."
    if family == "internlm2":
        heads, kv = text.num_attention_heads, text.num_key_value_heads
        hd, group = text.hidden_size // heads, text.num_attention_heads // text.num_key_value_heads
        t["language_model.model.tok_embeddings.weight"] = sd[lm + "embed_tokens.weight"]
        t["language_model.model.norm.weight"] = sd[lm + "norm.weight"]
        t["language_model.output.weight"] = sd["lm_head.weight"]
        for i in range(text.num_hidden_layers):
            src, dst = f"{lm}layers.{i}.", f"language_model.model.layers.{i}."
            q = sd[src + "self_attn.q_proj.weight"].reshape(kv, group, hd, -1)
            k = sd[src + "self_attn.k_proj.weight"].reshape(kv, 1, hd, -1)
            v = sd[src + "self_attn.v_proj.weight"].reshape(kv, 1, hd, -1)
            t[dst + "attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1]).contiguous()
            t[dst + "attention.wo.weight"] = sd[src + "self_attn.o_proj.weight"]
            t[dst + "attention_norm.weight"] = sd[src + "input_layernorm.weight"]
            t[dst + "ffn_norm.weight"] = sd[src + "post_attention_layernorm.weight"]
            t[dst + "feed_forward.w1.weight"] = sd[src + "mlp.gate_proj.weight"]
            t[dst + "feed_forward.w3.weight"] = sd[src + "mlp.up_proj.weight"]
            t[dst + "feed_forward.w2.weight"] = sd[src + "mlp.down_proj.weight"]
    else:
        for k, v in sd.items():
            if k.startswith(lm):
                t["language_model.model." + k[len(lm):]] = v
        # Always stored, tied or not: the remote code's InternVLChatModel never ties the LLM's head to its
        # embeddings (releases with tied LLMs, e.g. InternVL2.5-1B, ship `language_model.lm_head.weight`).
        t["language_model.lm_head.weight"] = sd["lm_head.weight"].clone()
    return t


def write_original_config(out: Path, cfg, family: str, tokenizer_dir: Path | None = None) -> None:
    """config.json (InternVLChatConfig), generation_config.json and the tokenizer files of the original layout."""
    text = cfg.text_config
    v = cfg.vision_config
    llm = {k: val for k, val in text.to_dict().items() if not k.startswith("_")}
    if family == "internlm2":
        llm = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
               "vocab_size": text.vocab_size, "hidden_size": text.hidden_size,
               "intermediate_size": text.intermediate_size, "num_hidden_layers": text.num_hidden_layers,
               "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
               "max_position_embeddings": text.max_position_embeddings, "rms_norm_eps": text.rms_norm_eps,
               "rope_theta": 1000000.0, "rope_scaling": None, "tie_word_embeddings": False,
               "bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id, "hidden_act": "silu",
               # as InternVL2-8B's llm_config names its remote code (shipped beside config.json)
               "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}}
    elif family == "phi3":  # as Phi-3-mini-128k-instruct's config.json (transformers 4.3x) writes it
        rope = text.rope_parameters
        llm = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": text.vocab_size,
               "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
               "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
               "num_key_value_heads": text.num_key_value_heads, "hidden_act": "silu",
               "max_position_embeddings": text.max_position_embeddings,
               "original_max_position_embeddings": text.original_max_position_embeddings,
               "rms_norm_eps": text.rms_norm_eps, "rope_theta": rope["rope_theta"], "sliding_window": 262144,
               "rope_scaling": {"type": "su", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]},
               "tie_word_embeddings": False, "bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id,
               "pad_token_id": text.pad_token_id,
               "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config",  # as InternVL2-4B's llm_config
                            "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"}}
    else:
        llm["architectures"] = [ARCHITECTURE[family]]
        llm["rope_theta"] = 1000000.0
    config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": TEMPLATE[family],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                     "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1, "force_image_size": 448,
        "dynamic_image_size": True, "use_thumbnail": True, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
        "torch_dtype": "bfloat16",
        "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                          "hidden_size": v.hidden_size, "num_hidden_layers": v.num_hidden_layers,
                          "num_attention_heads": v.num_attention_heads, "intermediate_size": v.intermediate_size,
                          "qkv_bias": v.attention_bias, "qk_normalization": v.use_qk_norm,
                          "norm_type": v.norm_type, "layer_norm_eps": v.layer_norm_eps, "image_size": 448,
                          "patch_size": 14, "hidden_act": "gelu", "use_flash_attn": False},
        "llm_config": llm,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": _eos(text)}))
    write_tokenizer(out, tokenizer_dir)


SHARD_BYTES = 5 * 10**9  # as the hub's InternVL releases are cut (model-0000N-of-0000M.safetensors)


def make_sharded_checkpoint(out: Path, shape: str, family: str, seed: int = 0,
                            shard_bytes: int = SHARD_BYTES) -> Path:
    """An original-layout checkpoint too big for memory: names and shapes from the model built on the meta
    device, each tensor drawn at random (bf16, std 1/sqrt(fan_in); norms near 1) and written into shards of
    about `shard_bytes` with `model.safetensors.index.json`, as the hub ships them. Memory: one shard."""
    import tempfile

    from safetensors.torch import save_file
    from transformers import InternVLForConditionalGeneration

    out = _fresh(out)
    with tempfile.TemporaryDirectory() as tmp:
        tokens = make_tokenizer(family, Path(tmp))
        tokens["vocab_size"] = max(tokens["vocab_size"], SHAPES[shape].get("vocab_size", 0))  # the real vocabulary
        cfg = build_config(shape, family, tokens=tokens)
        with torch.device("meta"):
            model = InternVLForConditionalGeneration(cfg)
        plan = original_tensors(cfg, dict(model.state_dict()), family)
        shards, size = [[]], 0
        for name, meta in plan.items():
            nbytes = meta.numel() * 2
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        gen = torch.Generator().manual_seed(seed)
        weight_map = {}
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in names:
                shape_ = plan[name].shape
                if len(shape_) == 1 or name.endswith(("ls1", "ls2")):
                    base = 1.0 if "norm" in name or name.endswith(("ls1", "ls2")) else 0.0
                    t = base + 0.1 * torch.randn(shape_, generator=gen)
                else:
                    fan_in = shape_[-1] if len(shape_) == 2 else shape_[1:].numel()
                    t = torch.randn(shape_, generator=gen) / fan_in ** 0.5
                tensors[name] = t.to(torch.bfloat16)
                weight_map[name] = file
            save_file(tensors, out / file, metadata={"format": "pt"})
            del tensors
        total = sum(m.numel() * 2 for m in plan.values())
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        write_original_config(out, cfg, family, Path(tmp) if family in SP_TOKENIZER else None)
    return out


def make_checkpoint(out: Path, shape: str = "tiny", seed: int = 0, family: str = "qwen2", vision: str = "300m",
                    layout: str = "hf") -> Path:
    """Write a random-weight checkpoint to `out` (refuses to overwrite a non-empty folder); shapes too big
    for memory (internvl2_5-8b) are written sharded, tensor by tensor, in the original layout."""
    import tempfile

    if shape == "internvl2_5-8b":
        if layout != "original" or vision != "300m":
            raise OutputError(f"--shape {shape} is written in the original layout with InternViT-300M only")
        return make_sharded_checkpoint(out, shape, family, seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokens = make_tokenizer(family, Path(tmp))
        model = make_model(shape, family, vision, seed, tokens=tokens)
        tok = Path(tmp) if family in SP_TOKENIZER else None
        return save_hf(model, out, tok) if layout == "hf" else save_original(model, out, family, tok)
