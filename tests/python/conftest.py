"""Shared pytest fixtures: the tiny models, images and PyTorch goldens of tests/fixtures.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session")
def fixtures() -> Path:
    """build/fixtures, (re)built when the exporter or the fixture script changed."""
    import fixtures as fx

    out = ROOT / "build" / "fixtures"
    fx.main(out)
    return out
