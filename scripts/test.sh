#!/usr/bin/env bash
# The whole test suite: lint, Python tests (exporter vs PyTorch, preprocessing parity), Rust tests
# (unit tests, end-to-end token parity with PyTorch, bad inputs), the edge bundle on a fresh Debian.
# Fixtures are built in this run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
command -v cmake >/dev/null || export CMAKE="$PWD/.venv/bin/cmake"  # libjpeg-turbo's build (setup.sh)
.venv/bin/ruff check export tests fuzz
cargo fmt --all -- --check
cargo clippy --release --all-targets --quiet -- -D warnings
.venv/bin/python tests/fixtures.py build/fixtures
.venv/bin/python -m pytest -q tests/python
cargo test --release
# The edge bundle in a fresh minimal Debian (debootstrap, about 40 s): unpacked, checked, answering.
scripts/fresh_box.sh build/fixtures/model build/fresh-box
