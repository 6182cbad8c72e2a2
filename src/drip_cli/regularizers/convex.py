"""A learned convex scalar regularizer on the latent variable ``z``.

    R(z) = sum_g sum_k w_gk sum_pixels psi_gk(t_g),   t_g = ((K z)_j)_{j in group g},
    psi_gk(t) = sqrt(|t|^2 + eps_gk^2) - eps_gk

``K`` is a bank of learned convolution filters (``n_filters`` of size ``kernel_size``, acting on
all latent channels), each kept zero-mean per channel by construction (so ``R`` is blind to
constant offsets, as in fields of experts, and cannot learn to pull intensities down). The image is
extended by half-sample symmetric padding, so a constant image has zero response up to the border
and border pixels are not pulled towards zero (zero padding did that, and cost 0.6 dB of PSNR on
64x64 blur, all of it in the outer pixels).
The filters come in groups of ``group_size`` consecutive filters whose responses are combined by
a smoothed Euclidean norm (``group_size = 1``: a smoothed ``|t|`` per filter; ``2``: a smoothed
gradient magnitude, as in isotropic TV). ``w_gk = softplus(rho_gk) >= 0`` and ``eps_gk > 0``.
Each ``psi_gk`` is convex, a non-negative sum of convex functions is convex, and ``K`` is linear,
so ``R`` is convex in ``z`` for every value of the parameters: the lower-level problem stays
convex throughout training.

Two options widen the family:

* ``potential_scales = S``: each group's potential is a learned non-negative mix of ``S``
  smoothed norms at smoothing ``eps, 4 eps, 16 eps, ...`` (starting weights ``1, 0.3, 0.09``
  times the group's), so training can shape the potential between ``|t|`` and ``t^2``.
* ``dilation_levels = D``: the filter groups are split evenly over dilations ``1, 2, ..., 2^(D-1)``
  (the TV pair at dilation 1), a multi-scale bank whose support grows without more weights.
  The model's default is ``D = 2``; the class's own default (1) is the single-scale bank.

``value`` and ``gradient`` are closed-form::

    grad R(z) = K^T [ t_g sum_k w_gk / sqrt(|t_g|^2 + eps_gk^2) ]

and ``grad R`` is Lipschitz with ``L <= ||K^T diag(c) K||``, ``c_g = sum_k w_gk / eps_gk`` (the
Hessian of ``psi_gk`` is at most ``1 / eps_gk`` times the identity; ``c`` is repeated over each
group's filters; ``w_j / eps_j`` below stands for it).
That norm is bounded in the Fourier domain: on the infinite grid ``K^T diag(w/eps) K`` is, at each
frequency, the latent-channel matrix ``lambda(f) = sum_j (w_j / eps_j) conj(k_j(f)) k_j(f)^T``.
The symmetrically padded image is one quarter of a ``2H x 2W``-periodic image of energy
``4 ||z||^2``, so ``sum_j (w_j/eps_j) ||K_j z||^2 <= 4 max_f lambda_max(f) ||z||^2``: the bound
is ``4 max_f lambda_max(f)``, the maximum sampled on a 128x128 grid and raised by 2% for the
frequencies in between (5x5 filters vary slowly in frequency; a dilated filter enters with its
zeros, as the dense filter it is). The true constant for a given image shape is close to
``max_f lambda_max(f)`` itself: :meth:`ConvexFilterRegularizer.padded_lipschitz_bound` bounds it by
Lanczos on the padded operator (0.98-1.0004 times ``max_f lambda_max(f)`` on the sample models,
16x16 to 256x256), and the solver steps by its inverse (:mod:`drip_cli.solvers.drip`).

Initialisation: the first ``2 C`` filters are vertical and horizontal differences on the image
channels with weight 1, i.e. smoothed total variation of ``z[:, :C]`` (isotropic with groups of
2, anisotropic with groups of 1), so training starts at TV's quality; the other filters are small
random zero-mean filters with weight ``EXTRA_WEIGHT = 0.3``. The extra filters must start
*alive*: at a weight of 1e-3 their implicit gradients were 1e-5 of the TV filters' and training
could not use them (``docs/design.md``).

There is no bias inside ``psi`` (``psi(K z + beta)``): filter responses of images are
symmetric about zero, and a bias only moves the potential's minimum off zero (its implicit
gradient was large and noisy).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..batching import channels_as_samples
from ..cache import cached_for_parameters
from ..operators.base import largest_eigenvalue_bound
from ..operators.convolution import (conv2d, conv2d_adjoint, symmetric_pad,
                                    symmetric_pad_adjoint)


EXTRA_WEIGHT = 0.3   # initial weight of the filters beyond the TV pair (see the module docstring)
SCALE_RATIO = 4.0    # smoothing of a group's successive potentials: eps, 4 eps, 16 eps, ...
SCALE_WEIGHT = 0.3   # and their initial weights relative to the first
# On the CPU, R and its gradient are evaluated in chunks of samples whose filter responses take
# about this much memory, so that the passes over them run in cache. On the tomography sample
# model (16 filters, 64x64, float32, 2 threads; the fastest of 15 calls) value and gradient took
# 101-135 ms for 256 images against 413-416 ms unchunked, 47-73 against 78-84 for 128 and
# 26-35 against 30-34 for 64; in chunks of 2 or 4 MiB no faster than in chunks of 8. One image
# larger than that is evaluated in strips of rows (ConvexFilterRegularizer._strips).
CPU_CHUNK_BYTES = 8 * 2**20


class _Terms(NamedTuple):
    """The potential's terms at filter responses ``t`` (``G`` groups, ``S`` scales)."""
    grouped: torch.Tensor         # t as (N, G, group_size, H, W)
    squared_norm: torch.Tensor    # s^2 = |t_g|^2 + eps_gk^2, (N, G, S, H, W)
    eps: torch.Tensor             # (1, G, S, 1, 1)
    weights: torch.Tensor         # w, (1, G, S, 1, 1)
    pixel_weights: torch.Tensor | None   # (N, 1, 1, H, W), or None


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class ConvexFilterRegularizer(torch.nn.Module):
    convex = True
    # R >= 0, and R = 0 on latents constant in each channel (zero-mean filters, symmetric
    # padding): where such a latent fits the data, the solver returns it (solvers.datafit)
    least_at_constants = True

    def __init__(self, latent_channels: int, image_channels: int = 1, n_filters: int = 32,
                 kernel_size: int = 5, eps: float = 0.01, group_size: int = 2, seed: int = 0,
                 potential_scales: int = 1, dilation_levels: int = 1):
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
        if potential_scales < 1:
            raise ValueError("potential_scales must be at least 1")
        if not 1 <= dilation_levels <= n_filters // group_size:
            raise ValueError("dilation_levels must be between 1 and the number of filter groups")
        gen = torch.Generator().manual_seed(seed)
        filters = 0.05 * torch.randn(n_filters, latent_channels, kernel_size, kernel_size, generator=gen)
        filters -= filters.mean(dim=(2, 3), keepdim=True)  # zero-mean: blind to constants
        centre = kernel_size // 2
        self.group_size = group_size
        n_groups = n_filters // group_size
        # filter group g acts at dilation 2**level(g): the groups are split evenly over the
        # levels, the TV pair in level 0 (dilation 1)
        # ``levels``: (dilation, symmetric padding, the level's slice of the filters)
        level = torch.arange(n_groups) * dilation_levels // n_groups
        self.levels = [(2**lv, 2**lv * (kernel_size // 2),
                        slice(group_size * int((level < lv).sum()),
                              group_size * int((level <= lv).sum())))
                       for lv in range(dilation_levels)]
        weights = torch.full((n_groups,), EXTRA_WEIGHT)
        for c in range(image_channels):
            for j, (dy, dx) in enumerate(((1, 0), (0, 1))):
                k = 2 * c + j
                filters[k].zero_()
                filters[k, c, centre, centre] = -1.0
                filters[k, c, centre + dy, centre + dx] = 1.0
                weights[k // group_size] = 1.0
        # potential k of each group: smoothing eps * SCALE_RATIO**k, weight SCALE_WEIGHT**k
        ladder = torch.arange(potential_scales, dtype=torch.float64)
        weights = weights[:, None] * SCALE_WEIGHT ** ladder[None, :]
        scales = (eps * SCALE_RATIO ** ladder).expand(n_groups, -1)
        self.filters = torch.nn.Parameter(filters)
        self.weight_logits = torch.nn.Parameter(_inverse_softplus(weights).float())
        self.eps_logits = torch.nn.Parameter(_inverse_softplus(scales).float())

    def widened(self, channels: int) -> ConvexFilterRegularizer:
        """This regularizer of one latent channel on each of ``channels``, ``R(z) = sum_c
        R(z_c)``, as one bank of ``channels`` times its filters: each filter on one channel,
        zeros on the others, with its weight and smoothing, each dilation level's filters
        together as the constructor places them. A starting point from which training can
        learn filters that mix the channels (``drip train --init``); to serve colour images
        as they are, :class:`PerChannelRegularizer` is faster. ``ValueError`` where the levels'
        filter counts do not scale with the channels (groups uneven over the levels)."""
        if self.filters.shape[1] != 1:
            raise ValueError("widened takes a regularizer of one latent channel")
        n, size = self.filters.shape[0], self.filters.shape[-1]
        wide = ConvexFilterRegularizer(channels, channels, n_filters=channels * n,
                                       kernel_size=size, group_size=self.group_size,
                                       potential_scales=self.weight_logits.shape[1],
                                       dilation_levels=len(self.levels)).to(self.filters)
        expected = [(d, pad, slice(channels * part.start, channels * part.stop))
                    for d, pad, part in self.levels]
        if wide.levels != expected:
            raise ValueError("the filter groups do not split evenly over the dilation levels")
        filters = torch.zeros_like(wide.filters)
        source = []   # source[i]: the filter of this bank that wide filter i is
        for _, _, part in self.levels:
            count = part.stop - part.start
            for c in range(channels):
                start = channels * part.start + c * count
                filters[start:start + count, c] = self.filters.detach()[part, 0]
                source.append(torch.arange(part.start, part.stop))
        groups = torch.cat(source)[::self.group_size] // self.group_size
        with torch.no_grad():
            wide.filters.copy_(filters)
            wide.weight_logits.copy_(self.weight_logits[groups])
            wide.eps_logits.copy_(self.eps_logits[groups])
        return wide

    # -- parameters in their constrained form ---------------------------------------------------
    @property
    def weights(self) -> torch.Tensor:
        return F.softplus(self.weight_logits)

    @property
    def eps(self) -> torch.Tensor:
        return F.softplus(self.eps_logits) + 1e-4

    @property
    def kernels(self) -> torch.Tensor:
        """The filters actually applied: the parameters minus their mean per (filter, channel)."""
        return self.filters - self.filters.mean(dim=(2, 3), keepdim=True)

    @property
    def reach(self) -> int:
        """The widest padding: images must be at least this many pixels on each side."""
        return self.levels[-1][1]

    def responses(self, z: torch.Tensor) -> torch.Tensor:
        """``K z``: all filter responses, ``(N, n_filters, H, W)`` (symmetric padding per level)."""
        kernels = self.kernels.to(z.dtype)
        return torch.cat([self._level_responses(z, kernels, level) for level in self.levels],
                         dim=1)

    def responses_adjoint(self, t: torch.Tensor) -> torch.Tensor:
        """``K^T t``, the exact adjoint of :meth:`responses`."""
        kernels = self.kernels.to(t.dtype)
        return sum(self._level_adjoint(t[:, level[2]], kernels, level) for level in self.levels)

    @staticmethod
    def _level_responses(z: torch.Tensor, kernels: torch.Tensor, level) -> torch.Tensor:
        """The responses of one dilation level's filters (``level``: an entry of ``levels``)."""
        dilation, pad, part = level
        return conv2d(symmetric_pad(z, pad), kernels[part], dilation=dilation)

    @staticmethod
    def _level_adjoint(t: torch.Tensor, kernels: torch.Tensor, level) -> torch.Tensor:
        """The adjoint of :meth:`_level_responses`, for that level's responses ``t``."""
        dilation, pad, part = level
        return symmetric_pad_adjoint(conv2d_adjoint(t, kernels[part], dilation=dilation), pad)

    def _level_groups(self, level) -> slice:
        """The filter groups of one dilation level (groups never straddle levels)."""
        part = level[2]
        return slice(part.start // self.group_size, part.stop // self.group_size)

    # -- the functional --------------------------------------------------------------------------
    def _smoothed(self, t: torch.Tensor, pixel_weights: torch.Tensor | None = None,
                  groups: slice = slice(None)) -> _Terms:
        """The terms of the potential at responses ``t`` (see :class:`_Terms`).

        Each pass over these tensors is memory-bound, so the functionals below take as few as
        they can: the sum of ``w (s - eps)`` is the weights applied to per-group pixel sums of
        ``s - eps``, and ``|t_g|^2`` is one fused multiply-add for pairs. (On the tomography sample
        model, 64 images of 64x64: potential and derivative 3.7 ms against 6.7 with the
        straightforward expressions.)"""
        grouped = t.view(t.shape[0], -1, self.group_size, *t.shape[2:])
        eps = self.eps[groups].to(t.dtype)[None, :, :, None, None]
        weights = self.weights[groups].to(t.dtype)[None, :, :, None, None]
        if self.group_size == 2:
            first, second = grouped[:, :, :1], grouped[:, :, 1:]
            squared_norm = (first * first).addcmul_(second, second)
        else:
            squared_norm = grouped * grouped
        # + eps^2 in the same buffer, unless several scales widen it (no graph keeps the
        # buffer's earlier values: the products above save their inputs, not their results)
        eps_squared = eps * eps
        squared_norm = (squared_norm + eps_squared if eps.shape[2] > 1
                        else squared_norm.add_(eps_squared))
        if pixel_weights is not None:
            pixel_weights = pixel_weights.to(t.dtype)[:, :, None]
        return _Terms(grouped, squared_norm, eps, weights, pixel_weights)

    @staticmethod
    def _potential(terms: _Terms, smoothed_norm: torch.Tensor) -> torch.Tensor:
        """``sum w (s - eps)`` per sample (times the pixel weights per pixel, where given), for
        ``smoothed_norm = s``.
        (``s - eps`` is formed per pixel: subtracting ``sum w eps`` from the sum of ``w s`` once
        lost the value of a flat image, ``R ~ 0.2`` against ``sum w s ~ 30``, to float32
        rounding, and the solver's sufficient-decrease test with it.)"""
        excess = smoothed_norm - terms.eps
        if terms.pixel_weights is not None:
            excess = excess * terms.pixel_weights
        return (excess.sum((3, 4)) * terms.weights[..., 0, 0]).flatten(1).sum(1)

    def potential(self, t: torch.Tensor, pixel_weights: torch.Tensor | None = None,
                  groups: slice = slice(None)) -> torch.Tensor:
        """``sum_g sum_k w_gk psi_gk(t_g)`` per sample for filter responses ``t`` of shape
        ``(N, n_filters, H, W)``; with ``pixel_weights`` ``m`` (``(N, 1, H, W)``, non-negative)
        each pixel's terms are multiplied by ``m`` there (:mod:`.adaptive`). With ``groups``,
        ``t`` holds the responses of those filter groups only, and the sum is theirs."""
        terms = self._smoothed(t, pixel_weights, groups)
        return self._potential(terms, torch.sqrt(terms.squared_norm))

    def potential_and_derivative(self, t: torch.Tensor, pixel_weights: torch.Tensor | None = None,
                                 groups: slice = slice(None)):
        """The potential and its gradient in ``t`` (same shape as ``t``)."""
        terms = self._smoothed(t, pixel_weights, groups)
        smoothed_norm = torch.sqrt(terms.squared_norm)
        return (self._potential(terms, smoothed_norm),
                self._derivative(terms, terms.weights / smoothed_norm))

    def derivative(self, t: torch.Tensor, pixel_weights: torch.Tensor | None = None,
                   groups: slice = slice(None)):
        """The potential's gradient in ``t`` alone, ``w / s`` by one ``rsqrt``: no ``s``, no
        value. (On the tomography sample model, 32 images of 64x64: 1.3-1.4 ms against
        2.3 for :meth:`potential_and_derivative`.) Where no gradient is recorded (the solver),
        the coefficient is formed in the buffer of ``|t_g|^2 + eps^2`` by in-place operations,
        the same operations in the same order, so the same numbers. (The tomography sample
        model's gradient, with pixel weights, 2 threads: timed alternately in one process on a
        slow afternoon, 23.6 ms for 64 images against 27.7 out of place, 12.8 for 32 against
        15.9; in three alternating pairs of processes on a faster one, 13.4-14.4 ms for 64
        against 13.7-16.0, 6.7-7.0 for 32 against 6.6-7.9. Its solve of the bench's 64 crops,
        12 alternating pairs of runs: 0.75-1.06 times the time, median 0.98, the same
        iterations.)"""
        terms = self._smoothed(t, pixel_weights, groups)
        if torch.is_grad_enabled():
            return self._derivative(terms, terms.weights * torch.rsqrt(terms.squared_norm))
        return self._derivative(terms, terms.squared_norm.rsqrt_().mul_(terms.weights),
                                in_place=True)

    @staticmethod
    def _derivative(terms: _Terms, coefficient: torch.Tensor,
                    in_place: bool = False) -> torch.Tensor:
        """``t_g sum_k w_gk / s_gk`` (times the pixel weights), from ``coefficient = w / s``
        (``in_place``: the caller's own buffer, which no graph records)."""
        if coefficient.shape[2] > 1:
            coefficient = coefficient.sum(2, keepdim=True)
        if terms.pixel_weights is not None:
            coefficient = (coefficient.mul_(terms.pixel_weights) if in_place
                           else coefficient * terms.pixel_weights)
        return (terms.grouped * coefficient).flatten(1, 2)

    def value(self, z: torch.Tensor, pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``R(z)`` per sample, shape ``(N,)`` (with ``pixel_weights``: the weighted sum)."""
        return self._evaluate(z, pixel_weights, value=True, gradient=False)[0]

    def value_and_gradient(self, z: torch.Tensor, pixel_weights: torch.Tensor | None = None):
        """``(R(z), grad R(z))`` from one pass over the filter responses (closed form,
        differentiable in the parameters)."""
        return self._evaluate(z, pixel_weights, value=True, gradient=True)

    def gradient(self, z: torch.Tensor, pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``grad R(z)``, same shape as ``z``, without the value (:meth:`derivative`)."""
        return self._evaluate(z, pixel_weights, value=False, gradient=True)[1]

    def _evaluate(self, z: torch.Tensor, pixel_weights: torch.Tensor | None, value: bool,
                  gradient: bool):
        """``(R(z) or None, grad R(z) or None)``, chunk by chunk (:meth:`_chunks`), a large
        image strip by strip (:meth:`_strips`), and each dilation level's filters on their own:
        no pass copies the whole bank's responses into one tensor or slices them back out. The
        gradient is the same to the last bit; on the tomography sample model (2 threads) it took
        7.2 ms for 32 images of 64x64 against 7.6 with the whole bank at once, 15.0 against 16.4
        for 64, and the model's solve of the bench's 64 crops 14.4 s against 15.1 (medians of 4
        alternating runs in one process, the same iterations)."""
        kernels = self.kernels.to(z.dtype)
        values, gradients = [], []
        for zc, mc in self._chunks(z, pixel_weights):
            parts_v, parts_g = [], []
            for zs, ms, rows, keep in self._strips(zc, mc):
                v = g = None
                both = value and gradient and rows is None   # one pass for both
                # a strip's R counts its own rows only; its gradient needs them all
                counted = ms if rows is None else rows if ms is None else ms * rows
                for level in self.levels:
                    t = self._level_responses(zs, kernels, level)
                    groups = self._level_groups(level)
                    if both:
                        vl, dpsi = self.potential_and_derivative(t, ms, groups)
                    else:
                        vl = self.potential(t, counted, groups) if value else None
                        dpsi = self.derivative(t, ms, groups) if gradient else None
                    if value:
                        v = vl if v is None else v + vl
                    if gradient:
                        gl = self._level_adjoint(dpsi, kernels, level)
                        g = gl if g is None else g + gl
                parts_v.append(v)
                if gradient:
                    parts_g.append(g[:, :, keep])
            if value:
                values.append(sum(parts_v[1:], parts_v[0]))
            if gradient:
                gradients.append(parts_g[0] if len(parts_g) == 1 else torch.cat(parts_g, dim=2))
        return (torch.cat(values) if value else None,
                torch.cat(gradients) if gradient else None)

    def _chunks(self, z: torch.Tensor, pixel_weights: torch.Tensor | None):
        """``(z, pixel_weights)`` in chunks of samples whose filter responses take about
        ``CPU_CHUNK_BYTES`` on the CPU (so the passes over them run in cache), whole elsewhere.
        Each sample's arithmetic is the same either way."""
        if z.device.type != "cpu":
            return [(z, pixel_weights)]
        per_sample = self.filters.shape[0] * z[0, 0].numel() * z.element_size()
        size = max(1, CPU_CHUNK_BYTES // per_sample)
        latents = z.split(size)
        weights = [None] * len(latents) if pixel_weights is None else pixel_weights.split(size)
        return list(zip(latents, weights)) or [(z, pixel_weights)]

    def _strips(self, z: torch.Tensor, pixel_weights: torch.Tensor | None):
        """A chunk of one image whose responses take more than ``CPU_CHUNK_BYTES`` (on the CPU)
        in strips of rows that take about that much, each with a halo of twice the filters'
        reach above and below, as ``(z, pixel_weights, rows, keep)``: ``rows`` masks the rows
        whose terms the strip counts in ``R``, ``keep`` the rows of its gradient that are the
        image's (a gradient row depends on the latent within twice the reach; the halo's own
        rows, mirrored at the strip's edge, are not the image's). Anything else whole, as
        ``(z, pixel_weights, None, slice(None))``. The blur sample model's gradient (float32,
        2 threads): one 1024x1024 image 116 ms in 9 strips against 304 in one pass (290 ns per
        pixel, where batches of 64x64 crops take 75-85), one 512x512 image 23 against 37 ms."""
        height, width = z.shape[2:]
        halo = 2 * self.reach
        rows = max(halo, CPU_CHUNK_BYTES // (self.filters.shape[0] * width * z.element_size()))
        if z.device.type != "cpu" or len(z) != 1 or height <= rows + 2 * halo:
            yield z, pixel_weights, None, slice(None)
            return
        for start in range(0, height, rows):
            stop = min(height, start + rows)
            low, high = max(0, start - halo), min(height, stop + halo)
            counted = z.new_zeros(1, 1, high - low, 1)
            counted[:, :, start - low:stop - low] = 1
            yield (z[:, :, low:high],
                   None if pixel_weights is None else pixel_weights[:, :, low:high],
                   counted, slice(start - low, stop - low))

    def hessian_at(self, z: torch.Tensor, pixel_weights: torch.Tensor | None = None):
        """``(h -> hess R(z) h, d)``: the exact Hessian-vector product at ``z`` in closed form,
        ``K^T J K h`` with ``J`` the potentials' Jacobian (per group
        ``sum_k w_k (I / s_k - t t^T / s_k^3)``, ``s_k = sqrt(|t|^2 + eps_k^2)``), computed once
        for any number of products; and ``d > 0``, an approximation of its diagonal for
        preconditioning (zero instead of symmetric padding, ``J``'s in-group off-diagonal
        terms left out). No graph is kept."""
        with torch.no_grad():
            grouped, squared_norm, _, weights, pixel_weights = self._smoothed(self.responses(z),
                                                                              pixel_weights)
            if pixel_weights is not None:
                weights = weights * pixel_weights
            smoothed_norm = torch.sqrt(squared_norm)
            first = (weights / smoothed_norm).sum(2, keepdim=True)
            second = (weights / smoothed_norm**3).sum(2, keepdim=True)
            # J's diagonal, sum_k w_k eps_k^2 / s_k^3 at least: positive
            jacobian_diagonal = (first - grouped.pow(2) * second).flatten(1, 2)
            squares = self.kernels.to(z.dtype).pow(2)
            diagonal = sum(conv2d_adjoint(jacobian_diagonal[:, part], squares[part], pad, d)
                           for d, pad, part in self.levels)

        def apply(h: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                th = self.responses(h).view_as(grouped)
                jh = th * first - grouped * (grouped * th).sum(2, keepdim=True) * second
                return self.responses_adjoint(jh.flatten(1, 2))

        return apply, diagonal

    def lipschitz_bound(self, grid: int = 128, margin: float = 1.02) -> torch.Tensor:
        """An upper bound on the Lipschitz constant of ``grad R`` (see the module docstring)."""
        return self.curvature_and_lipschitz_bound(grid, margin)[1]

    def curvature_and_lipschitz_bound(self, grid: int = 128, margin: float = 1.02,
                                      shape: tuple[int, ...] | None = None):
        """``(curvature, L)``: the solver's first step estimate and a bound ``L`` on the
        Lipschitz constant of ``grad R`` with symmetric padding. For every image size they are
        ``max_f lambda_max(f)``, the curvature on the infinite grid, and 4 times that; for latents
        of ``shape`` (``(C, H, W)``) both are the smaller of that bound and
        :meth:`padded_lipschitz_bound`, which is within a few percent of the curvature (above it
        for some shapes), so the solver steps by ``1 / L`` without testing a longer step."""
        curvature = self._fourier_curvature(grid, margin)
        if shape is None:
            return curvature, 4 * curvature
        bound = torch.minimum(4 * curvature, self.padded_lipschitz_bound(shape))
        return bound, bound

    def padded_lipschitz_bound(self, shape: tuple[int, ...]) -> torch.Tensor:
        """``||K^T diag(w/eps) K||`` on latents of ``shape`` (``(C, H, W)``), padding included:
        a Lanczos bound that holds except with probability 1e-6 over its random start
        (:func:`drip_cli.operators.base.largest_eigenvalue_bound`). On the sample models it is
        0.98-0.99 times the infinite grid's ``max_f lambda_max(f)`` (with its 2% margin) at
        16x16, 0.996-1.0 at 64x64 and 1.0-1.0004 at 256x256, where the Fourier argument can
        only promise 4 times that. Kept for the last shape and parameter values asked about, so
        a batch of solves pays once (at 64x64 about 0.1 s)."""
        device = self.filters.device

        def compute():
            curvature = self._filter_curvatures().detach()[None, :, None, None]

            def normal(z):   # K^T diag(w/eps) K, a large image strip by strip
                return torch.cat([self.responses_adjoint(curvature * self.responses(zs))[:, :, keep]
                                  for zs, _, _, keep in self._strips(z, None)], dim=2)

            bound = largest_eigenvalue_bound(normal, (1, *shape), dtype=self.filters.dtype,
                                             device=device)
            return torch.tensor(bound, dtype=self.filters.dtype, device=device)

        return cached_for_parameters(self, "_padded_bound", tuple(shape), self.parameters(),
                                     compute)

    def _filter_curvatures(self) -> torch.Tensor:
        """``c_j = sum_k w_gk / eps_gk`` for each filter ``j`` of group ``g``: the largest
        curvature of its potentials (the module docstring)."""
        return (self.weights / self.eps).sum(1).repeat_interleave(self.group_size)

    def _fourier_curvature(self, grid: int, margin: float) -> torch.Tensor:
        kernels = self.kernels.double()
        dense = kernels.new_zeros((*kernels.shape[:2], 2 * self.reach + 1, 2 * self.reach + 1))
        for d, pad, part in self.levels:   # each level's filters with their dilation's zeros
            dense[part, :, :2 * pad + 1:d, :2 * pad + 1:d] = kernels[part]
        spectra = torch.fft.fft2(dense, s=(grid, grid)).permute(2, 3, 0, 1)
        curvature = self._filter_curvatures().double().to(spectra.dtype)
        hessian = torch.einsum("xyjc,xyjd,j->xycd", spectra.conj(), spectra, curvature)
        return margin * torch.linalg.eigvalsh(hessian).max().to(self.filters.dtype)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.value(z)


class PerChannelRegularizer(torch.nn.Module):
    """A single-channel convex regularizer on each channel of latents of ``channels``:
    ``R(z) = sum_c R(z_c)`` (pixel weights shared by the channels), by the regularizer itself
    on the channels as samples of their own, so its fast single-channel convolutions serve them
    (3 channels of 64 crops of 64x64: the gradient 103 ms against 160 for one bank of 48
    filters over the 3 channels, zeros off its blocks). Its Hessian is block-diagonal, so its
    step bound is the regularizer's own on one channel."""

    convex = True
    least_at_constants = True

    def __init__(self, regularizer: ConvexFilterRegularizer, channels: int):
        super().__init__()
        if regularizer.filters.shape[1] != 1:
            raise ValueError("PerChannelRegularizer spreads a regularizer of one latent channel")
        self.single, self.channels = regularizer, channels

    @property
    def reach(self) -> int:
        return self.single.reach

    def _split(self, z: torch.Tensor, pixel_weights: torch.Tensor | None):
        return channels_as_samples(z), (None if pixel_weights is None
                                        else pixel_weights.repeat_interleave(z.shape[1], 0))

    def value(self, z: torch.Tensor, pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.single.value(*self._split(z, pixel_weights)).view(z.shape[:2]).sum(1)

    def gradient(self, z: torch.Tensor, pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.single.gradient(*self._split(z, pixel_weights)).view_as(z)

    def value_and_gradient(self, z: torch.Tensor, pixel_weights: torch.Tensor | None = None):
        value, gradient = self.single.value_and_gradient(*self._split(z, pixel_weights))
        return value.view(z.shape[:2]).sum(1), gradient.view_as(z)

    def curvature_and_lipschitz_bound(self, grid: int = 128, margin: float = 1.02,
                                      shape: tuple[int, ...] | None = None):
        one = None if shape is None else (1, *shape[1:])
        return self.single.curvature_and_lipschitz_bound(grid, margin, one)
