"""Serving benchmark: `internvl serve` under 1, 2, 4, 8 concurrent streams, through the openai client.

    .venv/bin/python -m scripts.serve_bench --model models/internvl2_5-1b-int8 [--threads 2] [--tokens 128]

Prints, per concurrency: aggregate and per-stream decode tokens/s, time to first token p50 / p95; then a
text-only request's time to first token while another request's 13-tile image encodes; then, for the
model's dtype, how many greedy tokens of each batched stream differ from its solo answer (fp32: none;
int8 quantises activations per tensor, so a row's logits move with its batch). Decode rates are
counted from each stream's first to last token. One timed server at a time; nothing else should run.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scripts import serving

ROOT = Path(__file__).resolve().parents[1]


def start(binary: Path, model: Path, threads: int, parallel: int, *flags: str):
    return serving.start(binary, model, "--threads", str(threads), "--parallel", str(parallel), "--queue", "64",
                         "--vision-cache-bytes", "0", *flags)


def image_uri(width: int, height: int) -> str:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def stream(client, prompt: str, tokens: int, image: str | None = None) -> dict:
    """One streamed request; times from the server's `timings` block (first token from the request's
    start in the server, decode rate over its own decode steps), text from the deltas."""
    content = [{"type": "text", "text": prompt}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    t0 = time.time()
    text, usage, timings = [], None, {}
    for c in client.chat.completions.create(model=client.model_id, messages=[{"role": "user", "content": content}],
                                            max_tokens=tokens, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}):
        if c.usage:
            usage = c.usage
            timings = (c.model_extra or {}).get("timings", {})
        if c.choices and c.choices[0].delta.content:
            text.append(c.choices[0].delta.content)
    return {"ttft": timings.get("first_token_ms", 0) / 1e3, "decode_tok_s": timings.get("decode_tokens_per_s", 0),
            "tokens": usage.completion_tokens if usage else 0, "wall": time.time() - t0, "text": "".join(text)}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--binary", type=Path, default=ROOT / "target" / "release" / "internvl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--exact", action="store_true", help="serve --exact (quantised models: answers equal solo)")
    args = ap.parse_args()
    import openai

    levels = [int(s) for s in args.streams.split(",")]
    proc, url = start(args.binary, args.model, args.threads, max(levels), *(["--exact"] if args.exact else []))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
        client.model_id = client.models.list().data[0].id
        prompts = [f"Write a long story about lighthouse number {i}." for i in range(max(levels))]
        stream(client, "warm up", 4)
        solo = {p: stream(client, p, args.tokens)["text"] for p in prompts}
        rows = []
        for k in levels:
            with ThreadPoolExecutor(k) as pool:
                t0 = time.time()
                res = list(pool.map(lambda p: stream(client, p, args.tokens), prompts[:k]))
                wall = time.time() - t0
            per = [r["decode_tok_s"] for r in res]
            ttft = [r["ttft"] for r in res]
            changed = sum(r["text"] != solo[p] for r, p in zip(res, prompts[:k], strict=True))
            rows.append({"streams": k, "aggregate_tok_s": sum(r["tokens"] for r in res) / wall,
                         "decode_tok_s_sum": sum(per), "per_stream_tok_s": statistics.median(per),
                         "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
                         "answers_differing_from_solo": changed})
            print(json.dumps(rows[-1]), flush=True)
        # A text-only request while a 13-tile image (4x3 grid + thumbnail) encodes.
        big = image_uri(1792, 1344)
        with ThreadPoolExecutor(2) as pool:
            img = pool.submit(stream, client, "Describe the image.", 8, big)
            time.sleep(1.0)
            text = pool.submit(stream, client, "Hello, how are you today?", 8).result()
            image = img.result()
        print(json.dumps({"text_ttft_during_13_tile_image_s": text["ttft"], "text_wall_s": text["wall"],
                          "image_ttft_s": image["ttft"]}), flush=True)
        base = rows[0]["decode_tok_s_sum"] if rows else 0
        print("| streams | decode tok/s, all streams (x one) | per stream | end to end tok/s | TTFT p50 / p95 s "
              "| answers != solo |", file=sys.stderr)
        for r in rows:
            print(f"| {r['streams']} | {r['decode_tok_s_sum']:.1f} ({r['decode_tok_s_sum'] / base:.2f}x) | "
                  f"{r['per_stream_tok_s']:.1f} | {r['aggregate_tok_s']:.1f} | "
                  f"{r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} | "
                  f"{r['answers_differing_from_solo']} of {r['streams']} |", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
