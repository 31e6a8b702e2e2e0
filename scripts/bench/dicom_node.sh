#!/usr/bin/env bash
# The DICOM node end to end: dcmtk's storescu sends a study of N CR images (512×512, 16-bit,
# Explicit VR Little Endian) to `mae-run serve --dicom-listen`, which classifies each and sends
# its SR and Secondary Capture on to Orthanc (--forward). From mae-run's audit log: images per
# second from the first receipt to the last result stored in Orthanc, and per image the time
# from its receipt to both results stored (p50, p99). Beside them, in the same run and on the
# same model: `mae-run bench` (the model alone, batch 1 and 8) and `mae-run predict` over the
# same files (decode, preprocess, classify, no DICOM network); and Orthanc's own ingest rate
# (storescu straight into Orthanc), the ceiling of a node that stores two results per image;
# and the node again with dcmtk's storescp (files only, no index) as the receiver, to show the
# node's own rate when the PACS does not bound it; and latency without a backlog, the same
# images sent one at a time at a steady rate under the node's capacity (pynetdicom).
# dcmtk (storescu, storescp, and the DICOM layer of Orthanc) leaves Nagle's algorithm on unless
# TCP_NODELAY=1 is in its environment, which costs ~40 ms a message (the delayed
# acknowledgement); every dcmtk process here runs with it (NAGLE=1 runs them without).
# Models: the tiny test model (runtime/tests/fixtures/gen_models.py: the DICOM path dominates)
# and a ViT-B/16 at 224 with random weights (scripts/bench/make_vit.py: the model dominates).
# Figures go to $OUT (default runs/bench-dicom) as JSON and a table on standard output.
#
# usage: scripts/bench/dicom_node.sh ; env N (200), MODELS (tiny,vit_base_patch16),
#        THREADS (2), BIN (folder of mae-run and mae-export; target/release if built there)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
n=${N:-200}
threads=${THREADS:-2}
models=${MODELS:-tiny,vit_base_patch16}
out=${OUT:-"$root/runs/bench-dicom"}
py="$root/.venv/bin/python"
if [ -z "${BIN:-}" ]; then
  BIN="$root/target/release"
  [ -x "$BIN/mae-run" ] || BIN="$root/target/debug"
fi
for tool in Orthanc storescu; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: run scripts/setup.sh" >&2; exit 1; }
done
rm -rf "$out/run"
mkdir -p "$out/run"
[ "${NAGLE:-0}" = 1 ] || export TCP_NODELAY=1
say() { printf '\033[1m[bench]\033[0m %s\n' "$*" >&2; }
free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

say "machine: $("$py" -c "import sys; sys.path.insert(0, '$root/scripts/bench'); import cpuinfo; m, c, has, lacks = cpuinfo.cpu(); print(f'{m}, {c} cores; has {\" \".join(has)}; lacks {\" \".join(lacks)}')")"
say "$BIN/mae-run; $n images; $threads threads"

say "the study: $n CR images"
"$py" - "$out/run/study" "$n" <<'EOF'
import os, sys
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
dst, n = sys.argv[1], int(sys.argv[2])
os.makedirs(dst, exist_ok=True)
rng = np.random.default_rng(0)
root = "1.2.826.0.1.3680043.8.498.4242."
y, x = np.mgrid[0:512, 0:512]
for i in range(n):
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = f"{root}2.{i + 1}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = root + "1", root + "3"
    ds.PatientID, ds.PatientName, ds.Modality = "BENCH-1", "Bench^Patient", "CR"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20261207", "120000", "B1", "1"
    ds.ReferringPhysicianName, ds.PatientBirthDate, ds.PatientSex = "", "", "O"
    ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
    ds.Rows = ds.Columns = 512
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    img = (np.sin(x / (7 + i % 5)) + np.cos(y / 11)) * 900 + 2048 + rng.normal(0, 60, (512, 512))
    ds.PixelData = np.clip(img, 0, 4095).astype(np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(f"{dst}/{i + 1:04d}.dcm", enforce_file_format=True)
EOF

orthanc_pid="" node_pid=""
cleanup() {
  [ -z "$node_pid" ] || kill "$node_pid" 2>/dev/null || true
  [ -z "$orthanc_pid" ] || kill "$orthanc_pid" 2>/dev/null || true
}
trap cleanup EXIT

start_orthanc() { # DIR: a fresh Orthanc on free ports ($http, $dicom), pid in $orthanc_pid
  http=$(free_port) dicom=$(free_port)
  mkdir -p "$1"
  printf '{"Name": "mae-bench", "StorageDirectory": "%s/db", "IndexDirectory": "%s/db", "HttpPort": %s, "DicomPort": %s, "DicomAet": "ORTHANC", "RemoteAccessAllowed": false, "AuthenticationEnabled": false, "Plugins": []}\n' \
    "$1" "$1" "$http" "$dicom" > "$1/orthanc.json"
  Orthanc "$1/orthanc.json" > "$1/log.txt" 2>&1 &
  orthanc_pid=$!
  for _ in $(seq 150); do
    curl -sf "http://127.0.0.1:$http/system" >/dev/null 2>&1 && return
    sleep 0.2
  done
  echo "Orthanc did not start:" >&2; cat "$1/log.txt" >&2; exit 1
}

through_node() { # DIR MODEL PORT [PAUSE]: storescu (or, with PAUSE, pynetdicom sending one
  # image every PAUSE seconds) → mae-run serve --dicom-listen → the receiver on PORT
  local d=$1 model=$2 port=$3 pause=${4:-} node
  node=$(free_port)
  mkdir -p "$d"
  "$BIN/mae-run" serve --model "$model" --threads "$threads" --listen 127.0.0.1:0 \
    --dicom-listen "127.0.0.1:$node" --dicom-spool "$d/spool" \
    --forward "ORTHANC@127.0.0.1:$port" --audit-log "$d/audit.jsonl" > "$d/serve.log" 2>&1 &
  node_pid=$!
  for _ in $(seq 150); do
    grep -q "DICOM node listening" "$d/serve.log" 2>/dev/null && break
    sleep 0.2
  done
  grep -q "DICOM node listening" "$d/serve.log" || { cat "$d/serve.log" >&2; exit 1; }
  if [ -n "$pause" ]; then
    "$py" "$root/runtime/tests/fixtures/scu.py" send "$node" "$pause" "$out/run/study"/*.dcm \
      > "$d/sender.txt"
  else
    storescu -aet STORESCU -aec MAE 127.0.0.1 "$node" "$out/run/study"/*.dcm
  fi
  for _ in $(seq 3000); do
    sent=$(grep -c '"event":"dicom-sent"' "$d/audit.jsonl" 2>/dev/null || true)
    [ "${sent:-0}" -ge $((2 * n)) ] && break
    sleep 0.2
  done
  kill "$node_pid" 2>/dev/null || true; wait "$node_pid" 2>/dev/null || true
  node_pid=""
}

IFS=, read -ra names <<< "$models"
for name in "${names[@]}"; do
  dir="$out/run/$name"
  mkdir -p "$dir"
  if [ "$name" = tiny ]; then
    "$py" "$root/runtime/tests/fixtures/gen_models.py" "$dir/fixtures" >/dev/null
    model="$dir/fixtures/binary.onnx"
  else
    "$py" "$root/scripts/bench/make_vit.py" "$dir/$name.pth" --model "$name" >/dev/null
    "$BIN/mae-export" --onnx --checkpoint "$dir/$name.pth" --model "$name" \
      --output "$dir/$name.onnx" >/dev/null
    model="$dir/$name.onnx"
  fi
  say "$name: Orthanc's own ingest (storescu straight into it)"
  start_orthanc "$dir/orthanc-direct"
  t0=$(date +%s.%N)
  storescu -aet STORESCU -aec ORTHANC 127.0.0.1 "$dicom" "$out/run/study"/*.dcm
  t1=$(date +%s.%N)
  kill "$orthanc_pid" 2>/dev/null || true; wait "$orthanc_pid" 2>/dev/null || true
  "$py" -c "print($n / ($t1 - $t0))" > "$dir/orthanc_ingest.txt"
  say "$name: Orthanc, then mae-run serve --dicom-listen --forward ORTHANC"
  start_orthanc "$dir/orthanc"
  through_node "$dir" "$model" "$dicom"
  # The same images at a steady rate under the node's capacity: latency without a backlog.
  pace=$([ "$name" = tiny ] && echo "${PACE_TINY:-0.02}" || echo "${PACE:-0.2}")
  say "$name: one image every ${pace}s (pynetdicom) → mae-run → Orthanc"
  through_node "$dir/paced" "$model" "$dicom" "$pace"
  echo "$pace" > "$dir/paced/pause.txt"
  in_orthanc=$(curl -sf "http://127.0.0.1:$http/statistics" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["CountInstances"])')
  kill "$orthanc_pid" 2>/dev/null || true; wait "$orthanc_pid" 2>/dev/null || true
  orthanc_pid=""

  say "$name: the same with dcmtk's storescp (files only, no index) as the receiver"
  receiver=$(free_port)
  mkdir -p "$dir/storescp/files"
  storescp -aet ORTHANC -od "$dir/storescp/files" "$receiver" > "$dir/storescp/log.txt" 2>&1 &
  orthanc_pid=$!
  sleep 1
  through_node "$dir/storescp" "$model" "$receiver"
  kill "$orthanc_pid" 2>/dev/null || true; wait "$orthanc_pid" 2>/dev/null || true
  orthanc_pid=""

  say "$name: mae-run bench and mae-run predict on the same model"
  for b in 1 8; do
    "$BIN/mae-run" bench --model "$model" --threads "$threads" --batch-size "$b" \
      --iterations 20 --warmup 3 --format json > "$dir/bench-b$b.json"
  done
  start=$(date +%s.%N)
  "$BIN/mae-run" predict --model "$model" --threads "$threads" --format jsonl \
    "$out/run/study"/*.dcm > "$dir/predict.jsonl"
  end=$(date +%s.%N)
  "$py" - "$dir" "$n" "$in_orthanc" "$start" "$end" "$name" > "$dir/summary.json" <<'EOF'
import json, sys
from datetime import datetime
d, n, in_orthanc, start, end, name = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
t = lambda s: datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()
def run(log):
    recs = [json.loads(l) for l in open(log)]
    received = {r["sop_instance_uid"]: t(r["time"]) for r in recs if r["event"] == "dicom-received"}
    sent = {r["sop_instance_uid"]: t(r["time"]) for r in recs if r["event"] == "dicom-sent"}
    lat = []
    for r in recs:
        if r["event"] == "dicom-classified":
            done = [sent.get(r["sr_sop_instance_uid"]), sent.get(r["sc_sop_instance_uid"])]
            if None not in done:
                lat.append(max(done) - received[r["sop_instance_uid"]])
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))] * 1000 if lat else float("nan")
    span = max(sent.values()) - min(received.values()) if sent and received else float("nan")
    ips = len(lat) / span if span == span and span > 0 else float("nan")
    return received, sent, lat, q, ips
received, sent, lat, q, node_ips = run(f"{d}/audit.jsonl")
_, _, _, q_scp, scp_ips = run(f"{d}/storescp/audit.jsonl")
_, _, _, q_paced, paced_ips = run(f"{d}/paced/audit.jsonl")
pause = float(open(f"{d}/paced/pause.txt").read())
bench = {b: json.load(open(f"{d}/bench-b{b}.json"))["batches"][0]["images_per_s"] for b in (1, 8)}
predicted = sum(1 for _ in open(f"{d}/predict.jsonl"))
ingest = float(open(f"{d}/orthanc_ingest.txt").read())
print(json.dumps({
    "model": name, "images": n, "received": len(received), "results_sent": len(sent),
    "results_in_orthanc": in_orthanc, "complete": len(lat),
    "node_images_per_s": node_ips, "latency_p50_ms": q(0.5), "latency_p99_ms": q(0.99),
    "bench_b1_images_per_s": bench[1], "bench_b8_images_per_s": bench[8],
    "predict_images_per_s": predicted / (end - start),
    "node_over_bench_b1": node_ips / bench[1], "node_over_bench_b8": node_ips / bench[8],
    "node_over_predict": node_ips / (predicted / (end - start)),
    "orthanc_ingest_instances_per_s": ingest,
    "node_over_orthanc_ceiling": node_ips / (ingest / 2),
    "storescp_node_images_per_s": scp_ips, "storescp_latency_p50_ms": q_scp(0.5),
    "storescp_latency_p99_ms": q_scp(0.99), "storescp_node_over_bench_b1": scp_ips / bench[1],
    "paced_seconds_between_images": pause, "paced_latency_p50_ms": q_paced(0.5),
    "paced_latency_p99_ms": q_paced(0.99),
}))
EOF
done

"$py" - "$out/run" "${names[@]}" <<'EOF'
import json, sys
rows = [json.load(open(f"{sys.argv[1]}/{m}/summary.json")) for m in sys.argv[2:]]
print("| model | images | results in Orthanc | node img/s | p50 receipt → stored | p99 | bench b1 img/s | bench b8 img/s | predict img/s | Orthanc ingest inst/s | node / bench b1 | node / bench b8 | node / predict | node / Orthanc ceiling | node → storescp img/s | its p50 | its p99 | node → storescp / bench b1 | paced: one image every | its p50 | its p99 |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['model']} | {r['images']} | {r['results_in_orthanc']} | {r['node_images_per_s']:.1f} | {r['latency_p50_ms']:.0f} ms | {r['latency_p99_ms']:.0f} ms | "
          f"{r['bench_b1_images_per_s']:.1f} | {r['bench_b8_images_per_s']:.1f} | {r['predict_images_per_s']:.1f} | "
          f"{r['orthanc_ingest_instances_per_s']:.1f} | {r['node_over_bench_b1']:.2f} | {r['node_over_bench_b8']:.2f} | {r['node_over_predict']:.2f} | {r['node_over_orthanc_ceiling']:.2f} | "
          f"{r['storescp_node_images_per_s']:.1f} | {r['storescp_latency_p50_ms']:.0f} ms | {r['storescp_latency_p99_ms']:.0f} ms | {r['storescp_node_over_bench_b1']:.2f} | "
          f"{r['paced_seconds_between_images']} s | {r['paced_latency_p50_ms']:.0f} ms | {r['paced_latency_p99_ms']:.0f} ms |")
json.dump(rows, open(f"{sys.argv[1]}/../dicom_node.json", "w"), indent=1)
EOF
