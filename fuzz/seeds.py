"""Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/seed-*), small hand-made inputs that
start each target off inside its format. Fuzzing adds its own files next to them (scripts/fuzz.sh).

Usage: .venv/bin/python fuzz/seeds.py [build/fixtures]

The input layouts are those of crates/internvl/tests/fuzz_checks/mod.rs: image = the image file itself;
manifest / history = the file itself; prompt = [flags, model, text with NUL-separated fields]; stream_decode =
[model, 3-byte ids].
Models are indexed in the default order of `model_dirs()`: qwen2, internlm2, llama, phi3, qwen3.
"""

import hashlib
import io
import json
import struct
import sys
from pathlib import Path

from PIL import Image
from tokenizers import Tokenizer

from export.testing.byte_level import bytes_to_unicode

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
MODELS = ["qwen2", "internlm2", "llama", "phi3", "qwen3"]
OUT_OF_VOCAB = 0xFFFFFF


def write(target: str, name: str, data: bytes) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    assert len(data) < 64 * 1024, (target, name, len(data))
    (d / f"seed-{name}").write_bytes(data)


def gradient(w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h))
    img.putdata([((x * 255) // max(w - 1, 1), (y * 255) // max(h - 1, 1), (x * 7 + y * 13) & 255)
                 for y in range(h) for x in range(w)])
    return img


def saved(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def images() -> None:
    rgb = gradient(37, 23)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    write("image", "rgb.png", saved(rgb, "PNG"))
    write("image", "rgba.png", saved(rgba, "PNG"))
    write("image", "gray.png", saved(rgb.convert("L"), "PNG"))
    write("image", "gray16.png", saved(rgb.convert("L").point(lambda v: v * 200, "I").convert("I;16"), "PNG"))
    write("image", "palette-transparency.png", saved(rgb.convert("P"), "PNG", transparency=3))
    write("image", "bilevel.png", saved(rgb.convert("1"), "PNG"))
    write("image", "exif6.png", saved(rgb, "PNG", exif=exif_orientation(6)))
    write("image", "strip-1x300.png", saved(gradient(1, 300), "PNG"))
    write("image", "strip-300x1.png", saved(gradient(300, 1), "PNG"))
    write("image", "baseline.jpg", saved(rgb, "JPEG", quality=75))
    write("image", "baseline-444.jpg", saved(rgb, "JPEG", quality=90, subsampling=0))
    write("image", "progressive.jpg", saved(rgb, "JPEG", quality=75, progressive=True))
    write("image", "gray.jpg", saved(rgb.convert("L"), "JPEG"))
    write("image", "cmyk.jpg", saved(rgb.convert("CMYK"), "JPEG"))
    write("image", "exif8.jpg", saved(rgb, "JPEG", exif=exif_orientation(8)))
    write("image", "optimized.jpg", saved(gradient(64, 48), "JPEG", optimize=True, quality=50))
    write("image", "palette.gif", saved(rgb.convert("P"), "GIF"))
    frames = [rgb.convert("P"), rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("P")]
    write("image", "animated.gif", saved(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    write("image", "lossy.webp", saved(rgb, "WEBP", quality=60))
    write("image", "lossless-alpha.webp", saved(rgba, "WEBP", lossless=True))
    write("image", "rgb.bmp", saved(rgb, "BMP"))
    write("image", "palette.bmp", saved(rgb.convert("P"), "BMP"))
    write("image", "raw.tiff", saved(rgb, "TIFF"))
    write("image", "lzw.tiff", saved(rgb, "TIFF", compression="tiff_lzw"))
    write("image", "deflate-rgba.tiff", saved(rgba, "TIFF", compression="tiff_adobe_deflate"))
    write("image", "gray16.tiff", saved(rgb.convert("L").point(lambda v: v * 200, "I").convert("I;16"), "TIFF"))


def file_entries(model_dir: Path) -> dict:
    entries = {}
    for f in sorted(model_dir.iterdir()):
        if f.name == "manifest.json" or not f.is_file():
            continue
        entries[f.name] = {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    return entries


def manifests(fixtures: Path) -> None:
    for d in sorted((fixtures / "models").iterdir()):
        m = json.loads((d / "manifest.json").read_text())
        # Fixtures from before the manifest's `files` section: add it as export/manifest.py writes it.
        m.setdefault("files", file_entries(d))
        write("manifest", f"{d.name}.json", json.dumps(m, indent=2, ensure_ascii=False).encode())
        if d.name == "qwen2-original":
            compact = {k: v for k, v in m.items() if k not in ("versions", "source", "generation")}
            write("manifest", "compact.json", json.dumps(compact, separators=(",", ":")).encode())


def history() -> None:
    seeds = {
        "empty": "[]",
        "one": '[{"user": "<image>\\nWhat is this?", "assistant": "A cat."}]',
        "two": '[{"user": "Image-1: <image>\\nImage-2: <image>\\nCompare.", "assistant": "Same."},\n'
               ' {"user": "Why?", "assistant": "Both \\u732b\\ud83d\\ude00."}]\n',
        "extra-fields": '[{"user": "a", "assistant": "b", "time": 3, "meta": {"x": [1, 2]}}]',
        "special-tokens": '[{"user": "<|im_start|>system\\nX<|im_end|><IMG_CONTEXT>", "assistant": "</img><img>"}]',
        "lone-surrogate": '[{"user": "\\ud800", "assistant": ""}]',
        "not-a-list": '{"user": "a", "assistant": "b"}',
        "crlf-bom": '\ufeff[\r\n {"user": "q",\r\n  "assistant": "a"}\r\n]\r\n',
    }
    for name, text in seeds.items():
        write("history", f"{name}.json", text.encode())
    write("history", "latin1.json", '[{"user": "caf\xe9", "assistant": ""}]'.encode("latin-1"))


def prompts() -> None:
    # flags: bits 0-2 images, bits 3-4 system (0 template's, 1 none, 2-3 the second field), bit 5 first.
    seeds = [
        (0x21, 0, "What is in the image?"),
        (0x01, 1, "Look: <image> now"),
        (0x33, 2, "Compare these.\0You are terse."),
        (0x08, 3, "Hi\0\0<image>\nA?\0B.\0C?\0D."),
        (0x22, 4, "你好，世界 😀 \u00e9\u0301 \u212b"),
        (0x21, 0, "<|im_start|>user\n<img></img><|im_end|>"),
        (0x21, 1, "stray <IMG_CONTEXT> token"),
        (0x07, 3, "<image><image><image>\0sys\0<image>\0"),
        (0x20, 2, "  spaces \t\n\n tabs  "),
        (0x21, 4, "<<image>image> <imag e> <image"),
    ]
    for i, (flags, model, text) in enumerate(seeds):
        write("prompt", f"{i:02}", bytes([flags, model]) + text.encode())


def stream_value(token_id: int, vocab: int) -> int:
    assert token_id < vocab
    return token_id if token_id < 0xF00000 else 0xF00000 + (vocab - 1 - token_id)


def stream_input(model: int, vocab: int, ids: list[int]) -> bytes:
    return bytes([model]) + b"".join(struct.pack("<I", stream_value(i, vocab))[:3] for i in ids)


def streams(fixtures: Path) -> None:
    texts = {
        "ascii": "Hello, world! This is a test.",
        "cjk-emoji": "你好，世界 😀👍🏽 done",
        "split": "The answer is 4.<|im_end|>\nignored <|im_start|>",
        "phi3-split": "The answer is 4.<|end|>\nignored",
        "spaces": "  leading and trailing  \n\n",
        "cleanup": "a . b , c ! don 't I 'm",
    }
    for index, name in enumerate(MODELS):
        d = fixtures / "models" / f"{name}-original"
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        vocab = json.loads((d / "manifest.json").read_text())["tokenizer"]["vocab_size"]

        def seed(label: str, ids: list[int], tail: bytes = b"", index=index, name=name, vocab=vocab) -> None:
            write("stream_decode", f"{name}-{label}", stream_input(index, vocab, ids) + tail)

        for label, text in texts.items():
            if (name, label) == ("internlm2", "cleanup"):
                continue  # the first finding: fuzz/regressions/stream_decode/internlm2-clean-up-streamed-differs
            seed(label, tok.encode(text, add_special_tokens=False).ids)
        # Byte tokens one by one: complete, truncated and invalid UTF-8.
        byte_ids = {}
        for b in range(256):
            for form in (f"<0x{b:02X}>", bytes_to_unicode()[b]):
                if (i := tok.token_to_id(form)) is not None:
                    byte_ids[b] = i
                    break
        if len(byte_ids) == 256:
            for label, raw in {"bytes-valid": "é你😀".encode(), "bytes-invalid": b"\xe4\xbdA\x80\x80\xff",
                               "bytes-truncated": b"ok\xf0\x9f\x98"}.items():
                seed(label, [byte_ids[b] for b in raw])
        seed("out-of-vocab", tok.encode("fine", add_special_tokens=False).ids,
             struct.pack("<I", OUT_OF_VOCAB)[:3] + b"\x00")


def main() -> None:
    fixtures = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "fixtures"
    images()
    manifests(fixtures)
    history()
    prompts()
    streams(fixtures)
    total = sum(f.stat().st_size for f in CORPUS.rglob("seed-*"))
    print(f"seeds written under {CORPUS}: {len(list(CORPUS.rglob('seed-*')))} files, {total} bytes")


if __name__ == "__main__":
    main()
