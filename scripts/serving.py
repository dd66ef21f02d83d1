"""What the serving scripts share: an `internvl serve` started on a free loopback port."""

from __future__ import annotations

import re
import subprocess
import threading
from pathlib import Path


def start(binary: Path, model: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """The server process and its base URL, once the model is loaded (its stderr is drained after)."""
    proc = subprocess.Popen([str(binary), "serve", "--model", str(model), "--port", "0", *flags],
                            stderr=subprocess.PIPE, text=True)
    url = None
    for line in proc.stderr:
        m = re.search(r"listening on (http://\S+) \(loading", line)
        url = m.group(1) if m else url
        if "model loaded" in line:
            break
    if url is None or proc.poll() is not None:
        raise RuntimeError(f"internvl serve did not start (exit {proc.poll()})")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, url
