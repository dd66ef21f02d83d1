"""The LLM families InternVL checkpoints come with, one entry each: how a checkpoint names it, the
transformers model the reference (and our self-check) is built as, the default conversation template, how
an original-layout checkpoint's `language_model.*` tensors map onto transformers' names, the config
fix-ups that model needs, and how the official `chat()` decodes answers. Supporting a new family is one
entry here (plus its decoder arithmetic, if transformers' model differs from the ones `decoder.py` knows).

The tokenizer kind is not here: it follows the checkpoint's tokenizer files (`tokenizer.py`), not the LLM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .common import CheckpointError

TensorMap = Callable[[str, torch.Tensor, int, int, int], dict[str, torch.Tensor]]


def map_standard(rest: str, t: torch.Tensor, heads: int, kv: int, head_dim: int) -> dict[str, torch.Tensor]:
    """`language_model.model.*` / `language_model.lm_head.weight`: transformers' own names already."""
    if rest == "lm_head.weight":
        return {"lm_head.weight": t}
    if rest.startswith("model."):
        return {"model.language_model." + rest[len("model."):]: t}
    raise CheckpointError(f"unexpected LLM tensor language_model.{rest}")


def map_internlm2(rest: str, t: torch.Tensor, heads: int, kv: int, head_dim: int) -> dict[str, torch.Tensor]:
    """InternLM2 names onto Llama's; the packed `wqkv` holds, per kv head, its group of query heads
    followed by that head's key and value: [(q_0 .. q_{g-1}, k, v) x kv_heads] x head_dim rows."""
    if rest == "output.weight":
        return {"lm_head.weight": t}
    simple = {"model.tok_embeddings.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight"}
    if rest in simple:
        return {"model.language_model." + simple[rest]: t}
    parts = rest.split(".")  # model.layers.{i}.<...>
    if len(parts) < 4 or parts[:2] != ["model", "layers"]:
        raise CheckpointError(f"unexpected InternLM2 tensor language_model.{rest}")
    pre = f"model.language_model.layers.{parts[2]}."
    sub = ".".join(parts[3:])
    names = {"attention.wo.weight": "self_attn.o_proj.weight", "attention_norm.weight": "input_layernorm.weight",
             "ffn_norm.weight": "post_attention_layernorm.weight", "feed_forward.w1.weight": "mlp.gate_proj.weight",
             "feed_forward.w3.weight": "mlp.up_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight"}
    if sub in names:
        return {pre + names[sub]: t}
    if sub == "attention.wqkv.weight":
        group = heads // kv
        w = t.reshape(kv, group + 2, head_dim, t.shape[-1])
        return {pre + "self_attn.q_proj.weight": w[:, :group].reshape(heads * head_dim, -1),
                pre + "self_attn.k_proj.weight": w[:, group].reshape(kv * head_dim, -1),
                pre + "self_attn.v_proj.weight": w[:, group + 1].reshape(kv * head_dim, -1)}
    raise CheckpointError(f"unexpected InternLM2 tensor language_model.{rest}")


def no_fixups(text: dict, llm: dict) -> None:
    pass


def internlm2_config(text: dict, llm: dict) -> None:
    """InternLM2 as transformers' Llama: its `bias` flag, untied head, and the old `type` key of rope_scaling."""
    text["attention_bias"] = bool(llm.get("bias", False))
    text.setdefault("tie_word_embeddings", False)
    if isinstance(text.get("rope_scaling"), dict) and "type" in text["rope_scaling"]:
        rs = dict(text["rope_scaling"])
        rs["rope_type"] = rs.pop("type")
        text["rope_scaling"] = rs


def phi3_config(text: dict, llm: dict) -> None:
    """Phi-3's configs keep the pre-training length beside rope_scaling; transformers 5 wants it inside."""
    if isinstance(text.get("rope_scaling"), dict):
        text["rope_scaling"] = {**text["rope_scaling"],
                                "original_max_position_embeddings": llm.get("original_max_position_embeddings", 4096)}


@dataclass(frozen=True)
class Family:
    name: str  # the LLM config's model_type
    architecture: str  # its causal-LM class, for configs that name only that
    reference: str  # the transformers model_type the reference model is built as
    template: str  # default conversation template (templates.py), when config.json names none
    map_llm: TensorMap = field(default=map_standard)
    fix_config: Callable[[dict, dict], None] = field(default=no_fixups)
    # The InternVL3.5 code decodes answers with skip_special_tokens=False; the internvl_chat code skips them.
    keeps_special_tokens: bool = False
    # Whether the config's `sliding_window` is used (Qwen2 configs carry one the model ignores).
    sliding_window: bool = False


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("qwen2", "Qwen2ForCausalLM", "qwen2", "internvl2_5"),
    Family("qwen3", "Qwen3ForCausalLM", "qwen3", "internvl2_5", keeps_special_tokens=True),
    Family("llama", "LlamaForCausalLM", "llama", "Hermes-2"),
    Family("internlm2", "InternLM2ForCausalLM", "llama", "internlm2-chat", map_llm=map_internlm2,
           fix_config=internlm2_config),
    Family("phi3", "Phi3ForCausalLM", "phi3", "phi3-chat", fix_config=phi3_config, sliding_window=True),
)}


def detect(llm: dict, where: str) -> Family:
    """The family of an LLM config: by model_type, else by its architecture."""
    kind = llm.get("model_type") or ""
    arch = (llm.get("architectures") or [""])[0]
    if kind in FAMILIES:
        return FAMILIES[kind]
    by_arch = {f.architecture: f for f in FAMILIES.values()}
    if not kind and arch in by_arch:
        return by_arch[arch]
    raise CheckpointError(f"checkpoint {where}: LLM {kind or arch!r} is not supported "
                          f"(supported: {', '.join(FAMILIES)})")
