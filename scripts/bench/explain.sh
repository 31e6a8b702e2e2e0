#!/usr/bin/env bash
# The cost of the heatmaps on the CPU, for issue 32: ViT-B/16 (random timm weights, make_vit.py)
# at batch 1 through `mae-run bench` without and with the rollout and Grad-CAM graph outputs
# (`mae-export --explain rollout,gradcam`), in alternating rounds in one run (goal: ≤ 1.10×);
# and occlusion's cost per image at the default window (input / 8, stride half of it: 15 × 15
# = 225 passes at 224 px) through `mae-run predict --explain occlusion`, against a plain predict.
# Prints the CPU's model and features first; writes the table to OUT/speed.md (and, with
# DOCS=1, to docs/results/explain/speed.md, which scripts/results/explain.sh puts on the page).
#
# Run it with no compile beside it, and the background training paused (it resumes them
# whatever happens):
#   flock /work/cargo.lock scripts/bench/explain.sh [OUT]
# env: BIN (folder of release binaries, default target/release), ROUNDS (5), ITERATIONS (20),
#      OCCLUSION_BATCH (8: occluded images per pass), THREADS (default: every core)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=${1:-"$root/target/bench-explain"}
bin=${BIN:-"$root/target/release"}
rounds=${ROUNDS:-5} iterations=${ITERATIONS:-20} obatch=${OCCLUSION_BATCH:-8}
py="$root/.venv/bin/python"
say() { printf '\033[1m[bench explain]\033[0m %s\n' "$*" >&2; }
for b in mae-export mae-run; do
  [ -x "$bin/$b" ] || { echo "no $bin/$b: cargo build --release --bins first" >&2; exit 2; }
done
mkdir -p "$out"
threads=()
[ -n "${THREADS:-}" ] && threads=(--threads "$THREADS")

# The models (kept between runs): the same weights, plain and with the maps.
if [ ! -f "$out/vit_base_patch16.explain.onnx" ]; then
  say "making the ViT-B/16 models"
  "$py" "$root/scripts/bench/make_vit.py" "$out/vit_base_patch16.pth" --model vit_base_patch16
  "$bin/mae-export" --onnx --checkpoint "$out/vit_base_patch16.pth" --model vit_base_patch16 \
    --output "$out/vit_base_patch16.onnx" > /dev/null
  "$bin/mae-export" --onnx --checkpoint "$out/vit_base_patch16.pth" --model vit_base_patch16 \
    --explain rollout,gradcam --output "$out/vit_base_patch16.explain.onnx" > /dev/null
fi
"$py" -c "
import numpy as np; from PIL import Image
Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype('uint8')).save('$out/image.png')"

paused=()
resume() {
  for p in "${paused[@]}"; do pkill -CONT -f "$p" || true; done
}
trap resume EXIT
for p in 'mae-train pretrain' 'mae-train sweep' 'mae-train finetune'; do
  pkill -STOP -f "$p" && say "paused '$p'" || true
  paused+=("$p")
done

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|avx2|fma|f16c|avx512f|avx512bw|avx512vl|avx512_vnni|avx_vnni|avx512_bf16|amx_tile|amx_bf16|amx_int8)$' | tr '\n' ' ')
say "CPU: $cpu, $(nproc) cores; SIMD: $flags"
say "mae-run: $bin/mae-run ($(date -r "$bin/mae-run" '+%F %T'))"

for r in $(seq 1 "$rounds"); do
  for kind in plain explain; do
    model="$out/vit_base_patch16.onnx"
    [ "$kind" = explain ] && model="$out/vit_base_patch16.explain.onnx"
    "$bin/mae-run" bench --model "$model" --batch-size 1 --iterations "$iterations" \
      --warmup 3 --format json "${threads[@]}" > "$out/r$r-$kind.json"
  done
  say "round $r of $rounds done"
done

# Occlusion at the default window: one image, plain predict and predict --explain occlusion.
t0=$(date +%s.%N)
"$bin/mae-run" predict --model "$out/vit_base_patch16.onnx" "${threads[@]}" "$out/image.png" > /dev/null
t1=$(date +%s.%N)
rm -rf "$out/occlusion"
"$bin/mae-run" predict --model "$out/vit_base_patch16.onnx" "${threads[@]}" \
  --batch-size "$obatch" --explain occlusion --heatmaps "$out/occlusion" "$out/image.png" > /dev/null
t2=$(date +%s.%N)
resume
trap - EXIT

"$py" - "$out" "$rounds" "$cpu" "$flags" "$(nproc)" "$t0" "$t1" "$t2" "$obatch" <<'PY'
import json, os, statistics, sys
out, rounds, cpu, flags, cores, t0, t1, t2, obatch = sys.argv[1:]
def p50(path):
    def walk(v):
        if isinstance(v, dict):
            if v.get("batch_size") == 1 and "p50_ms" in v:
                return v["p50_ms"]
            for x in v.values():
                r = walk(x)
                if r is not None:
                    return r
        if isinstance(v, list):
            for x in v:
                r = walk(x)
                if r is not None:
                    return r
        return None
    return walk(json.load(open(path)))
plain = [p50(f"{out}/r{r}-plain.json") for r in range(1, int(rounds) + 1)]
expl = [p50(f"{out}/r{r}-explain.json") for r in range(1, int(rounds) + 1)]
ratios = [e / p for p, e in zip(plain, expl)]
single = float(t1) - float(t0)
occl = float(t2) - float(t1)
lines = [
    f"CPU: {cpu}, {cores} cores; SIMD: {flags.strip()}",
    "",
    f"ViT-B/16 at batch 1, tract, `mae-run bench` p50 of 20 runs per round, {rounds} alternating rounds:",
    "",
    "| round | plain (ms) | + rollout + gradcam (ms) | ratio |",
    "|---|---|---|---|",
]
for i, (p, e, q) in enumerate(zip(plain, expl, ratios), 1):
    lines.append(f"| {i} | {p:.1f} | {e:.1f} | {q:.3f} |")
mp, me = statistics.median(plain), statistics.median(expl)
lines += [
    f"| median | {mp:.1f} | {me:.1f} | **{me / mp:.3f}×** (goal ≤ 1.10×) |",
    "",
    f"Occlusion at the default window (28 px, stride 14: 225 passes, {obatch} per batch), one "
    f"224 px image through `mae-run predict --explain occlusion`: {occl:.1f} s, against "
    f"{single:.1f} s for the plain prediction (both including the model's load): about "
    f"{occl - single:.1f} s of occlusion per image, {1000 * (occl - single) / 225:.0f} ms per pass.",
    "",
]
text = "\n".join(lines)
print(text)
tmp = f"{out}/.speed.md.tmp"
open(tmp, "w").write(text)
os.replace(tmp, f"{out}/speed.md")
PY
if [ "${DOCS:-0}" = 1 ]; then
  mkdir -p "$root/docs/results/explain"
  cp "$out/speed.md" "$root/docs/results/explain/.speed.md.tmp"
  mv "$root/docs/results/explain/.speed.md.tmp" "$root/docs/results/explain/speed.md"
fi
