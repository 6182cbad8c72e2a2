"""A learned convex scalar regularizer on the latent variable ``z``.

    R(z) = sum_g w_g sum_pixels psi_g(t_g),   t_g = ((K z)_j)_{j in group g},
    psi_g(t) = sqrt(|t|^2 + eps_g^2) - eps_g

``K`` is a bank of learned convolution filters (``n_filters`` of size ``kernel_size``, acting on
all latent channels), each kept zero-mean per channel by construction (so ``R`` is blind to
constant offsets, as in fields of experts, and cannot learn to pull intensities down). The image is
extended by half-sample symmetric padding, so a constant image has zero response up to the border
and border pixels are not pulled towards zero (zero padding did that, and cost 0.6 dB of PSNR on
64x64 blur, all of it in the outer pixels).
The filters come in groups of ``group_size`` consecutive filters whose responses are combined by
a smoothed Euclidean norm (``group_size = 1``: a smoothed ``|t|`` per filter; ``2``: a smoothed
gradient magnitude, as in isotropic TV). ``w_g = softplus(rho_g) >= 0`` and ``eps_g > 0``. Each
``psi_g`` is convex and ``K`` is linear, so ``R`` is convex in ``z`` for every value of the
parameters: the lower-level problem stays convex throughout training.

``value`` and ``gradient`` are closed-form::

    grad R(z) = K^T [ w_g t_g / sqrt(|t_g|^2 + eps_g^2) ]

and ``grad R`` is Lipschitz with ``L <= ||K^T diag(w / eps) K||`` (the Hessian of ``psi_g`` is
at most ``1 / eps_g`` times the identity; ``w / eps`` is repeated over each group's filters).
That norm is bounded in the Fourier domain: on the infinite grid ``K^T diag(w/eps) K`` is, at each
frequency, the latent-channel matrix ``lambda(f) = sum_j (w_j / eps_j) conj(k_j(f)) k_j(f)^T``.
The symmetrically padded image is one quarter of a ``2H x 2W``-periodic image of energy
``4 ||z||^2``, so ``sum_j (w_j/eps_j) ||K_j z||^2 <= 4 max_f lambda_max(f) ||z||^2``: the bound
is ``4 max_f lambda_max(f)``, the maximum sampled on a 128x128 grid and raised by 2% for the
frequencies in between (5x5 filters vary slowly in frequency). Power iteration on random filters
finds the true constant close to ``max_f lambda_max(f)`` itself, so the solver starts from that
step and backtracks, never going below the guaranteed ``1 / L``.

Initialisation: the first ``2 C`` filters are vertical and horizontal differences on the image
channels with weight 1, i.e. smoothed total variation of ``z[:, :C]`` (isotropic with groups of
2, anisotropic with groups of 1); the other filters are small random zero-mean filters with
weight ``EXTRA_WEIGHT = 0.3``. An untrained model is therefore smoothed TV plus a weak random
filter bank, and training starts at (slightly above) TV's quality. The extra filters must start
*alive*: with the earlier weight of 1e-3 their implicit gradients were 1e-5 of the TV filters'
and a step on them changed the loss by 0.02% -- training could not use them. At weight 0.3,
on 32 natural-photo crops at 2% blur noise, the untrained model gains 0.14 dB over weight 1e-3
and the solver needs 72 instead of 107 iterations; a step on the extra filters now lowers the
loss as much as one on the TV filters (~1% for a sign step of 0.01).

There is no bias inside ``psi`` (``psi(K z + beta)``): filter responses of images are
symmetric about zero, a bias only moves the potential's minimum off zero, and its implicit
gradient was large and noisy (a sign step of 0.01 raised the loss by 2%).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..operators.convolution import conv2d_adjoint


EXTRA_WEIGHT = 0.3   # initial weight of the filters beyond the TV pair (see the module docstring)


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _mirror_index(n: int, pad: int, device) -> torch.Tensor:
    """Indices of a length-``n`` axis extended by ``pad`` mirrored samples on each side, edge
    sample repeated (``[1 0 | 0 1 ... n-1 | n-1 n-2]``): the even, half-sample extension."""
    inner = torch.arange(n, device=device)
    return torch.cat([inner[:pad].flip(0), inner, inner[n - pad:].flip(0)])


def symmetric_pad(z: torch.Tensor, pad: int) -> torch.Tensor:
    """Half-sample symmetric padding of the last two axes (needs ``pad <= H, W``)."""
    if pad == 0:
        return z
    h, w = z.shape[-2:]
    z = z.index_select(-2, _mirror_index(h, pad, z.device))
    return z.index_select(-1, _mirror_index(w, pad, z.device))


def symmetric_pad_adjoint(g: torch.Tensor, pad: int) -> torch.Tensor:
    """The adjoint of :func:`symmetric_pad`: mirrored samples are added back where they came from."""
    if pad == 0:
        return g
    h, w = g.shape[-2] - 2 * pad, g.shape[-1] - 2 * pad
    rows = g.new_zeros((*g.shape[:-2], h, g.shape[-1])).index_add(-2, _mirror_index(h, pad, g.device), g)
    return rows.new_zeros((*g.shape[:-2], h, w)).index_add(-1, _mirror_index(w, pad, g.device), rows)


class ConvexFilterRegularizer(torch.nn.Module):
    convex = True

    def __init__(self, latent_channels: int, image_channels: int = 1, n_filters: int = 32,
                 kernel_size: int = 5, eps: float = 0.01, group_size: int = 2, seed: int = 0):
        super().__init__()
        if group_size not in (1, 2):
            raise ValueError("group_size must be 1 (per filter) or 2 (pairs, as isotropic TV)")
        if n_filters % group_size:
            raise ValueError("n_filters must be a multiple of group_size")
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
        self.group_size = group_size
        n_groups = n_filters // group_size
        weights = torch.full((n_groups,), _inverse_softplus(EXTRA_WEIGHT))
        for c in range(image_channels):
            for j, (dy, dx) in enumerate(((1, 0), (0, 1))):
                k = 2 * c + j
                filters[k].zero_()
                filters[k, c, centre, centre] = -1.0
                filters[k, c, centre + dy, centre + dx] = 1.0
                weights[k // group_size] = _inverse_softplus(1.0)
        self.filters = torch.nn.Parameter(filters)
        self.weight_logits = torch.nn.Parameter(weights)
        self.eps_logits = torch.nn.Parameter(torch.full((n_groups,), _inverse_softplus(eps)))

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
        return F.conv2d(symmetric_pad(z, self.padding), self.kernels.to(z.dtype))

    # -- the functional --------------------------------------------------------------------------
    def _grouped(self, z: torch.Tensor):
        """Responses as ``(N, groups, group_size, H, W)`` and ``sqrt(|t_g|^2 + eps_g^2)``."""
        t = self._responses(z)
        t = t.view(t.shape[0], -1, self.group_size, *t.shape[2:])
        eps = self.eps.to(z.dtype).view(1, -1, 1, 1)
        return t, torch.sqrt(t.pow(2).sum(2) + eps * eps), eps

    def value(self, z: torch.Tensor) -> torch.Tensor:
        """``R(z)`` per sample, shape ``(N,)``."""
        _, smoothed_norm, eps = self._grouped(z)
        return (self.weights.to(z.dtype).view(1, -1, 1, 1) * (smoothed_norm - eps)).flatten(1).sum(1)

    def value_and_gradient(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R(z), grad R(z))`` from one pass over the filter responses (closed form,
        differentiable in the parameters)."""
        t, smoothed_norm, eps = self._grouped(z)
        weights = self.weights.to(z.dtype).view(1, -1, 1, 1)
        value = (weights * (smoothed_norm - eps)).flatten(1).sum(1)
        scaled = (t * (weights / smoothed_norm).unsqueeze(2)).flatten(1, 2)
        gradient = symmetric_pad_adjoint(conv2d_adjoint(scaled, self.kernels.to(z.dtype)),
                                         self.padding)
        return value, gradient

    def gradient(self, z: torch.Tensor) -> torch.Tensor:
        """``grad R(z)``, same shape as ``z``."""
        return self.value_and_gradient(z)[1]

    def lipschitz_bound(self, grid: int = 128, margin: float = 1.02) -> torch.Tensor:
        """An upper bound on the Lipschitz constant of ``grad R`` (see the module docstring)."""
        return self.curvature_and_lipschitz_bound(grid, margin)[1]

    def curvature_and_lipschitz_bound(self, grid: int = 128, margin: float = 1.02):
        """``(max_f lambda_max(f), 4 max_f lambda_max(f))``: the curvature of ``R`` on the
        infinite grid (the solver's first step estimate) and the guaranteed bound on the
        Lipschitz constant of ``grad R`` with symmetric padding, from one computation."""
        curvature = self._fourier_curvature(grid, margin)
        return curvature, 4 * curvature

    def _fourier_curvature(self, grid: int, margin: float) -> torch.Tensor:
        spectra = torch.fft.fft2(self.kernels.double(), s=(grid, grid)).permute(2, 3, 0, 1)
        curvature = (self.weights / self.eps).repeat_interleave(self.group_size)
        curvature = curvature.double().to(spectra.dtype)
        hessian = torch.einsum("xyjc,xyjd,j->xycd", spectra.conj(), spectra, curvature)
        return margin * torch.linalg.eigvalsh(hessian).max().to(self.filters.dtype)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.value(z)
