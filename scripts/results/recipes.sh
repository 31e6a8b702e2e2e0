#!/usr/bin/env bash
# The recipe search of issue 29 (item 4), one lever at a time: fine-tuning on a target's
# ImageFolder tree (written by transfer.sh) from one pretraining, with the sweep's recipe and
# one change per recipe, each a `mae-train sweep` of its own (so it resumes where it stopped),
# then one table of test AUC and ACC per recipe against the base.
#
# usage: scripts/results/recipes.sh
#        env TARGET (breastmnist), INIT (a checkpoint: MedNIST's MAE continued on the target,
#        as transfer.sh writes it), SEEDS (0), RECIPES (names from the list below, comma-
#        separated; all by default), BIN (target/release), OUT (runs/results-transfer),
#        BASE (flag=value changes to the base recipe for this target, e.g. BASE="epochs=5" for
#        PneumoniaMNIST, whose all-label sweep cells run 5 epochs: the base is then the sweep's
#        cell), TABLE=1 (only the table of the cells finished so far), RUN (a name for a second set of
#        recipes from another INIT: its folders are recipes-RUN/ instead of recipes/),
#        CONTINUE=N: first continue MedNIST's MAE (MEDNIST_MAE, transfer.sh's by default) for N
#        epochs of MAE on the target's training images (resumable), and start the recipes from
#        that, in recipes-continuedN/ unless RUN is given
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${BIN:-"$root/target/release"}
out=${OUT:-"$root/runs/results-transfer"}
target=${TARGET:-breastmnist}
init=${INIT:-"$out/$target/pt-continued/checkpoint-19.safetensors"}
seeds=${SEEDS:-0}
tree="$out/$target/eval_data"
recipes_dir="$out/$target/recipes${RUN:+-$RUN}"
say() { printf '\033[1m[recipes %s]\033[0m %s\n' "$(date +%H:%M:%S)" "$*"; }
[ -d "$tree" ] || { echo "no $tree: run scripts/results/transfer.sh first" >&2; exit 2; }
if [ -n "${CONTINUE:-}" ]; then
  # The pretraining-length lever: MedNIST's MAE continued longer on the target than
  # transfer.sh's 20 epochs, with its recipe otherwise.
  mednist_mae=${MEDNIST_MAE:-"$out/pt-mednist/checkpoint-15.safetensors"}
  cont="$out/$target/pt-continued-$CONTINUE"
  init="$cont/checkpoint-$((CONTINUE - 1)).safetensors"
  recipes_dir="$out/$target/recipes-${RUN:-continued$CONTINUE}"
  if [ ! -f "$init" ] && [ "${TABLE:-0}" != 1 ]; then
    [ -f "$mednist_mae" ] || { echo "no MedNIST MAE checkpoint $mednist_mae (MEDNIST_MAE)" >&2; exit 2; }
    from=(--init "$mednist_mae")
    newest=$(ls "$cont"/checkpoint-[0-9]*.safetensors 2>/dev/null | grep -v optim | sort -V | tail -1 || true)
    [ -n "$newest" ] && from=(--resume "$newest")
    say "$target · MedNIST's MAE continued for $CONTINUE epochs on the target's images"
    start=$(date +%s)
    "$bin/mae-train" pretrain --model mae_vit_tiny_patch8_64 --depth 6 --input-size 64 \
      --data-path "$tree" --output-dir "$cont" --epochs "$CONTINUE" --warmup-epochs 5 \
      --batch-size 64 --blr 1.5e-4 --weight-decay 0.05 --mask-ratio 0.75 --norm-pix-loss \
      --seed 0 "${from[@]}"
    say "   took $(($(date +%s) - start)) s"
  fi
fi

[ -f "$init" ] || { echo "no checkpoint $init (INIT)" >&2; exit 2; }

# The base: transfer.sh's fine-tuning recipe. Each recipe changes some of these flags.
declare -A base=(
  [epochs]=16 [warmup-epochs]=1 [batch-size]=32 [lr]=3e-4 [drop-path]=0.05
  [layer-decay]=0.75 [min-crop-scale]=0.6 [aa]=none [mixup]=0 [cutmix]=0 [reprob]=0
  [smoothing]=0.1
)
for kv in ${BASE:-}; do
  [[ $kv == *=* ]] || { echo "BASE: '$kv' is not flag=value" >&2; exit 2; }
  [ -n "${base[${kv%%=*}]:-}" ] || { echo "BASE: no base flag --${kv%%=*}" >&2; exit 2; }
  base[${kv%%=*}]=${kv#*=}
done
# name: the flags it changes (flag=value ...), and what it tries.
recipes=(
  "base:"
  "epochs50:epochs=50 warmup-epochs=3"
  "lr1e-3:lr=1e-3"
  "decay0.9:layer-decay=0.9"
  "mix50:epochs=50 warmup-epochs=3 mixup=0.8 cutmix=1.0"
  "crop0.35:min-crop-scale=0.35"
  "droppath0.1:drop-path=0.1"
  "nosmooth:smoothing=0"
  "batch16:batch-size=16"
  "mix50decay0.9:epochs=50 warmup-epochs=3 mixup=0.8 cutmix=1.0 layer-decay=0.9"
  "ema0.99:model-ema model-ema-decay=0.99"
  "mix50ema:epochs=50 warmup-epochs=3 mixup=0.8 cutmix=1.0 model-ema model-ema-decay=0.995"
  # for a BASE with fewer epochs (PneumoniaMNIST's 5)
  "epochs10:epochs=10"
  "epochs16:epochs=16"
  "mix16:epochs=16 mixup=0.8 cutmix=1.0"
)
flags() { # the recipe's changes (flag=value, or a switch alone) -> the whole flag string
  declare -A f
  local s="--balance-classes"
  for k in "${!base[@]}"; do f[$k]=${base[$k]}; done
  for kv in $1; do
    if [[ $kv == *=* ]]; then f[${kv%%=*}]=${kv#*=}; else s+=" --$kv"; fi
  done
  for k in "${!f[@]}"; do s+=" --$k ${f[$k]}"; done
  echo "$s"
}

for r in "${recipes[@]}"; do
  name=${r%%:*}
  changes=${r#*:}
  if [ -n "${RECIPES:-}" ] && [[ ",$RECIPES," != *",$name,"* ]]; then continue; fi
  [ "${TABLE:-0}" = 1 ] && continue
  say "$target · $name (${changes:-unchanged}${BASE:+, on a base with $BASE}) · seeds $seeds"
  start=$(date +%s)
  "$bin/mae-train" sweep --train-samples all --seeds "$seeds" --init "ft=$init" \
    --kinds finetune --kind-args "finetune=$(flags "$changes")" \
    --output-dir "$recipes_dir/$name" -- --model vit_tiny_patch8_64 --depth 6 \
    --input-size 64 --data-path "$tree"
  say "   took $(($(date +%s) - start)) s"
done

say "test AUC and ACC per recipe"
echo "| recipe | changes | seeds | test AUC | test ACC |"
echo "|---|---|---:|---|---|"
for r in "${recipes[@]}"; do
  name=${r%%:*}
  dir="$recipes_dir/$name"
  ls "$dir"/cells/*/*/*/cell.json >/dev/null 2>&1 || continue
  row=$("$root/.venv/bin/python" "$root/scripts/results/sweep_cells.py" "$dir" | tail -1)
  # sweep_cells.py's row: | kind | init | labels | seeds | AUC | ACC |
  IFS='|' read -r _ _ _ _ s auc acc _ <<<"$row"
  changes=${r#*:}
  echo "| $name | ${changes:-none} | ${s// /} | ${auc# } | ${acc# } |"
done
