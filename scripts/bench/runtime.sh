#!/usr/bin/env bash
# Runtime benchmark: a randomly initialised ViT (default vit_base_patch16, 224×224) exported by
# mae-export in fp32, dynamic int8 and static int8 (calibrated on random images), measured with `mae-run bench` on tract and ONNX Runtime, beside
# ONNX Runtime's own Python InferenceSession on the same file and threads, then `mae-run serve`
# under concurrent clients. Figures go to $OUT (default runs/bench-runtime) as JSON and a table.
#
# usage: scripts/bench/runtime.sh [MODEL] ; env THREADS (2), ITERS (20), CLIENTS (8), SECONDS_LOAD (30),
#        BIN (folder of the binaries, default target/release if built there, else target/debug),
#        SLOW_ITERS (3): iterations of int8 models in tract's own graph (MAE_TRACT_REWRITES=none),
#        which is slow, ROUNDS (3): alternating batch-1 rounds (tract and ORT, fp32 and both
#        int8 forms; then bench and a 1-client serve) for median ratios that one slow spell of a
#        shared machine does not decide, P99_ITERS (100): iterations and requests of each side
#        of the bench / 1-client serve rounds, PATH_ROUNDS (3) and PATH_ITERS (10): the
#        kernel-path rounds (scripts/bench/kernel_paths.sh), ONLY_PATHS=1: the models, the
#        kernel paths and the table, nothing else
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
model=${1:-vit_base_patch16}
threads=${THREADS:-2}
iters=${ITERS:-20}
clients=${CLIENTS:-8}
seconds=${SECONDS_LOAD:-30}
out=${OUT:-"$root/runs/bench-runtime"}
py="$root/.venv/bin/python"
if [ -z "${BIN:-}" ]; then
  BIN="$root/target/release"
  [ -x "$BIN/mae-run" ] || BIN="$root/target/debug"
fi
mkdir -p "$out"
say() { printf '\033[1m[bench]\033[0m %s\n' "$*"; }

say "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); binaries $BIN"
say "1. random $model weights, exported fp32, int8 (dynamic) and int8 (static, 32 calibration images)"
"$root/scripts/bench/vit_models.sh" "$out" "$model" "$BIN"
say "   $("$BIN/mae-run" info --model "$out/$model.onnx" | grep -E '^(cpu|kernels) ')"
if [ "${ONLY_PATHS:-0}" = 1 ]; then
  say "2. kernel paths only (ONLY_PATHS=1)"
  BIN=$BIN THREADS=$threads "$root/scripts/bench/kernel_paths.sh" "$out" "$model"
  say "3. the table"
  "$py" "$root/scripts/bench/table.py" "$out" --model "$model" --threads "$threads" | tee "$out/table.md"
  exit 0
fi

bench() { # name model backend threads batches [extra mae-run flags]
  "$BIN/mae-run" bench --model "$2" --backend "$3" --threads "$4" --batch-size "$5" \
    --iterations "$iters" --format json --output "$out/$1.json" "${@:6}"
  say "   $1: $("$py" "$root/scripts/bench/summary.py" "$out/$1.json")"
}
bench_slow() { # as bench, with SLOW_ITERS iterations
  "$BIN/mae-run" bench --model "$2" --backend "$3" --threads "$4" --batch-size "$5" \
    --iterations "${SLOW_ITERS:-3}" --format json --output "$out/$1.json" "${@:6}"
  say "   $1: $("$py" "$root/scripts/bench/summary.py" "$out/$1.json")"
}
say "2. mae-run bench ($threads threads, then 1; $iters iterations)"
bench tract-fp32 "$out/$model.onnx" tract "$threads" 1,8 --parallel ops
bench tract-fp32-images "$out/$model.onnx" tract "$threads" 8 --parallel images
MAE_TRACT_PLANS=symbolic bench tract-fp32-symbolic "$out/$model.onnx" tract "$threads" 1,8
bench tract-fp32-1t "$out/$model.onnx" tract 1 1
bench ort-fp32 "$out/$model.onnx" ort "$threads" 1,8
bench ort-fp32-1t "$out/$model.onnx" ort 1 1
bench ort-int8 "$out/$model.int8.onnx" ort "$threads" 1,8
bench ort-int8s "$out/$model.int8s.onnx" ort "$threads" 1,8
bench tract-int8s "$out/$model.int8s.onnx" tract "$threads" 1,8
bench tract-int8 "$out/$model.int8.onnx" tract "$threads" 1,8
bench tract-int8-images "$out/$model.int8.onnx" tract "$threads" 8 --parallel images
say "   tract's own graph, without mae-run's rewrites (MAE_TRACT_REWRITES=none)"
MAE_TRACT_REWRITES=none bench tract-fp32-own "$out/$model.onnx" tract "$threads" 1
MAE_TRACT_REWRITES=none bench tract-fp32-own-1t "$out/$model.onnx" tract 1 1
MAE_TRACT_REWRITES=none bench_slow tract-int8-own "$out/$model.int8.onnx" tract "$threads" 1
MAE_TRACT_REWRITES=none bench_slow tract-int8s-own "$out/$model.int8s.onnx" tract "$threads" 1
rounds=${ROUNDS:-3}
say "   batch 1, $rounds alternating rounds: tract and ORT, fp32, int8 dynamic and int8 static"
for r in $(seq "$rounds"); do
  bench "round-$r-tract" "$out/$model.onnx" tract "$threads" 1 --parallel ops
  bench "round-$r-ort" "$out/$model.onnx" ort "$threads" 1
  bench "round-$r-tract-int8" "$out/$model.int8.onnx" tract "$threads" 1 --parallel ops
  bench "round-$r-ort-int8" "$out/$model.int8.onnx" ort "$threads" 1
  bench "round-$r-tract-int8s" "$out/$model.int8s.onnx" tract "$threads" 1 --parallel ops
  bench "round-$r-ort-int8s" "$out/$model.int8s.onnx" ort "$threads" 1
done
say "   kernel paths forced one by one, with tract's own kernels and ONNX Runtime"
BIN=$BIN THREADS=$threads "$root/scripts/bench/kernel_paths.sh" "$out" "$model"
say "3. ONNX Runtime's Python InferenceSession, same file and threads"
"$py" "$root/scripts/bench/ort_python.py" "$out/$model.onnx" --threads "$threads" \
  --iterations "$iters" > "$out/ort-python-fp32.json"
"$py" "$root/scripts/bench/ort_python.py" "$out/$model.int8.onnx" --threads "$threads" \
  --iterations "$iters" > "$out/ort-python-int8.json"
"$py" "$root/scripts/bench/ort_python.py" "$out/$model.int8s.onnx" --threads "$threads" \
  --iterations "$iters" > "$out/ort-python-int8s.json"
for f in ort-python-fp32 ort-python-int8 ort-python-int8s; do
  say "   $f: $("$py" "$root/scripts/bench/summary.py" "$out/$f.json")"
done

say "4. mae-run serve (tract backend): $clients clients, then 1 client, ${seconds}s each"
"$py" -c "import numpy as np; from PIL import Image; Image.fromarray((np.random.default_rng(0).random((224,224,3))*255).astype('uint8')).save('$out/probe.png')"
port=$(( 20000 + RANDOM % 20000 ))
"$BIN/mae-run" serve --model "$out/$model.onnx" --threads "$threads" --listen "127.0.0.1:$port" \
  --max-batch 8 --queue-size 256 --timeout-ms 120000 > "$out/serve.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 1; done
"$py" "$root/scripts/bench/serve_load.py" "http://127.0.0.1:$port/v1/predict" "$out/probe.png" \
  --clients "$clients" --seconds "$seconds" > "$out/serve.json"
say "   serve, $clients clients: $(cat "$out/serve.json")"
"$py" "$root/scripts/bench/serve_load.py" "http://127.0.0.1:$port/v1/predict" "$out/probe.png" \
  --clients 1 --seconds "$seconds" > "$out/serve-1.json"
say "   serve, 1 client: $(cat "$out/serve-1.json")"
# A p99 of 20 samples is their slowest one: these rounds take P99_ITERS (default 100) each side.
p99_iters=${P99_ITERS:-100}
say "   $rounds alternating rounds: bench at batch 1 ($p99_iters iterations after its 3 warm-up passes, serve idle), then 1 client sending 3 untimed requests and $p99_iters timed"
for r in $(seq "$rounds"); do
  iters=$p99_iters bench "round-$r-bench-b1" "$out/$model.onnx" tract "$threads" 1
  "$py" "$root/scripts/bench/serve_load.py" "http://127.0.0.1:$port/v1/predict" "$out/probe.png" \
    --clients 1 --warmup 3 --requests "$p99_iters" > "$out/round-$r-serve-1.json"
  say "   round-$r-serve-1: $(cat "$out/round-$r-serve-1.json")"
done
kill -TERM $pid; wait $pid || true

say "5. the table (every ratio from this run)"
"$py" "$root/scripts/bench/table.py" "$out" --model "$model" --threads "$threads" | tee "$out/table.md"
say "figures in $out"
