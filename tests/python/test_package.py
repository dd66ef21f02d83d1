"""`internvl package`: the archive holds the binary, ONNX Runtime, the model folder, a README and
SHA256SUMS; unpacked anywhere it answers as the original does; a damaged model folder, an output inside
the model folder and an incomplete GPU library folder are refused. (scripts/fresh_box.sh runs the
bundle in a minimal Debian.)"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BINARY = ROOT / "target" / "release" / "internvl"


def package(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(BINARY), "package", *map(str, args)], capture_output=True, text=True, timeout=300,
                          check=False)


def answer(binary: Path, model: Path, image: Path, env=None) -> str:
    return subprocess.run([str(binary), "run", "--model", str(model), "--image", str(image), "--prompt",
                           "Describe the image.", "--max-new-tokens", "12"], capture_output=True, text=True,
                          check=True, timeout=120, env=env).stdout


def test_bundle_unpacks_checks_and_answers(fixtures, tmp_path):
    out = tmp_path / "bundle.tar.gz"
    r = package("--model", fixtures / "model", "--out", out)
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "x", filter="data")
    top = tmp_path / "x" / "internvl-model"
    assert {"internvl-model/internvl", "internvl-model/libonnxruntime.so.1.31.1", "internvl-model/README.txt",
            "internvl-model/SHA256SUMS", "internvl-model/models/model/manifest.json"} <= set(names)
    sums = dict(reversed(line.split("  ", 1)) for line in (top / "SHA256SUMS").read_text().splitlines())
    files = sorted(str(p.relative_to(top)) for p in top.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    assert sorted(sums) == files
    for name, digest in sums.items():
        assert hashlib.sha256((top / name).read_bytes()).hexdigest() == digest, name
    assert "./internvl serve --model models/model" in (top / "README.txt").read_text()
    image = fixtures / "images" / "448x448_1.png"
    # Nothing from this checkout: no environment, the bundle's own ONNX Runtime beside its binary.
    got = answer(top / "internvl", top / "models" / "model", image, env={"PATH": "/usr/bin:/bin"})
    assert got == answer(BINARY, fixtures / "model", image)
    # A second run does not replace the archive without --force.
    assert package("--model", fixtures / "model", "--out", out).returncode == 2


def test_damaged_folders_and_bad_outputs_are_refused(fixtures, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(fixtures / "model", model)
    data = model / "vision.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the checksum tells
    data.write_bytes(bytes(raw))
    out = tmp_path / "b.tar.gz"
    r = package("--model", model, "--out", out)
    assert r.returncode != 0 and "vision.onnx.data" in r.stderr and "checksum" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".b.tar.gz*")), "a refused bundle left a file"
    r = package("--model", fixtures / "model", "--out", fixtures / "model" / "b.tar.gz")
    assert r.returncode == 2 and "inside the model folder" in r.stderr
    # A manifest whose name would climb out of where the archive is unpacked.
    evil = tmp_path / "evil"
    shutil.copytree(fixtures / "model", evil)
    m = json.loads((evil / "manifest.json").read_text())
    m["name"] = "../../etc"
    (evil / "manifest.json").write_text(json.dumps(m))
    r = package("--model", evil, "--out", out)
    assert r.returncode != 0 and "not a plain folder name" in r.stderr and not out.exists(), r.stderr
    (tmp_path / "gpu").mkdir()
    r = package("--model", fixtures / "model", "--out", out, "--gpu", tmp_path / "gpu")
    assert r.returncode == 2 and "libonnxruntime_providers_cuda.so" in r.stderr, r.stderr


@pytest.fixture(scope="module", autouse=True)
def built():
    subprocess.run(["cargo", "build", "--release", "--bin", "internvl"], cwd=ROOT, check=True)
