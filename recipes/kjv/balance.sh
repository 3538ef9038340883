#!/usr/bin/env bash
# Expert balancing on real text: the KJV MoE of train.yaml trained three times (no balancing,
# Switch balance loss, auxiliary-loss-free bias balancing), then one plot of loss and imbalance.
#   bash recipes/kjv/balance.sh [STEPS]        (about 4 minutes per run on 2 CPU cores at 200 steps)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
steps="${1:-200}"
[ -s "$here/data/kjv.txt" ] || python "$here/prepare.py"
common=(--set "steps=$steps" --set save_every=0 --set export=false --set eval_every=50)
moekit train "$here/train.yaml" "${common[@]}" --set out_dir=../../runs/kjv-off \
  --set model.overrides.moe.aux_loss=none
moekit train "$here/train.yaml" "${common[@]}" --set out_dir=../../runs/kjv-aux
moekit train "$here/train.yaml" "${common[@]}" --set out_dir=../../runs/kjv-bias \
  --set model.overrides.moe.aux_loss=none --set model.overrides.moe.bias_balance=true \
  --set model.overrides.moe.bias_update_rate=0.001
runs="$here/../../runs"
moekit plot "no balancing=$runs/kjv-off/log.jsonl" "balance loss=$runs/kjv-aux/log.jsonl" \
  "bias balancing=$runs/kjv-bias/log.jsonl" -o "$here/../../docs/img/kjv-balance.png" \
  --title "16 experts top-4 + 2 shared, 4 layers, KJV, $steps steps"
