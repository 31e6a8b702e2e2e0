#!/usr/bin/env bash
# The GPU check: one call on a lent GPU machine runs mae-train and mae-run there, beside
# PyTorch and ONNX Runtime on the same card, and writes check.json and check.md to $OUT.
#
# usage: scripts/gpu/check.sh [--dry-run] [--out DIR] [--bin DIR] [--data NPZ]
#                             [--budgets S1,...,S6] [--deadline S]
#   --dry-run  every step on the CPU with tiny models (checks the script, binaries and JSON,
#              not speed; a few minutes on 2 cores with debug binaries)
#   --out      results folder (default: $OUT, as the device tool sets it; else runs/gpu-check)
#   --bin      folder of mae-train, mae-run, mae-export (default: carried/bin, else
#              target/release, else target/debug)
#   --data     PneumoniaMNIST .npz (default on the GPU: carried/data/pneumoniamnist.npz,
#              shared/data/medmnist/ or ../shared/data/medmnist/, a generated two-class set
#              when none is found; in the dry run a small generated set, or a 128-image subset
#              of --data)
#   env PYTHON: the Python with torch (default: .venv/bin/python when present, else python3)
#
# Steps, in order, each under its own time budget (defaults 20,110,85,165,80,90 s on the GPU,
# at most ~9.5 minutes in all; a step that runs out is recorded as `timeout` and the next one
# starts):
#   1. mae-train info (GPU, CUDA, cuDNN, bf16 from the device's PyTorch beside it)
#   2. fine-tune step throughput, vit_base_patch16 b128 at 224: mae-train bench vs PyTorch +
#      timm eager fp32/bf16 and torch.compile bf16
#   3. MAE pretrain step throughput, mae_vit_base_patch16 b256 and mae_vit_large_patch16 b128,
#      mae-train bench vs a compact PyTorch MAE, eager fp32/bf16
#   4. a short real fine-tune: PneumoniaMNIST upsampled to 224, ViT-B from scratch, 2 epochs in
#      bf16 and in fp16 (loss scaler); falling finite loss, test AUC
#   5. the bf16 run of step 4 under `mae-train launch --nproc-per-node 1 --dist-backend nccl`
#   6. mae-run --backend ort --device cuda: fp32 and --fp16 exports of step 4's checkpoint,
#      bench at batch 1, 64, 256 vs ONNX Runtime's Python session, fp32 parity with tract (CPU)
#
# On the lent machine (device tool `run`, one call, timeout_s 590):
#   carry: ["carried/bin", "carried/data"]     (made here by scripts/gpu/prepare.sh)
#   command: scripts/gpu/check.sh
# The device's PyTorch provides libtorch and the CUDA libraries: this script puts
# `python3 -c 'import torch,os;print(os.path.dirname(torch.__file__)+"/lib")'` and every
# `nvidia/*/lib` folder of its Python on LD_LIBRARY_PATH.
#
# ONNX Runtime's CUDA provider (step 6): the device's onnxruntime is the CPU build, and the
# onnxruntime-gpu wheel (1.31.1, CUDA 13, ~255 MB) is larger than one call may carry (64 MiB).
# Recipe (scripts/gpu/ort_gpu.sh does each part):
#   here:  scripts/gpu/ort_gpu.sh download    # pip download the wheel, split it into
#                                            # carried/ort/part0..N (each under the carry limit)
#   there: one call per part, back to back (the machine keeps /tmp while it stays warm):
#          carry ["carried/ort/partK"], command `scripts/gpu/ort_gpu.sh stage`
#   then the check call above; it joins the parts, checks the SHA-256 and installs the wheel
#   under /tmp/ortg (pip --no-index --no-deps --target), and step 6 loads
#   /tmp/ortg/onnxruntime/capi/libonnxruntime.so.* with the CUDA and cuDNN libraries of the
#   device's `nvidia` package. Without it step 6 runs on the CPU provider and records
#   "unsupported: no CUDA provider".
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
here="$root/scripts/gpu"
dry=() out=${OUT:-} bin= data= extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=(--dry-run) ;;
    --out) out=$2; shift ;;
    --bin) bin=$2; shift ;;
    --data) data=$2; shift ;;
    --budgets | --deadline) extra+=("$1" "$2"); shift ;;
    -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
say() { printf '[check] %s\n' "$*"; }
fail() { printf 'check.sh: %s\n' "$*" >&2; exit 2; }

out=${out:-"$root/runs/gpu-check"}
mkdir -p "$out" || fail "cannot create the results folder $out"
out=$(cd "$out" && pwd)

py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py=python3; fi
fi
if [ -z "$bin" ]; then
  for d in "$root/carried/bin" "$root/target/release" "$root/target/debug"; do
    if [ -x "$d/mae-train" ] || [ -f "$d/mae-train.xz" ]; then bin=$d; break; fi
  done
  [ -n "$bin" ] || fail "no mae-train in carried/bin, target/release or target/debug (run scripts/gpu/prepare.sh, or pass --bin)"
fi
[ -d "$bin" ] || fail "no folder $bin"
bin=$(cd "$bin" && pwd)
if [ ! -x "$bin/mae-train" ] && [ -f "$bin/mae-train.xz" ]; then
  # prepare.sh carries the binaries xz-compressed; unpack them outside $OUT.
  unpacked=$(mktemp -d /tmp/mae-bin.XXXXXX)
  "$py" -c 'import lzma,os,sys
for p in sys.argv[2:]:
    d = os.path.join(sys.argv[1], os.path.basename(p)[:-3])
    with lzma.open(p) as f, open(d, "wb") as g:
        g.write(f.read())
    os.chmod(d, 0o755)' "$unpacked" "$bin"/*.xz || fail "cannot unpack the binaries of $bin"
  bin=$unpacked
fi
for b in mae-train mae-run mae-export; do
  [ -x "$bin/$b" ] || fail "$bin/$b is missing or not executable"
done

torch_lib=$("$py" -c 'import torch,os;print(os.path.dirname(torch.__file__)+"/lib")' 2>/dev/null) ||
  fail "$py cannot import torch: the check needs PyTorch 2.11 (libtorch for mae-train, and the reference figures)"
nv_libs=$("$py" -c 'import nvidia,glob,os;print(":".join(sorted(glob.glob(os.path.join(list(nvidia.__path__)[0],"*","lib")))))' 2>/dev/null || true)
ort_cpu=$("$py" -c 'import onnxruntime,glob,os;print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__),"capi","libonnxruntime.so*")))[-1])' 2>/dev/null || true)
export LD_LIBRARY_PATH="$torch_lib${nv_libs:+:$nv_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# The dry run trains on a small generated set (a clear signal: its loss falls in a few steps)
# unless --data is given; the GPU run on PneumoniaMNIST, generated data only when it is absent.
if [ -z "$data" ] && [ ${#dry[@]} -eq 0 ]; then
  for f in "$root/carried/data/pneumoniamnist.npz" \
    "$root/shared/data/medmnist/pneumoniamnist.npz" \
    "$root/../shared/data/medmnist/pneumoniamnist.npz"; do
    if [ -f "$f" ]; then data=$f; break; fi
  done
fi
if [ -n "$data" ]; then
  [ -f "$data" ] || fail "no data file $data"
  data=$(cd "$(dirname "$data")" && pwd)/$(basename "$data")
fi

# ONNX Runtime with the CUDA provider, from parts staged in /tmp by earlier calls.
ort_gpu=
if [ ${#dry[@]} -eq 0 ]; then
  "$here/ort_gpu.sh" stage >/dev/null 2>&1 || true
  if "$here/ort_gpu.sh" install; then ort_gpu=/tmp/ortg/onnxruntime/capi; fi
fi

say "mode: ${dry[*]:-gpu}; binaries $bin; python $py; data ${data:-generated}"
say "libtorch $torch_lib; ONNX Runtime CPU ${ort_cpu:-none}; CUDA provider ${ort_gpu:-none}"
say "results in $out"
exec "$py" "$here/check.py" "${dry[@]}" --out "$out" --bin "$bin" --python "$py" \
  ${data:+--data "$data"} ${ort_cpu:+--ort-cpu "$ort_cpu"} ${ort_gpu:+--ort-gpu "$ort_gpu"} "${extra[@]}"
