#!/usr/bin/env bash
# The environments the official InternVL remote code runs in (../shared/reference/README.md), for the
# tests that compare our answers with its chat() (tests/oracle/official_chat.py):
#   .venv-ref437  transformers 4.37.2, the internvl_chat code (Qwen2, Llama, InternLM2, Phi-3 LLMs)
#   .venv-ref455  transformers 4.55.0, the InternVL3.5 code (Qwen3 LLMs)
# Each shares torch, numpy, Pillow, sentencepiece, safetensors, protobuf, regex, pyyaml, tqdm, filelock,
# fsspec, packaging of the main .venv through a .pth file that sorts after the venv's own packages (so the
# venv's transformers / tokenizers / huggingface-hub win). Installed here, all with --no-deps: what the
# main venv lacks or has in a version these transformers refuse: transformers, tokenizers, huggingface-hub,
# peft; timm and einops (the remote code imports them), torchvision (timm imports it; its Python transforms
# are the model card's preprocessing), accelerate + psutil (4.37's low_cpu_mem_usage=True needs
# accelerate), requests + urllib3 + certifi + charset-normalizer (transformers 4.x and huggingface-hub 0.x
# import requests). The pins: pyproject.toml's dependency groups reference437 / reference455. Idempotent: a
# stamp with the package list makes a finished venv a ~0.1 s check; a different list (or a broken venv)
# rebuilds it. Fresh creation of both: about a minute (pip, no build).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || { echo "reference_env.sh: the main venv .venv is missing (run scripts/setup.sh)" >&2; exit 1; }
main_site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# A dependency group of pyproject.toml (PEP 735, include-group expanded), space-separated.
group() {
  .venv/bin/python - "$1" <<'EOF'
import sys, tomllib
with open("pyproject.toml", "rb") as f:
    groups = tomllib.load(f)["dependency-groups"]
def expand(name):
    for r in groups[name]:
        yield from expand(r["include-group"]) if isinstance(r, dict) else [r]
print(" ".join(expand(sys.argv[1])))
EOF
}
# modules whose presence (found, not imported) the fast path checks
modules="transformers tokenizers huggingface_hub timm einops torchvision accelerate requests torch numpy PIL sentencepiece safetensors"

make_env() {
  local dir=$1 want=$2 pkgs
  pkgs=$(echo "$3" | tr -s ' \n' ' ')
  local stamp="$dir/.reference-env"
  local check="import importlib.util as u, sys; m=[n for n in sys.argv[1:] if u.find_spec(n) is None]; sys.exit('missing: '+' '.join(m) if m else 0)"
  if [[ -f $stamp && "$(cat "$stamp")" == "$pkgs" ]] && "$dir/bin/python" -c "$check" $modules 2>/dev/null; then
    return
  fi
  echo "[reference_env] creating $dir (transformers $want)" >&2
  rm -rf "$dir"
  python3 -m venv "$dir"
  # shellcheck disable=SC2086
  "$dir/bin/pip" install -q --disable-pip-version-check --no-deps $pkgs
  local site
  site=$("$dir/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  # .pth files are read in name order, each appending to sys.path after the venv's own site-packages;
  # "zz" sorts last.
  echo "$main_site" > "$site/zz-main-venv.pth"
  # A real import of everything the oracle uses, from the right places.
  "$dir/bin/python" - "$want" "$dir" <<'EOF'
import os, sys
import accelerate, einops, requests, sentencepiece, timm, tokenizers, torch, torchvision, transformers
from timm.models.layers import DropPath  # what modeling_intern_vit imports
import torchvision.transforms as T  # the model card's transform
want, venv = sys.argv[1], os.path.realpath(sys.argv[2])
assert transformers.__version__ == want, f"transformers {transformers.__version__}, wanted {want}"
for mod in (transformers, tokenizers):
    assert os.path.realpath(mod.__file__).startswith(venv), f"{mod.__name__} comes from {mod.__file__}, not {venv}"
EOF
  echo "$pkgs" > "$stamp"
}

ref437=$(group reference437)
ref455=$(group reference455)
make_env .venv-ref437 4.37.2 "$ref437"
make_env .venv-ref455 4.55.0 "$ref455"
