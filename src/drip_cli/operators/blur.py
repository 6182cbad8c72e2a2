"""Periodic convolution with a point-spread function, applied with FFTs."""

from __future__ import annotations

import math

import h5py
import numpy as np
import torch

from .base import LinearOperator


def gaussian_psf_size(sigma: float) -> int:
    """The default PSF size for a Gaussian of std ``sigma``: ``2 * ceil(3 sigma) + 1`` (odd).
    A ``sigma`` that is not a positive number is a ``ValueError``."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"blur sigma must be a positive number, got {sigma}")
    return 2 * math.ceil(3 * sigma) + 1


def gaussian_psf(sigma: float, size: int | None = None) -> np.ndarray:
    """Normalised Gaussian PSF; ``size`` defaults to :func:`gaussian_psf_size`."""
    default_size = gaussian_psf_size(sigma)   # checks sigma
    size = default_size if size is None else size
    if size < 1 or size % 2 == 0:
        raise ValueError(f"PSF size must be odd, got {size}")
    r = np.arange(size, dtype=np.float64) - size // 2
    g = np.exp(-0.5 * (r / sigma) ** 2)
    psf = np.outer(g, g)
    return psf / psf.sum()


BOUNDARIES = ("periodic", "valid")


def _boundary(value) -> str:
    """A stored or given boundary as text, checked."""
    value = value.decode() if isinstance(value, bytes) else value
    if value not in BOUNDARIES:
        raise ValueError(f"unsupported blur boundary {value!r} (periodic or valid)")
    return value


class Blur(LinearOperator):
    """Convolution with a PSF per channel, the image extended periodically (CONTRACT.md)::

        b[i, j] = sum_{p,q} psf[p, q] * x[(i - p + kh//2) mod H, (j - q + kw//2) mod W]

    The PSF is embedded in an ``H x W`` kernel ``k`` with ``psf[p, q]`` at
    ``((p - kh//2) mod H, (q - kw//2) mod W)``, so ``A x = ifft(fft(k) fft(x))`` and the adjoint
    multiplies by the complex conjugate of ``fft(k)``. PSF taps that wrap onto the same pixel (a PSF
    larger than the image) add up, which is what the formula above says.

    With ``boundary = "valid"`` (an extension of the contract) only the pixels whose sums stay
    inside the image are measured: rows ``kh//2 .. H - 1 - kh//2`` and the columns alike, so
    ``b`` is ``(H - kh + 1) x (W - kw + 1)``. That is how a camera blurs a photograph, whose scene
    goes on beyond the frame: the image reconstructed is the scene that the measured pixels saw,
    ``kh - 1`` rows and ``kw - 1`` columns larger than them. The adjoint puts the measurements
    back in place, zeros around them, and applies the periodic adjoint.
    """

    kind = "blur"

    def __init__(self, image_shape: tuple[int, int, int], psf: np.ndarray | torch.Tensor,
                 boundary: str = "periodic"):
        super().__init__(image_shape)
        self.boundary = _boundary(boundary)
        psf = torch.as_tensor(np.asarray(psf, dtype=np.float64))
        if psf.ndim != 2 or psf.shape[0] % 2 == 0 or psf.shape[1] % 2 == 0:
            raise ValueError(f"PSF must be 2-D with odd sizes, got shape {tuple(psf.shape)}")
        if not bool(torch.isfinite(psf).all()):
            raise ValueError("PSF contains NaN or Inf")
        if not bool(psf.any()):   # A = 0: nothing is measured
            raise ValueError("PSF is all zeros")
        _, height, width = self.image_shape
        kh, kw = psf.shape
        if not self.periodic and (kh > height or kw > width):
            raise ValueError(f"a {kh}x{kw} PSF measures no pixel of {height}x{width} images "
                             "with the valid boundary")
        rows = (torch.arange(kh) - kh // 2) % height
        cols = (torch.arange(kw) - kw // 2) % width
        kernel = torch.zeros((height, width), dtype=torch.float64)
        kernel.index_put_((rows[:, None].expand(kh, kw), cols[None, :].expand(kh, kw)), psf,
                          accumulate=True)
        self.register_buffer("psf", psf, persistent=False)
        # Stored as (real, imaginary) pairs: Module.to(torch.float32) would drop the imaginary part
        # of a complex buffer.
        self.register_buffer("transfer", torch.view_as_real(torch.fft.rfft2(kernel)), persistent=False)

    @property
    def periodic(self) -> bool:
        """A circulant only with the periodic boundary (the Fourier projections, the embedding)."""
        return self.boundary == "periodic"

    @staticmethod
    def _measured_size(image_shape, psf_shape, boundary: str) -> tuple[int, int]:
        _, height, width = image_shape
        if boundary == "periodic":
            return height, width
        return height - psf_shape[0] + 1, width - psf_shape[1] + 1

    @property
    def measurement_shape(self) -> tuple[int, ...]:
        return (self.channels, *self._measured_size(self.image_shape, self.psf.shape,
                                                    self.boundary))

    @property
    def scored(self) -> tuple[slice, slice]:
        """The valid boundary's measured positions (the margin is seen only in part)."""
        return self._window() if not self.periodic else super().scored

    def _window(self) -> tuple[slice, slice]:
        """The measured rows and columns of the periodic convolution."""
        kh, kw = self.psf.shape
        height, width = self.measurement_shape[1:]
        return slice(kh // 2, kh // 2 + height), slice(kw // 2, kw // 2 + width)

    def _transfer_like(self, x: torch.Tensor) -> torch.Tensor:
        real_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.view_as_complex(self.transfer.to(device=x.device, dtype=real_dtype).contiguous())

    def _filter(self, x: torch.Tensor, conjugate: bool) -> torch.Tensor:
        transfer = self._transfer_like(x)
        if conjugate:
            transfer = transfer.conj()
        spectrum = torch.fft.rfft2(x) * transfer
        return torch.fft.irfft2(spectrum, s=x.shape[-2:])

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        b = self._filter(x, conjugate=False)
        return b if self.periodic else b[(..., *self._window())]

    def _adjoint_impl(self, y: torch.Tensor) -> torch.Tensor:
        if not self.periodic:
            placed = y.new_zeros((*y.shape[:-2], *self.image_shape[1:]))
            placed[(..., *self._window())] = y
            y = placed
        return self._filter(y, conjugate=True)

    def _write_hdf5(self, group) -> None:
        group.create_dataset("psf", data=self.psf.cpu().numpy())
        group.attrs["boundary"] = self.boundary

    @classmethod
    def _read_hdf5(cls, group, image_shape):
        return cls(image_shape, cls._stored_array(group, "psf"),
                   _boundary(group.attrs.get("boundary", "periodic")))

    @classmethod
    def _stored_measurement_size(cls, group, image_shape):
        boundary = _boundary(group.attrs.get("boundary", "periodic"))
        if boundary == "periodic":
            return tuple(image_shape[1:])
        psf = group.get("psf")
        if not isinstance(psf, h5py.Dataset) or psf.ndim != 2:
            raise ValueError("operator group lacks a 2-D dataset 'psf'")
        size = cls._measured_size(image_shape, psf.shape, boundary)
        if min(size) < 1:
            raise ValueError(f"a {psf.shape[0]}x{psf.shape[1]} PSF measures no pixel of "
                             f"{image_shape[1]}x{image_shape[2]} images with the valid boundary")
        return size

    def describe(self) -> dict:
        return {**super().describe(), "psf_shape": list(self.psf.shape), "boundary": self.boundary}
