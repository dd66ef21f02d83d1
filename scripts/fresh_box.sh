#!/usr/bin/env bash
# The edge bundle as a user meets it: `internvl package` a model folder, unpack the archive in a minimal
# Debian made with debootstrap (no Python, no Rust, no compiler; Debian's minbase variant), check the
# checksums there and answer a question about an image, which must equal the answer `internvl run` gives
# here. Prints the bundle's size and, inside the fresh box, the cold start (process start to the end of
# the answer, model load included). Needs root (chroot) and the Debian mirror; not part of CI (the
# debootstrap download is most of its time).
#
#   scripts/fresh_box.sh [MODEL_DIR] [WORK_DIR]
#
# MODEL_DIR defaults to the test fixtures' tiny model (build/fixtures/model); WORK_DIR (default
# build/fresh-box) keeps the debootstrapped root between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-build/fixtures/model}
work=${2:-build/fresh-box}
bin=target/release/internvl
[ -x "$bin" ] || scripts/setup.sh
[ -f "$model/manifest.json" ] || .venv/bin/python tests/fixtures.py build/fixtures
command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null
mkdir -p "$work"
root="$work/rootfs"
if [ ! -x "$root/bin/sh" ]; then
  echo "[fresh-box] debootstrap --variant=minbase bookworm $root" >&2
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
    || { tail -5 "$work/debootstrap.log" >&2; exit 1; }
fi
for tool in python3 cargo rustc gcc; do
  if chroot "$root" /bin/sh -c "command -v $tool" >/dev/null 2>&1; then
    echo "[fresh-box] $tool is in the box; it is not the fresh machine this check wants" >&2
    exit 1
  fi
done
bundle="$work/bundle.tar.gz"
"$bin" package --model "$model" --out "$bundle" --force
name=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['name'])" "$model/manifest.json")
image=build/fixtures/images/800x600_3.png
[ -f "$image" ] || image=$(ls build/fixtures/images/*.png | head -1)
want=$("$bin" run --model "$model" --image "$image" --prompt "Describe the image." --max-new-tokens 24)
rm -rf "$root/opt/bundle" && mkdir -p "$root/opt/bundle"
cp "$bundle" "$image" "$root/opt/bundle/"
mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
trap 'umount "$root/proc" 2>/dev/null || true' EXIT
got=$(chroot "$root" /usr/bin/env -i PATH=/usr/bin:/bin /bin/sh -c "
  set -e
  cd /opt/bundle && tar -xzf bundle.tar.gz && cd internvl-$name
  sha256sum -c --quiet SHA256SUMS >&2
  ./internvl info --model models/$name --verify >&2
  start=\$(date +%s%N)
  ./internvl run --model models/$name --image ../$(basename "$image") --prompt 'Describe the image.' --max-new-tokens 24
  echo \"[fresh-box] cold start to the end of a 24-token answer: \$(( (\$(date +%s%N) - start) / 1000000 )) ms\" >&2
")
echo "[fresh-box] bundle $(du -h "$bundle" | cut -f1) ($(stat -c %s "$bundle") bytes); binary $(stat -c %s "$bin") bytes" >&2
if [ "$got" != "$want" ]; then
  printf '[fresh-box] FAILED: the answer in the box differs\n  box:  %s\n  here: %s\n' "$got" "$want" >&2
  exit 1
fi
echo "[fresh-box] ok: the answer in a fresh Debian equals internvl run here" >&2
