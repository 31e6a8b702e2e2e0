#!/usr/bin/env bash
# tract against ONNX Runtime on ViT-B/16's matrix products alone (batch 1, 197 tokens), on 1 and
# 2 threads, with the kernel tract picks for each: the minimal case behind the end-to-end gap of
# scripts/bench/runtime.sh, self-contained enough to report to tract's maintainers.
#
# usage: scripts/bench/matmul.sh [ITERATIONS (20)]   (run it on an otherwise idle machine)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
iters=${1:-20}
scripts/setup.sh >/dev/null
cargo build --release -p mae-runtime --example tract_matmul -q
out=$(mktemp)
trap 'rm -f "$out"' EXIT
target/release/examples/tract_matmul "$iters" | tee "$out" >&2
.venv/bin/python scripts/bench/matmul.py "$out" "$iters"
