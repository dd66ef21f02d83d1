"""Tokenizer parity: the Rust runtime's token ids equal the reference's on a mixed corpus.

The reference loads its tokenizer with `use_fast=False`: for Qwen2 / Qwen2.5 that is transformers 4.x's
pure-Python byte-level BPE `Qwen2Tokenizer` (transformers 5, pinned here, no longer has it). Its
algorithm is written out below as the oracle: split on added tokens, NFC, Qwen2's pre-tokenisation
regex, GPT-2 byte-to-unicode, BPE by merge rank, from the model's own vocabulary and merges; compared
with the Rust `tokenizers` pipeline the runtime uses.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import pytest

from export.testing.byte_level import bytes_to_unicode

ROOT = Path(__file__).resolve().parents[2]

CORPUS = [
    "Describe the image in detail.",
    "你好，世界！这是一张什么图片？请详细描述。",
    "混合 English 和中文，还有数字 12345 与标点。",
    "Emoji: 😀🎉👍🏽 and flags 🇨🇳🇺🇸, ZWJ 👩‍👩‍👧‍👦.",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tindented\ttabs",
    "fn main() { println!(\"{}\", 1 << 3); }",
    "spaces:      many     runs\n\n\n\nand newlines   \n  trailing   ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n<img><IMG_CONTEXT></img>\nWhat?<|im_end|>",
    "Ünïcödé àccents, Ελληνικά, русский, العربية, हिन्दी, 日本語のテキスト, 한국어",
    "URLs https://example.com/path?q=1&x=y and emails a.b@c.de",
    "   leading spaces and a ▁ sentencepiece marker",
    "",
]


@pytest.fixture(scope="module")
def model(fixtures) -> Path:
    return fixtures / "model"


PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


class SlowQwen2:
    """transformers 4.x `Qwen2Tokenizer` (slow), reduced to what encoding needs."""

    def __init__(self, tokenizer_json: Path):
        import regex

        tok = json.loads(tokenizer_json.read_text())
        self.vocab = tok["model"]["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in tok["model"]["merges"]]
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.added = {t["content"]: t["id"] for t in tok["added_tokens"]}
        longest_first = sorted(self.added, key=len, reverse=True)
        self.split_added = regex.compile("(" + "|".join(regex.escape(t) for t in longest_first) + ")")
        self.pat = regex.compile(PRETOKENIZE)
        self.byte_map = bytes_to_unicode()

    def bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
        return parts

    def encode(self, text: str) -> list[int]:
        import unicodedata

        ids = []
        for piece in self.split_added.split(text):
            if not piece:
                continue
            if piece in self.added:
                ids.append(self.added[piece])
                continue
            for word in self.pat.findall(unicodedata.normalize("NFC", piece)):
                mapped = "".join(self.byte_map[b] for b in word.encode("utf-8"))
                ids.extend(self.vocab[p] for p in self.bpe(mapped))
        return ids


@pytest.fixture(scope="module")
def slow_tokenizer(model):
    return SlowQwen2(model / "tokenizer.json")


def test_rust_tokenization_equals_the_slow_reference(model, slow_tokenizer, tmp_path):
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps(CORPUS, ensure_ascii=False))
    out = subprocess.run([str(ROOT / "target" / "release" / "internvl"), "tokenize", "--model", str(model),
                          "--file", str(corpus)], check=True, capture_output=True, text=True).stdout
    rust = json.loads(out)
    for text, ids in zip(CORPUS, rust, strict=True):
        want = slow_tokenizer.encode(text)
        assert ids == want, f"{text!r}: rust {ids[:12]}... reference {want[:12]}..."
    assert sum(len(i) for i in rust) > 200
