#!/usr/bin/env bash
# The benchmark models: random MODEL weights (make_vit.py) exported by BIN's mae-export as
# OUT/MODEL.onnx (fp32), OUT/MODEL.int8.onnx (dynamic int8) and OUT/MODEL.int8s.onnx (static
# int8, calibrated on 32 random images in OUT/calibration). Used by runtime.sh and
# runtime_ab.sh.
#
# usage: scripts/bench/vit_models.sh OUT MODEL BIN
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=$1 model=$2 bin=$3
py="$root/.venv/bin/python"
mkdir -p "$out/calibration"
"$py" "$root/scripts/bench/make_vit.py" "$out/$model.pth" --model "$model"
"$bin/mae-export" --onnx --checkpoint "$out/$model.pth" --model "$model" --output "$out/$model.onnx"
"$bin/mae-export" --onnx --int8 --checkpoint "$out/$model.pth" --model "$model" --output "$out/$model.int8.onnx"
"$py" -c "
import numpy as np; from PIL import Image
rng = np.random.default_rng(1)
for i in range(32):
    Image.fromarray((rng.random((256, 256, 3)) * 255).astype('uint8')).save('$out/calibration/%02d.png' % i)"
"$bin/mae-export" --onnx --int8 --calibration-data "$out/calibration" --calibration-images 32 \
  --checkpoint "$out/$model.pth" --model "$model" --output "$out/$model.int8s.onnx"
