"""Conversation templates of the InternVL releases, as the reference `conversation.py` defines them.

The runtime builds prompts from these fields (written into the manifest), so a template is data here,
not code: adding a model version means adding an entry. All InternVL chat templates use
SeparatorStyle.MPT: the system block, then each turn as role + message + sep, and the open assistant
role last; the reference stops generation at `sep.strip()`.
"""

from __future__ import annotations

from .common import UsageError

INTERNVL_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
# InternVL 1.5 / 2 kept their older system prompt "to avoid changes in benchmark performance".
INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"  # noqa: E501 (verbatim)

_CHATML_ROLES = ["<|im_start|>user\n", "<|im_start|>assistant\n"]

TEMPLATES = {
    # InternVL 2.5 / 3 / 3.5 (Qwen2, Qwen2.5, Qwen3, InternLM2.5, Llama LLMs).
    "internvl2_5": {"system_template": "<|im_start|>system\n{system_message}", "system_message": INTERNVL_SYSTEM,
                    "roles": _CHATML_ROLES, "sep": "<|im_end|>\n"},
    # InternVL2-1B / 40B / 76B (Qwen2, Yi, Llama-3 LLMs).
    "Hermes-2": {"system_template": "<|im_start|>system\n{system_message}", "system_message": INTERNVL2_SYSTEM,
                 "roles": _CHATML_ROLES, "sep": "<|im_end|>"},
    # InternVL 1.5 and InternVL2-2B / 8B / 26B (InternLM2 LLMs).
    "internlm2-chat": {"system_template": "<|im_start|>system\n{system_message}", "system_message": INTERNVL2_SYSTEM,
                       "roles": _CHATML_ROLES, "sep": "<|im_end|>"},
    # Mini-InternVL-Chat-4B-V1-5, InternVL2-4B (Phi-3 LLM).
    "phi3-chat": {"system_template": "<|system|>\n{system_message}", "system_message": INTERNVL2_SYSTEM,
                  "roles": ["<|user|>\n", "<|assistant|>\n"], "sep": "<|end|>"},
}


def template(name: str) -> dict:
    if name not in TEMPLATES:
        raise UsageError(f"unknown conversation template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    t = TEMPLATES[name]
    return {"name": name, "style": "mpt", **t, "stop": t["sep"].strip()}


def build_prompt(tpl: dict, turns: list[tuple[str, str | None]], system: str | None = None) -> str:
    """The reference `get_prompt()`: `turns` are (user, assistant) pairs, the last assistant None (open).
    `system=""` drops the system block."""
    system = tpl["system_message"] if system is None else system
    out = tpl["system_template"].format(system_message=system) + tpl["sep"] if system else ""
    for user, assistant in turns:
        for role, message in ((tpl["roles"][0], user), (tpl["roles"][1], assistant)):
            out += role + message + tpl["sep"] if message else role
    return out
