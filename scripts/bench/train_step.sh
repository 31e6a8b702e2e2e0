#!/usr/bin/env bash
# Training-step benchmark on the CPU: `mae-train bench` against PyTorch (timm ViT, AdamW) on the
# same machine, threads and shapes: vit_tiny_patch4_28 at batch 64 and vit_base_patch16 at
# batch 8 (forward, backward, optimizer step; fp32). Runs alternate between the two, so load
# from elsewhere falls on both. Prints a table with the CPU's features; JSON in $OUT.
#
# usage: scripts/bench/train_step.sh ; env THREADS (every core), STEPS (10), ROUNDS (2),
#        BIN (folder of mae-train, default target/debug), OUT (runs/bench-train-step)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${BIN:-"$root/target/debug"}
out=${OUT:-"$root/runs/bench-train-step"}
steps=${STEPS:-10}
rounds=${ROUNDS:-2}
export OMP_NUM_THREADS=${THREADS:-$(nproc)}
py="$root/.venv/bin/python"
mkdir -p "$out"
say() { printf '\033[1m[train-step]\033[0m %s\n' "$*" >&2; }
say "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $OMP_NUM_THREADS threads"
for r in $(seq "$rounds"); do
  for case in "vit_tiny_patch4_28 64" "vit_base_patch16 8"; do
    set -- $case
    say "round $r: $1, batch $2"
    "$bin/mae-train" bench --model "$1" --batch-size "$2" --steps "$steps" --warmup 2 \
      --device cpu --json > "$out/mae-$1-$r.json"
    "$py" "$root/scripts/bench/train_step.py" "$1" --batch-size "$2" --steps "$steps" \
      --warmup 2 > "$out/torch-$1-$r.json"
  done
done
"$py" - "$out" "$rounds" <<'PY'
import json, os, sys
out, rounds = sys.argv[1], int(sys.argv[2])
flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
named = [("AVX2", "avx2"), ("AVX-512F", "avx512f"), ("AVX512-VNNI", "avx512_vnni"),
         ("AVX512-BF16", "avx512_bf16"), ("AMX-BF16", "amx_bf16")]
print("CPU features: " + ", ".join(n + ("" if f in flags else " (no)") for n, f in named) + "\n")
print("| model | batch | mae-train median ms/step | PyTorch median ms/step | mae-train / PyTorch |")
print("|---|---|---|---|---|")
for m, b in [("vit_tiny_patch4_28", 64), ("vit_base_patch16", 8)]:
    mae = [json.load(open(f"{out}/mae-{m}-{r}.json"))["median_ms"] for r in range(1, rounds + 1)]
    pt = [json.load(open(f"{out}/torch-{m}-{r}.json"))["median_ms"] for r in range(1, rounds + 1)]
    a, t = min(mae), min(pt)
    print(f"| {m} | {b} | {a:.1f} | {t:.1f} | {a / t:.3f}× |")
PY
