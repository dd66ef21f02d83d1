"""The Rust image preprocessing (`internvl preprocess`) against the reference `load_image`.

PNG (and the other lossless formats) must match `export/testing/reference.py` bit for bit: same decoded
pixels, same Pillow BICUBIC resize, same tile grid, same float32 normalisation. JPEG too: both
sides decode it with libjpeg-turbo and Pillow's settings. `reference.py` itself is checked against a literal copy of the
model card code kept in this file.

The binary is `target/release/internvl` (rebuilt with `cargo build --release` first) unless
`INTERNVL_BIN` names one. All test images are generated here.
"""

from __future__ import annotations

import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from export.testing import reference
from tests.oracle.model_card import dynamic_preprocess as oracle_dynamic_preprocess
from tests.oracle.model_card import find_closest_aspect_ratio as oracle_find_closest_aspect_ratio

ROOT = Path(__file__).resolve().parents[2]

STD255 = np.array(reference.IMAGENET_STD, dtype=np.float32) * 255


# --------------------------------------------------------------------------------------------
# The model card code (tests/oracle/model_card.py, literal): the oracle for export/testing/reference.py.
# --------------------------------------------------------------------------------------------


def oracle_choose(image, min_num, max_num, image_size):
    """The first half of the model card's `dynamic_preprocess`: which grid."""
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = set(  # noqa: C401 (model card code, kept literal)
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    return oracle_find_closest_aspect_ratio(
        aspect_ratio, target_ratios, orig_width, orig_height, image_size
    )


def oracle_grid(width, height, min_num, max_num, image_size=448):
    image = type("Size", (), {"size": (width, height)})()  # only .size is read before the resize
    return oracle_choose(image, min_num, max_num, image_size)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def run_cli(
    binary: Path, image: Path, out: Path, *, max_tiles=12, min_tiles=1, exif=False
):
    cmd = [str(binary), "preprocess", "--image", str(image), "--out", str(out)]
    cmd += ["--max-tiles", str(max_tiles), "--min-tiles", str(min_tiles)]
    if exif:
        cmd.append("--exif")
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)


def preprocess(binary: Path, image: Path, tmp_path: Path, **kw) -> np.ndarray:
    out = tmp_path / (image.stem + ".npy")
    out.unlink(missing_ok=True)  # a test may preprocess one image twice; outputs are never overwritten
    r = run_cli(binary, image, out, **kw)
    assert r.returncode == 0, r.stderr
    assert "panicked" not in r.stderr
    got = np.load(out)
    assert got.dtype == np.float32
    return got


def to_uint8(tiles: np.ndarray) -> np.ndarray:
    """Recovers the uint8 tiles [n, s, s, 3] from normalised float32 [n, 3, s, s]."""
    mean = np.array(reference.IMAGENET_MEAN, dtype=np.float32)
    std = np.array(reference.IMAGENET_STD, dtype=np.float32)
    x = tiles.transpose(0, 2, 3, 1) * std + mean
    u = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    # The map uint8 -> float32 is injective with steps ~0.017, so this inversion is exact.
    assert np.array_equal(
        ((u.astype(np.float32) / np.float32(255)) - mean) / std,
        tiles.transpose(0, 2, 3, 1),
    )
    return u


def noise(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def gradient(w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    r = xx * 255 // max(w - 1, 1)
    g = yy * 255 // max(h - 1, 1)
    b = (xx * 3 + yy * 5) % 256
    return np.stack([r, g, b], -1).astype(np.uint8)


def write_png(
    path: Path,
    arr: np.ndarray,
    color_type: int,
    bit_depth: int = 16,
    trns: bytes | None = None,
):
    """A minimal PNG writer, for the 16-bit layouts Pillow cannot save itself."""
    h, w = arr.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = np.ascontiguousarray(arr.astype(dtype)).reshape(h, -1).tobytes()
    stride = len(raw) // h
    data = b"".join(b"\x00" + raw[i * stride : (i + 1) * stride] for i in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    out = b"\x89PNG\r\n\x1a\n" + chunk(
        b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    )
    if trns is not None:
        out += chunk(b"tRNS", trns)
    out += chunk(b"IDAT", zlib.compress(data, 1)) + chunk(b"IEND", b"")
    path.write_bytes(out)


def assert_exact(got: np.ndarray, ref: np.ndarray, what: str):
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != reference {ref.shape}"
    if not np.array_equal(got, ref):
        diff = np.abs(got - ref) * STD255[None, :, None, None]
        pytest.fail(
            f"{what}: not bit-identical, max diff {diff.max():.2f} levels at {np.argwhere(diff > 0)[:3].tolist()}"
        )


# --------------------------------------------------------------------------------------------
# export/testing/reference.py against the literal model card code
# --------------------------------------------------------------------------------------------

GRID_SIZES = [
    1,
    2,
    3,
    5,
    7,
    10,
    16,
    100,
    200,
    224,
    333,
    447,
    448,
    449,
    500,
    600,
    777,
    800,
    1000,
    1600,
    4000,
]


def test_reference_grid_matches_model_card():
    for mn, mx in [(1, m) for m in range(1, 41)] + [
        (2, 2),
        (2, 3),
        (5, 5),
        (7, 8),
        (13, 14),
        (3, 12),
        (6, 40),
    ]:
        for w in GRID_SIZES:
            for h in GRID_SIZES:
                assert reference.closest_grid(w, h, mn, mx) == oracle_grid(
                    w, h, mn, mx
                ), (w, h, mn, mx)


@pytest.mark.parametrize(
    "size", [(1, 1), (10, 10), (447, 449), (800, 600), (333, 777), (1600, 200), (5, 4)]
)
@pytest.mark.parametrize("minmax", [(1, 12), (1, 6), (2, 2)])
def test_reference_tiles_match_model_card(size, minmax):
    img = Image.fromarray(noise(*size, seed=size[0]))
    mn, mx = minmax
    ours = reference.dynamic_preprocess(
        img, min_num=mn, max_num=mx, image_size=448, use_thumbnail=True
    )
    oracle = oracle_dynamic_preprocess(
        img, min_num=mn, max_num=mx, image_size=448, use_thumbnail=True
    )
    assert len(ours) == len(oracle)
    for a, b in zip(ours, oracle, strict=True):
        assert a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_reference_normalisation_matches_torch():
    """`to_tensor_normalize` against torchvision's ToTensor/Normalize arithmetic done in torch."""
    torch = pytest.importorskip("torch")
    values = np.arange(256, dtype=np.uint8)
    img = np.stack([values, values[::-1], np.roll(values, 77)], -1).reshape(16, 16, 3)
    ours = reference.to_tensor_normalize(Image.fromarray(img), input_size=16)
    t = torch.from_numpy(img).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.as_tensor(reference.IMAGENET_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(reference.IMAGENET_STD, dtype=torch.float32).view(-1, 1, 1)
    t = t.sub_(mean).div_(std)
    assert np.array_equal(ours, t.numpy())


# --------------------------------------------------------------------------------------------
# Bit-exact: lossless inputs
# --------------------------------------------------------------------------------------------

SIZES = [
    (1, 1),
    (10, 10),
    (448, 448),
    (447, 449),
    (800, 600),
    (600, 800),
    (1600, 200),
    (200, 1600),
    (333, 777),
    (1, 500),
]


@pytest.mark.parametrize("max_tiles", [1, 6, 12, 40])
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_png_bit_exact(binary, tmp_path, size, max_tiles):
    w, h = size
    arr = noise(w, h, seed=w * 7 + h) if (w + h + max_tiles) % 2 else gradient(w, h)
    path = tmp_path / f"img_{w}x{h}.png"
    Image.fromarray(arr).save(path, compress_level=1)
    got = preprocess(binary, path, tmp_path, max_tiles=max_tiles)
    ref = reference.load_image(path, max_num=max_tiles)
    assert_exact(got, ref, f"{w}x{h} max_tiles={max_tiles}")


@pytest.mark.parametrize(
    ("size", "max_tiles"), [((4000, 3000), 12), ((4000, 3000), 40), ((5000, 2000), 12)]
)
def test_large_png_bit_exact(binary, tmp_path, size, max_tiles):
    w, h = size
    path = tmp_path / "large.png"
    Image.fromarray(noise(w, h, seed=3)).save(path, compress_level=0)
    got = preprocess(binary, path, tmp_path, max_tiles=max_tiles)
    assert_exact(got, reference.load_image(path, max_num=max_tiles), f"{w}x{h}")


def test_8000x6000_works(binary, tmp_path):
    """A 48-megapixel photo must decode within the limits and still be exact."""
    path = tmp_path / "huge.png"
    Image.fromarray(gradient(8000, 6000)).save(path, compress_level=1)
    got = preprocess(binary, path, tmp_path)
    assert_exact(got, reference.load_image(path), "8000x6000")


@pytest.mark.parametrize(
    ("minmax", "size", "grid"),
    [
        ((2, 2), (500, 400), (1, 2)),
        ((2, 2), (2000, 1600), (2, 1)),
        ((14, 14), (530, 280), (7, 2)),
    ],
)
def test_set_order_tie_break(binary, tmp_path, minmax, size, grid):
    """Grids where only CPython's set iteration order decides (e.g. a 5:4 image -> 1x2)."""
    mn, mx = minmax
    assert oracle_grid(*size, mn, mx) == grid
    path = tmp_path / "tie.png"
    Image.fromarray(gradient(*size)).save(path)
    got = preprocess(binary, path, tmp_path, max_tiles=mx, min_tiles=mn)
    assert_exact(
        got, reference.load_image(path, max_num=mx, min_num=mn), f"tie {minmax} {size}"
    )


def _mode_images(tmp_path: Path, w: int, h: int) -> dict[str, Path]:
    base = noise(w, h, seed=11)
    grad = gradient(w, h)
    rng = np.random.default_rng(5)
    files: dict[str, Path] = {}

    def save(name, im, **kw):
        files[name] = tmp_path / name
        im.save(files[name], **kw)

    save("L.png", Image.fromarray(base[..., 0]))
    save("LA.png", Image.fromarray(base[..., :2], "LA"))
    save("RGBA.png", Image.fromarray(np.dstack([base, base[..., :1]]), "RGBA"))
    pal = Image.fromarray(grad).quantize(200)
    save("P.png", pal)
    save("P_transparency.png", pal, transparency=5)
    save("P_4bit.png", Image.fromarray(grad).quantize(16), bits=4)
    save("1bit.png", Image.fromarray(base[..., 0] > 128))
    save("L_transparency.png", Image.fromarray(base[..., 0]), transparency=7)
    save("RGB_transparency.png", Image.fromarray(base), transparency=(1, 2, 3))
    gray16 = rng.integers(0, 65536, (h, w)).astype(np.uint16)
    gray16[: h // 4] = rng.integers(0, 300, (h // 4, w))  # values around the 255 clip
    for name, arr, ct, trns in [
        ("gray16.png", gray16, 0, None),
        ("gray16_transparency.png", gray16, 0, b"\x00\x09"),
        ("rgb16.png", rng.integers(0, 65536, (h, w, 3)), 2, None),
        ("rgba16.png", rng.integers(0, 65536, (h, w, 4)), 6, None),
        ("la16.png", rng.integers(0, 65536, (h, w, 2)), 4, None),
    ]:
        files[name] = tmp_path / name
        write_png(files[name], arr, ct, trns=trns)
    save("rgb.bmp", Image.fromarray(base))
    save("palette.gif", pal)
    save("rgb.tif", Image.fromarray(base))
    save("lzw.tif", Image.fromarray(grad), compression="tiff_lzw")
    save("lossless.webp", Image.fromarray(grad), lossless=True)
    rgba = np.dstack([grad, base[..., :1]])
    save("rgba_lossless.webp", Image.fromarray(rgba, "RGBA"), lossless=True)
    save("palette_transparency.gif", pal, transparency=3)
    save("rgba.tif", Image.fromarray(rgba, "RGBA"))
    save("gray16.tif", Image.fromarray(gray16))
    return files


MODE_NAMES = [
    "L.png",
    "LA.png",
    "RGBA.png",
    "P.png",
    "P_transparency.png",
    "P_4bit.png",
    "1bit.png",
    "L_transparency.png",
    "RGB_transparency.png",
    "gray16.png",
    "gray16_transparency.png",
    "rgb16.png",
    "rgba16.png",
    "la16.png",
    "rgb.bmp",
    "palette.gif",
    "rgb.tif",
    "lzw.tif",
    "lossless.webp",
    "rgba_lossless.webp",
    "palette_transparency.gif",
    "rgba.tif",
    "gray16.tif",
]


@pytest.mark.parametrize("size", [(448, 448), (640, 360)])
def test_modes_bit_exact(binary, tmp_path, size):
    """Pillow's convert('RGB') rules: alpha dropped, palettes expanded, 16-bit gray clipped."""
    files = _mode_images(tmp_path, *size)
    assert sorted(files) == sorted(MODE_NAMES)
    assert Image.open(files["gray16.png"]).mode == "I;16"
    failures = []
    for name in MODE_NAMES:
        got = preprocess(binary, files[name], tmp_path, max_tiles=6)
        ref = reference.load_image(files[name], max_num=6)
        if got.shape != ref.shape or not np.array_equal(got, ref):
            failures.append(name)
    assert not failures, f"not bit-identical to Pillow: {failures}"


# --------------------------------------------------------------------------------------------
# Bit-exact: JPEG (libjpeg-turbo, as in Pillow's wheels), every kind Pillow writes. The kinds Pillow
# cannot write (4:1:1, 4:4:0, arithmetic coding, restart markers, Adobe RGB, YCCK, lossless) are
# encoded by libjpeg-turbo in tests/jpeg.rs and compared with Pillow's decode there.
# --------------------------------------------------------------------------------------------


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Photo-like content: smooth colour fields, texture, hard-edged shapes (every frequency band)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 6, 3)
        img[..., c] = 127 + 100 * np.sin(
            2 * np.pi * (fx * x / max(w, 1) + fy * y / max(h, 1)) + ph
        )
    img += rng.normal(0, 12, img.shape)
    for _ in range(8):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        img[y0 : y0 + max(h // 6, 1), x0 : x0 + max(w // 6, 1)] = rng.integers(0, 256, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


CONTENT = {"photo": photo, "noise": noise, "gradient": lambda w, h, seed=0: gradient(w, h)}


def _jpeg_cases():
    cases = []
    for size in [(448, 448), (800, 600), (333, 777), (1600, 200), (17, 9), (1, 1)]:
        for content in ["photo", "noise", "gradient"]:
            for q, sub, prog in [
                (50, "4:2:0", False),
                (75, "4:2:0", False),
                (95, "4:4:4", False),
                (85, "4:2:2", False),
                (85, "4:2:0", True),
                (100, "4:4:4", False),
                (92, "4:2:2", True),
            ]:
                if size in ((17, 9), (1, 1)) and content != "noise":
                    continue
                if prog and q > 90 and content == "noise":
                    continue  # Pillow's encoder fails on these ("Suspension not allowed here")
                cases.append((size, content, q, sub, prog))
    cases += [((3000, 2000), "photo", 90, "4:2:0", False), ((8001, 3), "noise", 80, "4:2:0", False)]
    cases += [((3, 8001), "noise", 80, "4:2:2", True)]
    return cases


@pytest.mark.parametrize(
    ("size", "content", "quality", "subsampling", "progressive"),
    _jpeg_cases(),
    ids=[
        f"{s[0]}x{s[1]}-{c}-q{q}-{sub.replace(':', '')}{'-prog' if p else ''}"
        for s, c, q, sub, p in _jpeg_cases()
    ],
)
def test_jpeg_bit_exact(binary, tmp_path, size, content, quality, subsampling, progressive):
    w, h = size
    path = tmp_path / "img.jpg"
    Image.fromarray(CONTENT[content](w, h, seed=w + h)).save(
        path, quality=quality, subsampling=subsampling, progressive=progressive
    )
    assert_exact(preprocess(binary, path, tmp_path), reference.load_image(path), path.name)


@pytest.mark.parametrize("kind", ["L", "CMYK"])
@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_gray_and_cmyk_bit_exact(binary, tmp_path, kind, progressive):
    img = Image.fromarray(photo(640, 480, seed=3)).convert(kind)
    path = tmp_path / f"{kind}.jpg"
    img.save(path, quality=90, progressive=progressive)
    assert Image.open(path).mode == kind
    assert_exact(preprocess(binary, path, tmp_path), reference.load_image(path), kind)


def test_jpeg_cmyk_every_value(binary, tmp_path):
    """Pillow's inverted-CMYK rule and its own CMYK -> RGB formula over all (C, K) pairs: quality 100
    4:4:4 so that libjpeg returns the stored values nearly unchanged, and the tiles equal Pillow's."""
    c = np.arange(256, dtype=np.uint8)
    cc, kk = np.meshgrid(c, c, indexing="ij")
    cmyk = np.stack([cc, 255 - cc, cc // 2, kk], -1)
    path = tmp_path / "cmyk_all.jpg"
    Image.fromarray(cmyk, "CMYK").save(path, quality=100, subsampling="4:4:4")
    assert_exact(
        preprocess(binary, path, tmp_path, max_tiles=1), reference.load_image(path, max_num=1), "cmyk"
    )


def test_jpeg_with_icc_and_comments_bit_exact(binary, tmp_path):
    """APP2 ICC profile and COM segments are skipped (Pillow does not apply the profile)."""
    path = tmp_path / "icc.jpg"
    icc = b"\0\0\2\0" + bytes(range(256)) * 300  # large enough to span several APP2 segments
    Image.fromarray(photo(500, 400, seed=9)).save(
        path, quality=88, icc_profile=icc, comment=b"made by test"
    )
    assert_exact(preprocess(binary, path, tmp_path), reference.load_image(path), "icc")


@pytest.mark.parametrize("cut", [0.05, 0.5, 0.9, -3, -2, -1])
@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg_refused_like_pillow(binary, tmp_path, cut, progressive):
    path = tmp_path / "full.jpg"
    Image.fromarray(photo(300, 200, seed=1)).save(path, quality=85, progressive=progressive)
    data = path.read_bytes()
    end = int(len(data) * cut) if isinstance(cut, float) else len(data) + cut
    cut_path = tmp_path / "cut.jpg"
    cut_path.write_bytes(data[:end])
    with pytest.raises(OSError):  # noqa: PT011 (any refusal: Pillow's messages vary by decoder)
        Image.open(cut_path).convert("RGB")
    out = tmp_path / "out.npy"
    r = run_cli(binary, cut_path, out)
    assert r.returncode != 0 and "panicked" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(cut_path) in lines[0] and "truncated" in lines[0], r.stderr
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# EXIF orientation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_png(binary, tmp_path, orientation):
    path = tmp_path / f"exif{orientation}.png"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(noise(900, 500, seed=orientation)).save(path, exif=exif.tobytes())
    # Default: ignored, like the reference.
    assert_exact(
        preprocess(binary, path, tmp_path), reference.load_image(path), "exif ignored"
    )
    # --exif: same as the reference applied to ImageOps.exif_transpose(img).
    transposed = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    ref = np.stack(
        [
            reference.to_tensor_normalize(t)
            for t in reference.dynamic_preprocess(transposed, use_thumbnail=True)
        ]
    )
    assert_exact(
        preprocess(binary, path, tmp_path, exif=True),
        ref,
        f"exif {orientation} applied",
    )
    assert_exact(
        ref,
        reference.load_image(path, apply_exif=True),
        "reference.load_image(apply_exif)",
    )


def test_exif_orientation_jpeg(binary, tmp_path):
    path = tmp_path / "exif6.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo(900, 500, seed=6)).save(path, exif=exif.tobytes(), quality=95)
    for apply in (False, True):
        assert_exact(
            preprocess(binary, path, tmp_path, exif=apply),
            reference.load_image(path, apply_exif=apply),
            f"exif 6 apply={apply}",
        )


# --------------------------------------------------------------------------------------------
# Bad input: a one-line error naming the file, non-zero exit, never a panic
# --------------------------------------------------------------------------------------------


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good_png = tmp_path / "good.png"
    Image.fromarray(noise(64, 48)).save(good_png)
    good_jpg = tmp_path / "good.jpg"
    Image.fromarray(noise(64, 48)).save(good_jpg, quality=90)
    png, jpg = good_png.read_bytes(), good_jpg.read_bytes()
    cases = {
        "missing": (tmp_path / "does_not_exist.png", "not found"),
        "text": (tmp_path / "notes.png", "not a recognised image"),
        "empty": (tmp_path / "empty.jpg", "empty"),
        "truncated_png": (tmp_path / "truncated.png", "truncated"),
        "truncated_jpeg": (tmp_path / "truncated.jpg", "truncated"),
        "jpeg_without_eoi": (tmp_path / "no_eoi.jpg", "truncated"),
        "corrupt_png": (tmp_path / "corrupt.png", "cannot load image"),
        "directory": (tmp_path / "a_directory.png", "directory"),
        "too_large": (tmp_path / "bomb.png", "too large"),
    }
    cases["text"][0].write_text("this is not an image\n")
    cases["empty"][0].write_bytes(b"")
    cases["truncated_png"][0].write_bytes(png[: len(png) // 2])
    cases["truncated_jpeg"][0].write_bytes(jpg[: len(jpg) // 2])
    cases["jpeg_without_eoi"][0].write_bytes(jpg[:-2])
    corrupt = bytearray(png)
    for i in range(60, len(corrupt), 7):
        corrupt[i] ^= 0x5A
    cases["corrupt_png"][0].write_bytes(bytes(corrupt))
    cases["directory"][0].mkdir()
    # 20000 x 10000 = 200 Mpx header (above Pillow's 178,956,970-pixel bomb limit); no pixels.
    write_png(cases["too_large"][0], np.zeros((1, 1, 3)), 2, bit_depth=8)
    data = bytearray(cases["too_large"][0].read_bytes())
    data[16:24] = struct.pack(">II", 20000, 10000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    cases["too_large"][0].write_bytes(bytes(data))
    return cases


BAD_NAMES = [
    "missing",
    "text",
    "empty",
    "truncated_png",
    "truncated_jpeg",
    "jpeg_without_eoi",
    "corrupt_png",
    "directory",
    "too_large",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_input_errors(binary, tmp_path, name):
    path, expect = _bad_inputs(tmp_path)[name]
    out = tmp_path / "out.npy"
    r = run_cli(binary, path, out)
    assert r.returncode != 0
    assert "panicked" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(path) in lines[0]
    assert expect in lines[0], lines[0]
    assert not out.exists()
    if name in ("truncated_png", "truncated_jpeg", "jpeg_without_eoi", "text", "empty"):
        # Pillow refuses these too (unless ImageFile.LOAD_TRUNCATED_IMAGES).
        with pytest.raises(OSError):  # noqa: PT011 (any refusal: Pillow's messages vary by decoder)
            Image.open(path).convert("RGB")
    if name == "too_large":
        assert "20000x10000" in lines[0]


def _png_with_chunk(kind: bytes, payload: bytes) -> bytes:
    """A small PNG with one extra ancillary chunk right after IHDR."""
    buf = __import__("io").BytesIO()
    Image.fromarray(noise(64, 48)).save(buf, "PNG")
    data = buf.getvalue()
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return data[:33] + struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc) + data[33:]


def _bomb_cases() -> dict[str, bytes]:
    def z(n):
        return zlib.compress(b"\0" * n, 9)

    cases = {
        "iccp_900k": _png_with_chunk(b"iCCP", b"icc\0\0" + z(900_000)),
        "iccp_2m": _png_with_chunk(b"iCCP", b"icc\0\0" + z(2 << 20)),
        "iccp_64m": _png_with_chunk(b"iCCP", b"icc\0\0" + z(64 << 20)),
        "ztxt_2m": _png_with_chunk(b"zTXt", b"key\0\0" + z(2 << 20)),
        "itxt_2m": _png_with_chunk(b"iTXt", b"key\0\1\0en\0k\0" + z(2 << 20)),
        "itxt_plain": _png_with_chunk(b"iTXt", b"key\0\0\0en\0k\0" + b"x" * 5000),
        "iccp_corrupt_zlib": _png_with_chunk(b"iCCP", b"icc\0\0" + b"not zlib at all"),
    }
    for lossless in (False, True):
        buf = __import__("io").BytesIO()
        Image.fromarray(photo(64, 48)).save(buf, "WEBP", lossless=lossless, quality=80)
        webp = buf.getvalue()
        for cut in (1, 2, 3, 4):
            cases[f"webp_{'lossless' if lossless else 'lossy'}_cut{cut}"] = webp[:-cut]
    return cases


@pytest.mark.parametrize("name", list(_bomb_cases()))
def test_chunk_bombs_and_cut_webp_as_pillow(binary, tmp_path, name):
    """Accepted exactly when Pillow accepts (and then bit-exact); refused in one line otherwise. Pillow
    refuses PNG text / ICC chunks that inflate past 1 MiB and WebP files shorter than their RIFF size."""
    path = tmp_path / (name + (".webp" if name.startswith("webp") else ".png"))
    path.write_bytes(_bomb_cases()[name])
    try:
        ref = reference.load_image(path)
    except (OSError, ValueError):
        ref = None
    out = tmp_path / "out.npy"
    r = run_cli(binary, path, out)
    assert "panicked" not in r.stderr
    if ref is None:
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 3 and len(lines) == 1 and str(path) in lines[0], r.stderr
        assert not out.exists()
    else:
        assert r.returncode == 0, r.stderr
        assert_exact(np.load(out), ref, name)
