"""The PyTorch reference for a list of test cases: greedy token ids from transformers' `generate`.

Independent of the exported graphs and of the Rust runtime: pixels come from `reference.py` (the
reference `load_image`), the prompt from the template definitions and the tokenizer as the reference
`chat()` builds it, and the model is transformers' own `InternVLForConditionalGeneration` loaded from a
`-hf` checkpoint.

A case: {"name", "prompt", "images": [paths relative to the cases file], "max_tiles", "max_new_tokens",
"system", "history": [[user, assistant], ...], "template", "checkpoint": -hf reference folder (relative)}.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .. import templates
from ..checkpoint import inspect
from ..convert import eos_ids
from ..manifest import token_id
from .pytorch import load
from .reference import load_image

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


def reference_query(tpl: dict, question: str, system: str | None, tiles: list[int], history: list,
                    tokens_per_tile: int) -> str:
    """`chat()`: with images and no `<image>` in the question, '<image>\\n' goes before it (several images:
    the model card's 'Image-1: <image>\\n...' lines); the template with the history turns; then each
    `<image>`, in order, becomes `<img>` + 256 x tiles `<IMG_CONTEXT>` + `</img>`."""
    if tiles and not any("<image>" in q for q, _ in history) and "<image>" not in question:
        if len(tiles) == 1:
            question = "<image>\n" + question
        else:
            question = "".join(f"Image-{i + 1}: <image>\n" for i in range(len(tiles))) + question
    query = templates.build_prompt(tpl, [*[(q, a) for q, a in history], (question, None)], system)
    for n in tiles:
        query = query.replace("<image>", IMG_START + IMG_CONTEXT * tokens_per_tile * n + IMG_END, 1)
    return query


def write_goldens(cases_file: Path, out: Path) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _write_goldens(cases_file, out, Path(tmp))


def _write_goldens(cases_file: Path, out: Path, tmp: Path) -> None:
    from tokenizers import Tokenizer

    from ..tokenizer import slow_class, write_tokenizer
    from .reference_tokenizer import Slow437

    cases = json.loads(cases_file.read_text())
    models: dict[str, tuple] = {}
    results = []
    for case in cases:
        ref = str((cases_file.parent / case["checkpoint"]).resolve())
        if ref not in models:
            ckpt = inspect(ref)
            # The reference's (slow) tokenizer as a tokenizer.json; tests/python/test_sp_tokenizer.py holds
            # the conversion to transformers 4.37's slow classes.
            tok_file = write_tokenizer(ckpt.path, tmp / f"tokenizer-{len(models)}.json")
            ids = Tokenizer.from_file(str(tok_file))
            cfg_file = ckpt.path / "tokenizer_config.json"
            kind = slow_class(json.loads(cfg_file.read_text()) if cfg_file.is_file() else {})
            # Sentencepiece checkpoints: prompts tokenized the way 4.37's slow class does, not by the conversion.
            encode = (Slow437(ckpt.path, internlm2=kind == "internlm2").encode if kind
                      else lambda text, ids=ids: ids.encode(text).ids)
            models[ref] = (ckpt, load(ckpt, ids.token_to_id(IMG_CONTEXT)), encode, tok_file)
        ckpt, model, encode, tok_file = models[ref]
        tpl = templates.template(case.get("template") or ckpt.template)
        stop = sorted({token_id(tok_file, tpl["stop"]), *eos_ids(ckpt)})
        pixel_values, tiles = [], []
        for image in case.get("images", []):
            pv = load_image(cases_file.parent / image, input_size=448, max_num=case.get("max_tiles", 12))
            pixel_values.append(pv)
            tiles.append(pv.shape[0])
        text = reference_query(tpl, case["prompt"], case.get("system"), tiles, case.get("history", []),
                               int(model.config.image_seq_length))
        ids = torch.tensor([encode(text)])  # `tokenizer(query)`: with the tokenizer's own specials
        extra = {"pixel_values": torch.from_numpy(np.concatenate(pixel_values))} if pixel_values else {}
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=case.get("max_new_tokens", 32),
                do_sample=False, eos_token_id=stop, pad_token_id=stop[0], **extra,
            )
        new = gen[0, ids.shape[1]:].tolist()
        finish = "stop" if new and new[-1] in stop else "length"
        if finish == "stop":
            new = new[:-1]
        results.append({"name": case["name"], "prompt_text": text, "prompt_ids": ids[0].tolist(), "tokens": new,
                        "finish_reason": finish, "tiles": sum(tiles)})
    out.write_text(json.dumps({"cases": results}) + "\n")
