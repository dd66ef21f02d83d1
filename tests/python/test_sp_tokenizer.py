"""Sentencepiece tokenizer parity: the tokenizer.json export/tokenizer.py converts from `tokenizer.model`
encodes like the reference's slow tokenizer (transformers 4.37, `use_fast=False`) on every tiny kind.

transformers 5 (pinned here) no longer has 4.37's slow classes; export/testing/reference_tokenizer.py writes
their encoding path out as the oracle, on top of the `sentencepiece` library itself.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from export.common import CheckpointError
from export.testing.reference_tokenizer import Slow437
from export.testing.tiny_tokenizer import make_sp_tokenizer
from export.tokenizer import write_tokenizer
from tests.python.test_tokenizer import CORPUS

ROOT = Path(__file__).resolve().parents[2]
SPIECE = "▁"

SP_CORPUS = CORPUS + [
    "<|system|>\nYou are helpful.<|end|>\n<|user|>\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is this?<|end|>\n"
    "<|assistant|>\n",
    "<|user|>  spaces after a role token and before <|end|>  \n\n<|assistant|>  answer",
    " <|system|> a leading space before a special token",
    "▁<|user|>x", "▁", " ", "   ", "\n", "\n\n", "<s>", "<s> hi </s> there", "a</s>b", "<|endoftext|>",
    "hello <img> world </img> !", "<img>", " <img>", "  <IMG_CONTEXT>", "text<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>", " <|im_start|> x", "▁▁ two markers ▁", "trailing space ", "tab\t<|end|>\tafter",
    "<|end|>\n\n\nnewlines after end", "<unk> and <unk>", "<|placeholder1|>   x", "x<|end|>", "<|end|>",
    "<|end|> ", "数字1234567890 and 😀😀", "<ref>a dog</ref><box>[[1, 2, 3, 4]]</box>",
    "[UNUSED_TOKEN_1]", "a[UNUSED_TOKEN_2] b [UNUSED_TOKEN_1]\n<|im_end|>",
]

KINDS = [("llama-legacy", None), ("llama-legacy", False), ("llama", None), ("phi3", None), ("internlm2", None),
         ("internlm2", False)]


def fuzz_texts(n: int = 1500) -> list[str]:
    """Random concatenations of the fragments where the slow and fast paths part ways."""
    rng = random.Random(7)
    atoms = [" ", "  ", "\n", "\t", " \n ", SPIECE, "a", "the", "image", "你好", "😀", "Ωλ", "1234", "x", ".", "<s>",
             "</s>", "<unk>", "<|end|>", "<|user|>", "<|system|>", "<|endoftext|>", "<img>", "<IMG_CONTEXT>",
             "<|im_start|>", "<|im_end|>", "[UNUSED_TOKEN_1]", "def f():", "<", "|", ">"]
    return ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 8))) for _ in range(n)]


def rust_tokenize(tokenizer_json: Path, texts: list[str], tmp: Path) -> list[list[int]]:
    corpus = tmp / "corpus.json"
    corpus.write_text(json.dumps(texts, ensure_ascii=False))
    out = subprocess.run([str(ROOT / "target" / "release" / "internvl"), "tokenize", "--tokenizer",
                          str(tokenizer_json), "--file", str(corpus)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def build(tmp: Path, kind: str, dummy: bool | None) -> tuple[Path, dict]:
    folder = tmp / "ckpt"
    info = make_sp_tokenizer(folder, kind, add_dummy_prefix=dummy)
    write_tokenizer(folder, tmp / "tokenizer.json")
    return folder, info


@pytest.mark.parametrize(("kind", "dummy"), KINDS, ids=[k + ("" if d is None else "-nodummy") for k, d in KINDS])
def test_sp_rust_tokenization_equals_slow_437(kind, dummy, tmp_path):
    folder, info = build(tmp_path, kind, dummy)
    slow = Slow437(folder, internlm2=kind == "internlm2")
    known = Slow437(folder, internlm2=kind == "internlm2", known_difference=True)
    texts = SP_CORPUS + fuzz_texts()
    rust = rust_tokenize(tmp_path / "tokenizer.json", texts, tmp_path)
    differ = []
    for text, ids in zip(texts, rust, strict=True):
        want = known.encode(text)
        assert ids == want, f"{text!r}: rust {ids} reference {want}"
        if want != slow.encode(text):
            differ.append(text)
    # The known difference stays rare: texts made of added tokens only, e.g. "<|end|>" or "x<s>[UNUSED_TOKEN_1]".
    assert len(differ) < len(texts) // 20, differ
    assert sum(len(i) for i in rust) > 500
    assert max(max(i, default=0) for i in rust) < info["vocab_size"]


def test_sp_tiny_tokenizer_ids(tmp_path):
    info = make_sp_tokenizer(tmp_path, "phi3")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    added = {t["content"]: int(i) for i, t in cfg["added_tokens_decoder"].items()}
    assert info["eos_id"] == added["<|endoftext|>"] and info["img_context_id"] == added["<IMG_CONTEXT>"]
    assert info["vocab_size"] == max(added.values()) + 1 and info["bos_id"] == 1


def test_sp_conversion_differs_from_transformers_fast_for_legacy_llama(tmp_path):
    """The point of converting ourselves: transformers' fast conversion of the same files encodes some
    prompts differently from the slow tokenizer the reference uses."""
    from transformers import AutoTokenizer

    folder, _ = build(tmp_path, "llama-legacy", None)
    fast = AutoTokenizer.from_pretrained(folder)
    ours = rust_tokenize(tmp_path / "tokenizer.json", SP_CORPUS, tmp_path)
    differ = [t for t, ids in zip(SP_CORPUS, ours, strict=True) if fast(t)["input_ids"] != ids]
    assert differ, "transformers' fast conversion agrees with the slow tokenizer on the whole corpus"


def test_sp_refuses_what_it_cannot_reproduce(tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    folder, _ = build(tmp_path, "llama-legacy", None)
    m = pb.ModelProto()
    m.ParseFromString((folder / "tokenizer.model").read_bytes())
    m.normalizer_spec.remove_extra_whitespaces = True
    (folder / "tokenizer.model").write_bytes(m.SerializeToString())
    with pytest.raises(CheckpointError, match="remove_extra_whitespaces"):
        write_tokenizer(folder, tmp_path / "t.json")


def test_sp_bos_eos_flags(tmp_path):
    """add_bos_token / add_eos_token as the config sets them (the tiny kinds only vary add_bos_token)."""
    folder = tmp_path / "ckpt"
    make_sp_tokenizer(folder, "internlm2")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg | {"add_bos_token": False, "add_eos_token": True}))
    write_tokenizer(folder, tmp_path / "tokenizer.json")
    slow = Slow437(folder, internlm2=True, known_difference=True)
    rust = rust_tokenize(tmp_path / "tokenizer.json", SP_CORPUS, tmp_path)
    assert rust == [slow.encode(t) for t in SP_CORPUS]
    assert rust[SP_CORPUS.index("")] == [2] and all(ids[-1] == 2 for ids in rust)
