"""Quality metrics and summaries of reconstructions."""

from .metrics import psnr, ssim

__all__ = ["psnr", "ssim"]
