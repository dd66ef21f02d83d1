"""The tests: tests/python (pytest), tests/oracle (the official InternVL code's behaviour, run in the reference
venvs), tests/fixtures.py (the fixtures the Rust and Python tests share), tests/videos.py (test clips).
Imported from the repository root as a package (pytest's `pythonpath`, `python -m` from the root)."""
