"""Decode cost per token as the context grows: one decoder step timed after a cache of L positions.

Usage: .venv/bin/python scripts/decode_curve.py models/internvl2_5-1b-int8 [--lengths 256 1024 2048 4096 8192]
Runs the exported decoder.onnx directly in ONNX Runtime (2 threads by default) with a random cache.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096, 8192])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    m = json.loads((args.model / "manifest.json").read_text())["decoder"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(args.model / m["file"]), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    past = [n for n in names if n.startswith("past_key_values.")]
    rng = np.random.default_rng(0)
    for length in args.lengths:
        cache = [rng.standard_normal((1, m["kv_heads"], length, m["head_dim"]), dtype=np.float32) for _ in past]
        times = []
        for step in range(args.steps + 2):
            n = length + step
            feed = {"inputs_embeds": rng.standard_normal((1, 1, m["hidden"]), dtype=np.float32),
                    "attention_mask": np.ones((1, n + 1), np.int64), "position_ids": np.array([[n]])}
            feed.update(zip(past, cache, strict=True))
            t = time.perf_counter()
            out = sess.run(None, {k: v for k, v in feed.items() if k in names})
            times.append(time.perf_counter() - t)
            cache = out[1:]
        ms = float(np.median(times[2:])) * 1e3
        print(f"context {length:>6}: {ms:7.1f} ms/token ({1e3 / ms:5.1f} tokens/s)", flush=True)


if __name__ == "__main__":
    main()
