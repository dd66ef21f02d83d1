#!/usr/bin/env bash
# The main job on a fresh machine, offline: build a random-weight InternVL checkpoint (as a download
# looks), export it, and ask a question about an image. Random weights answer with random tokens; with
# a real checkpoint use: python -m export --checkpoint OpenGVLab/InternVL3-1B-hf --out models/internvl3-1b
# Usage: scripts/demo.sh [tiny|internvl2_5-1b]
set -euo pipefail
cd "$(dirname "$0")/.."
shape=${1:-tiny}
scripts/setup.sh
ckpt=build/checkpoints/$shape
model=models/$shape
[ -f "$ckpt/config.json" ] || .venv/bin/python -m export.testing tiny --shape "$shape" --out "$ckpt"
[ -f "$model/manifest.json" ] || .venv/bin/python -m export --checkpoint "$ckpt" --out "$model"
image=build/demo.png
[ -f "$image" ] || .venv/bin/python -c "
from tests.fixtures import make_image; make_image((1024, 768), 7).save('$image')"
target/release/internvl run --model "$model" --image "$image" --prompt "Describe the image." --max-new-tokens 48 --verbose
