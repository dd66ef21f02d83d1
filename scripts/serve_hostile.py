"""Hostile clients against `internvl serve`, measured: what each attack costs the server (status, seconds,
CPU, descriptors, exit time). Run it for two binaries to compare them (the figures in the README and the
closing notes come from it); tests/python/test_serve_hostile.py asserts the same classes in CI.

    .venv/bin/python -m scripts.serve_hostile [--binary target/release/internvl] [--model build/fixtures/model]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import signal
import socket
import threading
import time
from pathlib import Path

import httpx

from tests.python.test_serve import Server
from tests.python.test_serve_hostile import canvas_bomb, cpu_seconds, open_fds, post_head, raw_request


def video(gif: bytes, frames: int = 8) -> dict:
    url = "data:image/gif;base64," + base64.b64encode(gif).decode()
    return {"model": "model", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url, "num_frames": frames}}, {"type": "text", "text": "x"}]}]}


def attacks(binary: Path, model: Path) -> None:
    s = Server(binary, model, "--api-key", "k", "--parallel", "1", "--queue", "1")
    auth = {"Authorization": "Bearer k"}
    host, port = s.url.removeprefix("http://").split(":")
    try:
        try:
            t = time.time()
            line = raw_request(s.url, post_head(60_000_000), timeout=10)
            print(f"no key, 60 MB Content-Length, no body: {line!r} after {time.time() - t:.2f} s")
        except TimeoutError:
            print("no key, 60 MB Content-Length, no body: no answer within 10 s")
        bomb = canvas_bomb(9000, 9000, 40)
        t = time.time()
        r = httpx.post(s.url + "/v1/chat/completions", json=video(bomb), headers=auth, timeout=300)
        took = time.time() - t
        print(f"canvas bomb ({len(bomb)} B GIF, 40 1x1 frames on 9000x9000): {r.status_code} after {took:.2f} s")
        slow = video(canvas_bomb(4000, 4000, 40))
        c0 = cpu_seconds(s.proc.pid)
        httpx.post(s.url + "/v1/chat/completions", json=slow, headers=auth, timeout=120)
        whole = cpu_seconds(s.proc.pid) - c0
        c0 = cpu_seconds(s.proc.pid)
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(s.url + "/v1/chat/completions", json=slow, headers=auth, timeout=0.5)
        admitted = s.metric("internvl_requests_admitted")
        time.sleep(whole + 1)
        print(f"4000x4000 GIF abandoned after 0.5 s: admitted right after {admitted:.0f}, "
              f"CPU spent {cpu_seconds(s.proc.pid) - c0:.2f} s (the whole request: {whole:.2f} s)")
        base = open_fds(s.proc.pid)
        socks = [socket.create_connection((host, int(port))) for _ in range(200)]
        time.sleep(1)
        held = open_fds(s.proc.pid)
        time.sleep(15)
        print(f"200 idle sockets: server descriptors {base} -> {held}, {open_fds(s.proc.pid)} 15 s later")
        for x in socks:
            x.close()
    finally:
        s.stop()


def shutdown(binary: Path, model: Path) -> None:
    s = Server(binary, model, "--grace-period", "0")
    body = video(canvas_bomb(4000, 4000, 40))

    def ask():
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)

    threading.Thread(target=ask, daemon=True).start()
    time.sleep(0.7)
    t = time.time()
    s.proc.send_signal(signal.SIGTERM)
    try:
        s.proc.wait(60)
        print(f"--grace-period 0, SIGTERM 0.7 s into a decode of seconds: exited after {time.time() - t:.1f} s")
    finally:
        s.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--binary", type=Path, default=Path("target/release/internvl"))
    p.add_argument("--model", type=Path, default=Path("build/fixtures/model"))
    a = p.parse_args()
    attacks(a.binary, a.model)
    shutdown(a.binary, a.model)


if __name__ == "__main__":
    main()
