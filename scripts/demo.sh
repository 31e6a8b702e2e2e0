#!/usr/bin/env bash
# The quick-start job: a small labelled image set is generated, a tiny ViT fine-tuned on it on
# the CPU, evaluated, exported to ONNX and run with mae-run.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bin="$root/target/debug"
out=${1:-"$root/runs/demo"}
say() { printf '\033[1m[demo]\033[0m %s\n' "$*"; }

rm -rf "$out"
mkdir -p "$out"

say "1. this machine, as libtorch sees it"
"$bin/mae-train" info | tee "$out/machine.txt"

say "2. a small labelled image set (3 shapes, 28×28 grayscale)"
"$bin/mae-train" synth --output "$out/data" --per-class 60 --size 28

say "3. fine-tune a tiny ViT (vit_tiny_patch4_28, 4 blocks) on the CPU"
"$bin/mae-train" finetune --data-path "$out/data" --output-dir "$out/train" \
  --model vit_tiny_patch4_28 --depth 4 --epochs 15 --warmup-epochs 2 --batch-size 16 \
  --lr 1e-3 --layer-decay 1.0 --drop-path 0.0 --min-crop-scale 0.5 --aa none --reprob 0 --smoothing 0 --num-workers 2

say "4. evaluate on the held-out test split"
"$bin/mae-train" eval --resume "$out/train/checkpoint-14.safetensors" --data-path "$out/data" \
  --split test --output "$out/test-metrics.json"

onnx="$out/model.onnx"
say "5. export to ONNX (no libtorch; checked with tract against the checkpoint's probe outputs)"
"$bin/mae-export" --onnx --checkpoint "$out/train/checkpoint-14.safetensors" --output "$onnx"

say "6. predict and evaluate the test images with mae-run (no libtorch)"
"$bin/mae-run" predict --model "$onnx" "$out/data/test" --format csv --output "$out/predictions.csv"
"$bin/mae-run" eval --model "$onnx" --data-path "$out/data" --split test | tee "$out/mae-run-eval.txt"

say "outputs:"
say "  machine report     $out/machine.txt"
say "  image set          $out/data (train/ val/ test/, one folder per class)"
say "  training run       $out/train (args.json, log.txt, checkpoint-*.safetensors, metrics.json)"
say "  test metrics       $out/test-metrics.json"
say "  ONNX model         $onnx"
say "  predictions        $out/predictions.csv (mae-run)"
say "  mae-run metrics    $out/mae-run-eval.txt"
exit 0
