"""Shared pytest fixtures: the tiny models, images and PyTorch goldens of tests/fixtures.py, and the
`internvl` binary."""

from __future__ import annotations

import os
import subprocess
import threading
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


@pytest.fixture(scope="session")
def image_host(fixtures):
    """An http server on loopback: /img.png, /hop/N (N redirects, then the image), /big (2 MB of noise)."""
    import http.server

    png = (fixtures / "images" / "448x448_1.png").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/hop/"):
                n = int(self.path.split("/")[-1])
                self.send_response(302)
                self.send_header("Location", f"/hop/{n - 1}" if n > 1 else "/img.png")
                self.end_headers()
                return
            body = png if self.path == "/img.png" else b"\0" * (2 << 20) if self.path == "/big" else None
            if body is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
