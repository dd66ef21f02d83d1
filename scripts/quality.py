"""Quality cost of a quantised model folder against its fp32 export, on a fixed set of prompts and images.

The fp32 folder runs in ONNX Runtime from Python: the reference preprocessing, the prompt as the reference
`chat()` builds it, greedy decoding. The quantised folder runs in the `internvl` binary as users run it
(with the graphs it picks, e.g. the AMX attention variants; `--attention onnx` for the portable ones),
teacher-forced with the fp32 model's answer (`run --force-tokens`), so every step compares the two on the
same context. Prints, per folder: image-embedding cosine and relative L2 error against fp32 (`internvl
embed`), top-1 agreement of the next-token choice, max / mean absolute logit difference.

Usage: .venv/bin/python -m scripts.quality --fp32 models/internvl2_5-1b --quant models/internvl2_5-1b-int8 \\
           [--images a.png b.jpg] [--steps 32] [--attention auto|onnx|amx]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from export.common import ort_session
from export.decoder import empty_past, step_feed
from export.precision import typed
from export.testing.golden import reference_query
from export.testing.reference import load_image

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = ["Describe the image in detail.", "What objects are in this picture?", "Write a short story about it."]


class Model:
    def __init__(self, folder: Path):
        self.m = json.loads((folder / "manifest.json").read_text())
        self.vision = ort_session(folder / self.m["vision"]["file"])
        self.decoder = ort_session(folder / self.m["decoder"]["file"])
        e = self.m["embed"]
        self.table = np.memmap(folder / e["file"], dtype="<f4", mode="r", shape=(e["vocab"], e["hidden"]))
        self.inputs = [i.name for i in self.decoder.get_inputs()]
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.outputs = [o.name for o in self.decoder.get_outputs()]
        self.long_after = self.m["decoder"].get("long_rope_after")

    def _long(self, end: int) -> np.ndarray:
        """LongRoPE's switch for a call ending at position `end` (as the runtime sets it)."""
        return np.array([int(self.long_after is not None and end > self.long_after)], np.int64)

    def prefill(self, ids: list[int], image_embeds: np.ndarray | None):
        emb = np.array(self.table[ids], np.float32)
        if image_embeds is not None:
            emb[np.array(ids) == self.m["tokenizer"]["img_context_id"]] = image_embeds.reshape(-1, emb.shape[-1])
        d = self.m["decoder"]
        empty = empty_past(d["layers"], d["kv_heads"], d["head_dim"])
        feed = step_feed(set(self.inputs), emb[None], empty, 0, int(self._long(len(ids))[0]))
        res = self.decoder.run(self.outputs, typed(feed, self.decoder))
        return res[0][0], res[1:], len(ids)

    def step(self, token: int, past, n: int):
        emb = np.array(self.table[[token]], np.float32)[None]
        feed = step_feed(set(self.inputs), emb, dict(zip(self.past, past, strict=True)), n, int(self._long(n + 1)[0]))
        res = self.decoder.run(self.outputs, typed(feed, self.decoder))
        return res[0][0], res[1:], n + 1


def runtime_embeddings(model: Path, image: Path, attention: str, max_tiles: int) -> np.ndarray:
    """Image embeddings as the `internvl` binary computes them (same preprocessing as the reference)."""
    binary = ROOT / "target" / "release" / "internvl"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "embeds.npy"
        r = subprocess.run([str(binary), "embed", "--model", str(model), "--image", str(image), "--max-tiles",
                            str(max_tiles), "--out", str(out), "--attention", attention, "--verbose"],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise SystemExit(f"internvl embed failed: {r.stderr.strip()}")
        print(f"  {image.name}: {r.stderr.strip()}")
        return np.load(out)


def runtime_logits(model: Path, image: Path, prompt: str, tokens: list[int], attention: str) -> np.ndarray:
    """The binary's logits before each of `tokens`, fed one by one after the prompt about `image`."""
    binary = ROOT / "target" / "release" / "internvl"
    with tempfile.TemporaryDirectory() as tmp:
        ids, out = Path(tmp) / "ids.json", Path(tmp) / "logits.npy"
        ids.write_text(json.dumps(tokens))
        r = subprocess.run([str(binary), "run", "--model", str(model), "--image", str(image), "--max-tiles", "6",
                            "--prompt", prompt, "--force-tokens", str(ids), "--logits-out", str(out), "--json",
                            "--attention", attention], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise SystemExit(f"internvl run failed: {r.stderr.strip()}")
        return np.load(out)


def main() -> None:
    from tokenizers import Tokenizer

    from tests.fixtures import make_image

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", required=True, type=Path)
    ap.add_argument("--quant", required=True, type=Path, nargs="+")
    ap.add_argument("--images", type=Path, nargs="*")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--attention", default="auto", choices=["auto", "onnx", "amx"])
    args = ap.parse_args()
    images = args.images or []
    if not images:
        tmp = ROOT / "build" / "quality"
        tmp.mkdir(parents=True, exist_ok=True)
        for size, seed in (((448, 448), 1), ((1024, 768), 2)):
            p = tmp / f"{size[0]}x{size[1]}_{seed}.png"
            make_image(size, seed).save(p)
            images.append(p)
    ref = Model(args.fp32)
    tok = Tokenizer.from_file(str(args.fp32 / "tokenizer.json"))
    tpl = ref.m["template"]
    for qdir in args.quant:
        q = json.loads((qdir / "manifest.json").read_text())
        agree = total = 0
        max_diff, diffs, cos, rel = 0.0, [], 1.0, 0.0
        for image in images:
            pv = load_image(image, input_size=448, max_num=6)
            emb_ref = ref.vision.run(None, {"pixel_values": pv})[0]
            emb_q = runtime_embeddings(qdir, image, args.attention, 6)
            x, y = emb_ref.astype(np.float64), emb_q.astype(np.float64)
            cos = min(cos, float((x * y).sum() / (np.linalg.norm(x) * np.linalg.norm(y))))
            rel = max(rel, float(np.linalg.norm(x - y) / np.linalg.norm(x)))
            for prompt in PROMPTS:
                text = reference_query(tpl, prompt, None, [pv.shape[0]], [], ref.m["vision"]["tokens_per_tile"])
                a, pa, na = ref.prefill(tok.encode(text).ids, emb_ref)
                want, tokens = [], []
                for _ in range(args.steps):
                    want.append(a)
                    tokens.append(int(a.argmax()))
                    a, pa, na = ref.step(tokens[-1], pa, na)
                got = runtime_logits(qdir, image, prompt, tokens, args.attention)
                for a, b in zip(want, got, strict=True):
                    agree += int(a.argmax() == b.argmax())
                    total += 1
                    d = np.abs(a.astype(np.float64) - b)
                    max_diff, diffs = max(max_diff, float(d.max())), [*diffs, float(d.mean())]
        print(f"{qdir}: dtype {q['dtype']}: image embeddings cosine {cos:.5f}, relative L2 {rel:.4f}; "
              f"top-1 agreement {agree / total:.3f} over {total} steps, "
              f"max |logit diff| {max_diff:.3f}, mean |logit diff| {np.mean(diffs):.4f}")


if __name__ == "__main__":
    main()
