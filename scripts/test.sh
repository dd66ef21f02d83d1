#!/usr/bin/env bash
# The whole test suite, fastest lanes first so a broken change fails in a minute or two:
#   1. formatting and the fuzz crate's lockfile (seconds, before anything is installed)
#   2. lint (ruff, clippy) and the unit tests that need no fixtures (the scheduler, limits, tiling, ...)
#   3. the fixtures (tiny checkpoints exported here), then the Python tests (exporter vs PyTorch,
#      preprocessing parity, the server through the official openai client) and the Rust integration tests
#      (end-to-end token parity with PyTorch and the official chat(), bad inputs, kernels)
#   4. the edge bundle in a fresh minimal Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
lane() { printf '\n== %s ==\n' "$*" >&2; }

lane "1/4 format, fuzz lockfile"
cargo fmt --all -- --check
# The fuzz crate is its own workspace over the library alone; its lockfile must be current.
cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null

lane "2/4 setup, lint, unit tests"
scripts/setup.sh
command -v cmake >/dev/null || export CMAKE="$PWD/.venv/bin/cmake"  # libjpeg-turbo's build (setup.sh)
.venv/bin/ruff check  # every Python file; the rules are in pyproject.toml
cargo clippy --release --all-targets --quiet -- -D warnings
cargo test --release --quiet --workspace --lib --bins

lane "3/4 fixtures, Python tests, Rust integration tests"
.venv/bin/python tests/fixtures.py build/fixtures
.venv/bin/python -m pytest -q  # tests/python (pyproject.toml: testpaths)
cargo test --release --workspace

lane "4/4 the edge bundle in a fresh minimal Debian (debootstrap, about 40 s)"
scripts/fresh_box.sh build/fixtures/model build/fresh-box
