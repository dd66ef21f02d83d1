"""The reference tokenizer's decoding of generated ids, as the official chat() does it: the checkpoint's slow
tokenizer (`use_fast=False`, its remote code for InternLM2), `batch_decode(ids, skip_special_tokens=...)`,
then `.split(sep)[0].strip()`. Run in the reference venv (scripts/reference_env.sh).

    python -m tests.oracle.slow_decode --checkpoint DIR --ids ids.json --split SEP [--keep-special] --out texts.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from tests.oracle.official_chat import reference_code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--ids", type=Path, required=True)
    ap.add_argument("--split", required=True)
    ap.add_argument("--keep-special", action="store_true", help="skip_special_tokens=False (InternVL3.5 code)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "tok"
        work.mkdir()
        for f in a.checkpoint.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens")):
                shutil.copyfile(f, work / f.name)
        shutil.copyfile(reference_code() / "internvl_chat" / "tokenization_internlm2.py",
                        work / "tokenization_internlm2.py")
        tok = AutoTokenizer.from_pretrained(work, trust_remote_code=True, use_fast=False)
        out = []
        for ids in json.loads(a.ids.read_text()):
            text = tok.batch_decode([ids], skip_special_tokens=not a.keep_special)[0]
            out.append({"text": text, "answer": text.split(a.split)[0].strip()})
    a.out.write_text(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
