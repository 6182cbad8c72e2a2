#!/usr/bin/env bash
# The GPU figures of issue 3 in one run, for a machine with CUDA: the CUDA tests, `make bench` on
# the GPU (reconstruction and training images per second: blur and tomography at 64 images,
# blur at 512, training batches of 8 and 64), where a 512-crop blur solve spends its time,
# `drip reconstruct` of 256 tomography crops in the GPU's default batch and in batches of 64, a
# short training run, `drip evaluate` on the blur sample and a tomography reconstruction.
# Each stage has its own time limit and a failed stage does not stop the others. Logs and
# figures go to ${OUT:-gpu_out}: summary.txt (one line per stage), log.txt (every stage's
# output), bench.json, bench512.json, train64.json, tomo_default.json, tomo_64.json,
# history.csv, evaluate.json, tomography.json.
#   usage: scripts/gpu_check.sh            (DEVICE=cpu MINUTES=0.2 to rehearse it on a CPU;
#          SKIP="bench512 profile512" leaves those stages out, to fit a short device budget)
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
MINUTES="${MINUTES:-1}"
OUT="${OUT:-gpu_out}"
PY="${PYTHON:-python3}"
SKIP=" ${SKIP:-} "
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 COLUMNS=140
WORK="$(mktemp -d)"
mkdir -p "$OUT"
: > "$OUT/summary.txt"

# stage NAME SECONDS COMMAND...: run it under a time limit, log it, record its status and time
stage() {
    local name="$1" limit="$2" start rc
    shift 2
    if [[ "$SKIP" == *" $name "* ]]; then
        echo "$name: skipped" | tee -a "$OUT/summary.txt"
        return
    fi
    start=$(date +%s)
    timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    echo "$name: rc=$rc, $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
    { echo "===== $name (rc=$rc)"; cat "$WORK/$name.log"; } >> "$OUT/log.txt"
    tail -n 30 "$WORK/$name.log"
}

if [[ "$DEVICE" == cuda* ]]; then
    stage gpu 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    stage versions 30 "$PY" -c "import torch, sys; print(sys.version); print(torch.__version__, torch.cuda.get_device_name())"
    # test_damaged_files.py has no CUDA tests and needs hypothesis, which a bare GPU machine lacks
    stage cuda_tests 120 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests \
        --ignore=tests/test_damaged_files.py
    # one timed round per method (--rounds 1): the stages' limits and the device budget were
    # sized for one, and a GPU's timings do not drift like the 2-core CPU's
    # (without the low-noise section, added after the stages' limits were sized)
    stage bench 150 "$PY" bench/bench.py --device "$DEVICE" --rounds 1 --train-steps 10 \
        --memory-images 0 --low-noise-images 0 --out "$WORK/bench"
    stage bench512 100 "$PY" bench/bench.py --device "$DEVICE" --rounds 1 --images 512 \
        --train-steps 0 --memory-images 0 --low-noise-images 0 --reconstruct blur \
        --out "$WORK/bench512"
    # where a 512-crop blur solve spends its time (the parts of an iteration, synchronised)
    stage profile512 90 "$PY" bench/active_profile.py blur "$DEVICE" 512
    stage train64 60 "$PY" bench/bench.py --device "$DEVICE" --images 128 --reconstruct "" \
        --train-steps 4 --train-batch 64 --memory-images 0 --low-noise-images 0 \
        --out "$WORK/train64"
else
    stage bench 300 "$PY" bench/bench.py --device "$DEVICE" --rounds 1 --train-steps 2 \
        --memory-images 0 --low-noise-images 0 --out "$WORK/bench"
fi

# training throughput over a real run: 1000 crops of the training photographs, blur sigma 2
stage simulate 30 "$PY" -m drip_cli simulate "skimage:motorcycle_left,motorcycle_right,rocket,coins,moon" \
    "$WORK/train_blur.h5" --operator blur --blur-sigma 2 --noise-percent 2 --crop-size 64 \
    --crops-per-image 200 --seed 3 --quiet
stage train "$(python3 -c "print(int(60 * $MINUTES) + 40)")" "$PY" -m drip_cli train \
    "$WORK/train_blur.h5" --out "$WORK/run" --noise-percent 1:5 --max-minutes "$MINUTES" \
    --device "$DEVICE" --quiet
stage evaluate 60 "$PY" -m drip_cli evaluate sample_data/blur.h5 --model "$WORK/run" \
    --model sample_data/drip_blur.safetensors --out "$WORK/evaluate" --device "$DEVICE" \
    --noise-percent 2,5
# 256 tomography crops (16 on a CPU) through the CLI: the device's default batch (one batch on a
# GPU) against batches of 64
CROPS=$([[ "$DEVICE" == cuda* ]] && echo 64 || echo 4)
stage simulate_tomo 30 "$PY" -m drip_cli simulate skimage:camera,coffee,astronaut,chelsea \
    "$WORK/tomo_many.h5" --operator tomography --angles 32 --angle-range 120 --noise-percent 2 \
    --crop-size 64 --crops-per-image "$CROPS" --seed 1 --quiet
for batch in default 64; do
    stage "tomo_$batch" 60 "$PY" -m drip_cli reconstruct "$WORK/tomo_many.h5" \
        --out "$WORK/tomo_$batch.h5" --model sample_data/drip_tomography.safetensors \
        --device "$DEVICE" --report "$WORK/tomo_$batch.json" --quiet \
        $([[ $batch == default ]] || echo --batch-size "$batch")
done
stage tomography 40 "$PY" -m drip_cli reconstruct sample_data/tomography.h5 --out "$WORK/tomo.h5" \
    --model sample_data/drip_tomography.safetensors --device "$DEVICE" \
    --report "$WORK/tomography.json"

cp "$WORK/bench/bench.json" "$OUT/bench.json" 2>/dev/null
cp "$WORK/bench512/bench.json" "$OUT/bench512.json" 2>/dev/null
cp "$WORK/train64/bench.json" "$OUT/train64.json" 2>/dev/null
cp "$WORK"/tomo_*.json "$OUT/" 2>/dev/null
cp "$WORK/run/history.csv" "$OUT/history.csv" 2>/dev/null
cp "$WORK"/evaluate/*.json "$OUT/evaluate.json" 2>/dev/null
cp "$WORK/tomography.json" "$OUT/tomography.json" 2>/dev/null
rm -rf "$WORK"
cat "$OUT/summary.txt"
