"""pytest tests (`python -m pytest` from the repository root; testpaths in pyproject.toml)."""
