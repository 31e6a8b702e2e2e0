#!/usr/bin/env bash
# The quick-start job: a small labelled image set is generated, a tiny ViT fine-tuned on it on
# the CPU, evaluated, exported to ONNX and run with mae-run. Steps that this build does not have
# yet are named and skipped.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bin="$root/target/debug"
out=${1:-"$root/runs/demo"}
say() { printf '\033[1m[demo]\033[0m %s\n' "$*"; }
has() { "$bin/$1" --help 2>/dev/null | grep -q -- "$2"; }

rm -rf "$out"
mkdir -p "$out"

say "1. this machine, as libtorch sees it"
"$bin/mae-train" info | tee "$out/machine.txt"

say "2. a small labelled image set (3 shapes, 28×28 grayscale)"
"$bin/mae-train" synth --output "$out/data" --per-class 60 --size 28

say "3. fine-tune a tiny ViT (vit_tiny_patch4_28, 4 blocks) on the CPU"
"$bin/mae-train" finetune --data-path "$out/data" --output-dir "$out/train" \
  --model vit_tiny_patch4_28 --depth 4 --epochs 15 --warmup-epochs 2 --batch-size 16 \
  --lr 1e-3 --layer-decay 1.0 --drop-path 0.0 --min-crop-scale 0.5 --reprob 0 --smoothing 0 --num-workers 2

say "4. evaluate on the held-out test split"
"$bin/mae-train" eval --resume "$out/train/checkpoint-14.safetensors" --data-path "$out/data" \
  --split test --output "$out/test-metrics.json"

onnx="$out/model.onnx"
if has mae-export "--output"; then
  say "5. export to ONNX"
  "$bin/mae-export" --onnx --checkpoint "$out/train/checkpoint-14.safetensors" --output "$onnx"
else
  say "5. export: mae-export --onnx is not in this build yet"
fi

if [ -f "$onnx" ] && has mae-run predict; then
  say "6. predict the test images with mae-run (no libtorch)"
  "$bin/mae-run" predict --model "$onnx" "$out/data/test" --format csv --output "$out/predictions.csv"
  "$bin/mae-run" eval --model "$onnx" --data-path "$out/data" --split test | tee "$out/mae-run-eval.txt"
else
  say "6. inference: mae-run predict is not in this build yet"
fi

say "outputs:"
say "  machine report     $out/machine.txt"
say "  image set          $out/data (train/ val/ test/, one folder per class)"
say "  training run       $out/train (args.json, log.txt, checkpoint-*.safetensors, metrics.json)"
say "  test metrics       $out/test-metrics.json"
[ -f "$onnx" ] && say "  ONNX model         $onnx"
[ -f "$out/predictions.csv" ] && say "  predictions        $out/predictions.csv"
exit 0
