#!/usr/bin/env bash
# Fuzzing campaign of the parsers that read untrusted bytes (cargo-fuzz / libFuzzer, nightly
# Rust): the .pth reader (zip + pickle), safetensors with our metadata, .npz, DICOM, image
# decoding, mae-run serve's request bodies (multipart, /v2 infer) and the ONNX metadata reader.
#
# usage: scripts/fuzz.sh [SECONDS] [TARGET ...]
#   SECONDS   the most each target runs (default 600); it stops earlier at RUNS executions
#   TARGET    some of: pth safetensors npz dicom image http onnx_meta (default: all)
#   env RUNS (1000000), JOBS (1: targets fuzzed at once), MAX_LEN (65536), TIMEOUT (1: the
#   seconds an input may take, under AddressSanitizer, before it counts as a hang)
#
# Each target starts from fuzz/seeds/<t> and fuzz/corpus/<t>; inputs that add coverage are
# merged back into fuzz/corpus/<t> (commit them: CI replays them). A crash, a hang (over
# TIMEOUT) or an out-of-memory (over 2 GB) is kept in fuzz/artifacts/<t>/; make it a regression
# by copying it to fuzz/regressions/<t>/ and fixing the cause. The executions and findings per
# target are printed as a table at the end and kept in fuzz/logs/.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
seconds=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(pth safetensors npz dicom image http onnx_meta)
runs=${RUNS:-1000000}
jobs=${JOBS:-1}
max_len=${MAX_LEN:-65536}
timeout=${TIMEOUT:-1}
say() { printf '\033[1m[fuzz]\033[0m %s\n' "$*" >&2; }
cd "$root/fuzz"

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
if ! command -v cargo-fuzz >/dev/null; then
  say "installing cargo-fuzz from crates.io"
  cargo install cargo-fuzz --locked
fi
say "building the targets (nightly, release with debug assertions, AddressSanitizer)"
cargo +nightly fuzz build -a
# The binaries are run directly from here on, so that editing the sources while a campaign
# runs cannot make a target rebuild (or wait for another's build) halfway through.
bin_dir="target/$(rustc +nightly -vV | sed -n 's/^host: //p')/release"

mkdir -p logs
run_one() {
  local t=$1
  mkdir -p "work/$t" "corpus/$t" "artifacts/$t"
  cp -n "seeds/$t"/* "work/$t"/ 2>/dev/null || true
  cp -n "corpus/$t"/* "work/$t"/ 2>/dev/null || true
  "$bin_dir/$t" "work/$t" -runs="$runs" -max_total_time="$seconds" \
    -max_len="$max_len" -timeout="$timeout" -rss_limit_mb=2048 -malloc_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="artifacts/$t/" > "logs/$t.log" 2>&1 || true
  # Keep what adds coverage (the smallest such inputs).
  rm -rf "work/$t.min" && mkdir -p "work/$t.min"
  "$bin_dir/$t" -merge=1 -max_len="$max_len" -timeout="$timeout" -rss_limit_mb=2048 \
    "work/$t.min" "work/$t" > "logs/$t.cmin.log" 2>&1 || true
  if [ -n "$(ls -A "work/$t.min")" ]; then
    rm -f "corpus/$t"/*
    cp "work/$t.min"/* "corpus/$t"/
  fi
}
say "fuzzing ${targets[*]}: up to $runs executions or ${seconds}s each, $jobs at a time"
running=0
for t in "${targets[@]}"; do
  run_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then wait -n; running=$((running - 1)); fi
done
wait

printf '\n| target | executions | seconds | exec/s | corpus | findings |\n|---|---|---|---|---|---|\n'
for t in "${targets[@]}"; do
  log="logs/$t.log"
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  secs=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  found=$(find "artifacts/$t" -type f | wc -l)
  corpus=$(find "corpus/$t" -type f | wc -l)
  t_s=$(( ${execs:-0} / (${secs:-1} > 0 ? ${secs:-1} : 1) ))
  printf '| %s | %s | %s | %s | %s | %s |\n' "$t" "${execs:-?}" "$t_s" "${secs:-?}" "$corpus" "$found"
done
say "findings (if any) are in fuzz/artifacts/; logs in fuzz/logs/"
