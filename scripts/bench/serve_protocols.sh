#!/usr/bin/env bash
# mae-run serve through /v1 and the Open Inference Protocol (/v2) side by side, and the cost of
# TLS and bearer tokens, on the tiny test model (runtime/tests/fixtures/gen_models.py).
# Figures go to $OUT (default runs/bench-serve) as JSON lines and a summary on standard output.
#
# usage: scripts/bench/serve_protocols.sh ; env CLIENTS (8), SECONDS_LOAD (10), THREADS (2),
#        BIN (folder of mae-run, default target/release if built there, else target/debug)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
clients=${CLIENTS:-8}
seconds=${SECONDS_LOAD:-10}
threads=${THREADS:-2}
out=${OUT:-"$root/runs/bench-serve"}
py="$root/.venv/bin/python"
if [ -z "${BIN:-}" ]; then
  BIN="$root/target/release"
  [ -x "$BIN/mae-run" ] || BIN="$root/target/debug"
fi
command -v openssl >/dev/null || { echo "openssl is needed for the test certificate" >&2; exit 1; }
mkdir -p "$out"
say() { printf '\033[1m[bench]\033[0m %s\n' "$*" >&2; }

say "machine: $(nproc) cores; $BIN/mae-run; $clients clients, ${seconds}s per run"
"$py" "$root/runtime/tests/fixtures/gen_models.py" "$out/fixtures" >/dev/null
model="$out/fixtures/multiclass.onnx"
image="$out/fixtures/images/rgb.png"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost -keyout "$out/key.pem" -out "$out/cert.pem" 2>/dev/null
token=bench-token
printf '%s bench\n' "$(printf %s "$token" | sha256sum | cut -d' ' -f1)" > "$out/api-keys"

pid=""
trap '[ -z "$pid" ] || kill "$pid" 2>/dev/null || true' EXIT
start() { # port, extra flags...
  local port=$1; shift
  "$BIN/mae-run" serve --model "$model" --threads "$threads" --listen "127.0.0.1:$port" \
    --max-batch 8 --queue-size 256 "$@" > "$out/serve-$port.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do grep -q "serving" "$out/serve-$port.log" 2>/dev/null && return; sleep 0.2; done
  echo "mae-run serve did not start:" >&2; cat "$out/serve-$port.log" >&2; exit 1
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""; }
load() { # base api clients [flags]
  local base=$1 api=$2 n=$3; shift 3
  "$py" "$root/scripts/bench/serve_protocols.py" "$base" multiclass "$image" --api "$api" \
    --clients "$n" --seconds "$seconds" "$@" | tee -a "$out/results.jsonl"
}
: > "$out/results.jsonl"

port=$(( 20000 + RANDOM % 20000 ))
say "plain HTTP, no tokens: /v1 then /v2 at $clients clients, then one client"
start "$port"
load "http://127.0.0.1:$port" v1 "$clients"
load "http://127.0.0.1:$port" v2 "$clients"
load "http://127.0.0.1:$port" v1 1
load "http://127.0.0.1:$port" v2 1
stop
port=$((port + 1))
say "HTTPS with bearer tokens"
start "$port" --tls-cert "$out/cert.pem" --tls-key "$out/key.pem" --api-keys "$out/api-keys"
load "https://localhost:$port" v1 "$clients" --token "$token" --cafile "$out/cert.pem"
load "https://localhost:$port" v2 "$clients" --token "$token" --cafile "$out/cert.pem"
load "https://localhost:$port" v1 1 --token "$token" --cafile "$out/cert.pem"
load "https://localhost:$port" v2 1 --token "$token" --cafile "$out/cert.pem"
stop

"$py" - "$out/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def get(api, scheme, clients):
    return next(r for r in rows if r["api"] == api and r["scheme"] == scheme and r["clients"] == clients)
n = max(r["clients"] for r in rows)
print(f"{'':24}{'/v1 req/s':>11}{'/v2 req/s':>11}{'/v1 p50 ms':>12}{'/v2 p50 ms':>12}")
for scheme, label in [("http", "plain"), ("https", "TLS + token")]:
    for c in (n, 1):
        a, b = get("v1", scheme, c), get("v2", scheme, c)
        print(f"{label + f', {c} clients':24}{a['requests_per_s']:>11}{b['requests_per_s']:>11}"
              f"{a['p50_ms']:>12}{b['p50_ms']:>12}")
for api in ("v1", "v2"):
    p, s = get(api, "http", 1), get(api, "https", 1)
    print(f"/{api} latency ratio TLS+token / plain (1 client, p50): {s['p50_ms'] / p['p50_ms']:.3f}")
PY
