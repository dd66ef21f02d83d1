"""Sentencepiece tokenizer parity: the tokenizer.json export/tokenizer.py converts from `tokenizer.model`
encodes like the reference's slow tokenizer (transformers 4.37, `use_fast=False`) on every tiny kind.

transformers 5 (pinned here) no longer has 4.37's slow classes, so their encoding path is written out below
as the oracle, on top of the `sentencepiece` library itself: `PreTrainedTokenizer.tokenize` (split on added
tokens, lstrip / rstrip), `LlamaTokenizer.tokenize` / `_tokenize` (legacy and non-legacy),
`InternLM2Tokenizer._tokenize`, `convert_tokens_to_ids`, `build_inputs_with_special_tokens`.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
from pathlib import Path

import pytest
from test_tokenizer import CORPUS

from export.tiny_tokenizer import make_sp_tokenizer
from export.tokenizer import write_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SPIECE = "▁"

SP_CORPUS = CORPUS + [
    "<|system|>\nYou are helpful.<|end|>\n<|user|>\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is this?<|end|>\n<|assistant|>\n",
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


class Slow437:
    """transformers 4.37's slow `LlamaTokenizer` / `InternLM2Tokenizer`, reduced to `tokenizer(text).input_ids`."""

    def __init__(self, folder: Path, internlm2: bool, known_difference: bool = False):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        smap = json.loads((folder / "special_tokens_map.json").read_text())
        cfg.update({k: v for k, v in smap.items() if v})  # from_pretrained: the map's entries win

        def content(t):
            return t["content"] if isinstance(t, dict) else t

        self.internlm2 = internlm2
        # LlamaTokenizer.__init__: legacy None -> True (with a warning). InternLM2Tokenizer has no such notion.
        self.legacy = True if internlm2 or cfg.get("legacy") is None else cfg["legacy"]
        self.unk = content(cfg.get("unk_token", "<unk>"))
        self.bos = content(cfg.get("bos_token", "<s>"))
        self.eos = content(cfg.get("eos_token", "</s>"))
        pad = content(cfg.get("pad_token", "</s>" if internlm2 else None))
        self.add_bos = cfg.get("add_bos_token", True)
        self.add_eos = cfg.get("add_eos_token", False)
        # LlamaTokenizer.get_spm_processor: non-legacy reloads the model with add_dummy_prefix=False.
        proto = (folder / "tokenizer.model").read_bytes()
        if not self.legacy:
            m = pb.ModelProto()
            m.ParseFromString(proto)
            m.normalizer_spec.add_dummy_prefix = False
            proto = m.SerializeToString()
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        # _added_tokens_decoder from the config; the special token attributes are added on top
        # (PreTrainedTokenizer.__init__ -> _add_tokens), at their vocabulary id, without lstrip / rstrip.
        self.added = {t["content"]: (int(i), t) for i, t in cfg.get("added_tokens_decoder", {}).items()}
        extra = [content(t) for t in cfg.get("additional_special_tokens", [])]
        self.all_special = list(dict.fromkeys(t for t in [self.bos, self.eos, self.unk, pad, *extra] if t))
        for t in self.all_special:
            self.added.setdefault(t, (self.sp.piece_to_id(t), {"lstrip": False, "rstrip": False}))
        # The Trie finds the earliest match, the longest one there.
        self.trie = re.compile("|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)))
        self.unk_token_length = len(self.sp.encode(self.unk))
        # export/tokenizer.py's one documented difference, emulated when `known_difference`: a piece of text
        # sentencepiece gets with a "▁" in front (legacy: each chunk, given add_dummy_prefix; non-legacy: the
        # whole text) that is otherwise exactly one token the conversion matches after normalization (a
        # non-special added token in non-legacy mode, a USER_DEFINED piece 4.37 does not split on) encodes
        # without that "▁" token.
        self.known_difference = known_difference
        model = pb.ModelProto.FromString(proto)
        self.user_defined = {p.piece for p in model.pieces if p.type == p.USER_DEFINED} - set(self.added)
        self.dummy = model.normalizer_spec.add_dummy_prefix

    def split(self, text: str) -> list[str]:
        out, pos = [], 0
        for m in self.trie.finditer(text):
            out += [text[pos:m.start()], m.group()]
            pos = m.end()
        return [t for t in [*out, text[pos:]] if t]

    def base_tokenize(self, text: str) -> list[str]:  # PreTrainedTokenizer.tokenize
        tokens = self.split(text)
        for i, token in enumerate(tokens):
            if token in self.added:
                tok = self.added[token][1]
                left = tokens[i - 1] if i > 0 else None
                right = tokens[i + 1] if i < len(tokens) - 1 else None
                if tok.get("rstrip") and right:
                    tokens[i + 1] = right.lstrip()
                if tok.get("lstrip") and left:
                    tokens[i - 1] = left.rstrip()
        out = []
        for token in tokens:
            if not token:
                continue
            out.extend([token] if token in self.added else self._tokenize(token))
        return out

    def tokenize(self, text: str) -> list[str]:
        if self.known_difference and not self.legacy and (text in self.user_defined or (
                text in self.added and text not in self.all_special)):
            return [text]
        if self.internlm2 or self.legacy or len(text) == 0:
            return self.base_tokenize(text)
        tokens = self.base_tokenize(SPIECE + text.replace(SPIECE, " "))
        if len(tokens) > 1 and tokens[0] == SPIECE and tokens[1] in self.all_special:
            tokens = tokens[1:]
        return tokens

    def _tokenize(self, text: str) -> list[str]:
        if self.known_difference and (self.internlm2 or self.legacy) and self.dummy and text in self.user_defined:
            return [text]
        tokens = self.sp.encode(text, out_type=str)
        if self.internlm2 or self.legacy or not text.startswith((SPIECE, " ")):
            return tokens
        tokens = self.sp.encode(self.unk + text, out_type=str)
        return tokens[self.unk_token_length:] if len(tokens) >= self.unk_token_length else tokens

    def token_id(self, token: str) -> int:
        return self.added[token][0] if token in self.added else self.sp.piece_to_id(token)

    def encode(self, text: str) -> list[int]:
        ids = [self.token_id(t) for t in self.tokenize(text)]
        return [self.token_id(self.bos)] * self.add_bos + ids + [self.token_id(self.eos)] * self.add_eos


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
    with pytest.raises(SystemExit, match="remove_extra_whitespaces"):
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
