#!/usr/bin/env bash
# Reproduces the table in docs/upcycling.md with one command (about 40 minutes on 2 CPU cores):
#   1. pretrain a small dense LLaMA on the King James Bible          (recipes/upcycle/dense.yaml)
#   2. upcycle it, 16 experts / top-4, with each construction method  (moekit upcycle)
#   3. continue pretraining each upcycled model, and the dense model  (recipes/upcycle/cpt.yaml)
#   4. score every model on the same held-out windows                 (recipes/upcycle/evaluate.py)
# Stages whose output exists are skipped; delete runs/upcycle to start over.
#   bash recipes/upcycle/run.sh [methods...]        (default: random cluster)
set -euo pipefail
cd "$(dirname "$0")/../.."
R="$PWD/runs/upcycle"
if [ $# -gt 0 ]; then METHODS=("$@"); else METHODS=(random cluster); fi
mkdir -p "$R"
[ -s recipes/kjv/data/kjv.txt ] || python recipes/kjv/prepare.py
head -c 200000 recipes/kjv/data/kjv.txt > "$R/calibration.txt"   # Genesis: calibration text for importance / report

[ -f "$R/dense/model/config.json" ] || nice -n 10 moekit train recipes/upcycle/dense.yaml --set out_dir="$R/dense"
for m in "${METHODS[@]}"; do
  [ -f "$R/$m/init/config.json" ] || nice -n 10 moekit upcycle --model "$R/dense/model" --out "$R/$m/init" \
      --method "$m" --experts 16 --top-k 4 --calibration "$R/calibration.txt" --seq-len 256 --windows 32
  [ -f "$R/$m/cpt/model/config.json" ] || nice -n 10 moekit train recipes/upcycle/cpt.yaml \
      --set model.path="$R/$m/init" --set out_dir="$R/$m/cpt"
done
# the same continued pretraining for the dense model: what the extra tokens alone are worth
[ -f "$R/dense-cpt/model/config.json" ] || nice -n 10 moekit train recipes/upcycle/cpt.yaml \
    --set model.path="$R/dense/model" --set out_dir="$R/dense-cpt"
# LLaMA-MoE's scale E/K against S = E (which matches the dense FFN on average): loss before training only
[ -f "$R/random-scale16/init/config.json" ] || nice -n 10 moekit upcycle --model "$R/dense/model" \
    --out "$R/random-scale16/init" --method random --experts 16 --top-k 4 --scale 16
nice -n 10 python recipes/upcycle/evaluate.py --runs "$R" --methods "${METHODS[@]}" random-scale16
logs=()
for m in "${METHODS[@]}"; do logs+=("$m=$R/$m/cpt/log.jsonl"); done
logs+=("dense=$R/dense-cpt/log.jsonl")
moekit plot "${logs[@]}" -o "$R/cpt.png" --title "continual pretraining after upcycling (16 experts, top-4)"
