"""The Python project's own wiring: pyproject.toml and export/requirements.txt (what scripts/setup.sh installs)
list the same pinned requirements, and nothing reaches its imports by editing sys.path."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_requirements_txt_is_pyprojects_dependencies_and_test_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    want = project["dependencies"] + project["optional-dependencies"]["test"]
    lines = (ROOT / "export" / "requirements.txt").read_text().splitlines()
    got = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert got == want


def test_no_sys_path_edits():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py", "*.sh"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    bad = [f for f in files if (ROOT / f).is_file() and re.search(r"sys\.path\.(insert|append)|sys\.path\s*=",
                                                                   (ROOT / f).read_text(errors="replace"))]
    assert not bad, f"sys.path edited in {bad}: import as packages (pyproject.toml, the README's Python layout)"


def test_export_imports_from_any_folder(tmp_path):
    """tests/fixtures.py runs by path (the Rust tests, scripts/test.sh): `export` comes from the install."""
    r = subprocess.run([sys.executable, "-I", "-c", "import export; print(export.__file__)"], cwd=tmp_path,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"`export` is not installed in {sys.prefix} (run scripts/setup.sh): {r.stderr}"
    assert Path(r.stdout.strip()).resolve() == ROOT / "export" / "__init__.py"
