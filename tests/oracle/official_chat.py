"""Golden answers from the official InternVL remote code: `InternVLChatModel.chat()` on a checkpoint in the
original OpenGVLab layout, exactly as a user runs it (model card), in the environment its code pins.

Run with `.venv-ref437/bin/python` (the `internvl_chat` code: Qwen2, Llama, InternLM2, Phi-3 LLMs) or
`.venv-ref455/bin/python` (the InternVL3.5 code: Qwen3 LLMs); `scripts/reference_env.sh` makes both.

    python -m tests.oracle.official_chat --checkpoint DIR --cases cases.json --out golden.json   (from the root)

The checkpoint folder is copied with the remote code's .py files beside config.json (as hub checkpoints
ship them); nothing else changes. cases.json: a list of {"name", "question", "images": [paths, relative
to the cases file's folder or absolute], "history": [[q, a], ...] (optional), "max_new_tokens", "max_num"
(tiles, default 12)}. Each answer: "text" (the string chat() returns), "ids" (the generated tokens, the
eos it stopped on included), "output_ids" (what generate() returned: under 4.37 [bos] + ids, since the
prompt goes in as embeddings; under 4.55 ids), "eos_token_id" / "eos_token" (chat()'s stop id: the
template separator's), "prompt_ids" (the input_ids chat() passed to generate), "template".

The remote code is read from $INTERNVL_REFERENCE, else the first `shared/reference` found beside the
repository or above it (../shared/reference/README.md says what it is).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.oracle.model_card import load_image, load_video

ROOT = Path(__file__).resolve().parents[2]


def reference_code() -> Path:
    env = os.environ.get("INTERNVL_REFERENCE")
    candidates = [Path(env)] if env else [p / "shared" / "reference" for p in ROOT.parents]
    for c in candidates:
        if all((c / sub / "modeling_internvl_chat.py").is_file() for sub in ("internvl_chat", "internvl3_5")):
            return c
    raise SystemExit(f"official InternVL code not found (looked for {[str(c) for c in candidates]}); "
                     "set INTERNVL_REFERENCE to the folder holding internvl_chat/ and internvl3_5/")


# ---- Loading as the model card does, with the README's numerically neutral shims ----


def load(checkpoint: Path, work: Path):
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if not (checkpoint / "config.json").is_file():
        raise SystemExit(f"{checkpoint}: no config.json (expected an original-layout InternVL checkpoint)")
    config = json.loads((checkpoint / "config.json").read_text())
    if config.get("model_type") != "internvl_chat":
        raise SystemExit(f"{checkpoint}: model_type {config.get('model_type')!r}, expected 'internvl_chat' "
                         "(the original OpenGVLab layout)")
    qwen3 = config["llm_config"]["architectures"][0].startswith("Qwen3")
    want = "4.55." if qwen3 else "4.37."
    if not transformers.__version__.startswith(want):
        raise SystemExit(f"{checkpoint.name}: the {'InternVL3.5' if qwen3 else 'internvl_chat'} code runs under "
                         f"transformers {want}x, this is {transformers.__version__} ({sys.executable}); use "
                         f"{'.venv-ref455' if qwen3 else '.venv-ref437'}/bin/python (scripts/reference_env.sh)")
    code = reference_code() / ("internvl3_5" if qwen3 else "internvl_chat")
    shutil.copytree(checkpoint, work, dirs_exist_ok=True)
    for f in code.glob("*.py"):
        shutil.copyfile(f, work / f.name)
    cfg = AutoConfig.from_pretrained(work, trust_remote_code=True)
    type(cfg).has_no_defaults_at_init = True  # 4.44-4.57: to_diff_dict() builds the config without arguments
    model = AutoModel.from_pretrained(work, config=cfg, torch_dtype=torch.float32, low_cpu_mem_usage=True,
                                      trust_remote_code=True).eval()
    check_weights(model, work)
    model = model.float()  # the InternVL3.5 code builds mlp1 and the LLM in bf16 whatever dtype is asked
    tokenizer = AutoTokenizer.from_pretrained(work, trust_remote_code=True, use_fast=False)
    print(f"[official_chat] {checkpoint.name}: {code.name} code, transformers {transformers.__version__}, "
          f"{type(tokenizer).__name__}", file=sys.stderr)
    return model, tokenizer


def check_weights(model, folder: Path) -> None:
    """Every tensor of the official model comes from the checkpoint and every stored tensor is used.
    from_pretrained's own report cannot be trusted here: with base_model_prefix 'language_model', 4.37
    reports nothing for a missing `language_model.lm_head.weight` and leaves it on the meta device."""
    from safetensors import safe_open

    stored = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            stored |= set(st.keys())
    expected = set(model.state_dict())
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if expected - stored or stored - expected or meta:
        raise SystemExit(f"{folder.name}: weights do not match the official model: missing "
                         f"{sorted(expected - stored)}, unused {sorted(stored - expected)}, not loaded {meta}")


def answer(model, tokenizer, case: dict) -> dict:
    import torch

    images = case.get("images") or []
    max_num = case.get("max_num", 12)
    pixel_values, num_patches_list = None, None
    if images:
        tiles = [load_image(p, max_num=max_num).to(torch.float32) for p in images]
        pixel_values = torch.cat(tiles)
        num_patches_list = [t.shape[0] for t in tiles]
    question = case["question"]
    if case.get("video"):  # the model card's video chat: load_video (decord), one Frame-N line per frame
        pixel_values, num_patches_list = load_video(case["video"], bound=case.get("bound"),
                                                    num_segments=case["frames"])
        pixel_values = pixel_values.to(torch.float32)
        question = "".join(f"Frame-{i + 1}: <image>\n" for i in range(len(num_patches_list))) + question
    if len(images) > 1 and "<image>" not in question:  # the model card's multi-image prompt
        question = "".join(f"Image-{i + 1}: <image>\n" for i in range(len(images))) + question
    history = [tuple(t) for t in case.get("history") or []] or None
    seen = {"template": model.template}
    generate = model.generate

    def recording_generate(*args, **kwargs):
        seen["prompt_ids"] = kwargs["input_ids"][0].tolist()
        seen["eos_token_id"] = eos = kwargs.get("eos_token_id")
        seen["eos_token"] = tokenizer.convert_ids_to_tokens(eos) if isinstance(eos, int) else None
        out = generate(*args, **kwargs)
        seen["output_ids"] = out[0].tolist()  # what generate() returned (4.37: [bos] + ids)
        return out

    class NewTokens:
        """A generate() streamer: its first put() is the ids generate starts from (4.37: [bos], since
        the prompt goes in as embeddings; later versions: none), each later one a generated token."""

        def __init__(self):
            self.calls, seen["ids"] = 0, []

        def put(self, value):
            self.calls += 1
            if self.calls > 1:
                seen["ids"] += value.reshape(-1).tolist()

        def end(self):
            pass

    def ask(question, history):
        seen.pop("output_ids", None)
        config = {"max_new_tokens": case["max_new_tokens"], "do_sample": False, "streamer": NewTokens()}
        with torch.no_grad():
            response, history = model.chat(tokenizer, pixel_values, question, config, history=history,
                                           return_history=True, num_patches_list=num_patches_list)
        if "output_ids" not in seen:
            raise SystemExit(f"case {case['name']}: chat() did not call generate()")
        return {"text": response, **seen}, history

    model.generate = recording_generate
    try:
        first, history = ask(question, history)
        # Later turns as the model card's multi-round chat: the same pixel values, the returned history.
        follow_ups = []
        for q in case.get("follow_ups") or []:
            turn, history = ask(q, history)
            follow_ups.append(turn)
    finally:
        del model.generate
    return {"name": case["name"], **first, "follow_ups": follow_ups}


def check_case(case: dict, base: Path) -> dict:
    """The case with image paths resolved against the cases file's folder; refuses malformed cases."""
    missing = [k for k in ("name", "question", "max_new_tokens") if k not in case]
    if missing:
        raise SystemExit(f"case {case.get('name', case)}: missing {missing}")
    images = [base / p for p in case.get("images") or []]
    for p in images:
        if not p.is_file():
            raise SystemExit(f"case {case['name']}: image {p} not found")
    video = {"video": str(base / case["video"])} if case.get("video") else {}
    if video and not Path(video["video"]).is_file():
        raise SystemExit(f"case {case['name']}: video {video['video']} not found")
    return {**case, "images": [str(p) for p in images], **video}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--cases", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        model, tokenizer = load(a.checkpoint, Path(tmp) / a.checkpoint.name)
        print(f"[official_chat] loaded in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        cases = [check_case(c, a.cases.resolve().parent) for c in json.loads(a.cases.read_text())]
        goldens = []
        for c in cases:
            t = time.perf_counter()
            goldens.append(answer(model, tokenizer, c))
            print(f"[official_chat] {c['name']}: {len(goldens[-1]['ids'])} ids in {time.perf_counter() - t:.1f} s",
                  file=sys.stderr)
    tmp_out = a.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(goldens, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp_out.replace(a.out)


if __name__ == "__main__":
    main()
