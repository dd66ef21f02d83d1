"""Shared pytest fixtures: the tiny models, images and PyTorch goldens of tests/fixtures.py, and the
`internvl` binary."""

from __future__ import annotations

import os
import subprocess
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


@pytest.fixture(scope="session")
def binary() -> Path:
    """The release binary (built here when stale), or `$INTERNVL_BIN`."""
    env = os.environ.get("INTERNVL_BIN")
    if env:
        path = Path(env)
    else:
        subprocess.run(["cargo", "build", "--release", "--bin", "internvl"], cwd=ROOT, check=True)
        path = ROOT / "target" / "release" / "internvl"
    assert path.is_file(), f"internvl binary not found at {path}"
    return path
