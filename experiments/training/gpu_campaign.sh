#!/usr/bin/env bash
# The campaign on a GPU lease: continue the training states there for a fixed
# wall-clock budget, bring back what changed, then run the GPU benchmark in the same call.
#
#   bash experiments/training/gpu_campaign.sh prepare    # here, once: fills .gpu/ (ignored by git) with MNIST
#        t10k for the held-out loss and wheels of zarr and its needs for Python 3.12 (the GPU image has torch,
#        typer, rich, safetensors and matplotlib, not zarr; bench_gpu.py writes zarr stores)
#   bash experiments/training/gpu_campaign.sh run [TRAIN_S] [BENCH_S]    # there, in the repository root, with
#        .gpu carried and $OUT set: trains every network of EDTOOL_CAMPAIGN_NETS (default "unet resnet") at
#        once on the GPU for TRAIN_S seconds (default 240) with the campaign's settings (snapshots every
#        2,000 steps), packs each state's new files into $OUT/<net>.tar and
#        $OUT/<net>_snapshots.tar, then runs bench_gpu.py for at most
#        BENCH_S seconds (default 240, 0: none; its log in $OUT/bench_gpu.log; EDTOOL_BENCH_ARGS replaces
#        its sizes, EDTOOL_DEVICE=cpu and EDTOOL_CAMPAIGN_NETS="" run the bench alone on CPU, as the tests do)
#   bash experiments/training/gpu_campaign.sh unpack DIR # here: replaces a state with DIR/<net>*.tar's only if
#        the result reads as a complete state further on than the one here
#
# The device tool's call: its `carry` names .gpu, and the working states <net>/ that are ahead of kept/<net>/ (git
# ignores them, so only a carry takes them along; a network without one starts from kept/<net>/, or is skipped):
#   bash experiments/training/gpu_campaign.sh run 240 240
# Every random draw comes from the CPU generator saved in the state, so a GPU stretch draws the same data, times
# and noise as a CPU one would; its arithmetic differs in the last bits (other kernels), so the run is not
# bit-identical to an all-CPU one from that step on.
set -u
cd "$(dirname "$0")/../.."
nets=${EDTOOL_CAMPAIGN_NETS-unet resnet}  # empty: none (the benchmark alone)
training=${EDTOOL_TRAINING_DIR:-experiments/training}

seed() {  # a network without a working state starts from the one git keeps, copied (training never touches kept/)
  local net dir kept
  for net in $nets; do
    dir=$training/$net kept=$training/kept/$net
    [ -f "$dir/state.json" ] || [ ! -f "$kept/state.json" ] || { mkdir -p "$dir" && cp "$kept"/* "$dir"/; } || exit 1
  done
}

prepare() {
  local shared=${EDTOOL_SHARED_DATA:-../shared/data/mnist}
  mkdir -p .gpu/heldout/MNIST/raw .gpu/whl
  cp -f "$shared"/MNIST/raw/t10k-*-idx*-ubyte.gz .gpu/heldout/MNIST/raw/ || exit 1
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 || exit 1
  du -sh .gpu
}

run() {
  local train_s=${1:-240} bench_s=${2:-240} out=${OUT:?set OUT to the folder that comes back}
  mkdir -p "$out" /tmp/site
  python3 -c "import zarr" 2>/dev/null ||
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
  local device=${EDTOOL_DEVICE:-cuda} held=${EDTOOL_HELD_OUT:-.gpu/heldout} started
  seed
  started=$(mktemp)  # files newer than this are what the stretch wrote
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  for net in $nets; do
    [ -f "$training/$net/state.json" ] || { echo "$net: no state in $training/$net (README.md: restore it); skipped"; continue; }
    python3 -m edtool train --state "$training/$net" --steps 1000000 --device "$device" --time-limit "$train_s" \
      --snapshot-every 2000 --held-out-root "$held" --ckpt-every 2000 --quiet > "$out/train_$net.log" 2>&1 &
  done
  wait
  for net in $nets; do
    [ -f "$out/train_$net.log" ] || continue
    tail -n 2 "$out/train_$net.log"
    (cd "$training" &&  # two tars, each under the lease's 16 MB a file: the state, and the new snapshots
      find "$net" -newer "$started" -type f ! -path "$net/snapshots/*" | tar -cf "$out/$net.tar" -T - &&
      find "$net" -newer "$started" -type f -path "$net/snapshots/*" | tar -cf "$out/${net}_snapshots.tar" -T -)
  done
  rm -f "$started"
  [ "$bench_s" -gt 0 ] || return 0
  # it starts no step after its own limit, a minute before the hard one (a CPU step of (a) can take tens of
  # seconds), and prints each row as it is measured
  local limit=$((bench_s > 120 ? bench_s - 60 : bench_s / 2))
  timeout "$bench_s" python3 tests/benchmarks/bench_gpu.py --device "$device" --time-limit "$limit" \
    ${EDTOOL_BENCH_ARGS:---realizations 8 --batches 1,8 --check-steps 3} > "$out/bench_gpu.log" 2>&1
  echo "bench_gpu exit $?"
  truncate -s '<15M' "$out/bench_gpu.log"  # a file the lease brings back stays under 16 MB, whatever happened
  tail -n 12 "$out/bench_gpu.log"
}

unpack() {
  local from=${1:?name the folder holding <net>.tar} found=0 failed=0
  seed
  for net in $nets; do
    [ -f "$from/$net.tar" ] || { echo "no $from/$net.tar: $net left as it is"; continue; }
    local dir=$training/$net new=$training/.unpack-$net
    rm -rf "$new" && cp -a "$dir" "$new" && rm -f "$new"/state_step*.safetensors
    local ok=1 t
    for t in "$from/$net.tar" "$from/${net}_snapshots.tar"; do
      [ -f "$t" ] || continue
      tar -xf "$t" -C "$new" --strip-components=1 || { echo "$t is damaged; nothing replaced" >&2; ok=0; }
    done
    if [ "$ok" = 1 ] && python3 - "$dir" "$new" <<'EOF'
import sys
from edtool.errors import EdtoolError
from edtool.networks import train_state
try:
    old, new = (train_state.read(p) for p in sys.argv[1:])
except EdtoolError as e:
    sys.exit(f"{e}; nothing replaced")
if new is None or (old is not None and new["step"] <= old["step"]):
    sys.exit(f"{sys.argv[2]}: no state further on than the committed one; nothing replaced")
print(f"{sys.argv[1]}: step {old['step'] if old else 0} -> {new['step']}")
EOF
    then
      rm -rf "$dir.old" && mv "$dir" "$dir.old" && mv "$new" "$dir" && rm -rf "$dir.old"
      found=$((found + 1))
    else
      rm -rf "$new"
      failed=1
    fi
  done
  [ "$found" -gt 0 ] || [ "$failed" -gt 0 ] || { echo "no <net>.tar in $from for $nets: nothing unpacked" >&2; exit 1; }
  [ "$failed" -eq 0 ] || exit 1
}

case ${1:-} in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  unpack) shift; unpack "$@" ;;
  *) echo "usage: $0 prepare | run [TRAIN_S] [BENCH_S] | unpack DIR" >&2; exit 2 ;;
esac
