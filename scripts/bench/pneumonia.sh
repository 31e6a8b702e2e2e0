#!/usr/bin/env bash
# PneumoniaMNIST from scratch on the CPU: a 6-block vit_tiny_patch4_28 trained on the 28×28 train
# split with class-balanced loss, the checkpoint with the best validation AUC evaluated on the
# official test split. Prints the training time and writes everything under $OUT.
#
# usage: scripts/bench/pneumonia.sh [DATA.npz] ; env OUT (runs/pneumonia-scratch), EPOCHS (16),
#        SEED (0), BIN (folder of the binaries, default target/debug)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
data=${1:-"$root/../shared/data/medmnist/pneumoniamnist.npz"}
out=${OUT:-"$root/runs/pneumonia-scratch"}
bin=${BIN:-"$root/target/debug"}
[ -f "$data" ] || { echo "no PneumoniaMNIST file at $data" >&2; exit 2; }
say() { printf '\033[1m[pneumonia]\033[0m %s\n' "$*"; }

say "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
say "1. train from scratch (layer decay 1.0: every block learns at the same rate)"
"$bin/mae-train" finetune --model vit_tiny_patch4_28 --depth 6 --data-path "$data" \
  --output-dir "$out" --epochs "${EPOCHS:-16}" --warmup-epochs 1 --batch-size 32 --lr 3e-4 \
  --layer-decay 1.0 --drop-path 0.05 --min-crop-scale 0.6 --aa none --mixup 0 --cutmix 0 \
  --reprob 0 --smoothing 0.1 --balance-classes --seed "${SEED:-0}"
say "2. the best checkpoint by validation AUC, on the test split"
"$bin/mae-train" eval --resume "$out/checkpoint-best.safetensors" --data-path "$data" \
  --split test --output "$out/test-metrics.json"
