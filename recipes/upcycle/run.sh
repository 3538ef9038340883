#!/usr/bin/env bash
# Reproduces the table in docs/upcycling.md with one command (an estimated 20-25 minutes on an idle 2-core CPU;
# 70 minutes on the busy shared one of docs/upcycling.md):
#   1. pretrain a small dense LLaMA on the King James Bible          (recipes/upcycle/dense.yaml)
#   2. upcycle it, 16 experts / top-4, with each construction method  (moekit upcycle)
#   3. continue pretraining each upcycled model, and the dense model  (recipes/upcycle/cpt.yaml)
#   4. score every model on the same held-out windows                 (recipes/upcycle/evaluate.py)
# Stages whose output exists are skipped; delete runs/upcycle to start over.
#   bash recipes/upcycle/run.sh [methods...]        (default: random cluster importance)
set -euo pipefail
cd "$(dirname "$0")/../.."
R="$PWD/runs/upcycle"
if [ $# -gt 0 ]; then METHODS=("$@"); else METHODS=(random cluster importance); fi
mkdir -p "$R"
[ -s recipes/kjv/data/kjv.txt ] || python recipes/kjv/prepare.py
head -c 200000 recipes/kjv/data/kjv.txt > "$R/calibration.txt"   # Genesis: calibration text for importance / report

[ -f "$R/dense/model/config.json" ] || nice -n 10 moekit train recipes/upcycle/dense.yaml --set out_dir="$R/dense"

upcycle_and_train() {  # NAME, then `moekit upcycle` flags: upcycle into $R/NAME/init, train into $R/NAME/cpt
  local name=$1; shift
  [ -f "$R/$name/init/config.json" ] || nice -n 10 moekit upcycle --model "$R/dense/model" --out "$R/$name/init" \
      --experts 16 --top-k 4 --calibration "$R/calibration.txt" --seq-len 256 --windows 32 "$@"
  [ -f "$R/$name/cpt/model/config.json" ] || nice -n 10 moekit train recipes/upcycle/cpt.yaml \
      --set model.path="$R/$name/init" --set out_dir="$R/$name/cpt"
}
for m in "${METHODS[@]}"; do upcycle_and_train "$m" --method "$m"; done
# LLaMA-MoE's scale E/K = 4 against S = E = 16 (which matches the dense FFN on average)
upcycle_and_train random-scale16 --method random --scale 16
# the same continued pretraining for the dense model: what the extra tokens alone are worth
[ -f "$R/dense-cpt/model/config.json" ] || nice -n 10 moekit train recipes/upcycle/cpt.yaml \
    --set model.path="$R/dense/model" --set out_dir="$R/dense-cpt"
nice -n 10 python recipes/upcycle/evaluate.py --runs "$R" --methods "${METHODS[@]}" random-scale16
logs=()
for m in "${METHODS[@]}" random-scale16; do logs+=("$m=$R/$m/cpt/log.jsonl"); done
logs+=("dense=$R/dense-cpt/log.jsonl")
moekit plot "${logs[@]}" -o "$R/cpt.png" --title "continual pretraining after upcycling (16 experts, top-4)"
