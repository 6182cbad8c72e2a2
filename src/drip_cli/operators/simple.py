"""Pointwise operators: ``denoise`` (the identity) and ``inpainting`` (a pixel mask)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import LinearOperator


class Denoise(LinearOperator):
    """``A = I``: measurements are the noisy image itself."""

    kind = "denoise"
    periodic = True

    @property
    def measurement_shape(self) -> tuple[int, ...]:
        return self.image_shape

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _adjoint_impl(self, y: torch.Tensor) -> torch.Tensor:
        return y


class Inpainting(LinearOperator):
    """``b = mask * x`` with a binary ``(H, W)`` mask shared by all channels (1 = observed).

    Unobserved entries of ``b`` are stored as 0 and are not data: ``M = C * sum(mask)``.
    """

    kind = "inpainting"

    def __init__(self, image_shape: tuple[int, int, int], mask: np.ndarray | torch.Tensor):
        super().__init__(image_shape)
        mask = torch.as_tensor(np.asarray(mask))
        if tuple(mask.shape) != self.image_shape[1:]:
            raise ValueError(f"mask shape {tuple(mask.shape)} != image size {self.image_shape[1:]}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must contain only 0 and 1")
        if not bool(mask.any()):
            raise ValueError("mask observes no pixel (all entries are 0)")
        self.register_buffer("mask", mask.to(torch.float64), persistent=False)
        self._observed = int(mask.sum())

    @classmethod
    def random(cls, image_shape, keep_fraction: float, rng: np.random.Generator) -> Inpainting:
        """A mask that observes each pixel independently with probability ``keep_fraction``."""
        if not 0.0 < keep_fraction <= 1.0:
            raise ValueError("keep_fraction must be in (0, 1]")
        _, height, width = image_shape
        return cls(image_shape, (rng.random((height, width)) < keep_fraction).astype(np.uint8))

    @property
    def measurement_shape(self) -> tuple[int, ...]:
        return self.image_shape

    @property
    def measured_count(self) -> int:
        return self.channels * self._observed

    def _mask_like(self, t: torch.Tensor) -> torch.Tensor:
        return self.mask.to(device=t.device, dtype=t.dtype)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._mask_like(x)

    _adjoint_impl = _forward_impl

    def project_measurements(self, b: torch.Tensor) -> torch.Tensor:
        return b * self._mask_like(b)

    def _write_hdf5(self, group) -> None:
        group.create_dataset("mask", data=self.mask.cpu().numpy().astype(np.uint8))

    @classmethod
    def _read_hdf5(cls, group, image_shape):
        return cls(image_shape, cls._stored_array(group, "mask"))

    def describe(self) -> dict:
        observed = self._observed / math.prod(self.image_shape[1:])
        return {**super().describe(), "observed_fraction": round(observed, 4)}
