"""transformers 4.37's slow sentencepiece tokenizers, written out: the reference InternVL code loads its
tokenizer with `use_fast=False` under 4.37, and transformers 5 (pinned here) no longer has these classes.

On top of the `sentencepiece` library itself: `PreTrainedTokenizer.tokenize` (split on added tokens, lstrip /
rstrip), `LlamaTokenizer.tokenize` / `_tokenize` (legacy and non-legacy), `InternLM2Tokenizer._tokenize`,
`convert_tokens_to_ids`, `build_inputs_with_special_tokens`. The oracle of tests/python/test_sp_tokenizer.py
and the tokenizer of the PyTorch goldens (export/testing/golden.py) for sentencepiece checkpoints; independent of
export/tokenizer.py, whose converted tokenizer.json the runtime uses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

SPIECE = "▁"


class Slow437:
    """transformers 4.37's slow `LlamaTokenizer` / `InternLM2Tokenizer`, reduced to `tokenizer(text).input_ids`."""

    def __init__(self, folder: Path, internlm2: bool, known_difference: bool = False):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        smap_file = folder / "special_tokens_map.json"
        smap = json.loads(smap_file.read_text()) if smap_file.is_file() else {}
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
        # `all_special_tokens`: every special-token attribute, then the additional ones.
        others = [content(cfg.get(k)) for k in ("sep_token", "cls_token", "mask_token")]
        self.all_special = list(dict.fromkeys(t for t in [self.bos, self.eos, self.unk, *others, pad, *extra] if t))
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
