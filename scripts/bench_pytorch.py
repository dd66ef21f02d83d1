"""Side-by-side benchmark: `internvl bench` and the PyTorch reference (fp32 and bf16) on the same
checkpoint, same thread count, same run; prints each figure with its ratio to both, and the machine's
measured limits (GEMM GFLOP/s fp32 / bf16 / int8, memory read GB/s) with how close each figure is.

Usage: .venv/bin/python -m scripts.bench_pytorch --checkpoint build/checkpoints/internvl2_5-1b \\
           --model models/internvl2_5-1b [--model models/internvl2_5-1b-int8 ...] [--runs 3] [--threads 2]
           [--json out.json]
Not a timed test: numbers are printed, nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from export.checkpoint import inspect
from export.templates import template
from export.testing.golden import reference_query
from export.testing.pytorch import load
from export.testing.reference import IMAGENET_MEAN, IMAGENET_STD, dynamic_preprocess

ROOT = Path(__file__).resolve().parent.parent


def med(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def synthetic_image(w: int, h: int):
    """The same picture as `bench::synthetic_image` in Rust."""
    from PIL import Image

    x = np.arange(w, dtype=np.uint64)[None, :].repeat(h, 0)
    y = np.arange(h, dtype=np.uint64)[:, None].repeat(w, 1)
    m = np.uint64(0xFFFFFFFF)
    hsh = (((x * np.uint64(2654435761)) & m) ^ ((y * np.uint64(40503)) & m)) * np.uint64(2246822519) & m
    img = np.stack([(x * 255 // w), (y * 255 // h), hsh >> np.uint64(24)], -1).astype(np.uint8)
    return Image.fromarray(img, "RGB")


def pixel_values(img, max_num=12) -> torch.Tensor:
    tiles = dynamic_preprocess(img, image_size=448, use_thumbnail=True, max_num=max_num)
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    arr = [((np.asarray(t, np.float32) / np.float32(255) - mean) / std).transpose(2, 0, 1) for t in tiles]
    return torch.from_numpy(np.stack(arr).astype(np.float32))


def machine_limits(threads: int) -> dict:
    torch.set_num_threads(threads)
    out = {}
    n = 2048
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        torch.mm(a, b)
        t = time.perf_counter()
        for _ in range(5):
            torch.mm(a, b)
        out[f"gemm_{name}_gflops"] = 5 * 2 * n**3 / (time.perf_counter() - t) / 1e9
    try:
        a = torch.randint(-128, 127, (n, n), dtype=torch.int8)
        b = torch.randint(-128, 127, (n, n), dtype=torch.int8)
        torch._int_mm(a, b)
        t = time.perf_counter()
        for _ in range(5):
            torch._int_mm(a, b)
        out["gemm_int8_gops"] = 5 * 2 * n**3 / (time.perf_counter() - t) / 1e9
    except (RuntimeError, AttributeError):  # not every torch build has an int8 CPU GEMM
        out["gemm_int8_gops"] = float("nan")
    # Memory read: a 1 GiB dot product of a buffer with itself on `threads` threads (one core alone does not
    # saturate the memory bus; a plain sum was measured compute-bound at 16-25 GB/s), best of 3.
    buf = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    best = float("inf")
    for _ in range(4):
        t = time.perf_counter()
        torch.dot(buf, buf)
        best = min(best, time.perf_counter() - t)
    out["mem_read_gbs"] = buf.numel() * 4 / best / 1e9
    return out


def bench_torch(ckpt_dir: str, dtype: torch.dtype, runs: int, threads: int, decode_tokens: int,
                device: str = "cpu") -> dict:
    """The reference's figures on `device` (`cuda` for scripts/gpu_check.sh's PyTorch column): timings read
    after a device synchronise, so they cover the work and not its launch."""
    from tokenizers import Tokenizer
    from transformers import DynamicCache

    torch.set_num_threads(threads)
    dev = torch.device(device)

    def now() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    ckpt = inspect(ckpt_dir)
    t = now()
    tok = Tokenizer.from_file(str(ckpt.path / "tokenizer.json"))
    model = load(ckpt, tok.token_to_id("<IMG_CONTEXT>")).to(dev, dtype)
    load_ms = (now() - t) * 1e3
    tpl = template(ckpt.template)
    lm, head = model.model.language_model, model.lm_head
    r = {"load_ms": med([load_ms])}

    def vision(pv):
        return model.model.get_image_features(pixel_values=pv.to(dev, dtype), vision_feature_layer=-1,
                                              vision_feature_select_strategy="default").pooler_output

    with torch.no_grad():
        pv4 = torch.randn(4, 3, 448, 448)
        vision(pv4[:1])
        v1, v4 = [], []
        for _ in range(runs):
            t = now()
            for i in range(4):
                vision(pv4[i:i + 1])
            v1.append((now() - t) * 1e3 / 4)
            t = now()
            vision(pv4)
            v4.append((now() - t) * 1e3 / 4)
        r["vision_ms_per_tile_batch1"], r["vision_ms_per_tile_batched"] = med(v1), med(v4)

        def first_token(img) -> tuple[float, float, int]:
            t0 = now()
            pv = pixel_values(img)
            text = reference_query(tpl, "Describe the image.", None, [pv.shape[0]], [], 256)
            ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids], device=dev)
            feats = vision(pv)
            emb = lm.embed_tokens(ids)
            emb[ids == model.config.image_token_id] = feats.reshape(-1, feats.shape[-1]).to(emb.dtype)
            t1 = now()
            h = lm(inputs_embeds=emb, past_key_values=DynamicCache(config=model.config.text_config),
                   use_cache=True).last_hidden_state
            head(h[:, -1]).argmax(-1)
            t2 = now()
            return (t2 - t0) * 1e3, ids.shape[1] / (t2 - t1), ids.shape[1]

        t1s, t7s, pfs = [], [], []
        for _ in range(runs):
            a, pf, n = first_token(synthetic_image(448, 448))
            t1s.append(a)
            pfs.append(pf)
            t7s.append(first_token(synthetic_image(1344, 896))[0])
        r["ttft_1tile_ms"], r["ttft_7tile_ms"], r["prefill_tokens_per_s"] = med(t1s), med(t7s), med(pfs)
        r["prefill_tokens"] = n

        text = reference_query(tpl, "Write a long story about a lighthouse keeper.", None, [], [], 256)
        ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids], device=dev)
        decs = []
        for _ in range(runs):
            cache = DynamicCache(config=model.config.text_config)
            h = lm(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state
            nxt = head(h[:, -1]).argmax(-1, keepdim=True)
            t = now()
            for _ in range(decode_tokens):
                h = lm(input_ids=nxt, past_key_values=cache, use_cache=True).last_hidden_state
                nxt = head(h[:, -1]).argmax(-1, keepdim=True)
            decs.append(decode_tokens / (now() - t))
        r["decode_tokens_per_s"] = med(decs)
    import resource

    if dev.type == "cuda":
        r["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return r


def machine_fraction(ckpt_dir: str, model_dir: Path, ours: dict, limits: dict) -> list[str]:
    """How close the figures are to the machine's limits: vision and prefill as GEMM throughput, decode as
    weight bytes read per second."""
    cfg = json.loads((Path(ckpt_dir) / "config.json").read_text())
    v = cfg["vision_config"]
    t = cfg.get("text_config") or cfg.get("llm_config")
    n, h, i = 1025, v["hidden_size"], v["intermediate_size"]
    tile_flops = v["num_hidden_layers"] * (2 * n * (4 * h * h + 2 * h * i) + 4 * n * n * h)
    th, ti = t["hidden_size"], t["intermediate_size"]
    kv = t["num_key_value_heads"] * th // t["num_attention_heads"]
    layer_params = th * th * 2 + th * kv * 2 + 3 * th * ti
    token_flops = 2 * t["num_hidden_layers"] * layer_params
    dtype = json.loads((model_dir / "manifest.json").read_text())["dtype"]
    peak = limits["gemm_fp32_gflops"] if dtype == "float32" else limits.get("gemm_int8_gops", float("nan"))
    vis = tile_flops / (ours["vision_ms_per_tile_batched"]["median"] / 1e3) / 1e9
    pre = token_flops * ours["prefill_tokens_per_s"]["median"] / 1e9
    dec_bytes = (model_dir / "decoder.onnx.data").stat().st_size
    dec = dec_bytes * ours["decode_tokens_per_s"]["median"] / 1e9
    unit = "fp32 GEMM" if dtype == "float32" else "int8 GEMM"
    return [f"vision {vis:.0f} GFLOP/s ({vis / peak:.0%} of {unit} peak)",
            f"prefill {pre:.0f} GFLOP/s ({pre / peak:.0%})",
            f"decode reads {dec:.1f} GB/s of weights ({dec / limits['mem_read_gbs']:.0%} of memory bandwidth)"]


FIGURES = [  # key, label, higher is better
    ("load_ms", "model load, ms", False),
    ("vision_ms_per_tile_batch1", "vision ms/tile, batch 1", False),
    ("vision_ms_per_tile_batched", "vision ms/tile, default batch (PT: 4)", False),
    ("ttft_1tile_ms", "time to first token, 1 tile, ms", False),
    ("ttft_7tile_ms", "time to first token, 7 tiles, ms", False),
    ("prefill_tokens_per_s", "prefill tokens/s", True),
    ("decode_tokens_per_s", "decode tokens/s", True),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--model", required=True, action="append",
                    help="model folder(s) to bench; DIR@onnx / DIR@amx passes --attention onnx / amx (default auto)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--skip-bf16", action="store_true")
    ap.add_argument("--json", type=Path, help="also write all figures here")
    args = ap.parse_args()

    limits = machine_limits(args.threads)
    print("machine:", ", ".join(f"{k} {v:.0f}" for k, v in limits.items()), flush=True)
    results = {"limits": limits}
    ours_cols = []
    for spec in args.model:
        folder, _, attention = spec.partition("@")
        model = Path(folder)
        cmd = [str(ROOT / "target/release/internvl"), "bench", "--model", str(model), "--runs", str(args.runs),
               "--threads", str(args.threads), "--decode-tokens", str(args.decode_tokens), "--json",
               "--attention", attention or "auto"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        key = f"internvl {model.name}" + (f"@{attention}" if attention else "")
        results[key] = json.loads(out)
        ours_cols.append(key)
        print(f"internvl bench {model} done", flush=True)
    # Each PyTorch precision in its own process so peak RSS is its own; it imports `scripts` from the working
    # folder, as this process did (python -m scripts.bench_pytorch).
    for name in ("fp32", *(() if args.skip_bf16 else ("bf16",))):
        code = (f"import sys, json; sys.argv=['x'];"
                f"from scripts.bench_pytorch import bench_torch; import torch;"
                f"print(json.dumps(bench_torch({args.checkpoint!r},"
                f" torch.{'float32' if name == 'fp32' else 'bfloat16'},"
                f" {args.runs}, {args.threads}, {args.decode_tokens})))")
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        results[f"pytorch_{name}"] = json.loads(out.strip().splitlines()[-1])
        print(f"pytorch {name} done", flush=True)

    cols = [k for k in ("pytorch_fp32", "pytorch_bf16") if k in results]
    for ours_key in ours_cols:
        ours = results[ours_key]
        print(f"\n{ours_key}, graphs {', '.join(ours['graphs'])} (ratios > 1: internvl is faster)")
        print(f"{'figure (median)':<36}{'internvl':>11}" + "".join(f"{c.replace('pytorch_', 'PT '):>11}" for c in cols)
              + "".join(f"{'vs ' + c.replace('pytorch_', 'PT '):>12}" for c in cols))
        for key, label, higher in FIGURES:
            o = ours[key]["median"]
            row = f"{label:<36}{o:>11.1f}" + "".join(f"{results[c][key]['median']:>11.1f}" for c in cols)
            for c in cols:
                p = results[c][key]["median"]
                row += f"{(o / p if higher else p / o):>11.2f}x"
            print(row)
        model_dir = Path(ours["model"])
        lim = machine_fraction(args.checkpoint, model_dir, ours, limits)
        print("   against this machine: " + "; ".join(lim))
        for length, st in ours.get("decode_curve_ms", []):
            print(f"{'decode step at ' + str(length) + ' context, ms':<36}{st['median']:>11.1f}")
        print(f"{'peak RSS, MiB':<36}{ours['peak_rss_mb']:>11.0f}"
              + "".join(f"{results[c]['peak_rss_mb']:>11.0f}" for c in cols)
              + f"   (weights {ours['weight_mb']:.0f} MiB)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
