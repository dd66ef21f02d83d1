"""Shared pytest fixtures: the tiny models, images and PyTorch goldens of tests/fixtures.py."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def fixtures() -> Path:
    """build/fixtures, (re)built when the exporter or the fixture script changed."""
    from tests import fixtures as fx

    out = ROOT / "build" / "fixtures"
    fx.main(out)
    return out
