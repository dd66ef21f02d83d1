"""`internvl serve` against clients that make it pay before it may: raw sockets and bodies built by hand, on
loopback, each bounded in time. Each test names the cost that must be refused before it is paid, and checks
that the server still answers afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import struct
import threading
import time
from fractions import Fraction
from pathlib import Path

import httpx

from tests.python.test_serve import Server


def raw_request(url: str, head: str, timeout: float = 10.0) -> str:
    """Sends `head` (request line and headers, no body) and returns the status line of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.encode())
        answer = s.recv(4096).decode(errors="replace")
    return answer.split("\r\n", 1)[0]


def post_head(length: int, key: str | None = None) -> str:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"{auth}Content-Length: {length}\r\n\r\n")


def test_auth_and_the_body_limit_come_before_the_body(binary, fixtures):
    # A 60 MB Content-Length whose body never comes: the answer must not wait for it (it used to, forever).
    s = Server(binary, fixtures / "model", "--api-key", "k", "--body-limit", "1000000")
    try:
        assert raw_request(s.url, post_head(60_000_000)).startswith("HTTP/1.1 401")
        assert raw_request(s.url, post_head(60_000_000, key="wrong")).startswith("HTTP/1.1 401")
        assert raw_request(s.url, post_head(60_000_000, key="k")).startswith("HTTP/1.1 413")
        # A body that grows past the limit while it streams in (chunked, no length) is cut at the limit.
        r = httpx.post(s.url + "/v1/chat/completions", headers={"Authorization": "Bearer k"},
                       content=iter([b"x" * 600_000, b"x" * 600_000]), timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
    finally:
        s.stop()


def test_media_references_are_counted_before_any_is_read(binary, fixtures, tmp_path):
    # 65 references, the last to a file that is not there: refused for their number before any is opened
    # (before, every file was read first, and the missing one answered 403).
    image = tmp_path / "a.png"
    image.write_bytes((fixtures / "images" / "448x448_1.png").read_bytes())
    parts = [{"type": "image_url", "image_url": {"url": f"file://{image}"}}] * 64
    parts.append({"type": "image_url", "image_url": {"url": f"file://{tmp_path}/missing.png"}})
    s = Server(binary, fixtures / "model", "--media-root", str(tmp_path))
    try:
        body = {"model": "model", "max_tokens": 2,
                "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "x"}]}]}
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "too_many_images" and "at most 64" in r.json()["error"]["message"]
        assert s.metric("internvl_requests_admitted") == 0
    finally:
        s.stop()


def canvas_bomb(width: int, height: int, frames: int) -> bytes:
    """A GIF whose frames are 1x1 pixels on a `width` x `height` canvas: a few bytes a frame, each frame
    composited onto the whole canvas when decoded."""
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff")
    for _ in range(frames):
        out += b"\x21\xf9\x04\x04\x0a\x00\x00\x00"  # graphic control: 100 ms, keep the canvas
        out += b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"  # one pixel
    return bytes(out + b"\x3b")


def test_an_animated_canvas_bomb_is_refused_for_its_compositing_cost(binary, fixtures):
    gif = canvas_bomb(9000, 9000, 40)
    assert len(gif) < 2000
    s = Server(binary, fixtures / "model")
    try:
        url = "data:image/gif;base64," + base64.b64encode(gif).decode()
        body = {"model": "model", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": url, "num_frames": 2}}, {"type": "text", "text": "x"}]}]}
        before = rss_mb(s.proc.pid)
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        assert "frames on a 9000x9000 canvas" in r.json()["error"]["message"]
        # Its 9000x9000 canvases (324 MB each) are given back.
        assert rss_mb(s.proc.pid) < before + 32, f"RSS {rss_mb(s.proc.pid):.0f} MB, {before:.0f} MB before"
        # A small animation of the same kind still answers.
        body["messages"][0]["content"][0]["video_url"]["url"] = (
            "data:image/gif;base64," + base64.b64encode(canvas_bomb(64, 64, 40)).decode())
        assert httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
        assert s.metric("internvl_requests_admitted") == 0
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
    finally:
        s.stop()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    """Resident memory of a process."""
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_decoding_stops_when_its_client_leaves(binary, fixtures):
    # A 4000x4000 animation of 40 frames takes seconds of compositing. Asked for and abandoned after half a
    # second, its decoding must stop at the next frame (it used to run to the end for nobody), and what it
    # held must be given back once it has stopped.
    gif = canvas_bomb(4000, 4000, 40)
    s = Server(binary, fixtures / "model", "--parallel", "1", "--queue", "0")
    try:
        url = "data:image/gif;base64," + base64.b64encode(gif).decode()
        body = {"model": "model", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": url, "num_frames": 8}}, {"type": "text", "text": "x"}]}]}
        start = cpu_seconds(s.proc.pid)
        assert httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120).status_code == 200
        whole = cpu_seconds(s.proc.pid) - start
        assert whole > 1.0, f"the decoding took only {whole:.2f} s of CPU: too little to tell a stop from the end"
        warm, fds = rss_mb(s.proc.pid), open_fds(s.proc.pid)
        start = cpu_seconds(s.proc.pid)
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(s.url + "/v1/chat/completions", json=body, timeout=0.5)
        deadline = time.time() + whole * 2 + 5
        while s.metric("internvl_requests_admitted") != 0 and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(whole)  # the work it would have done, had it gone on
        abandoned = cpu_seconds(s.proc.pid) - start
        assert abandoned < 0.5 * whole, f"abandoned request used {abandoned:.2f} s of CPU, the whole one {whole:.2f} s"
        assert s.metric("internvl_requests_admitted") == 0
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
        # Memory and descriptors back where the same request, answered, left them.
        assert rss_mb(s.proc.pid) < warm + 32, f"RSS {rss_mb(s.proc.pid):.0f} MB, {warm:.0f} MB before"
        assert open_fds(s.proc.pid) <= fds
    finally:
        s.stop()


def test_malformed_fields_are_named_and_paths_are_not_echoed(binary, fixtures, tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"not a video at all")
    s = Server(binary, fixtures / "model", "--media-root", str(tmp_path), "--api-key", "k")
    try:
        def post(body):
            return httpx.post(s.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"},
                              timeout=60)

        text = [{"role": "user", "content": "x"}]
        for extra, param in [({"model": 5}, "model"), ({"stream_options": 5}, "stream_options"),
                             ({"stream_options": {"include_usage": "yes"}}, "stream_options"),
                             ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                             ({"repetition_penalty": 0}, "repetition_penalty")]:
            r = post({"messages": text, "max_tokens": 2, **extra})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
        clip = {"type": "video_url", "video_url": {"url": f"file://{tmp_path}/clip.mp4"}}
        r = post({"messages": [{"role": "user", "content": [clip, {"type": "text", "text": "x"}]}], "max_tokens": 2})
        assert r.status_code == 400, r.text
        assert str(tmp_path) not in r.text and "<media-root>" in r.text, r.text
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": text}, timeout=10)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    finally:
        s.stop()


def test_shutdown_keeps_its_grace_period_and_leaves_no_temporary_files(binary, fixtures, tmp_path):
    # Left by a killed server (a pid that is gone): swept at start; one of a live process: kept.
    dead = next(p for p in range(4_000_000, 4_100_000) if not Path(f"/proc/{p}").exists())
    (tmp_path / f"internvl-video-{dead}-0123").write_bytes(b"x")
    (tmp_path / f"internvl-video-{os.getpid()}-0123").write_bytes(b"x")
    s = Server(binary, fixtures / "model", "--grace-period", "0", env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("internvl-video-"))
        assert left == [f"internvl-video-{os.getpid()}-0123"], left
        # A decode of seconds (a 4000x4000 animation) is running when SIGTERM comes: the process ends within
        # the grace period and a little, not when the decode would have (it used to wait for it).
        url = "data:image/gif;base64," + base64.b64encode(canvas_bomb(4000, 4000, 40)).decode()
        body = {"model": "model", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": url, "num_frames": 8}}, {"type": "text", "text": "x"}]}]}
        def ask():
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)

        threading.Thread(target=ask, daemon=True).start()
        deadline = time.time() + 10
        while not any(p.name.startswith(f"internvl-video-{s.proc.pid}-") for p in tmp_path.iterdir()):
            assert time.time() < deadline, "the video never reached its decoder"
            time.sleep(0.02)
        signalled = time.time()
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(30)
        took = time.time() - signalled
        assert took < 3.0, f"exit took {took:.1f} s after SIGTERM with --grace-period 0"
        assert not any(p.name.startswith(f"internvl-video-{s.proc.pid}-") for p in tmp_path.iterdir())
    finally:
        s.stop()




def test_idle_slow_and_excess_connections_are_bounded(binary, fixtures):
    s = Server(binary, fixtures / "model", "--header-timeout", "1", "--body-timeout", "1",
               "--max-connections", "8")
    host, port = s.url.removeprefix("http://").split(":")
    sockets = []
    try:
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
        baseline, rss = open_fds(s.proc.pid), rss_mb(s.proc.pid)
        # 30 idle sockets and a slowloris one (headers that never end).
        for _ in range(30):
            sockets.append(socket.create_connection((host, int(port)), timeout=10))
        slow = socket.create_connection((host, int(port)), timeout=10)
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        sockets.append(slow)
        time.sleep(0.5)
        assert open_fds(s.proc.pid) <= baseline + 8, "more connections accepted than --max-connections"
        # The cap is full of idle sockets, each closed after --header-timeout: /health still gets its turn.
        assert httpx.get(s.url + "/health", timeout=15).status_code == 200
        # Every one of them is closed by the server (EOF), and its descriptors are given back.
        for sock in sockets:
            sock.settimeout(15)
            while sock.recv(4096):  # whatever the server says before closing; a timeout fails the test
                pass
        deadline = time.time() + 10
        while open_fds(s.proc.pid) > baseline and time.time() < deadline:
            time.sleep(0.1)
        assert open_fds(s.proc.pid) <= baseline
        assert rss_mb(s.proc.pid) < rss + 16, f"RSS {rss_mb(s.proc.pid):.0f} MB, {rss:.0f} MB before"
        # A body that stops arriving, and one that drips a byte at a time: 408 after --body-timeout, not a
        # connection held for ever.
        with socket.create_connection((host, int(port)), timeout=10) as b:
            b.sendall(post_head(100).encode() + b'{"messages":')
            assert b.recv(4096).decode().startswith("HTTP/1.1 408")
        with socket.create_connection((host, int(port)), timeout=10) as b:
            b.sendall(post_head(100).encode())
            b.settimeout(0.3)
            answer = b""
            for _ in range(40):
                with contextlib.suppress(OSError):
                    b.sendall(b" ")
                with contextlib.suppress(TimeoutError):
                    answer = b.recv(4096)
                if answer:
                    break
            assert answer.decode().startswith("HTTP/1.1 408"), answer
    finally:
        for sock in sockets:
            sock.close()
        s.stop()


def test_a_stream_whose_client_stops_reading_is_cut_and_frees_its_slot(binary, fixtures):
    # A client asks for a long stream and never reads. Loopback buffers take about 4 MB first (some 12,000
    # tokens of chunks from the tiny model, half a minute); then, --send-timeout later, the stream is cut and
    # the request cancelled, long before its 30,000 tokens. (Before, the slot was held for ever.)
    s = Server(binary, fixtures / "model", "--send-timeout", "2", "--parallel", "1", "--queue", "0")
    host, port = s.url.removeprefix("http://").split(":")
    stalled = socket.socket()
    try:
        body = json.dumps({"model": "model", "max_tokens": 30000, "stream": True, "ignore_eos": True,
                           "messages": [{"role": "user", "content": "Tell me a story."}]})
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect((host, int(port)))
        stalled.sendall((post_head(len(body)) + body).encode())
        deadline = time.time() + 10
        while s.metric("internvl_requests_admitted") != 1:
            assert time.time() < deadline, "the stream never started"
            time.sleep(0.05)
        deadline = time.time() + 90
        while s.metric("internvl_requests_admitted") != 0:
            assert time.time() < deadline, "a stream nobody reads still holds its slot"
            time.sleep(0.5)
        assert s.metric("internvl_streams_cut_total") == 1
        assert s.metric("internvl_generated_tokens_total") < 30000
        r = httpx.post(s.url + "/v1/chat/completions", timeout=60,
                       json={"model": "model", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200, "the freed slot does not answer the next client"
    finally:
        stalled.close()
        s.stop()


def test_a_video_frame_size_is_admitted_before_it_is_decoded(binary, fixtures, tmp_path):
    # --max-pixels-in-flight 50 M pixels. A 4000x4000 animation is decoding (its canvas and frames: 44 M);
    # a 3840x2160 video asked meanwhile needs 8 frames' tiles (1.6 M, which fit) and its own 4K frame while
    # FFmpeg decodes it (16.6 M, which does not): 429, as soon as ffprobe told its size. (Before, only the
    # tiles were counted and it was admitted.)
    from tests.videos import make_video

    make_video(tmp_path / "uhd.mp4", "libx264", 4, Fraction(25), (3840, 2160))
    s = Server(binary, fixtures / "model", "--max-pixels-in-flight", "50000000", "--media-root", str(tmp_path))
    try:
        slow = "data:image/gif;base64," + base64.b64encode(canvas_bomb(4000, 4000, 40)).decode()

        def video(url):
            return {"model": "model", "max_tokens": 2, "messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": url, "num_frames": 8}}, {"type": "text", "text": "x"}]}]}

        def ask():
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(s.url + "/v1/chat/completions", json=video(slow), timeout=60)

        first = threading.Thread(target=ask)
        first.start()
        deadline = time.time() + 10
        while s.metric("internvl_requests_admitted") != 1:
            assert time.time() < deadline, "the first video was never admitted"
            time.sleep(0.02)
        time.sleep(0.3)  # its header read and its canvas admitted
        r = httpx.post(s.url + "/v1/chat/completions", json=video(f"file://{tmp_path}/uhd.mp4"), timeout=60)
        assert r.status_code == 429 and r.json()["error"]["code"] == "server_overloaded", r.text
        first.join()
        # Alone, the same video is admitted and answered.
        r = httpx.post(s.url + "/v1/chat/completions", json=video(f"file://{tmp_path}/uhd.mp4"), timeout=60)
        assert r.status_code == 200, r.text
        assert s.metric("internvl_requests_admitted") == 0
    finally:
        s.stop()


def test_remote_media_is_admitted_before_it_is_fetched(binary, fixtures, image_host):
    # Each fetch may bring --media-max-bytes (3 MB = 1 M pixels of the budget): taken before it starts, the
    # surplus given back after. With a 1.5 M-pixel budget the second of two 2 MB downloads does not fit: 429
    # before it is fetched. (Before, both were fetched, and only then was anything counted.)
    s = Server(binary, fixtures / "model", "--allow-remote-media", "--allow-private-media",
               "--media-max-bytes", "3000000", "--max-pixels-in-flight", "1500000")
    try:
        big = {"type": "image_url", "image_url": {"url": image_host + "/big"}}
        body = {"model": "model", "max_tokens": 2,
                "messages": [{"role": "user", "content": [big, big, {"type": "text", "text": "x"}]}]}
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 429 and r.json()["error"]["code"] == "server_overloaded", r.text
        # One image that fits is fetched and answered; nothing stays taken.
        one = {"type": "image_url", "image_url": {"url": image_host + "/img.png"}}
        body["messages"][0]["content"] = [one, {"type": "text", "text": "x"}]
        assert httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
        assert s.metric("internvl_requests_admitted") == 0
    finally:
        s.stop()
