#!/usr/bin/env bash
# Regenerates every file in sample_data/ with `drip simulate` (run from the repository root,
# with drip installed: `make install`, then `. .venv/bin/activate`).
# Ground truth: 64x64 grayscale crops of photographs bundled with scikit-image (4 crops from
# each of camera, coffee, astronaut and chelsea: 16 images per file). These four photographs are
# held out for testing; training data should be drawn from the other bundled photographs.
set -euo pipefail
cd "$(dirname "$0")"
PHOTOS="skimage:camera,coffee,astronaut,chelsea"
CROPS="--crop-size 64 --crops-per-image 4 --seed 0 --quiet"

drip simulate "$PHOTOS" blur.h5        --operator blur --blur-sigma 2 --noise-percent 2 $CROPS
drip simulate "$PHOTOS" inpainting.h5  --operator inpainting --keep-fraction 0.5 --noise-percent 2 $CROPS
drip simulate "$PHOTOS" tomography.h5  --operator tomography --angles 32 --angle-range 120 --noise-percent 2 $CROPS
drip simulate "$PHOTOS" denoise.h5     --operator denoise --noise-percent 10 $CROPS

# A user-supplied operator: 2x2 average pooling (64x64 -> 32x32) as a CSR matrix.
python - <<'PY'
import numpy as np
side, half = 64, 32
rows = np.repeat(np.arange(half * half), 4)
r, c = np.divmod(np.arange(half * half), half)
cols = np.stack([(2 * r + dr) * side + 2 * c + dc for dr in (0, 1) for dc in (0, 1)], 1).ravel()
np.savez("downsample2x_64.npz", data=np.full(rows.size, 0.25), indices=cols,
         indptr=np.arange(0, rows.size + 1, 4), shape=np.array([half * half, side * side]),
         format=np.bytes_(b"csr"))
PY
drip simulate "$PHOTOS" matrix.h5 --operator matrix --matrix downsample2x_64.npz --noise-percent 1 $CROPS

# The pretrained sample models (about 55 minutes on 2 CPU cores; only with --with-model): DRIP
# for blur, limited-angle tomography, inpainting and denoising, and the unrolled baseline for
# blur, each
# trained for 10 minutes with drip train's defaults, which depend on the operator (one
# edge-adaptive reweighting pass for DRIP; on blur a periodic embedding, whose projections are
# exact in the Fourier basis; on tomography a sharp start, eps 0.001, and tighter training
# solves); the four DRIP models also with a patch mixture of 80 components (its
# pass after the others, its weight chosen on the validation split; drip train's default for
# these 1000 crops since session 44, given explicitly here as the models were made with it).
# Training data: 1000 crops of five other photographs, never the four test photographs above;
# noise drawn from 1-5% per sample, for denoising from 2-10%.
if [[ "${1:-}" == "--with-model" ]]; then
    TRAIN="$(mktemp -d)"
    drip simulate "skimage:motorcycle_left,motorcycle_right,rocket,coins,moon" "$TRAIN/train_blur.h5" \
        --operator blur --blur-sigma 2 --noise-percent 2 --crop-size 64 --crops-per-image 200 --seed 3 --quiet
    drip train "$TRAIN/train_blur.h5" --out "$TRAIN/run" --noise-percent 1:5 --max-minutes 10 \
        --patch-components 80 --quiet
    cp "$TRAIN/run/model.safetensors" drip_blur.safetensors
    cp "$TRAIN/run/history.csv" drip_blur_history.csv
    drip train "$TRAIN/train_blur.h5" --out "$TRAIN/unrolled" --noise-percent 1:5 --max-minutes 10 \
        --architecture unrolled --quiet
    cp "$TRAIN/unrolled/model.safetensors" unrolled_blur.safetensors
    cp "$TRAIN/unrolled/history.csv" unrolled_blur_history.csv
    drip simulate "skimage:motorcycle_left,motorcycle_right,rocket,coins,moon" "$TRAIN/train_tomo.h5" \
        --operator tomography --angles 32 --angle-range 120 --noise-percent 2 --crop-size 64 \
        --crops-per-image 200 --seed 3 --quiet
    drip train "$TRAIN/train_tomo.h5" --out "$TRAIN/tomo" --noise-percent 1:5 --max-minutes 10 \
        --patch-components 80 --quiet
    cp "$TRAIN/tomo/model.safetensors" drip_tomography.safetensors
    cp "$TRAIN/tomo/history.csv" drip_tomography_history.csv
    drip simulate "skimage:motorcycle_left,motorcycle_right,rocket,coins,moon" "$TRAIN/train_inp.h5" \
        --operator inpainting --keep-fraction 0.5 --noise-percent 2 --crop-size 64 \
        --crops-per-image 200 --seed 3 --quiet
    drip train "$TRAIN/train_inp.h5" --out "$TRAIN/inp" --noise-percent 1:5 --max-minutes 10 \
        --patch-components 80 --quiet
    cp "$TRAIN/inp/model.safetensors" drip_inpainting.safetensors
    cp "$TRAIN/inp/history.csv" drip_inpainting_history.csv
    drip simulate "skimage:motorcycle_left,motorcycle_right,rocket,coins,moon" "$TRAIN/train_den.h5" \
        --operator denoise --noise-percent 2 --crop-size 64 --crops-per-image 200 --seed 3 --quiet
    drip train "$TRAIN/train_den.h5" --out "$TRAIN/den" --noise-percent 2:10 --max-minutes 10 \
        --patch-components 80 --quiet
    cp "$TRAIN/den/model.safetensors" drip_denoise.safetensors
    cp "$TRAIN/den/history.csv" drip_denoise_history.csv
    rm -rf "$TRAIN"
fi
