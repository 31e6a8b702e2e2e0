#!/usr/bin/env bash
# The quick-start job: a small labelled image set is generated, a tiny ViT trained on it on the
# CPU, exported to ONNX and run with mae-run. Steps that this build does not have yet are named
# and skipped.
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

say "2. a small labelled image set"
"$bin/mae-train" synth --output "$out/data" --per-class 40 --size 28

say "3. the model: vit_tiny_patch4_28 with 3 classes"
"$bin/mae-train" models --model vit_tiny_patch4_28 --nb-classes 3 > "$out/model.txt"
tail -n 1 "$out/model.txt"

say "4. training, export and inference are not in this build yet:"
say "   mae-train finetune, mae-export --onnx and mae-run predict come with the next releases."

say "outputs:"
say "  machine report   $out/machine.txt"
say "  image set        $out/data (train/ val/ test/, one folder per class)"
say "  parameter table  $out/model.txt"
