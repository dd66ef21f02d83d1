"""GPT-2's byte -> character map of byte-level BPE vocabularies (Qwen2, Llama 3): how a test writes a byte as
the token a byte-level tokenizer stores for it."""

from __future__ import annotations


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))
