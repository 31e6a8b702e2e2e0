#!/usr/bin/env bash
# Prepares what scripts/gpu/check.sh needs on the lent GPU machine: stripped, xz-compressed
# release binaries in carried/bin (mae-train, mae-run, mae-export; check.sh unpacks them there)
# and the PneumoniaMNIST file in carried/data,
# both git-ignored, and checks that they travel within the device tool's 64 MiB per call
# together with the working tree.
#
# usage: scripts/gpu/prepare.sh [--debug] [--no-build]
#   --debug     carry target/debug's binaries instead (no build): checks this script's logic
#               quickly; not for the GPU, where debug builds are too slow
#   --no-build  use target/release as it is
# env DATA (PneumoniaMNIST .npz, default ../shared/data/medmnist/pneumoniamnist.npz), LIMIT_MIB (64)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
profile=release build=1
for a in "$@"; do
  case "$a" in
    --debug) profile=debug build=0 ;;
    --no-build) build=0 ;;
    -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "prepare.sh: unknown argument '$a'" >&2; exit 2 ;;
  esac
done
say() { printf '[prepare] %s\n' "$*"; }
fail() { printf 'prepare.sh: %s\n' "$*" >&2; exit 1; }
bins=(mae-train mae-run mae-export)

if [ "$build" = 1 ]; then
  say "cargo build --release -p mae-trainer -p mae-runtime -p mae-exporter"
  cargo build --release -p mae-trainer -p mae-runtime -p mae-exporter
fi
for b in "${bins[@]}"; do
  [ -x "target/$profile/$b" ] || fail "target/$profile/$b is missing (build it, or drop --no-build)"
done

stage=carried/bin.tmp
rm -rf "$stage"
mkdir -p "$stage"
for b in "${bins[@]}"; do
  strip -o "$stage/$b" "target/$profile/$b"
done
# mae-train must keep libtorch_cuda.so linked, or the device's CUDA goes unseen.
readelf -d "$stage/mae-train" | grep -q 'NEEDED.*libtorch_cuda' ||
  fail "mae-train does not link libtorch_cuda.so: it would not see the GPU (link with -Wl,--no-as-needed -ltorch_cuda)"
if command -v ldd >/dev/null; then
  lib=$(.venv/bin/python -c 'import torch,os;print(os.path.dirname(torch.__file__)+"/lib")' 2>/dev/null || true)
  for b in "${bins[@]}"; do
    missing=$(LD_LIBRARY_PATH=${lib:-} ldd "$stage/$b" | grep 'not found' || true)
    [ -z "$missing" ] || fail "$b needs libraries that are not found:
$missing"
  done
  # Libraries outside libtorch and the C runtime would have to be on the device too.
  other=$(LD_LIBRARY_PATH=${lib:-} ldd "$stage/mae-train" | awk '{print $1}' |
    grep -Ev '^(linux-vdso|/lib64/ld-linux|lib(c|m|dl|rt|pthread|util|gcc_s|stdc\+\+)\.so|lib(torch|c10|gomp|cu|nv|nccl))' || true)
  [ -z "$other" ] || say "note: mae-train also needs: $(echo $other) (present on the device?)"
fi
# xz shrinks them about fivefold; check.sh unpacks them on the device (Python's lzma).
xz -T0 -6 "$stage"/*
rm -rf carried/bin
mv "$stage" carried/bin

data=${DATA:-"$root/../shared/data/medmnist/pneumoniamnist.npz"}
mkdir -p carried/data
if [ -f "$data" ]; then
  cp "$data" carried/data/pneumoniamnist.npz
else
  say "no PneumoniaMNIST at $data: the check will generate a synthetic set there"
  rm -f carried/data/pneumoniamnist.npz
fi

tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb carried/bin carried/data | tail -1 | cut -f1)
limit=$(( ${LIMIT_MIB:-64} * 1048576 ))
total=$((tree + carried))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
for f in carried/bin/* carried/data/*; do
  if [ -e "$f" ]; then say "$(printf '%-34s %6s MiB' "$f" "$(mib "$(stat -c %s "$f")")")"; fi
done
say "working tree $(mib "$tree") MiB + carried $(mib "$carried") MiB = $(mib "$total") MiB (limit ${LIMIT_MIB:-64} MiB)"
[ "$total" -le "$limit" ] || fail "too large to carry: $total bytes > $limit"
say 'ready: device tool run with carry ["carried/bin", "carried/data"], command scripts/gpu/check.sh, timeout_s 590'
