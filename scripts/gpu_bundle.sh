#!/usr/bin/env bash
# Assembles the GPU bundle: the internvl binary with ONNX Runtime's GPU build beside it, taken from the
# onnxruntime-gpu==1.31.1 wheel on PyPI (built for CUDA 13). The binary is the same as the CPU one; only
# the libraries beside it differ.
#
#   scripts/gpu_bundle.sh OUT_DIR [WHEEL]
#
# OUT_DIR gets: internvl, libonnxruntime.so.1.31.1 (the GPU core, not the CPU wheel's file of the same
# name), libonnxruntime_providers_shared.so, libonnxruntime_providers_cuda.so and
# libonnxruntime_providers_tensorrt.so. What the target machine must provide (not in the wheel):
#   CUDA provider:     an r580+ NVIDIA driver, CUDA 13 (libcudart.so.13, libcublas.so.13,
#                      libcublasLt.so.13, libcurand.so.10, libcufft.so.12) and cuDNN 9 (libcudnn*.so.9),
#                      e.g. from the pip packages nvidia-cuda-runtime, nvidia-cublas, nvidia-curand,
#                      nvidia-cufft, nvidia-cudnn-cu13 (folders under site-packages/nvidia/cu13/lib),
#                      on LD_LIBRARY_PATH;
#   TensorRT provider: the above plus TensorRT 10 for CUDA 13 (libnvinfer.so.10,
#                      libnvinfer_plugin.so.10, libnvonnxparser.so.10).
# `OUT_DIR/internvl devices` then says which providers start there.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_bundle.sh OUT_DIR [onnxruntime_gpu-1.31.1-...whl]}
wheel=${2:-}
libs=(libonnxruntime.so.1.31.1 libonnxruntime_providers_shared.so libonnxruntime_providers_cuda.so
      libonnxruntime_providers_tensorrt.so)
[ -x target/release/internvl ] || scripts/setup.sh
if [ -z "$wheel" ]; then
  cache=build/wheels
  mkdir -p "$cache"
  wheel=$(ls "$cache"/onnxruntime_gpu-1.31.1-*manylinux*x86_64.whl 2>/dev/null | head -1 || true)
  if [ -z "$wheel" ]; then
    echo "[gpu_bundle] downloading onnxruntime-gpu==1.31.1 (about 256 MB)" >&2
    .venv/bin/pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --platform manylinux_2_28_x86_64 --python-version 3.11 onnxruntime-gpu==1.31.1 -d "$cache"
    wheel=$(ls "$cache"/onnxruntime_gpu-1.31.1-*manylinux*x86_64.whl | head -1)
  fi
fi
[ -f "$wheel" ] || { echo "gpu_bundle: wheel $wheel not found" >&2; exit 2; }
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
  echo "gpu_bundle: $out exists and is not empty; give a new folder" >&2
  exit 2
fi
# Build beside the destination and move into place: a failed run leaves no half bundle.
parent=$(dirname "$out"); mkdir -p "$parent"
work=$(mktemp -d "$parent/.gpu-bundle.XXXXXX")
trap 'rm -rf "$work"' EXIT
.venv/bin/python - "$wheel" "$work" "${libs[@]}" <<'PY'
import sys, zipfile
from pathlib import Path
wheel, out, libs = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    names = {Path(n).name: n for n in z.namelist() if n.startswith("onnxruntime/capi/")}
    missing = [lib for lib in libs if lib not in names]
    if missing:
        sys.exit(f"gpu_bundle: {wheel} lacks {', '.join(missing)} (not the onnxruntime-gpu 1.31.1 wheel?)")
    for lib in libs:
        (out / lib).write_bytes(z.read(names[lib]))
        (out / lib).chmod(0o755)
PY
cp target/release/internvl "$work/"
# The layout check: the binary finds the GPU core beside itself and every provider library with it.
"$work/internvl" devices --bundle-check
rmdir "$out" 2>/dev/null || true
chmod 755 "$work"
mv "$work" "$out"
trap - EXIT
echo "[gpu_bundle] wrote $out ($(du -sh "$out" | cut -f1)): run '$out/internvl devices' on the GPU machine" >&2
