"""The PyTorch reference for a list of test cases: greedy token ids from transformers' `generate`.

Independent of the exported graphs and of the Rust runtime: pixels come from `reference.py` (the
reference `load_image`), the prompt from the template definitions and the tokenizer as the reference
`chat()` builds it, and the model is transformers' own `InternVLForConditionalGeneration`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import templates
from .checkpoint import inspect, load_model
from .convert import eos_ids, ids_of
from .reference import load_image

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


def reference_prompt(tpl: dict, question: str, system: str | None, tiles: int | None, tokens_per_tile: int) -> str:
    """`chat()`: '<image>\\n' before a question without one, the template, then the image-token expansion."""
    if tiles is not None and "<image>" not in question:
        question = "<image>\n" + question
    query = templates.build_prompt(tpl, question, system)
    if tiles is not None:
        query = query.replace("<image>", IMG_START + IMG_CONTEXT * tokens_per_tile * tiles + IMG_END, 1)
    return query


def write_goldens(checkpoint: Path, cases_file: Path, out: Path) -> None:
    from tokenizers import Tokenizer

    ckpt = inspect(str(checkpoint))
    tpl = templates.template(ckpt.template)
    model = load_model(ckpt)
    tok = Tokenizer.from_file(str(ckpt.path / "tokenizer.json"))
    stop = sorted({ids_of(ckpt.path / "tokenizer.json", tpl["stop"]), *eos_ids(ckpt)})
    tokens_per_tile = int(model.config.image_seq_length)
    cases = json.loads(cases_file.read_text())
    results = []
    for case in cases:
        pixel_values, tiles = None, None
        if case.get("image"):
            image = (cases_file.parent / case["image"]).resolve()
            pv = load_image(image, input_size=448, max_num=case.get("max_tiles", 12))
            pixel_values, tiles = torch.from_numpy(pv), pv.shape[0]
        text = reference_prompt(tpl, case["prompt"], case.get("system"), tiles, tokens_per_tile)
        ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids])
        extra = {} if pixel_values is None else {"pixel_values": pixel_values}
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=case.get("max_new_tokens", 32),
                do_sample=False, eos_token_id=stop, pad_token_id=stop[0], **extra,
            )
        new = gen[0, ids.shape[1]:].tolist()
        finish = "stop" if new and new[-1] in stop else "length"
        if finish == "stop":
            new = new[:-1]
        results.append({"name": case["name"], "prompt_ids": ids[0].tolist(), "tokens": new,
                        "finish_reason": finish, "tiles": tiles or 0})
    out.write_text(json.dumps({"cases": results}) + "\n")
