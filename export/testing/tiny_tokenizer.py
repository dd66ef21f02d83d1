"""Tiny sentencepiece tokenizers shaped like the real InternVL checkpoints' slow ones, for tests.

`make_sp_tokenizer(out, kind)` trains a small BPE `tokenizer.model` (well under a second, deterministic: fixed
synthetic corpus, one thread) and writes tokenizer_config.json + special_tokens_map.json the way the hub
checkpoints ship them, so that export/tokenizer.py converts it exactly as it would a real one:

- "llama-legacy": LlamaTokenizer with no `legacy` key (transformers 4.37 then means legacy=True), BOS on;
  ChatML tokens appended after the sentencepiece vocabulary (as InternVL does with `add_tokens`).
- "llama": LlamaTokenizer, legacy=False (Yi / Nous-Hermes-2-Yi style): ChatML tokens are USER_DEFINED pieces
  of the model itself and listed as additional special tokens.
- "phi3": LlamaTokenizer, legacy=False, add_bos_token=False, eos `<|endoftext|>`, the chat tokens of
  Phi-3-mini-128k-instruct's tokenizer_config (ids 32000+ there: `<|endoftext|>` rstrip=False, the role
  tokens and `</s>` rstrip=True) and, as there, none of them in additional_special_tokens.
- "internlm2": remote-code InternLM2Tokenizer (auto_map), pad `</s>`. Like InternLM2's tokenizer.model, the
  model has USER_DEFINED "[UNUSED_TOKEN_n]" pieces, and added_tokens_decoder gives the ids of the last two
  to `<|im_end|>` / `<|im_start|>` (InternLM2: 92542 / 92543, with <|plugin|> etc. before them; that these
  pieces are USER_DEFINED and not CONTROL is a guess, both are converted). `add_dummy_prefix` True by
  default (what InternLM2's own fast converter reads from the model); pass False to test the other setting.

Every kind ends with InternVL's added tokens (`<img>` ... `</box>`, special, never normalized).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

KINDS = ("llama-legacy", "llama", "phi3", "internlm2")
CHATML = ["<|im_start|>", "<|im_end|>"]
UNUSED = [f"[UNUSED_TOKEN_{i}]" for i in range(1, 5)]
PHI3_CHAT = [  # (content, rstrip) in Phi-3-mini-128k-instruct's order, ids 32000.. there
    ("<|endoftext|>", False), ("<|assistant|>", True), ("<|placeholder1|>", True), ("<|placeholder2|>", True),
    ("<|placeholder3|>", True), ("<|placeholder4|>", True), ("<|system|>", True), ("<|end|>", True),
    ("<|placeholder5|>", True), ("<|placeholder6|>", True), ("<|user|>", True),
]
INTERNVL = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
VOCAB_SIZE = 3000

WORDS = ("the a of and to in is image picture describe detail what where who this that with for on are was "
         "please answer question model vision language token text person dog cat car tree sky blue red green "
         "left right top bottom small large number count color shape")
HANZI = "你好世界这是一张什么图片请详细描述中文数字与标点的我们在图像里有个人和猫狗车天空蓝色红绿左右上下大小"
EMOJI = "😀🎉👍🏽🇨🇳🇺🇸👩‍👧✨🔥"
CODE = ["def f(x):\n    return x + 1", "fn main() { println!(\"{}\", 1 << 3); }", "for i in range(10):\n\tprint(i)",
        "if (a && b) { return {'k': [1, 2]}; }", "x = [1, 2, 3]  # comment"]


def corpus(n: int = 3000) -> list[str]:
    """Deterministic mixed text: English, Chinese, emoji, code, digits, runs of spaces, tabs and newlines."""
    rng = random.Random(1234)
    vocab = WORDS.split()
    lines = []
    for i in range(n):
        words = [rng.choice(vocab) for _ in range(rng.randint(3, 12))]
        if i % 3 == 0:
            words.insert(rng.randint(0, len(words)), "".join(rng.choice(HANZI) for _ in range(rng.randint(2, 8))))
        if i % 7 == 0:
            words.append(rng.choice(EMOJI))
        if i % 5 == 0:
            words.append(str(rng.randint(0, 99999)))
        sep = rng.choice([" ", " ", " ", "  ", "   ", "\t", "\n", " \n "])
        line = sep.join(words)
        if i % 4 == 0:
            line = rng.choice(CODE) + "\n" + line
        if i % 11 == 0:
            line = " " * rng.randint(1, 6) + line + " " * rng.randint(0, 3)
        lines.append(line.capitalize() if i % 2 else line)
    return lines


def _train(kind: str, add_dummy_prefix: bool) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, model_type="bpe", vocab_size=VOCAB_SIZE,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, add_dummy_prefix=add_dummy_prefix, character_coverage=1.0,
        user_defined_symbols={"llama": CHATML, "internlm2": UNUSED}.get(kind, []), num_threads=1,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=1 << 16, minloglevel=2)
    return model.getvalue()


def _token(content: str, rstrip: bool = False, special: bool = True) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": rstrip, "single_word": False,
            "special": special}


def make_sp_tokenizer(out: Path, kind: str, add_dummy_prefix: bool | None = None) -> dict:
    """Writes tokenizer.model, tokenizer_config.json, special_tokens_map.json into `out`.

    Returns {"vocab_size", "bos_id", "eos_id", "pad_id", "img_context_id"}: vocab_size counts the added tokens
    (the embedding rows a model with this tokenizer needs); the same ids are in tokenizer_config.json.
    """
    import sentencepiece as spm

    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: choose one of {', '.join(KINDS)}")
    dummy = True if add_dummy_prefix is None else add_dummy_prefix
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = _train(kind, dummy)
    (out / "tokenizer.model").write_bytes(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    n = sp.get_piece_size()

    added = {0: _token("<unk>"), 1: _token("<s>"), 2: _token("</s>")}
    extra = []  # tokens appended after the sentencepiece vocabulary, in order
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    additional = list(INTERNVL)
    if kind == "llama-legacy":
        extra += [_token(t) for t in CHATML]
    if kind == "llama":
        added |= {sp.piece_to_id(t): _token(t) for t in CHATML}
    if kind == "internlm2":
        added |= {sp.piece_to_id(u): _token(t) for u, t in zip(UNUSED[2:], ["<|im_end|>", "<|im_start|>"], strict=True)}
    if kind in ("llama", "internlm2"):
        additional = CHATML + additional
    if kind == "phi3":
        added[2] = _token("</s>", rstrip=True, special=False)
        extra += [_token(t, rstrip=r) for t, r in PHI3_CHAT]
        specials |= {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    if kind == "internlm2":
        specials["pad_token"] = "</s>"
    extra += [_token(t) for t in INTERNVL]
    added |= {n + i: t for i, t in enumerate(extra)}
    ids = {t["content"]: i for i, t in added.items()}

    config = {
        "added_tokens_decoder": {str(i): t for i, t in sorted(added.items())},
        "additional_special_tokens": additional,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        **specials,
    }
    if kind == "internlm2":
        config |= {"tokenizer_class": "InternLM2Tokenizer", "add_bos_token": True, "add_eos_token": False,
                   "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                                  "tokenization_internlm2_fast.InternLM2TokenizerFast"]}}
    else:
        config |= {"tokenizer_class": "LlamaTokenizer", "add_bos_token": kind != "phi3", "add_eos_token": False,
                   "sp_model_kwargs": {}}
        if kind != "llama-legacy":
            config["legacy"] = False
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    smap = {k: {f: x for f, x in _token(v).items() if f != "special"} for k, v in specials.items()}
    smap["additional_special_tokens"] = additional
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2, ensure_ascii=False) + "\n")
    return {"vocab_size": max(added) + 1, "bos_id": ids["<s>"], "eos_id": ids[specials["eos_token"]],
            "pad_id": ids.get(specials.get("pad_token")), "img_context_id": ids["<IMG_CONTEXT>"]}
