#!/usr/bin/env bash
# What medical pretraining data, and how much of it, buys on a new medical task: the seed's
# experiment at its own scale, on the CPU, with no ImageNet data anywhere.
#   1. MAE pretraining of a 6-block vit_tiny_patch8_64 on MedNIST's 47,164 training images
#      (mednist.zip read in place; labels unused);
#   2. the MedNIST size curve: fine-tuning at 600 and 6000 images × 3 seeds and at 36000 and all
#      (47,164) × 1 seed with fewer epochs, from scratch and from (1); each cell's
#      best-validation checkpoint tested on MedNIST's test split;
#   3. each target (PneumoniaMNIST, BreastMNIST) written out as an ImageFolder tree
#      (`eval_data/{train,val,test}/{class}/`, 28×28 PNG, run at --input-size 64);
#   4. MAE pretraining on each target's own training images, and (1) continued on them;
#   5. per target, one sweep: fine-tuning and linear probing with 100 and all labels × 3 seeds,
#      from (a) scratch, (b) MAE on the target's images, (c) MAE on MedNIST, (d) the MedNIST
#      classifiers of (2) at 600, 6000 and all (seed 0, from MAE), (e) (c) continued on the
#      target;
#   6. tables, plots and pretraining logs to docs/results/transfer/ (each target's from every
#      finished cell in its sweep's folder).
# Interrupted, it resumes: pretraining from its last checkpoint, each sweep at its first
# unfinished cell. Each step prints its wall time.
#
# usage: scripts/results/transfer.sh
#   env: OUT (runs/results-transfer), BIN (target/release if built, else target/debug),
#        MEDNIST (../shared/data/mednist.zip), PNEUMONIA, BREAST (../shared/data/medmnist/*.npz),
#        PT_EPOCHS (40), PT_WARMUP (4), TARGET_PT_EPOCHS (100), CONTINUE_EPOCHS (20),
#        FT_EPOCHS (10: MedNIST at 600 and 6000), FT_EPOCHS_LARGE (1: at 36000 and all, with
#        a warm-up of WARMUP_LARGE, 0.2 epochs: 1125 and 1473 steps, against 1875 at 6000),
#        TARGET_EPOCHS (16), LP_EPOCHS (30), LP_LR (2: an absolute rate; the linear-scaling
#        rule from base lr 0.1 at batch 64 gives 0.025, with which the LARS-trained probe
#        learns only the class prior), LP_BATCH (64: at most the 100-label cells' images),
#        ALL_EPOCHS (pneumoniamnist=5: per target, the epochs of its all-label cells, fine-tune
#        and linear probe, through the sweep's --size-args; a target not named keeps
#        TARGET_EPOCHS and LP_EPOCHS, as BreastMNIST's 546 images do),
#        INITS (scratch,mae_own,mae_mednist,mae_mednist_then_own,mednist_ft_*: which inits the
#        targets' sweeps run; a pretraining no init named needs is not run),
#        SEEDS (0,1,2), KINDS (finetune,linprobe: the targets' cell kinds; KINDS=finetune
#        first, then a run with both, has every fine-tune cell before the first probe),
#        RESTORE=1: before each target's sweep, the cells that docs/results/transfer/*-sweep.csv
#        hold get their cell.json back from it (scripts/results/restore_cells.py), so a run
#        continued on a fresh machine runs only the cells not measured yet (not with SMOKE=1),
#        SMOKE=1: every step on tiny subsets (BreastMNIST only) and one epoch, to check the
#        pipeline in minutes; for a partial run: TARGETS (breastmnist,pneumoniamnist: which
#        targets), LARGE=0 (skip MedNIST's 36000 and all cells), SUPERVISED (600,6k,all: which
#        MedNIST classifiers are (d)), CURVE=0 (of the size curve, only the cells that are (d):
#        seed 0, from MAE); a later full run adds only the cells left out
set -euo pipefail
# Whether the comma-separated list $1 holds the item $2.
listed() { [[ ",$1," == *",$2,"* ]]; }
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
shared="$root/../shared/data"
mednist=${MEDNIST:-"$shared/mednist.zip"}
# BreastMNIST first: its sweep takes minutes where PneumoniaMNIST's takes hours, so a run cut
# short still has one whole target.
targets=("breastmnist=${BREAST:-$shared/medmnist/breastmnist.npz}"
         "pneumoniamnist=${PNEUMONIA:-$shared/medmnist/pneumoniamnist.npz}")
out=${OUT:-"$root/runs/results-transfer"}
bin=${BIN:-"$root/target/release"}
[ -x "$bin/mae-train" ] || bin="$root/target/debug"
smoke=${SMOKE:-0}
py="$root/.venv/bin/python"
if [ "$smoke" = 1 ]; then
  out=${OUT:-"$root/runs/results-transfer-smoke"}
  : "${PT_EPOCHS:=1}" "${PT_WARMUP:=0}" "${TARGET_PT_EPOCHS:=1}" "${CONTINUE_EPOCHS:=1}"
  : "${FT_EPOCHS:=1}" "${FT_EPOCHS_LARGE:=1}" "${TARGET_EPOCHS:=1}" "${LP_EPOCHS:=1}" "${SEEDS:=0}" "${LP_BATCH:=32}"
  targets=("${targets[0]}")
fi
if [ -n "${TARGETS:-}" ]; then
  keep=()
  for t in "${targets[@]}"; do ! listed "$TARGETS" "${t%%=*}" || keep+=("$t"); done
  targets=("${keep[@]}")
fi
pt_epochs=${PT_EPOCHS:-40}
seeds=${SEEDS:-0,1,2}
say() { printf '\033[1m[transfer %s]\033[0m %s\n' "$(date +%T)" "$*"; }
timed() { local t0=$SECONDS; "$@"; say "   took $((SECONDS - t0)) s"; }
for f in "$mednist" "${targets[@]#*=}"; do
  [ -f "$f" ] || { echo "no data file at $f" >&2; exit 2; }
done
say "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $bin"
if [ "$smoke" = 1 ] && [ ! -f "$out/mednist-smoke.zip" ]; then
  # A MedNIST in miniature, with the zip's layout: 30 images per class of each split.
  mkdir -p "$out"
  "$py" - "$mednist" "$out/mednist-smoke.zip" <<'PY'
import collections, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
taken = collections.Counter()
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst + ".tmp", "w") as zout:
    for info in zin.infolist():
        parts = info.filename.split("/")
        if info.is_dir() or len(parts) != 4 or taken[tuple(parts[1:3])] >= 30:
            continue
        taken[tuple(parts[1:3])] += 1
        zout.writestr(info.filename, zin.read(info))
import os
os.replace(dst + ".tmp", dst)
PY
fi
[ "$smoke" = 1 ] && mednist="$out/mednist-smoke.zip"

# MAE pretraining into DIR (resumed from its newest checkpoint): pretrain DIR EPOCHS FLAGS...
pretrain() {
  local dir=$1 epochs=$2
  shift 2
  [ -f "$dir/checkpoint-$((epochs - 1)).safetensors" ] && return 0
  local resume=() newest
  newest=$(ls "$dir"/checkpoint-[0-9]*.safetensors 2>/dev/null | grep -v optim | sort -V | tail -1 || true)
  [ -n "$newest" ] && resume=(--resume "$newest")
  "$bin/mae-train" pretrain --model mae_vit_tiny_patch8_64 --depth 6 --input-size 64 \
    --output-dir "$dir" --epochs "$epochs" --batch-size 64 --blr 1.5e-4 --weight-decay 0.05 \
    --mask-ratio 0.75 --norm-pix-loss --seed 0 "${resume[@]}" "$@"
}
# The fine-tuning recipe of docs/results/pneumoniamnist.md, at 64×64 with patch 8.
arch=(--model vit_tiny_patch8_64 --depth 6 --input-size 64)
tuning="--warmup-epochs 1 --batch-size 32 --lr 3e-4 --drop-path 0.05 --min-crop-scale 0.6 \
--aa none --mixup 0 --cutmix 0 --reprob 0 --smoothing 0.1 --balance-classes"
small=600,6000
large=36000,all
if [ "$smoke" = 1 ]; then small=60; large=120; fi

pt_mednist="$out/pt-mednist"
say "1. MAE pretraining on MedNIST's training images, $pt_epochs epochs"
timed pretrain "$pt_mednist" "$pt_epochs" --data-path "$mednist" --warmup-epochs "${PT_WARMUP:-4}"
mae_mednist="$pt_mednist/checkpoint-$((pt_epochs - 1)).safetensors"

classifier() { # size: the MedNIST classifier fine-tuned from MAE on that many images, seed 0
  local sweep=mednist-small
  ! listed "$large" "$1" || sweep=mednist-large
  echo "$out/$sweep/cells/mae/n$1/seed0/checkpoint-best.safetensors"
}
if [ "$smoke" = 1 ]; then sup=(600=60 all=120); else sup=(600=600 6k=6000 all=all); fi
# Whether the targets' sweeps run this init (INITS).
wanted() { [ -z "${INITS:-}" ] || listed "$INITS" "$1"; }
keep=()
for s in "${sup[@]}"; do
  [ -z "${SUPERVISED:-}" ] || listed "$SUPERVISED" "${s%%=*}" || continue
  ! wanted "mednist_ft_${s%%=*}" || keep+=("$s")
done
sup=("${keep[@]}")

curve_small=(--train-samples "$small" --seeds "$seeds" --init "scratch,mae=$mae_mednist"
  --init-args 'scratch=--layer-decay 1.0')
curve_large=(--train-samples "$large" --seeds 0 --init "scratch,mae=$mae_mednist"
  --init-args 'scratch=--layer-decay 1.0')
what="$small × seeds $seeds, $large × seed 0"
if [ "${CURVE:-1}" = 0 ]; then
  # Only the classifiers (d) needs: the same cells (and folders) as in the whole curve.
  need_small=() need_large=()
  for s in "${sup[@]}"; do
    if listed "$large" "${s#*=}"; then need_large+=("${s#*=}"); else need_small+=("${s#*=}"); fi
  done
  small=$(IFS=,; echo "${need_small[*]}")
  large=$(IFS=,; echo "${need_large[*]}")
  curve_small=(--train-samples "$small" --seeds 0 --init "mae=$mae_mednist")
  curve_large=(--train-samples "$large" --seeds 0 --init "mae=$mae_mednist")
  [ -n "$large" ] || LARGE=0
  what="CURVE=0, only the classifiers of (d): ${small:-none} and ${large:-none}, seed 0, from MAE"
fi
say "2. the MedNIST size curve: $what"
[ -z "$small" ] || \
timed "$bin/mae-train" sweep "${curve_small[@]}" \
  --output-dir "$out/mednist-small" -- "${arch[@]}" $tuning --data-path "$mednist" \
  --epochs "${FT_EPOCHS:-10}"
[ "${LARGE:-1}" = 0 ] || \
timed "$bin/mae-train" sweep "${curve_large[@]}" \
  --output-dir "$out/mednist-large" -- "${arch[@]}" \
  ${tuning/--warmup-epochs 1/--warmup-epochs ${WARMUP_LARGE:-0.2}} --data-path "$mednist" \
  --epochs "${FT_EPOCHS_LARGE:-1}"
for t in "${targets[@]}"; do
  name=${t%%=*}
  npz=${t#*=}
  say "3. $name as an ImageFolder tree (eval_data)"
  tree="$out/$name/eval_data"
  [ -d "$tree" ] || "$bin/mae-train" export-npz --data-path "$npz" --output "$tree"
  say "4. MAE on $name's training images, and MedNIST's MAE continued on them"
  ! wanted mae_own || timed pretrain "$out/$name/pt-own" "${TARGET_PT_EPOCHS:-100}" \
    --data-path "$tree" --warmup-epochs "$([ "$smoke" = 1 ] && echo 0 || echo 10)"
  ! wanted mae_mednist_then_own || timed pretrain "$out/$name/pt-continued" \
    "${CONTINUE_EPOCHS:-20}" --data-path "$tree" \
    --warmup-epochs "$([ "$smoke" = 1 ] && echo 0 || echo 2)" --init "$mae_mednist"
  own="$out/$name/pt-own/checkpoint-$((${TARGET_PT_EPOCHS:-100} - 1)).safetensors"
  continued="$out/$name/pt-continued/checkpoint-$((${CONTINUE_EPOCHS:-20} - 1)).safetensors"
  all_inits=("scratch" "mae_own=$own" "mae_mednist=$mae_mednist" "mae_mednist_then_own=$continued")
  for s in "${sup[@]}"; do all_inits+=("mednist_ft_${s%%=*}=$(classifier "${s#*=}")"); done
  inits=
  for i in "${all_inits[@]}"; do ! wanted "${i%%=*}" || inits+="${inits:+,}$i"; done
  [ -n "$inits" ] || { echo "INITS=$INITS names none of the inits" >&2; exit 2; }
  if [ "${RESTORE:-0}" = 1 ] && [ "$smoke" != 1 ] \
      && [ -f "$root/docs/results/transfer/$name-sweep.csv" ]; then
    "$py" "$root/scripts/results/restore_cells.py" "$root/docs/results/transfer/$name-sweep.csv" \
      "$out/$name/sweep"
  fi
  say "5. $name: fine-tuning (100 and all labels) and linear probing, from every pretraining"
  sizes=$([ "$smoke" = 1 ] && echo 40,80 || echo 100,all)
  size_args=()
  for te in ${ALL_EPOCHS-pneumoniamnist=5}; do
    [ "${te%%=*}" = "$name" ] && size_args=(--size-args "${sizes#*,}=--epochs ${te#*=} --warmup-epochs 1")
  done
  kinds=${KINDS:-finetune,linprobe}
  kind_args=()
  ! listed "$kinds" finetune || \
    kind_args+=(--kind-args "finetune=--epochs ${TARGET_EPOCHS:-16} $tuning")
  ! listed "$kinds" linprobe || kind_args+=(--kind-args \
    "linprobe=--epochs ${LP_EPOCHS:-30} --lr ${LP_LR:-2} --global-pool --batch-size ${LP_BATCH:-64}")
  # (the sweep refuses --init-args for an init it does not run)
  scratch_args=()
  ! wanted scratch || scratch_args=(--init-args 'scratch=--layer-decay 1.0')
  timed "$bin/mae-train" sweep --train-samples "$sizes" "${size_args[@]}" \
    --seeds "$seeds" --init "$inits" "${scratch_args[@]}" \
    --kinds "$kinds" "${kind_args[@]}" \
    --output-dir "$out/$name/sweep" -- "${arch[@]}" --data-path "$tree"
done

say "6. results to docs/results/transfer/"
if [ "$smoke" = 1 ]; then say "   (smoke run: nothing copied)"; exit 0; fi
dst="$root/docs/results/transfer"
mkdir -p "$dst"
if [ "${CURVE:-1}" = 0 ]; then
  say "   (CURVE=0: the MedNIST size curve's files are left as they are)"
else
  for d in mednist-small mednist-large; do
    for f in sweep.csv sweep.md sweep.png; do [ ! -f "$out/$d/$f" ] || cp "$out/$d/$f" "$dst/$d-$f"; done
  done
fi
cp "$pt_mednist/log.txt" "$dst/pretrain-mednist-log.txt"
for t in "${targets[@]}"; do
  name=${t%%=*}
  # Every finished cell in the sweep's folder, restored ones included, not only those of the
  # last command's inits.
  table=$("$py" "$root/scripts/results/sweep_cells.py" "$out/$name/sweep" --csv "$dst/$name-sweep.csv" \
    --png "$dst/$name-sweep.png" --title "$name: test AUC and ACC against labels, per pretraining")
  printf '# %s: every cell, mean ± sd over seeds\n\nBy `scripts/results/transfer.sh`; the sweep'"'"'s last command:\n\n```\n%s\n```\n\n%s\n' \
    "$name" "$(cat "$out/$name/sweep/sweep.command.txt")" "$table" > "$dst/$name-sweep.md.tmp"
  mv "$dst/$name-sweep.md.tmp" "$dst/$name-sweep.md"
  # (a pretraining that INITS left out has no log here)
  [ ! -f "$out/$name/pt-own/log.txt" ] || cp "$out/$name/pt-own/log.txt" "$dst/pretrain-$name-log.txt"
  [ ! -f "$out/$name/pt-continued/log.txt" ] ||
    cp "$out/$name/pt-continued/log.txt" "$dst/pretrain-mednist-then-$name-log.txt"
done
