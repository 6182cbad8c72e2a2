"""Image quality: PSNR (``data_range = 1``) and SSIM (Wang et al., via scikit-image), per sample."""

from __future__ import annotations

import numpy as np


def psnr(reconstruction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``10 log10(1 / MSE)`` per sample for ``(N, C, H, W)`` arrays."""
    diff = np.asarray(reconstruction, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    mse = np.mean(diff.reshape(len(diff), -1) ** 2, axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / mse)


SSIM_WINDOW = 7  # scikit-image's default: the Gaussian-free 7x7 window of Wang et al.'s code


def ssim(reconstruction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``skimage.metrics.structural_similarity(data_range=1)`` per channel, averaged, per sample.
    NaN for images smaller than its 7x7 window, where it is not defined."""
    from skimage.metrics import structural_similarity

    out = np.full(len(truth), np.nan)
    if min(np.shape(truth)[-2:]) < SSIM_WINDOW:
        return out
    for i, (u, x) in enumerate(zip(reconstruction, truth)):
        out[i] = np.mean([structural_similarity(x[c].astype(np.float64), u[c].astype(np.float64),
                                                data_range=1.0) for c in range(x.shape[0])])
    return out
