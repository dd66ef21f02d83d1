#!/usr/bin/env bash
# Installs what the project needs on a fresh machine: the pinned Python stack in .venv (export,
# PyTorch reference, ONNX Runtime's shared library for the Rust binary) and the release build.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import torch, transformers, onnx, onnxruntime, PIL, pytest, ruff, openai, httpx, av, decord" 2>/dev/null; then
  echo "[setup] creating .venv (about 1.5 min, 5.7 GB)" >&2
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r export/requirements.txt
fi
# This checkout's Python package (pyproject.toml: `export`), editable and without dependencies (the pins above
# are the lock): `import export` then works from any folder, e.g. for tests/fixtures.py, which runs by path.
# Built offline by the venv's own setuptools (torch requires setuptools>=77). Redone when the venv has none,
# or one of another checkout.
if ! .venv/bin/python -I -c "import export, pathlib, sys; sys.exit(pathlib.Path(export.__file__).parent != pathlib.Path(sys.argv[1]).resolve())" export 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
fi
# libjpeg-turbo (the JPEG decoder Pillow uses) is built from source with CMake: the system's, or the
# PyPI one in .venv.
if ! command -v cmake >/dev/null && [ ! -x .venv/bin/cmake ]; then
  .venv/bin/pip install -q --disable-pip-version-check "cmake>=3.16,<5"
fi
command -v cmake >/dev/null || export CMAKE="$PWD/.venv/bin/cmake"
# FFmpeg's programs: `--video` runs ffprobe / ffmpeg (the binary itself starts without them). Debian's
# package where we may install it; otherwise the video tests say what is missing.
if ! command -v ffprobe >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing Debian's ffmpeg (for --video)" >&2
  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ffmpeg) >/dev/null 2>&1 \
    || echo "[setup] could not install ffmpeg; --video tests will fail saying ffprobe is missing" >&2
fi
cargo build --release --quiet
