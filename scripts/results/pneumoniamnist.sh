#!/usr/bin/env bash
# Does MAE pretraining pay on medical images? PneumoniaMNIST (28×28 chest X-rays), on the CPU:
#   1. MAE pretraining of a 6-block vit_tiny_patch4_28 on the training images (labels unused);
#   2. `mae-train sweep`: fine-tuning at 100, 300, 600, 1200 and all (4708) labels × 3 seeds,
#      from scratch and from that pretraining, with the same recipe and epochs per cell, each
#      cell's best-validation checkpoint tested on the official test split;
#   3. the table and the plot copied to docs/results/.
# Interrupted, it resumes: pretraining from its last checkpoint, the sweep at its first
# unfinished cell.
#
# usage: scripts/results/pneumoniamnist.sh [DATA.npz]
#   env: OUT (runs/results-pneumoniamnist), BIN (target/debug), PT_EPOCHS (100), PT_WARMUP (10),
#        FT_EPOCHS (16), SIZES (100,300,600,1200,all), SEEDS (0,1,2)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
data=${1:-"$root/../shared/data/medmnist/pneumoniamnist.npz"}
out=${OUT:-"$root/runs/results-pneumoniamnist"}
bin=${BIN:-"$root/target/debug"}
pt_epochs=${PT_EPOCHS:-100}
[ -f "$data" ] || { echo "no PneumoniaMNIST file at $data" >&2; exit 2; }
say() { printf '\033[1m[pneumoniamnist]\033[0m %s\n' "$*"; }
say "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"

pt="$out/pretrain"
last="$pt/checkpoint-$((pt_epochs - 1)).safetensors"
if [ ! -f "$last" ]; then
  say "1. MAE pretraining, $pt_epochs epochs, mask ratio 0.75, normalised-pixel loss"
  resume=()
  newest=$(ls "$pt"/checkpoint-[0-9]*.safetensors 2>/dev/null | grep -v optim | sort -V | tail -1 || true)
  [ -n "$newest" ] && resume=(--resume "$newest")
  "$bin/mae-train" pretrain --model mae_vit_tiny_patch4_28 --depth 6 --data-path "$data" \
    --output-dir "$pt" --epochs "$pt_epochs" --warmup-epochs "${PT_WARMUP:-10}" --batch-size 64 --blr 1.5e-4 \
    --weight-decay 0.05 --mask-ratio 0.75 --norm-pix-loss --seed 0 "${resume[@]}"
fi

say "2. the sweep: scratch vs MAE-pretrained"
"$bin/mae-train" sweep --train-samples "${SIZES:-100,300,600,1200,all}" --seeds "${SEEDS:-0,1,2}" \
  --init "scratch,mae=$last" --init-args 'scratch=--layer-decay 1.0' \
  --output-dir "$out/sweep" -- \
  --model vit_tiny_patch4_28 --depth 6 --data-path "$data" --epochs "${FT_EPOCHS:-16}" \
  --warmup-epochs 1 --batch-size 32 --lr 3e-4 --drop-path 0.05 --min-crop-scale 0.6 --aa none \
  --mixup 0 --cutmix 0 --reprob 0 --smoothing 0.1 --balance-classes

say "3. results to docs/results/pneumoniamnist/"
mkdir -p "$root/docs/results/pneumoniamnist"
cp "$out/sweep/sweep.csv" "$out/sweep/sweep.md" "$out/sweep/sweep.png" \
  "$root/docs/results/pneumoniamnist/"
cp "$pt/log.txt" "$root/docs/results/pneumoniamnist/pretrain-log.txt"
