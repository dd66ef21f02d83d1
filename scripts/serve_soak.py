"""Memory soak: `internvl serve` answers N distinct images (default 1000); RSS is sampled from /metrics
after each, and the slope of a least-squares line over the second half is reported (bytes per request).

    .venv/bin/python -m scripts.serve_soak --model DIR [--images 1000] [--size 640x480] [--tokens 4]

The vision-feature cache is bounded (`--vision-cache-bytes`, 256 MiB by default) and fills first, so the
slope is measured once it is full; a leak shows as a slope that stays above zero.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path

from scripts import serving

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import httpx
    import numpy as np
    import openai
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--binary", type=Path, default=ROOT / "target" / "release" / "internvl")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--cache-bytes", type=int, default=32 << 20)
    args = ap.parse_args()
    w, h = (int(x) for x in args.size.split("x"))
    proc, url = serving.start(args.binary, args.model, "--vision-cache-bytes", str(args.cache_bytes))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        model_id = client.models.list().data[0].id
        rng = np.random.default_rng(1)
        rss = []
        for i in range(args.images):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
            uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            client.chat.completions.create(model=model_id, max_tokens=args.tokens, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                             {"type": "text", "text": f"Image {i}?"}]}])
            text = httpx.get(url + "/metrics", timeout=10).text
            rss.append(next(float(line.split()[-1]) for line in text.splitlines()
                            if line.startswith("internvl_resident_memory_bytes")))
        half = rss[len(rss) // 2:]
        xs = np.arange(len(half), dtype=np.float64)
        slope = float(np.polyfit(xs, np.array(half), 1)[0]) if len(half) > 1 else 0.0
        print(json.dumps({"images": args.images, "size": args.size, "rss_first_mb": rss[0] / 2**20,
                          "rss_half_mb": half[0] / 2**20, "rss_last_mb": rss[-1] / 2**20,
                          "rss_max_mb": max(rss) / 2**20, "slope_bytes_per_request_second_half": slope}))
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
