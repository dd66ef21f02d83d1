#!/usr/bin/env bash
# Fuzzes what parses untrusted bytes (cargo-fuzz / libFuzzer + AddressSanitizer, nightly Rust):
#   image          decode_image + preprocess (tiling, resize, normalisation) of any image file
#   manifest       Manifest::parse of any manifest.json
#   stream_decode  token ids -> AnswerStream, against the returned answer text
#   prompt         render + token_ids of any question / system message / history turns
#   history        load_history of any --history file, then the prompt built on it
# The checks themselves are crates/internvl/tests/fuzz_checks/mod.rs; crates/internvl/tests/fuzz_corpus.rs replays the saved corpus and
# every regression in plain `cargo test` (what CI runs).
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#   SECONDS_PER_TARGET  default 600 (the benchmark: 10 minutes each); a few seconds replays the corpus.
#   TARGET              default all five, run one after another (one fuzzing process at a time).
# Environment:
#   FUZZ_KEEP_GOING=1   don't stop a target at its first crash (libFuzzer -fork=1 -ignore_crashes=1 ...):
#                       each crash is saved and fuzzing goes on for the whole time.
#   FUZZ_CMIN=1         then minimise each target's corpus (libFuzzer -merge=1; the seed-* files stay): what
#                       fuzzing adds to fuzz/corpus/ is kept only where it reaches new code.
#   FUZZ_LOG_DIR        where each target's libFuzzer log goes (default build/fuzz-logs).
#   INTERNVL_FUZZ_MODEL model folders (':'-separated) whose tokenizer / manifest the checks use (default:
#                       the fixtures' build/fixtures/models/*-original, from tests/fixtures.py).
#
# Per target it prints the executions (libFuzzer's final stat::number_of_executed_units), the corpus size,
# and whether a crash / timeout / out-of-memory artifact appeared. Artifacts are copied to
# fuzz/regressions/<target>/, which crates/internvl/tests/fuzz_corpus.rs replays: every finding becomes a regression test.
# Exits 1 if any target crashed.
set -euo pipefail
cd "$(dirname "$0")/.."

# The whole script is one function, read before it runs: editing this file during a run cannot change it.
main() {
  SECONDS_PER_TARGET=${1:-600}
  shift || true
  ALL_TARGETS=(image manifest stream_decode prompt history)
  TARGETS=("$@")
  [ ${#TARGETS[@]} -eq 0 ] && TARGETS=("${ALL_TARGETS[@]}")
  LOG_DIR=${FUZZ_LOG_DIR:-build/fuzz-logs}
  mkdir -p "$LOG_DIR"

  command -v cmake >/dev/null || export CMAKE="$PWD/.venv/bin/cmake"  # libjpeg-turbo's build (setup.sh)
  rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
  command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

  max_len() {
    case $1 in
      image) echo 262144 ;;      # images up to 256 KiB: room for multi-scan JPEGs, TIFF strips, PNG chunks
      stream_decode) echo 4096 ;; # 1 + 3 bytes per id; the check stops at MAX_STREAM_IDS (1024) ids
      *) echo 65536 ;;
    esac
  }

  echo "== building the fuzz targets (nightly, AddressSanitizer)"
  cargo +nightly fuzz build
  # Run the binaries built now (not `cargo fuzz run`, which rebuilds first): every target fuzzes the same build
  # of the library, even while its sources change.
  BIN_DIR=fuzz/target/$(rustc +nightly -vV | sed -n 's/^host: //p')/release
  export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0}

  crashed=()
  summary=()
  for t in "${TARGETS[@]}"; do
    corpus=fuzz/corpus/$t
    artifacts=fuzz/artifacts/$t
    mkdir -p "$corpus" "$artifacts"
    before=$(ls "$artifacts")
    log=$LOG_DIR/$t.log
    flags=(-max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=4096 -timeout=20 -max_len="$(max_len "$t")"
           -print_final_stats=1)
    [ -f "fuzz/dicts/$t.dict" ] && flags+=(-dict="fuzz/dicts/$t.dict")
    [ "${FUZZ_KEEP_GOING:-0}" = 1 ] && flags+=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
    echo "== $t: ${SECONDS_PER_TARGET}s over $corpus ($(ls "$corpus" | wc -l) inputs), log $log"
    start=$(date +%s)
    set +e
    "$BIN_DIR/$t" -artifact_prefix="$artifacts/" "${flags[@]}" "$corpus" >"$log" 2>&1
    rc=$?
    set -e
    took=$(( $(date +%s) - start ))

    # Executions: the final stats of a plain run; in fork mode the parent's last "#N: cov: ..." line.
    execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
    if [ "${FUZZ_KEEP_GOING:-0}" = 1 ] || [ -z "$execs" ]; then
      fork=$(grep -oE '^#[0-9]+: cov:' "$log" | tail -1 | grep -oE '[0-9]+' || true)
      [ -n "$fork" ] && execs=$fork
    fi
    if [ "${FUZZ_CMIN:-0}" = 1 ]; then
      grown=$(ls "$corpus" | wc -l)
      tmp=$(mktemp -d "fuzz/.cmin-$t.XXXXXX")
      cp "$corpus"/seed-* "$tmp"/ 2>/dev/null || true
      if "$BIN_DIR/$t" -merge=1 -rss_limit_mb=4096 -timeout=20 "$tmp" "$corpus" >"$LOG_DIR/$t.cmin.log" 2>&1; then
        rm -rf "$corpus" && mv "$tmp" "$corpus"
        echo "   corpus minimised: $grown -> $(ls "$corpus" | wc -l) files"
      else
        rm -rf "$tmp"
        echo "   corpus minimisation failed (see $LOG_DIR/$t.cmin.log); corpus kept as it is"
      fi
    fi
    files=$(ls "$corpus" | wc -l)
    bytes=$(du -sb "$corpus" | cut -f1)

    new=()
    for f in $(ls "$artifacts"); do
      case $f in crash-*|timeout-*|oom-*|leak-*) ;; *) continue ;; esac
      grep -qxF "$f" <<<"$before" || new+=("$f")
    done
    if [ ${#new[@]} -gt 0 ]; then
      # With FUZZ_KEEP_GOING one bug can leave many artifacts: the first five become regressions.
      mkdir -p "fuzz/regressions/$t"
      for f in "${new[@]:0:5}"; do cp "$artifacts/$f" "fuzz/regressions/$t/$f"; done
      status="FOUND ${#new[@]}: ${new[*]}"
      crashed+=("$t")
    elif [ $rc -ne 0 ]; then
      status="libFuzzer exited $rc without an artifact (see $log)"
      crashed+=("$t")
    else
      status="no crash"
    fi
    line="$t: ${execs:-?} executions in ${took}s, corpus $files files / $bytes bytes, $status"
    summary+=("$line")
    echo "   $line"
    if [ ${#new[@]} -gt 0 ]; then
      grep -m1 -B2 -A12 -E "panicked at|ERROR: (AddressSanitizer|libFuzzer)" "$log" | sed 's/^/   | /' || true
      for f in "${new[@]:0:5}"; do
        echo "   reproduce: cargo +nightly fuzz run $t fuzz/regressions/$t/$f"
      done
      [ ${#new[@]} -gt 5 ] && echo "   ($(( ${#new[@]} - 5 )) more in $artifacts/)"
      echo "   minimise:  cargo +nightly fuzz tmin $t fuzz/regressions/$t/${new[0]}"
      echo "   the regression now runs in: cargo test --release --test fuzz_corpus $t"
    fi
  done

  echo "== summary (${SECONDS_PER_TARGET}s per target)"
  printf '   %s\n' "${summary[@]}"
  if [ ${#crashed[@]} -gt 0 ]; then
    echo "findings in: ${crashed[*]} (reproducers in fuzz/regressions/)"
    exit 1
  fi
}

main "$@"
