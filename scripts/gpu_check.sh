#!/usr/bin/env bash
# The GPU check, one prepared command for a machine with an NVIDIA GPU (nothing in CI depends on it).
#
#   scripts/gpu_check.sh BUNDLE_DIR [OUT_DIR]
#
# BUNDLE_DIR: what scripts/gpu_bundle.sh wrote (internvl + ONNX Runtime's GPU build beside it). The
# machine needs CUDA 13 + cuDNN 9 (found on LD_LIBRARY_PATH or, failing that, in PyTorch's nvidia-*
# pip packages, which are put on LD_LIBRARY_PATH here) and this repository's Python packages (torch,
# transformers, onnx, onnxruntime) for the exports.
#
# It exports the tiny fixture checkpoint and the InternVL2.5-1B shape (random weights) in float16,
# bfloat16 and int4-float16 (MatMulNBits on the GPU), then for each:
#   - CPU vs CUDA greedy tokens (--tf32 off) over 32+ decode steps, and the CUDA logits of the CPU's
#     tokens (teacher forcing) against the CPU's: worst difference of the logits' range;
#   - `internvl bench` on cuda and tensorrt: vision ms per tile at batch 1 and 13, time to first token
#     with 1 and 7 tiles, prefill and decode tokens/s;
# and PyTorch (the official modules through transformers, fp16 and bf16) on the same GPU, same figures
# (scripts/bench_pytorch.py's bench_torch with device cuda).
# Everything lands in OUT_DIR (default build/gpu-check) as JSON plus summary.md. A step that fails is
# recorded there and the script goes on: TensorRT is often not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=${1:?usage: scripts/gpu_check.sh BUNDLE_DIR [OUT_DIR]}
out=${2:-build/gpu-check}
mkdir -p "$out"
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
bin="$bundle/internvl"
summary="$out/summary.md"
: > "$summary"
say() { echo "$*" | tee -a "$summary" >&2; }

# CUDA 13 / cuDNN 9 from PyTorch's wheels where the system has none on the path.
for lib in libcublasLt.so.13 libcudnn.so.9 libcudart.so.13 libcurand.so.10 libcufft.so.12; do
  if ! ldconfig -p 2>/dev/null | grep -q "$lib"; then
    d=$("$py" - "$lib" <<'PY'
import sys, site, pathlib
for root in site.getsitepackages():
    for p in pathlib.Path(root, "nvidia").rglob(sys.argv[1]):
        print(p.parent); raise SystemExit
PY
)
    [ -n "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$summary"
"$bin" devices | tee -a "$summary"

shapes=(tiny internvl2_5-1b)
for shape in "${shapes[@]}"; do
  ck="$out/checkpoints/$shape"
  [ -d "$ck" ] || "$py" -m export.testing tiny --shape "$shape" --out "$ck" >"$out/export-$shape.log" 2>&1 \
    || { say "export.testing tiny $shape failed (see export-$shape.log)"; continue; }
  for dtype in float16 bfloat16 int4-float16; do
    m="$out/models/$shape-$dtype"
    [ -d "$m" ] || "$py" -m export --checkpoint "$ck" --out "$m" --dtype "$dtype" >"$out/export-$shape-$dtype.log" 2>&1 \
      || { say "$shape $dtype: export failed"; continue; }
    tag="$shape-$dtype"
    img=$("$py" -c "from PIL import Image; Image.new('RGB', (1344, 1008), (90, 140, 200)).save('$out/photo.png')" && echo "$out/photo.png")
    # Greedy tokens: the CPU has float16 kernels only (bfloat16 runs on CUDA alone), so bfloat16 is
    # compared CUDA against CUDA with TF32 on / off. int4-float16 runs on the CPU too.
    ref_dev=cpu; [ "$dtype" = bfloat16 ] && ref_dev=cuda
    "$bin" run --model "$m" --image "$img" --max-tiles 6 --prompt "Describe the image." --max-new-tokens 40 \
      --device "$ref_dev" --tf32 off --json >"$out/$tag-ref.json" 2>"$out/$tag-ref.err" || say "$tag: $ref_dev run failed: $(tail -1 "$out/$tag-ref.err")"
    "$bin" run --model "$m" --image "$img" --max-tiles 6 --prompt "Describe the image." --max-new-tokens 40 \
      --device cuda --tf32 off --json >"$out/$tag-cuda.json" 2>"$out/$tag-cuda.err" || say "$tag: cuda run failed: $(tail -1 "$out/$tag-cuda.err")"
    "$py" - "$out/$tag-ref.json" >"$out/$tag-ids.json" <<'PY' || true
import json, sys
print(json.dumps(json.load(open(sys.argv[1]))["token_ids"]))
PY
    "$bin" run --model "$m" --image "$img" --max-tiles 6 --prompt "Describe the image." --device cuda --tf32 off \
      --force-tokens "$out/$tag-ids.json" --logits-out "$out/$tag-cuda-logits.npy" --json >/dev/null 2>>"$out/$tag-cuda.err"
    "$bin" run --model "$m" --image "$img" --max-tiles 6 --prompt "Describe the image." --device "$ref_dev" --tf32 off \
      --force-tokens "$out/$tag-ids.json" --logits-out "$out/$tag-ref-logits.npy" --json >/dev/null 2>>"$out/$tag-ref.err"
    "$py" - "$out" "$tag" "$ref_dev" <<'PY' | tee -a "$summary"
import json, sys
import numpy as np
out, tag, ref = sys.argv[1:]
try:
    a, b = (json.load(open(f"{out}/{tag}-{k}.json"))["token_ids"] for k in ("ref", "cuda"))
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    la, lb = np.load(f"{out}/{tag}-ref-logits.npy"), np.load(f"{out}/{tag}-cuda-logits.npy")
    worst = float((np.abs(la - lb).max(-1) / np.abs(la).max(-1)).max())
    print(f"{tag}: {ref} vs cuda (tf32 off): greedy tokens equal for {same} of {len(a)}; teacher-forced logits "
          f"over {la.shape[0]} steps differ by at most {worst:.2e} of their range")
except Exception as e:  # a failed run above: already said
    print(f"{tag}: token comparison not available ({e})")
PY
    for dev in cuda tensorrt; do
      for vb in 1 13; do
        r="$out/$tag-bench-$dev-batch$vb"
        "$bin" bench --model "$m" --device "$dev" --vision-batch "$vb" --json >"$r.json" 2>"$r.err" \
          && say "$tag $dev vision batch $vb: $(cat "$r.json")" \
          || say "$tag $dev vision batch $vb: bench failed: $(tail -1 "$r.err")"
      done
    done
  done
  # PyTorch on the same GPU, each precision in its own process (its peak memory its own).
  for pt in float16 bfloat16; do
    r="$out/$shape-pytorch-cuda-$pt.json"
    "$py" -c "import json, torch; from scripts.bench_pytorch import bench_torch; \
print(json.dumps(bench_torch('$ck', torch.$pt, 3, 8, 128, device='cuda')))" 2>"$r.err" | tail -1 >"$r" \
      && say "$shape pytorch cuda $pt: $(cat "$r")" || say "$shape pytorch cuda $pt: failed: $(tail -1 "$r.err")"
  done
done
say "wrote $out"
