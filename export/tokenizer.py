"""The model folder's tokenizer.json: copied from the checkpoint, or converted from its sentencepiece model.

The reference InternVL code loads the LLM tokenizer with `use_fast=False` (under transformers 4.37). For
Qwen2 that slow tokenizer and the shipped tokenizer.json agree, so the file is copied. For sentencepiece
checkpoints (InternLM2 / InternLM2.5 via remote-code `InternLM2Tokenizer`, Phi-3 and Llama / Yi via
`LlamaTokenizer`) a shipped tokenizer.json comes from the *fast* converter, which differs from the slow
tokenizer around added tokens and leading spaces. So `tokenizer.model` is converted here into a tokenizer.json
that encodes exactly like 4.37's slow class, given how the `tokenizers` pipeline runs: split on non-normalized
added tokens, normalize each remaining segment, split on normalized added tokens, pre-tokenize, BPE, post-process.

- legacy LlamaTokenizer and InternLM2Tokenizer: every text chunk between added tokens is `sp.encode`d on its
  own, with the model's dummy prefix: added tokens are non-normalized, so the normalizer (Prepend "▁" +
  spaces to "▁") runs per chunk.
- non-legacy LlamaTokenizer: "▁" is prepended once to the whole text (after "▁" -> " "), chunks are encoded
  without dummy prefix, and a lone "▁" token before a special token is dropped: all added tokens are
  normalized, so the normalizer sees the whole text once; spaces become "▁" only in the pre-tokenizer, after
  the added tokens' lstrip / rstrip have eaten the whitespace next to them, as 4.37 does on the raw text.
- The `normalized` flags of the config are ignored (the slow classes ignore them too).
- One difference remains (see `restore` below): a chunk sentencepiece gets with a "▁" in front that is
  exactly one token matched after normalization, e.g. the whole prompt "<|end|>" for Phi-3, lacks 4.37's
  "▁" token. Prompts start with a template, not with a lone token, so real prompts are unaffected.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .common import CheckpointError

SPIECE = "▁"
NORMAL, USER_DEFINED, UNUSED = 1, 4, 5  # sentencepiece ModelProto.SentencePiece.Type
SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def write_tokenizer(path: Path, dst: Path) -> Path:
    """tokenizer.json for the checkpoint folder `path`: converted when the reference's slow tokenizer is a
    sentencepiece one, else the shipped file, else transformers' fast conversion."""
    path = Path(path)
    cfg = _json(path / "tokenizer_config.json")
    kind = slow_class(cfg)
    if kind and (path / "tokenizer.model").is_file():
        tok = convert_sentencepiece(path, kind)
        dst.write_text(json.dumps(tok, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return dst
    src = path / "tokenizer.json"
    if src.is_file():
        shutil.copyfile(src, dst)
        return dst
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, use_fast=True)
    except Exception as e:  # any conversion failure is one message
        raise CheckpointError(
            f"checkpoint {path}: no tokenizer.json and the tokenizer cannot be converted ({e})") from e
    if not getattr(tok, "is_fast", False):
        raise CheckpointError(f"checkpoint {path}: no tokenizer.json and no fast tokenizer conversion")
    tok.backend_tokenizer.save(str(dst))
    return dst


def slow_class(cfg: dict) -> str | None:
    """"llama" or "internlm2" when `AutoTokenizer(use_fast=False)` gives a sentencepiece tokenizer we convert."""
    auto = (cfg.get("auto_map") or {}).get("AutoTokenizer") or []
    auto = [auto] if isinstance(auto, str) else auto
    if cfg.get("tokenizer_class") in ("InternLM2Tokenizer", "InternLM2TokenizerFast") or any(
            a and a.endswith("InternLM2Tokenizer") for a in auto):
        return "internlm2"
    if cfg.get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast"):
        return "llama"
    return None


@dataclass
class SlowConfig:
    """What 4.37's slow tokenizer takes from tokenizer_config.json + special_tokens_map.json."""

    legacy: bool
    add_bos: bool
    add_eos: bool
    special: dict[str, str]  # bos_token etc. -> content
    all_special: list[str]  # `all_special_tokens`: the attributes plus additional_special_tokens
    added: dict[int, dict]  # added_tokens_decoder


def slow_config(path: Path, kind: str) -> SlowConfig:
    cfg = _json(path / "tokenizer_config.json")
    # from_pretrained lets special_tokens_map.json override the config's special tokens.
    cfg |= {k: v for k, v in _json(path / "special_tokens_map.json").items() if v}
    defaults = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    if kind == "internlm2":
        defaults["pad_token"] = "</s>"
    special = {k: _content(cfg.get(k, defaults.get(k))) for k in SPECIAL_ATTRS}
    special = {k: v for k, v in special.items() if v is not None}
    extra = [_content(t) for t in cfg.get("additional_special_tokens") or []]
    all_special = list(dict.fromkeys([*special.values(), *extra]))
    added = {int(i): t for i, t in (cfg.get("added_tokens_decoder") or {}).items()}
    legacy = kind == "internlm2" or cfg.get("legacy") in (None, True)
    return SlowConfig(legacy, bool(cfg.get("add_bos_token", True)), bool(cfg.get("add_eos_token", False)),
                      special, all_special, added)


def convert_sentencepiece(path: Path, kind: str) -> dict:
    """tokenizer.json (as a dict) encoding like transformers 4.37's slow `kind` tokenizer of checkpoint `path`."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    src = path / "tokenizer.model"
    m = pb.ModelProto()
    m.ParseFromString(src.read_bytes())
    ts, ns = m.trainer_spec, m.normalizer_spec

    def refuse(why: str):
        raise CheckpointError(f"{src}: cannot convert to tokenizer.json exactly: {why}")

    if ts.model_type != pb.TrainerSpec.BPE:
        refuse(f"model_type {pb.TrainerSpec.ModelType.Name(ts.model_type)} (only BPE is converted)")
    if ns.precompiled_charsmap or ns.name not in ("identity", ""):
        refuse(f"normalization rule {ns.name!r} (only identity is converted)")
    if ns.remove_extra_whitespaces:
        refuse("remove_extra_whitespaces=true")
    if not ns.escape_whitespaces or ts.treat_whitespace_as_suffix:
        refuse("whitespace is not escaped as a '▁' prefix")
    if any(p.type == UNUSED for p in m.pieces):
        refuse("UNUSED pieces")
    c = slow_config(path, kind)
    if any(t.get("single_word") for t in c.added.values()):
        refuse("an added token with single_word=true")

    vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    # The tokens 4.37 splits the text on before sentencepiece sees it: added_tokens_decoder, plus the special
    # token attributes (LlamaTokenizer wraps them as AddedToken(normalized=False): no lstrip / rstrip).
    added = dict(c.added)
    known = {t["content"] for t in added.values()}
    for t in c.all_special:
        if t not in known:
            if t not in vocab:
                refuse(f"special token {t!r} is neither in the model nor in added_tokens_decoder")
            added[vocab[t]] = {"content": t, "lstrip": False, "rstrip": False, "special": True}
    for i, t in added.items():
        if vocab.get(t["content"], i) != i:
            refuse(f"added token {t['content']!r} has id {i}, the model's piece {vocab[t['content']]}")
        if i < len(m.pieces) and m.pieces[i].type == NORMAL and m.pieces[i].piece != t["content"]:
            refuse(f"added token {t['content']!r} replaces the model's ordinary piece {m.pieces[i].piece!r}")
    # Each added token in the model vocabulary at its id: `tokenizers` keeps an added token's id only when the
    # model knows its content (else it numbers it anew), and InternLM2 maps ids of its "[UNUSED_TOKEN_n]"
    # pieces to its chat tokens in added_tokens_decoder.
    vocab = {p.piece: i for i, p in enumerate(m.pieces) if i not in added} | {t["content"]: i for i, t in added.items()}
    tokens = [{"id": i, "content": t["content"], "single_word": False, "lstrip": bool(t.get("lstrip")),
               "rstrip": bool(t.get("rstrip")), "normalized": not c.legacy, "special": bool(t.get("special"))}
              for i, t in sorted(added.items())]
    # USER_DEFINED pieces 4.37 does not split on: sentencepiece matches them inside each (normalized) chunk,
    # so they are matched after normalization.
    tokens += [{"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": True, "special": False}
               for i, p in enumerate(m.pieces) if p.type == USER_DEFINED and i not in added]
    if not c.legacy and any(SPIECE in t["content"] for t in tokens):
        refuse("an added token containing '▁' (non-legacy replaces it by a space)")
    ids = {t["content"]: t["id"] for t in tokens}
    # `tokenizers` normalizes the contents of normalized added tokens before matching them, Prepend included:
    # a regex takes that "▁" off again. The price: a chunk that is exactly such a token loses its "▁"
    # (4.37 encodes it as ["▁", token]), e.g. the whole text "<|end|>" for Phi-3.
    restore = "|".join(_onig_escape(t["content"]) for t in tokens if t["normalized"])
    if c.legacy:
        normalizer = [{"type": "Prepend", "prepend": SPIECE}] if ns.add_dummy_prefix else []
        normalizer.append({"type": "Replace", "pattern": {"String": " "}, "content": SPIECE})
        if restore and ns.add_dummy_prefix:
            normalizer.append(_drop_lead(f"(?:{restore})\\z"))
        pre_tokenizer = None
    else:
        # "▁" once before the whole text; `tokenize` drops tokens[0] == "▁" when tokens[1] is in
        # all_special_tokens (whitespace between them is gone already if that token lstrips).
        lead = [(r"\s*" if added[ids[t]].get("lstrip") else "") + _onig_escape(t) for t in c.all_special]
        normalizer = [{"type": "Replace", "pattern": {"String": SPIECE}, "content": " "},
                      {"type": "Prepend", "prepend": SPIECE},
                      _drop_lead("|".join([f"(?:{'|'.join(lead)})"] + [f"(?:{restore})\\z"] * bool(restore)))]
        pre_tokenizer = {"type": "Metaspace", "replacement": SPIECE, "prepend_scheme": "never", "split": False}

    for flag, name in ((c.add_bos, "bos_token"), (c.add_eos, "eos_token")):
        if flag and name not in c.special:
            refuse(f"add_{name} is set but there is no {name}")
    bos = [c.special["bos_token"]] if c.add_bos else []
    eos = [c.special["eos_token"]] if c.add_eos else []

    def template(seqs):  # LlamaTokenizer.build_inputs_with_special_tokens: [bos] A [eos] ([bos] B [eos])
        return [{"SpecialToken": {"id": t, "type_id": type_id}} if t else {"Sequence": {"id": s, "type_id": type_id}}
                for s, type_id in seqs for t in [*bos, None, *eos]]

    decoder = [{"type": "Replace", "pattern": {"String": SPIECE}, "content": " "}, {"type": "ByteFallback"},
               {"type": "Fuse"}]
    if ns.add_dummy_prefix or not c.legacy:
        decoder.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": tokens,
        "normalizer": {"type": "Sequence", "normalizers": normalizer},
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "TemplateProcessing", "single": template([("A", 0)]),
                           "pair": template([("A", 0), ("B", 1)]),
                           "special_tokens": {t: {"id": t, "ids": [ids[t] if t in ids else vocab[t]], "tokens": [t]}
                                              for t in bos + eos}},
        "decoder": {"type": "Sequence", "decoders": decoder},
        "model": {"type": "BPE", "dropout": None, "unk_token": m.pieces[ts.unk_id].piece,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": ts.byte_fallback, "ignore_merges": False, "vocab": vocab,
                  "merges": bpe_merges(m)},
    }


def bpe_merges(m) -> list[list[str]]:
    """Merges that replay sentencepiece's BPE: it repeatedly joins the adjacent pair whose joined piece
    scores highest, so every split of a NORMAL piece into two NORMAL pieces is a merge, ranked by that
    piece's score (ties by id, then by where it splits). USER_DEFINED pieces are added tokens here, split
    off before BPE runs."""
    symbols = {p.piece for p in m.pieces if p.type == NORMAL}
    merges = []
    for i, p in enumerate(m.pieces):
        if p.type != NORMAL:
            continue
        for k in range(1, len(p.piece)):
            left, right = p.piece[:k], p.piece[k:]
            if left in symbols and right in symbols:
                merges.append((-p.score, i, k, [left, right]))
    return [pair for *_, pair in sorted(merges)]


def _drop_lead(lookahead: str) -> dict:
    """Normalizer step removing a "▁" at the start when `lookahead` follows."""
    return {"type": "Replace", "pattern": {"Regex": f"\\A{SPIECE}(?={lookahead})"}, "content": ""}


def _content(t) -> str | None:
    return t.get("content") if isinstance(t, dict) else t


def _onig_escape(s: str) -> str:
    return re.sub(r"([\\^$.|?*+()\[\]{}-])", r"\\\1", s)


def _json(p: Path) -> dict:
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


# The special-token defaults of the slow tokenizer classes the reference loads (`use_fast=False`), used
# where tokenizer_config.json does not name a token (transformers 4.37 `__init__` signatures).
SLOW_DEFAULTS = {
    "Qwen2Tokenizer": {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    "LlamaTokenizer": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    "InternLM2Tokenizer": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"},
}
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def reference_added_tokens(checkpoint: Path) -> tuple[list[str], bool, bool, bool]:
    """The slow tokenizer's added tokens (tokenizer_config.json's added_tokens_decoder); whether its class
    is a sentencepiece one whose decode joins the text around them with spaces; whether it applies
    `clean_up_tokenization` (" ." -> "." and the like) to each run (InternLM2Tokenizer's
    convert_tokens_to_string always does) and to the whole text (`clean_up_tokenization_spaces`, whose
    default is False in all three classes)."""
    f = Path(checkpoint) / "tokenizer_config.json"
    cfg = json.loads(f.read_text()) if f.is_file() else {}
    cls = str(cfg.get("tokenizer_class") or "").removesuffix("Fast")
    added = [t["content"] for t in (cfg.get("added_tokens_decoder") or {}).values()]
    return (added, cls in ("LlamaTokenizer", "InternLM2Tokenizer"), cls == "InternLM2Tokenizer",
            bool(cfg.get("clean_up_tokenization_spaces", False)))


def reference_special_tokens(checkpoint: Path) -> list[str]:
    """The slow tokenizer's `all_special_tokens` (what `skip_special_tokens=True` drops): the named special
    tokens from tokenizer_config.json, overridden by special_tokens_map.json as `from_pretrained` does, the
    class defaults for those it names nowhere, then `additional_special_tokens`."""
    checkpoint = Path(checkpoint)

    def load(name):
        f = checkpoint / name
        return json.loads(f.read_text()) if f.is_file() else {}

    cfg, smap = load("tokenizer_config.json"), load("special_tokens_map.json")
    cls = str(cfg.get("tokenizer_class") or "").removesuffix("Fast")
    merged = {**SLOW_DEFAULTS.get(cls, {}), **cfg, **{k: v for k, v in smap.items() if v}}

    def content(t):
        return t.get("content") if isinstance(t, dict) else t

    names = [content(merged.get(k)) for k in SPECIAL_KEYS]
    names += [content(t) for t in merged.get("additional_special_tokens") or []]
    return list(dict.fromkeys(n for n in names if n))
