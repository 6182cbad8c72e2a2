"""A learned convex scalar regularizer on the latent variable ``z``.

    R(z) = sum_j w_j sum_pixels psi_j((K z)_j + beta_j),     psi_j(t) = sqrt(t^2 + eps_j^2) - eps_j

``K`` is a bank of learned convolution filters (``n_filters`` of size ``kernel_size``, acting on
all latent channels, zero padding), each kept zero-mean per channel by construction (so ``R`` is
blind to constant offsets, as in fields of experts, and cannot learn to pull intensities down), ``w_j = softplus(rho_j) >= 0`` and ``eps_j > 0``. Each
``psi_j`` is convex and ``K`` is linear, so ``R`` is convex in ``z`` for every value of the
parameters: the lower-level problem stays convex throughout training.

``value`` and ``gradient`` are closed-form::

    grad R(z) = K^T [ w_j psi_j'((K z)_j + beta_j) ],   psi'(t) = t / sqrt(t^2 + eps^2)

and ``grad R`` is Lipschitz with ``L <= ||K^T diag(w / eps) K||`` (since ``psi'' <= 1 / eps``).
That norm is computed in the Fourier domain: on the infinite grid ``K^T diag(w/eps) K`` is, at
each frequency, the latent-channel matrix ``sum_j (w_j / eps_j) conj(k_j(f)) k_j(f)^T``, and
the largest eigenvalue over frequencies bounds the operator on any zero-padded image (a
compression of the infinite one). It is sampled on a 128x128 frequency grid and raised by 2% for
the frequencies between samples (5x5 filters vary slowly in frequency). Solvers take steps of
``1 / L`` from :meth:`lipschitz_bound`, which keeps them stable however training moves the
parameters.

Initialisation: the first ``2 C`` filters are vertical and horizontal differences on the image
channels with weight 1, i.e. smoothed anisotropic total variation of ``z[:, :C]``; the other
filters start small and nearly switched off (weight ``1e-3``). An untrained model is therefore
(smoothed) TV, and training starts at TV's quality.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class ConvexFilterRegularizer(torch.nn.Module):
    convex = True

    def __init__(self, latent_channels: int, image_channels: int = 1, n_filters: int = 32,
                 kernel_size: int = 5, eps: float = 0.01, seed: int = 0):
        super().__init__()
        if kernel_size % 2 == 0 or kernel_size < 3:
            raise ValueError("kernel_size must be odd and at least 3")
        if n_filters < 2 * image_channels:
            raise ValueError("n_filters must be at least 2 * image channels (the TV start)")
        if latent_channels < image_channels:
            raise ValueError("latent_channels must be at least the number of image channels")
        gen = torch.Generator().manual_seed(seed)
        filters = 0.05 * torch.randn(n_filters, latent_channels, kernel_size, kernel_size, generator=gen)
        filters -= filters.mean(dim=(2, 3), keepdim=True)  # zero-mean: blind to constants
        centre = kernel_size // 2
        weights = torch.full((n_filters,), _inverse_softplus(1e-3))
        for c in range(image_channels):
            for j, (dy, dx) in enumerate(((1, 0), (0, 1))):
                k = 2 * c + j
                filters[k].zero_()
                filters[k, c, centre, centre] = -1.0
                filters[k, c, centre + dy, centre + dx] = 1.0
                weights[k] = _inverse_softplus(1.0)
        self.filters = torch.nn.Parameter(filters)
        self.bias = torch.nn.Parameter(torch.zeros(n_filters))
        self.weight_logits = torch.nn.Parameter(weights)
        self.eps_logits = torch.nn.Parameter(torch.full((n_filters,), _inverse_softplus(eps)))

    # -- parameters in their constrained form ---------------------------------------------------
    @property
    def weights(self) -> torch.Tensor:
        return F.softplus(self.weight_logits)

    @property
    def eps(self) -> torch.Tensor:
        return F.softplus(self.eps_logits) + 1e-4

    @property
    def padding(self) -> int:
        return self.filters.shape[-1] // 2

    @property
    def kernels(self) -> torch.Tensor:
        """The filters actually applied: the parameters minus their mean per (filter, channel)."""
        return self.filters - self.filters.mean(dim=(2, 3), keepdim=True)

    def _responses(self, z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, self.kernels.to(z.dtype), self.bias.to(z.dtype), padding=self.padding)

    # -- the functional --------------------------------------------------------------------------
    def value(self, z: torch.Tensor) -> torch.Tensor:
        """``R(z)`` per sample, shape ``(N,)``."""
        t = self._responses(z)
        eps = self.eps.to(z.dtype).view(1, -1, 1, 1)
        psi = torch.sqrt(t * t + eps * eps) - eps
        return (self.weights.to(z.dtype).view(1, -1, 1, 1) * psi).flatten(1).sum(1)

    def gradient(self, z: torch.Tensor) -> torch.Tensor:
        """``grad R(z)``, same shape as ``z`` (closed form, differentiable in the parameters)."""
        t = self._responses(z)
        eps = self.eps.to(z.dtype).view(1, -1, 1, 1)
        dpsi = t / torch.sqrt(t * t + eps * eps)
        scaled = self.weights.to(z.dtype).view(1, -1, 1, 1) * dpsi
        return F.conv_transpose2d(scaled, self.kernels.to(z.dtype), padding=self.padding)

    def lipschitz_bound(self, grid: int = 128, margin: float = 1.02) -> torch.Tensor:
        """An upper bound on the Lipschitz constant of ``grad R`` (see the module docstring)."""
        spectra = torch.fft.fft2(self.kernels.double(), s=(grid, grid)).permute(2, 3, 0, 1)
        curvature = (self.weights / self.eps).double().to(spectra.dtype)
        hessian = torch.einsum("xyjc,xyjd,j->xycd", spectra.conj(), spectra, curvature)
        return margin * torch.linalg.eigvalsh(hessian).max().to(self.filters.dtype)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.value(z)
