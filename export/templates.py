"""Conversation templates of the InternVL releases, as the reference `conversation.py` defines them.

The runtime builds prompts from these fields (written into the manifest), so a template is data here,
not code: adding a model version means adding an entry.
"""

from __future__ import annotations

INTERNVL_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)

TEMPLATES = {
    # InternVL 2.5 and 3 (Qwen2 / Qwen2.5 LLMs). SeparatorStyle.MPT: the system block, then each turn as
    # role + message + sep, and the open assistant role last.
    "internvl2_5": {
        "style": "mpt",
        "system_template": "<|im_start|>system\n{system_message}",
        "system_message": INTERNVL_SYSTEM_MESSAGE,
        "roles": ["<|im_start|>user\n", "<|im_start|>assistant\n"],
        "sep": "<|im_end|>\n",
        "stop": "<|im_end|>",
    },
}


def template(name: str) -> dict:
    if name not in TEMPLATES:
        raise SystemExit(f"unknown conversation template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    return dict(name=name, **TEMPLATES[name])


def build_prompt(tpl: dict, question: str, system: str | None = None) -> str:
    """The reference `get_prompt()` for one user turn; `system=""` drops the system block."""
    system = tpl["system_message"] if system is None else system
    out = tpl["system_template"].format(system_message=system) + tpl["sep"] if system else ""
    return out + tpl["roles"][0] + question + tpl["sep"] + tpl["roles"][1]
