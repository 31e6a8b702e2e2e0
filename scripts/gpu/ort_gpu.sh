#!/usr/bin/env bash
# ONNX Runtime's CUDA provider for the lent GPU machine, carried in parts: the onnxruntime-gpu
# wheel (CUDA 13) is larger than one device call may carry (64 MiB), the machine has no network,
# and /tmp there survives between calls while the machine stays warm.
#
# usage: scripts/gpu/ort_gpu.sh download   here: the wheel into carried/ort/partK/ (K = 0..N-1),
#                                          each part under PART_MIB (default 60) with a manifest
#        scripts/gpu/ort_gpu.sh stage      there: copies every carried/ort/part*/ present to
#                                          /tmp/ort-parts/ (one call per part, carry
#                                          ["carried/ort/partK"])
#        scripts/gpu/ort_gpu.sh install    there: when every part is in /tmp/ort-parts, joins
#                                          them, checks the SHA-256 and installs the wheel into
#                                          /tmp/ortg (check.sh does this itself); exit 1 when
#                                          parts are missing
# env VERSION (1.31.1), PYTHON (python3), PART_MIB (60)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
version=${VERSION:-1.31.1}
py=${PYTHON:-python3}
parts="$root/carried/ort"
tmp=/tmp/ort-parts
say() { printf '[ort-gpu] %s\n' "$*"; }

case "${1:-}" in
  download)
    [ -x "$root/.venv/bin/pip" ] && pip="$root/.venv/bin/pip" || pip="$py -m pip"
    dl=$(mktemp -d)
    trap 'rm -rf "$dl"' EXIT
    $pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_28_x86_64 "onnxruntime-gpu==$version" -d "$dl"
    wheel=$(ls "$dl"/onnxruntime_gpu-*.whl)
    rm -rf "$parts"
    mkdir -p "$parts"
    size=$(stat -c %s "$wheel")
    limit=$(( ${PART_MIB:-60} * 1024 * 1024 ))
    n=$(( (size + limit - 1) / limit ))
    sum=$(sha256sum "$wheel" | cut -d' ' -f1)
    (cd "$dl" && split -n "$n" -d -a 1 "$(basename "$wheel")" part)
    for ((k = 0; k < n; k++)); do
      mkdir -p "$parts/part$k"
      mv "$dl/part$k" "$parts/part$k/"
      printf '%s %s %s\n' "$(basename "$wheel")" "$n" "$sum" > "$parts/part$k/manifest"
    done
    say "$(basename "$wheel"): $((size / 1048576)) MiB in $n parts under $parts"
    ;;
  stage)
    mkdir -p "$tmp"
    found=0
    for d in "$parts"/part*/; do
      [ -f "$d/manifest" ] || continue
      cp "$d"/part* "$d/manifest" "$tmp/"
      found=$((found + 1))
      say "staged $(basename "$d") in $tmp"
    done
    [ "$found" -gt 0 ] || { say "no carried/ort/part*/ in this call"; exit 1; }
    ls "$tmp"
    ;;
  install)
    if [ -f /tmp/ortg/onnxruntime/capi/libonnxruntime_providers_cuda.so ]; then
      say "already installed in /tmp/ortg"
      exit 0
    fi
    [ -f "$tmp/manifest" ] || { say "no parts staged in $tmp"; exit 1; }
    read -r name n sum < "$tmp/manifest"
    for ((k = 0; k < n; k++)); do
      [ -f "$tmp/part$k" ] || { say "part $k of $n is not staged yet"; exit 1; }
    done
    cat $(for ((k = 0; k < n; k++)); do echo "$tmp/part$k"; done) > "$tmp/$name"
    echo "$sum  $tmp/$name" | sha256sum -c --quiet - || { say "SHA-256 mismatch"; exit 1; }
    "$py" -m pip install --quiet --no-index --no-deps --target /tmp/ortg "$tmp/$name"
    say "installed $name into /tmp/ortg"
    ;;
  *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
