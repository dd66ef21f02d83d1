"""`internvl serve` through the official `openai` client, on loopback, bounded in time.

Answers are compared with `internvl run` on the same fp32 tiny model (token parity with PyTorch is what
tests/parity.rs and test_official_chat.py check for `run`): non-streamed text equals `run --json`'s, the
streamed deltas add up to what `run` streams, and eight concurrent streams (four with images) each equal
their solo answer. Errors arrive as the SDK's exceptions with the right status.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]


class Server:
    def __init__(self, binary: Path, model: Path, *flags: str, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([str(binary), "serve", "--model", str(model), "--port", "0", *flags],
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.url = None
        deadline = time.time() + 60
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("server exited: " + "".join(self.lines))
            self.lines.append(line)
            m = re.search(r"listening on (http://\S+) \(loading", line)
            if m:
                self.url = m.group(1)
            if "model loaded" in line:
                break
        assert self.url, self.lines
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def model(fixtures: Path) -> Path:
    return fixtures / "model"


@pytest.fixture(scope="module")
def server(binary: Path, model: Path):
    s = Server(binary, model, "--parallel", "4", "--queue", "16")
    yield s
    s.stop()


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def user(prompt: str, *images: Path) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_uri(p)}} for p in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]


def solo(binary: Path, model: Path, prompt: str, images: list[Path], tokens: int) -> tuple[str, str, int]:
    """(streamed text, answer text, prompt tokens) of `internvl run`."""
    args = [str(binary), "run", "--model", str(model), "--prompt", prompt, "--max-new-tokens", str(tokens)]
    for p in images:
        args += ["--image", str(p)]
    streamed = subprocess.run(args, capture_output=True, check=True, timeout=120).stdout.decode()
    out = json.loads(subprocess.run(args + ["--json"], capture_output=True, check=True, timeout=120).stdout)
    assert streamed.endswith("\n")
    return streamed[:-1], out["text"], out["prompt_tokens"]


CASES = [("Describe the image.", ["448x448_1.png"]), ("What is in these pictures?", ["800x600_3.png", "448x448_2.png"]),
         ("Tell me a story.", []), ("Hello, who are you?", [])]


@pytest.mark.parametrize(("prompt", "images"), CASES)
def test_answers_equal_internvl_run(server, binary, model, fixtures, prompt, images):
    paths = [fixtures / "images" / p for p in images]
    streamed, text, prompt_tokens = solo(binary, model, prompt, paths, 24)
    client = server.client()
    r = client.chat.completions.create(model="model", messages=user(prompt, *paths), max_tokens=24)
    assert r.choices[0].message.content == text
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.completion_tokens == 24 and r.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="model", messages=user(prompt, *paths), max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == streamed
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == prompt_tokens
    assert (r.usage.prompt_tokens_details.image_tokens > 0) == bool(paths)


def test_sse_framing(server, fixtures):
    body = {"model": "model", "messages": user("Describe.", fixtures / "images" / "448x448_1.png"), "max_tokens": 8,
            "stream": True}
    for include_usage in (False, True):
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            raw = r.read().decode()
        events = [e for e in raw.split("\n\n") if e.strip()]
        assert events[-1] == "data: [DONE]"
        data = [json.loads(e[len("data: "):]) for e in events[:-1] if e.startswith("data: ")]
        assert len({d["id"] for d in data}) == 1 and all(d["object"] == "chat.completion.chunk" for d in data)
        assert data[0]["choices"][0]["delta"]["role"] == "assistant"
        finishes = [c["finish_reason"] for d in data for c in d["choices"] if c["finish_reason"]]
        assert finishes == ["length"]
        usage = [d for d in data if d["choices"] == []]
        assert len(usage) == int(include_usage)
        assert all(d["usage"] is None for d in data if d["choices"])
        for d in data:  # every delta is whole UTF-8 (json.loads would have failed otherwise) and non-split
            for c in d["choices"]:
                assert "\ufffd" not in (c["delta"].get("content") or "")


def test_eight_concurrent_streams_each_equal_their_solo_answer(server, binary, model, fixtures):
    img = fixtures / "images"
    jobs = [(f"Question number {i}: what do you see?", [img / ["448x448_1.png", "800x600_3.png", "600x900_4.png",
                                                                   "448x448_2.png"][i]] if i < 4 else [])
            for i in range(8)]
    want = [solo(binary, model, p, ims, 32)[0] for p, ims in jobs]
    client = server.client()

    def ask(job):
        p, ims = job
        stream = client.chat.completions.create(model="model", messages=user(p, *ims), max_tokens=32, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, jobs))
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"stream {i} differs from its solo answer"


def test_exact_keeps_int8_answers_equal_to_solo_runs(binary, fixtures):
    # int8 activations are quantised per tensor, so batching moves a row's logits; --exact steps such
    # models one request per call and reuses no prompt prefix, and every answer is its solo one again.
    model = fixtures / "models" / "qwen2-amx-int8"
    jobs = [f"Request {i} asks: what do you see?" for i in range(4)]
    want = [solo(binary, model, p, [], 24)[0] for p in jobs]
    s = Server(binary, model, "--parallel", "4", "--exact")
    try:
        client = s.client()

        def ask(p):
            stream = client.chat.completions.create(model="qwen2-amx-int8", messages=user(p), max_tokens=24,
                                                    stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(ask, jobs)) == want
    finally:
        s.stop()


def test_errors_are_openai_errors(server, binary, model, fixtures):
    client = server.client()
    cases = [
        (openai.BadRequestError, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, {"type": "text", "text": "x"}]}]},
         "base64"),
        (openai.BadRequestError, {"messages": [{"role": "user", "content": [
            {"type": "image_url",
             "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}},
            {"type": "text", "text": "x"}]}]}, "image"),
        (openai.BadRequestError, {"messages": user("x", fixtures / "images" / "448x448_1.png"),
                                      "extra_body": {"max_dynamic_patch": 99}}, "max_dynamic_patch"),
        (openai.BadRequestError, {"messages": user("word " * 40000)}, "context"),
        (openai.BadRequestError, {"messages": user("x"), "n": 2}, "n"),
        (openai.BadRequestError, {"messages": user("x"), "logprobs": True}, "logprobs"),
        (openai.BadRequestError, {"messages": user("x"), "tools": [{"type": "function", "function": {"name": "f"}}]},
         "tools"),
        (openai.BadRequestError, {"messages": [{"role": "assistant", "content": "hi"}]}, "user"),
        (openai.PermissionDeniedError, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, {"type": "text", "text": "x"}]}]}, "file://"),
    ]
    for exc, kwargs, needle in cases:
        with pytest.raises(exc) as e:
            client.chat.completions.create(model="model", max_tokens=4, **kwargs)
        assert needle in str(e.value), (needle, str(e.value))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=user("x"), max_tokens=4)
    # Still serving after all of that.
    assert client.chat.completions.create(model="model", messages=user("x"), max_tokens=2).choices[0].message.content


def test_remote_images_only_as_allowed(binary, model, fixtures, image_host, server):
    def ask(client, url):
        return client.chat.completions.create(model="model", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe."}]}])

    with pytest.raises(openai.BadRequestError, match="allow-remote-media"):
        ask(server.client(), image_host + "/img.png")
    want = ask(server.client(), data_uri(fixtures / "images" / "448x448_1.png")).choices[0].message.content
    public_only = Server(binary, model, "--allow-remote-media")
    lan = Server(binary, model, "--allow-remote-media", "--allow-private-media", "--media-max-bytes", "1000000")
    try:
        with pytest.raises(openai.PermissionDeniedError, match="private or local network"):
            ask(public_only.client(), image_host + "/img.png")
        c = lan.client()
        assert ask(c, image_host + "/img.png").choices[0].message.content == want
        assert ask(c, image_host + "/hop/3").choices[0].message.content == want
        for path, needle in [("/hop/4", "redirects"), ("/big", "bytes"), ("/missing", "404")]:
            with pytest.raises(openai.BadRequestError, match=needle):
                ask(c, image_host + path)
    finally:
        public_only.stop()
        lan.stop()
    listed = Server(binary, model, "--allow-remote-media", "--allow-private-media", "--allow-media-host",
                    "images.example")
    try:
        with pytest.raises(openai.PermissionDeniedError, match="allow-media-host"):
            ask(listed.client(), image_host + "/img.png")
    finally:
        listed.stop()


def test_auth_body_limit_and_overload(binary, model, fixtures):
    s = Server(binary, model, "--api-key", "s3cret", "--body-limit", "100000", "--parallel", "1", "--queue", "0")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").chat.completions.create(model="model", messages=user("x"), max_tokens=2)
        good = s.client("s3cret")
        with pytest.raises(openai.APIStatusError) as e:
            good.chat.completions.create(model="model", messages=user("y" * 200000), max_tokens=2)
        assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
        # One row, no queue: a second request while the first streams is told to come back.
        stream = good.chat.completions.create(model="model", messages=user("long"), max_tokens=4000, stream=True)
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as e:
            good.chat.completions.create(model="model", messages=user("x"), max_tokens=2)
        assert e.value.response.headers.get("retry-after") == "1"
        stream.close()
    finally:
        s.stop()


def test_image_pixels_in_flight_are_bounded(binary, model, fixtures):
    # One 448x448 image (200704 pixels) fits a budget of 300000; a second while the first is in flight
    # does not (429), a text request still does, and the budget comes back when the first ends.
    s = Server(binary, model, "--max-pixels-in-flight", "300000")
    try:
        c = s.client()
        img = fixtures / "images" / "448x448_1.png"
        stream = c.chat.completions.create(model="model", messages=user("long", img), max_tokens=20000, stream=True)
        next(iter(stream))
        with pytest.raises(openai.RateLimitError, match="pixels"):
            c.chat.completions.create(model="model", messages=user("second", img), max_tokens=2)
        assert c.chat.completions.create(model="model", messages=user("text"), max_tokens=2).choices
        stream.close()
        deadline = time.time() + 5
        while True:
            try:
                c.chat.completions.create(model="model", messages=user("again", img), max_tokens=2)
                break
            except openai.RateLimitError:
                assert time.time() < deadline, "the pixel budget was not given back"
                time.sleep(0.1)
    finally:
        s.stop()


def test_closed_stream_is_cancelled_and_a_repeated_image_is_a_cache_hit(server, tmp_path):
    client = server.client()
    before = server.metric("internvl_requests_cancelled_total")
    stream = client.chat.completions.create(model="model", messages=user("go on"), max_tokens=20000, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.time() + 1.0
    while server.metric("internvl_requests_cancelled_total") <= before and time.time() < deadline:
        time.sleep(0.05)
    assert server.metric("internvl_requests_cancelled_total") > before, "closed stream not cancelled within 1 s"

    import numpy as np
    from PIL import Image

    img = tmp_path / "fresh.png"  # never sent before
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (700, 500, 3), dtype=np.uint8)).save(img)
    hits = server.metric("internvl_vision_cache_hits_total")
    tiles = server.metric("internvl_vision_tiles_total")
    a = client.chat.completions.create(model="model", messages=user("one", img), max_tokens=4)
    tiles_once = server.metric("internvl_vision_tiles_total") - tiles
    b = client.chat.completions.create(model="model", messages=user("two", img), max_tokens=4)
    assert server.metric("internvl_vision_cache_hits_total") == hits + 1
    assert server.metric("internvl_vision_tiles_total") - tiles == tiles_once, "the repeated image was encoded again"
    assert a.usage.prompt_tokens_details.image_tokens == b.usage.prompt_tokens_details.image_tokens > 0


def test_health_answers_while_an_image_encodes(server, fixtures):
    big = fixtures / "images" / "1600x1000_5.png"
    done = threading.Event()

    def ask():
        server.client().chat.completions.create(model="model", messages=user("describe", big), max_tokens=64,
                                                extra_body={"max_dynamic_patch": 40})
        done.set()

    t = threading.Thread(target=ask)
    t.start()
    worst = 0.0
    while not done.is_set():
        t0 = time.time()
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        worst = max(worst, time.time() - t0)
        time.sleep(0.01)
    t.join()
    assert worst < 0.5, f"/health took {worst:.2f} s while a request ran"
    assert httpx.get(server.url + "/health/live", timeout=5).status_code == 200
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["model"]


def test_sigterm_drains_in_flight_requests_and_exits_0(binary, model):
    s = Server(binary, model, "--grace-period", "30")
    try:
        client = s.client()
        stream = client.chat.completions.create(model="model", messages=user("story"), max_tokens=300, stream=True)
        it = iter(stream)
        next(it)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        r = httpx.get(s.url + "/health", timeout=5) if s.proc.poll() is None else None
        assert r is None or r.status_code == 503
        rest = list(it)
        assert rest[-1].choices[0].finish_reason == "length", "the in-flight stream was cut"
        assert s.proc.wait(30) == 0
    finally:
        s.stop()


def test_video_url_answers_equal_internvl_run(binary, model, fixtures, tmp_path):
    """A `video_url` part (vLLM's spelling; `num_frames`, `start`, `end` in its object) as a data: URI and
    as a file:// URL under --media-root: the answer `internvl run --video` gives."""
    from fractions import Fraction

    from tests.videos import make_video

    clip = make_video(tmp_path / "clip.mp4", "libx264", 30, Fraction(15), (160, 120))
    prompt = "What happens in the video?"
    s = Server(binary, model, "--media-root", str(tmp_path))
    try:
        client = s.client()

        def ask(url: str, video: dict, extra: list | None = None):
            part = {"type": "video_url", "video_url": {"url": url, **video}}
            content = [part, *(extra or []), {"type": "text", "text": prompt}]
            return client.chat.completions.create(model="model", max_tokens=12,
                                                  messages=[{"role": "user", "content": content}])

        uri = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
        for video, flags in (({"num_frames": 3}, ["--frames", "3"]),
                             ({"num_frames": 2, "start": 0.5, "end": 1.5},
                              ["--frames", "2", "--video-start", "0.5", "--video-end", "1.5"])):
            want = json.loads(subprocess.run(
                [str(binary), "run", "--model", str(model), "--video", str(clip), *flags, "--prompt", prompt,
                 "--max-new-tokens", "12", "--json"], capture_output=True, check=True, timeout=120).stdout)
            for url in (uri, f"file://{clip}"):
                r = ask(url, video)
                assert r.choices[0].message.content == want["text"], (video, url[:30])
                assert r.usage.prompt_tokens == want["prompt_tokens"]
                assert r.usage.prompt_tokens_details.image_tokens == video["num_frames"] * 256
        image = {"type": "image_url", "image_url": {"url": data_uri(fixtures / "images" / "448x448_1.png")}}
        junk = "data:video/mp4;base64," + base64.b64encode(b"\0" * 3000).decode()
        for url, video, extra, needle in [
            (uri, {"num_frames": 0}, None, "num_frames"),
            (uri, {"num_frames": 2, "start": 1.0}, None, "start and end"),
            (uri, {}, [image], "cannot also carry images"),
            (uri, {}, [{"type": "video_url", "video_url": {"url": uri}}], "one video"),
            (junk, {}, None, "video"),
            ("file:///etc/passwd", {}, None, "media root"),
        ]:
            with pytest.raises((openai.BadRequestError, openai.PermissionDeniedError)) as e:
                ask(url, video, extra)
            assert needle in str(e.value), (needle, str(e.value))
        assert ask(uri, {"num_frames": 1}).choices[0].message.content  # still serving
    finally:
        s.stop()
