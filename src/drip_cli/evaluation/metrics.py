"""Image quality: PSNR (``data_range = 1``) and SSIM (Wang et al., via scikit-image), per sample."""

from __future__ import annotations

import numpy as np


def psnr(reconstruction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``10 log10(1 / MSE)`` per sample for ``(N, C, H, W)`` arrays."""
    diff = np.asarray(reconstruction, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    mse = np.mean(diff.reshape(len(diff), -1) ** 2, axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / mse)


def ssim(reconstruction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``skimage.metrics.structural_similarity(data_range=1)`` per channel, averaged, per sample."""
    from skimage.metrics import structural_similarity

    out = np.empty(len(truth))
    for i, (u, x) in enumerate(zip(reconstruction, truth)):
        out[i] = np.mean([structural_similarity(x[c].astype(np.float64), u[c].astype(np.float64),
                                                data_range=1.0) for c in range(x.shape[0])])
    return out
