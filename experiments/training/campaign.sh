#!/usr/bin/env bash
# The training campaign: continue the MNIST UNet and ResNet with the paper's learning rate and per-step decay, in
# stretches of 2,000 steps, alternating networks, one thread, from the working states in <net>/ (ignored by git; a
# missing one is copied from kept/<net>/, the state git keeps; README.md). Stop it at any moment (kill); rerun this
# script to continue exactly.
#   nohup bash experiments/training/campaign.sh > cache/campaign.log 2>&1 &
# Held-out losses use MNIST t10k (EDTOOL_HELD_OUT, default ../shared/data/mnist). EDTOOL_CAMPAIGN_NETS names the
# networks to continue (default: resnet; the UNet has spent its 12 CPU-hours). A fresh state starts from the network
# in <net>/start/.
set -u
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
held=${EDTOOL_HELD_OUT:-../shared/data/mnist}
common=(--lr 1e-4 --lr-gamma 0.999965 --batch 64 --ema-decay 0.999 --snapshot-every 2000
        --held-out-root "$held" --ckpt-every 100 --quiet)
step_of() { python -c "import json,sys;print(json.load(open(sys.argv[1]))['step'])" "$1/state.json" 2>/dev/null || echo 0; }
for net in ${EDTOOL_CAMPAIGN_NETS:-resnet}; do  # a network without a working state starts from the one git keeps
  dir=experiments/training/$net kept=experiments/training/kept/$net
  [ -f "$dir/state.json" ] || [ ! -f "$kept/state.json" ] || { mkdir -p "$dir" && cp "$kept"/* "$dir"/; } || exit 1
done
for target in $(seq 2000 2000 200000); do
  for net in ${EDTOOL_CAMPAIGN_NETS:-resnet}; do
    dir=experiments/training/$net
    [ "$(step_of "$dir")" -ge "$target" ] && continue
    if [ -f "$dir/state.json" ]; then
      edtool train --state "$dir" --steps "$target" "${common[@]}" || exit 1
    elif [ "$net" = unet ]; then
      edtool train --arch unet --fsizes 32,64,128 --emb-dim 256 --init-from experiments/training/unet/start/mnist5k_unet.safetensors \
        --state "$dir" --steps "$target" "${common[@]}" || exit 1
    else
      edtool train --arch resnet --width 64 --layers 4 --init-from experiments/training/resnet/start/mnist5k_resnet.safetensors \
        --state "$dir" --steps "$target" "${common[@]}" || exit 1
    fi
  done
done
