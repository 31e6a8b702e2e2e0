#!/usr/bin/env bash
# Two builds of mae-run against each other, in alternating rounds in one run: the measures of
# scripts/bench/runtime.sh that a change inside mae-run can move (tract in fp32, int8 dynamic
# and int8 static at batch 1 and batch 8, one thread, ONNX Runtime as a control, serve under 8
# clients and one client's p99), each taken from build A then build B (B first in even rounds),
# and the median over rounds of each B / A ratio. Figures go to $OUT as JSON and a table.
#
# usage: scripts/bench/runtime_ab.sh BIN_A BIN_B [MODEL]
#   BIN_*: folders holding mae-run (BIN_A also mae-export, which makes the models)
#   env THREADS (2), ITERS (20), ROUNDS (5), SECONDS_LOAD (10), P99_REQUESTS (60),
#       OUT (runs/bench-ab)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
a=$(cd "$1" && pwd)
b=$(cd "$2" && pwd)
model=${3:-vit_base_patch16}
threads=${THREADS:-2}
iters=${ITERS:-20}
rounds=${ROUNDS:-5}
seconds=${SECONDS_LOAD:-10}
p99_requests=${P99_REQUESTS:-60}
out=${OUT:-"$root/runs/bench-ab"}
py="$root/.venv/bin/python"
mkdir -p "$out"
say() { printf '\033[1m[ab %s]\033[0m %s\n' "$(date +%T)" "$*"; }

say "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
say "CPU: $("$py" -c "import sys; sys.path.insert(0, '$root/scripts/bench'); from cpuinfo import cpu; m, n, has, lacks = cpu(); print(f'{m}; has {\", \".join(has)}; lacks {\", \".join(lacks)}')")"
say "A: $a; B: $b"
if [ ! -f "$out/$model.int8s.onnx" ]; then
  say "random $model weights, exported fp32, int8 (dynamic) and int8 (static) by A's mae-export"
  "$root/scripts/bench/vit_models.sh" "$out" "$model" "$a"
  "$py" -c "import numpy as np; from PIL import Image; Image.fromarray((np.random.default_rng(0).random((224,224,3))*255).astype('uint8')).save('$out/probe.png')"
fi

bench() { # side round name model backend threads batch [flags]
  "$1/mae-run" bench --model "$4" --backend "$5" --threads "$6" --batch-size "$7" \
    --iterations "$iters" --format json --output "$out/$3.json" "${@:8}" 2>/dev/null
}
serve() { # side name
  local port=$(( 20000 + RANDOM % 20000 ))
  "$1/mae-run" serve --model "$out/$model.onnx" --threads "$threads" --listen "127.0.0.1:$port" \
    --max-batch 8 --queue-size 256 --timeout-ms 120000 > "$out/$2.serve.log" 2>&1 &
  local pid=$!
  for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 1; done
  "$py" "$root/scripts/bench/serve_load.py" "http://127.0.0.1:$port/v1/predict" "$out/probe.png" \
    --clients 8 --seconds "$seconds" --warmup 3 > "$out/$2-serve8.json"
  "$py" "$root/scripts/bench/serve_load.py" "http://127.0.0.1:$port/v1/predict" "$out/probe.png" \
    --clients 1 --warmup 3 --requests "$p99_requests" > "$out/$2-serve1.json"
  kill -TERM $pid; wait $pid || true
}
side() { # folder label round
  local s=$1 l=$2 r=$3
  bench "$s" "$r" "r$r-$l-fp32-b1" "$out/$model.onnx" tract "$threads" 1 --parallel ops
  bench "$s" "$r" "r$r-$l-fp32-b8" "$out/$model.onnx" tract "$threads" 8 --parallel images
  bench "$s" "$r" "r$r-$l-fp32-1t" "$out/$model.onnx" tract 1 1
  bench "$s" "$r" "r$r-$l-int8-b1" "$out/$model.int8.onnx" tract "$threads" 1 --parallel ops
  bench "$s" "$r" "r$r-$l-int8-b8" "$out/$model.int8.onnx" tract "$threads" 8 --parallel images
  bench "$s" "$r" "r$r-$l-int8s-b1" "$out/$model.int8s.onnx" tract "$threads" 1 --parallel ops
  bench "$s" "$r" "r$r-$l-int8s-b8" "$out/$model.int8s.onnx" tract "$threads" 8 --parallel images
  bench "$s" "$r" "r$r-$l-ort-b1" "$out/$model.onnx" ort "$threads" 1
  serve "$s" "r$r-$l"
}
for r in $(seq "$rounds"); do
  if [ $((r % 2)) = 1 ]; then
    side "$a" A "$r"; side "$b" B "$r"
  else
    side "$b" B "$r"; side "$a" A "$r"
  fi
  say "round $r of $rounds done"
done
"$py" - "$out" "$rounds" <<'PY' | tee "$out/table.md"
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def ms(r, side, name):
    return json.load(open(f"{out}/r{r}-{side}-{name}.json"))["batches"][0]["ms_per_image"]
def serve(r, side, clients, key):
    return json.load(open(f"{out}/r{r}-{side}-serve{clients}.json"))[key]
rows = [(f"tract {n}, ms/image (p50)", lambda r, s, n=n: ms(r, s, n), False) for n in
        ("fp32-b1", "fp32-b8", "fp32-1t", "int8-b1", "int8-b8", "int8s-b1", "int8s-b8")]
rows.append(("ONNX Runtime fp32-b1, ms/image (control)", lambda r, s: ms(r, s, "ort-b1"), False))
rows.append(("serve 8 clients, images/s", lambda r, s: serve(r, s, 8, "images_per_s"), True))
rows.append(("serve 1 client, p99 ms", lambda r, s: serve(r, s, 1, "p99_ms"), False))
print("| measure | A (median) | B (median) | B / A per round | median B / A |")
print("|---|---|---|---|---|")
for name, get, higher_better in rows:
    a = [get(r, "A") for r in range(1, rounds + 1)]
    b = [get(r, "B") for r in range(1, rounds + 1)]
    ratios = [y / x for x, y in zip(a, b)]
    print(f"| {name} | {statistics.median(a):.2f} | {statistics.median(b):.2f} | "
          f"{', '.join(f'{q:.3f}' for q in ratios)} | **{statistics.median(ratios):.3f}** |")
PY
say "figures in $out"
