#!/usr/bin/env bash
# mae-run's kernel paths side by side on one model, in alternating rounds: each path forced with
# MAE_KERNELS (avx512, avx-vnni, avx2), tract's own product kernels (MAE_TRACT_REWRITES=
# no-products, the other rewrites on the same path) on AVX-512 and on AVX2, and ONNX Runtime, in fp32 and int8 dynamic, at batch 1
# and 8. An AVX-512 CPU runs the AVX2 and AVX-VNNI code, so every path is measured on it: the
# narrower paths also hide AVX-512 (and AVX-VNNI) from tract's own kernels through
# TRACT_CPU_ISA, so that what is left to tract runs as it would on such a CPU. ONNX Runtime
# keeps the kernels it picks for this CPU. A path this CPU lacks is left out, and said so.
#
# usage: scripts/bench/kernel_paths.sh OUT MODEL_BASENAME   (runtime.sh runs it; the models
#        OUT/MODEL.onnx and OUT/MODEL.int8.onnx must exist: scripts/bench/vit_models.sh)
#        env BIN (binaries), THREADS (2), PATH_ITERS (10), PATH_ROUNDS (3)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=$1
model=$2
threads=${THREADS:-2}
iters=${PATH_ITERS:-10}
rounds=${PATH_ROUNDS:-3}
BIN=${BIN:-"$root/target/release"}
py="$root/.venv/bin/python"
say() { printf '\033[1m[bench]\033[0m %s\n' "$*"; }

# The features each narrower path hides from tract's own kernels.
hide_avx512="-avx512f,-avx512vnni,-avx512fp16"
isa_of() {
  case $1 in
    avx512) echo "" ;;
    avx-vnni) echo "$hide_avx512" ;;
    avx2) echo "$hide_avx512,-avxvnni" ;;
  esac
}

paths=()
for p in avx512 avx-vnni avx2; do
  if MAE_KERNELS=$p "$BIN/mae-run" info --model "$out/$model.onnx" >/dev/null 2>"$out/refused.txt"; then
    paths+=("$p")
  else
    say "   path $p: not on this CPU ($(tail -1 "$out/refused.txt"))"
  fi
done
own=(avx512 avx2)
[[ " ${paths[*]} " == *" avx512 "* ]] || own=(avx2)
[[ " ${paths[*]} " == *" avx2 "* ]] || own=()

one() { # name env-assignments... -- model backend
  local name=$1; shift
  local envs=()
  while [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  env "${envs[@]}" "$BIN/mae-run" bench --model "$1" --backend "$2" --threads "$threads" \
    --batch-size 1,8 --iterations "$iters" --format json --output "$out/$name.json"
  say "   $name: $("$py" "$root/scripts/bench/summary.py" "$out/$name.json")"
}

say "   kernel paths: ${paths[*]:-none}; tract's own kernels on: ${own[*]:-none}; $rounds alternating rounds, $iters iterations at batch 1 and 8, $threads threads"
for r in $(seq "$rounds"); do
  for kind in fp32 int8; do
    file="$out/$model.onnx"
    [ "$kind" = int8 ] && file="$out/$model.int8.onnx"
    for p in "${paths[@]}"; do
      # AVX-VNNI changes only the int8 products: its fp32 is the AVX2 path.
      [ "$p" = avx-vnni ] && [ "$kind" = fp32 ] && continue
      one "path-$r-$p-$kind" MAE_KERNELS="$p" TRACT_CPU_ISA="$(isa_of "$p")" -- "$file" tract
    done
    for p in "${own[@]}"; do
      one "path-$r-own-$p-$kind" MAE_TRACT_REWRITES=no-products MAE_KERNELS="$p" \
        TRACT_CPU_ISA="$(isa_of "$p")" -- "$file" tract
    done
    one "path-$r-ort-$kind" MAE_KERNELS=auto -- "$file" ort
  done
done
