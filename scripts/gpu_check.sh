#!/usr/bin/env bash
# The GPU figures of issue 3 in one run, for a machine with CUDA (about 6 minutes on an H100):
# the CUDA tests, `make bench` on the GPU (reconstruction and training images per second), a
# 2-minute training run and `drip evaluate` on the sample data. Results go to ${OUT:-gpu_out}.
#   usage: scripts/gpu_check.sh            (DEVICE=cpu MINUTES=0.5 to rehearse it on a CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
MINUTES="${MINUTES:-2}"
OUT="${OUT:-gpu_out}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
drip() { "$PY" -m drip_cli "$@"; }

if [[ "$DEVICE" == cuda* ]]; then
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
    "$PY" -m pytest -q -m cuda tests 2>&1 | tail -5 | tee "$OUT/cuda_tests.txt"
fi
"$PY" bench/bench.py --device "$DEVICE" --train-steps 20 --out "$OUT" | tee "$OUT/bench.txt"

# training throughput over a real run: 1000 crops of the training photographs, blur sigma 2
drip simulate "skimage:motorcycle_left,motorcycle_right,rocket,coins,moon" "$OUT/train_blur.h5" \
    --operator blur --blur-sigma 2 --noise-percent 2 --crop-size 64 --crops-per-image 200 \
    --seed 3 --quiet
drip train "$OUT/train_blur.h5" --out "$OUT/run" --noise-percent 1:5 --max-minutes "$MINUTES" \
    --device "$DEVICE" --quiet
tail -3 "$OUT/run/history.csv" | tee "$OUT/train.txt"
TIMEFORMAT="evaluate: %R s wall"
{ time drip evaluate sample_data/blur.h5 --model "$OUT/run" \
    --model sample_data/unrolled_blur.safetensors --out "$OUT/evaluate" --device "$DEVICE" \
    --quiet; } 2>&1 | tee "$OUT/evaluate.txt"
rm -f "$OUT/train_blur.h5"
