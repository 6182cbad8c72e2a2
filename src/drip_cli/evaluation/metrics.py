"""Image quality: PSNR (``data_range = 1``) and SSIM (Wang et al., via scikit-image), per sample."""

from __future__ import annotations

import numpy as np


def _pair(reconstruction, truth) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64 ``(N, C, H, W)`` arrays (NumPy arrays or CPU tensors); ``ValueError``
    unless their shapes are the same: a batch of another size broadcast in silence."""
    u, x = (np.asarray(a, dtype=np.float64) for a in (reconstruction, truth))
    if u.shape != x.shape or x.ndim != 4:
        raise ValueError(f"expected two (N, C, H, W) arrays of one shape, got {u.shape} "
                         f"and {x.shape}")
    return u, x


def psnr(reconstruction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``10 log10(1 / MSE)`` per sample for ``(N, C, H, W)`` arrays."""
    u, x = _pair(reconstruction, truth)
    mse = np.mean((u - x).reshape(len(x), -1) ** 2, axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / mse)


SSIM_WINDOW = 7  # scikit-image's default: the Gaussian-free 7x7 window of Wang et al.'s code


def ssim(reconstruction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``skimage.metrics.structural_similarity(data_range=1)`` per channel, averaged, per sample.
    NaN for images smaller than its 7x7 window, where it is not defined."""
    from skimage.metrics import structural_similarity

    reconstruction, truth = _pair(reconstruction, truth)
    out = np.full(len(truth), np.nan)
    if min(truth.shape[-2:]) < SSIM_WINDOW:
        return out
    for i, (u, x) in enumerate(zip(reconstruction, truth)):
        out[i] = np.mean([structural_similarity(x[c], u[c], data_range=1.0)
                          for c in range(x.shape[0])])
    return out
