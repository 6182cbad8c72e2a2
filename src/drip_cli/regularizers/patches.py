"""A patch-mixture term for a last pass: ``R(z) + lam Q(E z)``, after EPLL (Zoran & Weiss 2011).

A mixture of ``K`` zero-mean Gaussians is fitted by EM to the mean-removed ``p x p`` patches of
the training images (:meth:`PatchMixture.fit`, float32, deterministic for a seed). After the
model's passes, each overlapping patch of the solution ``u`` (stride ``PATCH_STRIDE``) takes its
most likely component ``k(i)``, and one more pass solves

    minimize_z  R_w(z) + lam sum_i |C P_i E z|^2_{W_k(i)}   subject to the data fit,

``P_i`` the patch extraction, ``C`` the removal of each channel's mean, ``W_k = (S_k + eps I)^-1``
the component's precision (``eps = PRECISION_FLOOR``), ``R_w`` the model's regularizer with the
last pass's pixel weights. With the components held fixed the added term is a positive
semidefinite quadratic, so the pass is a convex problem with the data-fit guarantee of every
pass, and it is zero at constant images, so the convex family's shortcut for flat crops
(:func:`~drip_cli.solvers.datafit.best_constant`) still holds. ``lam`` is the model's
``patch_weight``, chosen by ``drip train`` on the validation split; the mixture is fitted to the
training images, not trained through the solver.

Why it is there (docs/quality.md, "A patch mixture prior"): the patch term's errors are not the
filter bank's, and on the held-out crops of the README the pass gained 0.08-0.22 dB over the
model's own solution on blur and tomography, where no change to the filter family had.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..batching import channels_as_samples
from ..cache import cached_for_parameters
from ..operators.base import largest_eigenvalue_bound

# 8x8: 10x10 was lower on tomography and 6x6 level (+-0.1 dB by set and operator, with 160
# components; docs/quality.md, *What did not add to the patch pass*)
PATCH_SIZE = 8
# patches on every second pixel: 4 times cheaper than every pixel, 0.04 dB lower on tomography
# at 2% noise (32 held-out crops, 32.30 against 32.35 dB at each one's best weight)
PATCH_STRIDE = 2
# added to each covariance inside the quadratic: the smallest eigenvalues of natural patches'
# covariances lie near the fit's floor (1e-6); 1e-4 instead of 1e-5 cost 0.08 dB (tomography,
# 2% noise, docs/design.md)
PRECISION_FLOOR = 1e-5
# added to each covariance when a patch of a solution picks its component (the solution's own
# error); 2e-3 instead gave 0.24 dB less on tomography at 2% noise (docs/quality.md)
LABEL_VARIANCE = 1e-4
LABEL_CHUNK = 65_536      # patches whose components are picked at a time
FIT_FLOOR = 1e-6          # kept on every fitted covariance's diagonal
FIT_PATCHES = 60_000      # patches drawn for EM (30 iterations: 8 s for 20 components, 31 s for 80)
FIT_STRIDE = 4            # the grid the fit draws its patches from
# fewer patches per component than this many times the patch dimension leave the fitted
# covariances ill-determined (each has d (d + 1) / 2 entries); drip train warns
FIT_PATCHES_PER_DIMENSION = 10
FIT_ITERATIONS = 30
# ALLOCATION. The fit's and the likelihoods' loops over the components (never differentiated)
# write into buffers allocated once, not into a fresh tensor per component. Allocated fresh,
# a freed (patches x d) product could be split by the small result kept from it, and glibc's
# heap then grew by about one product per component: in a script, picking the components of
# 64 crops (80 components, 14 MB products) raised the peak memory by 0.9-1.0 GB in 4 of 6 runs
# and by 1.03-1.10 GB in 3 of 3 in another; with the buffers, by 0.14-0.17 GB in 3 of 3, with
# the same labels and fit to the last bit and 0.29-0.35 s per call instead of 0.39-0.42. (In
# three `drip reconstruct` runs of the tomography model the peak was 500-516 MB before and
# 507-533 MB after: the growth depends on the heap's history.)


def centred_patches(u: torch.Tensor, stride: int = PATCH_STRIDE) -> torch.Tensor:
    """``(N, C, H, W) -> (N, L, C p^2)``: the ``p x p`` patches at ``stride``, each channel's
    mean removed."""
    n, c = u.shape[:2]
    patches = F.unfold(u, PATCH_SIZE, stride=stride).view(n, c, PATCH_SIZE**2, -1)
    return (patches - patches.mean(2, keepdim=True)).flatten(1, 2).transpose(1, 2)


def patch_index(shape: tuple[int, ...], order: torch.Tensor | None = None) -> torch.Tensor:
    """``(N L, C p^2)``: for images of ``shape`` ``(N, C, H, W)``, the flat index of each pixel
    of each patch at ``PATCH_STRIDE``, in the order of :func:`centred_patches` (patches of the
    first image first), or with the patches taken in ``order``."""
    n, c, h, w = shape
    device = None if order is None else order.device
    rows = torch.arange(0, h - PATCH_SIZE + 1, PATCH_STRIDE, device=device)
    columns = torch.arange(0, w - PATCH_SIZE + 1, PATCH_STRIDE, device=device)
    images = torch.arange(n, device=device) * (c * h * w)
    starts = (images[:, None, None] + rows[:, None] * w + columns).view(-1)
    offsets = torch.arange(PATCH_SIZE, device=device)
    within = (torch.arange(c, device=device)[:, None, None] * (h * w)
              + offsets[:, None] * w + offsets).view(-1)
    return (starts if order is None else starts[order])[:, None] + within


def fit_patch_count(shape: tuple[int, ...]) -> int:
    """How many patches :meth:`PatchMixture.fit` draws from images of ``shape`` ``(N, C, H, W)``."""
    n, _, h, w = shape
    if min(h, w) < PATCH_SIZE:
        return 0
    return min(FIT_PATCHES, n * ((h - PATCH_SIZE) // FIT_STRIDE + 1)
               * ((w - PATCH_SIZE) // FIT_STRIDE + 1))


def supported_components(shape: tuple[int, ...]) -> int:
    """The most components a fit to images of ``shape`` determines: ``FIT_PATCHES_PER_DIMENSION
    d`` patches each (``d = C p^2``)."""
    return fit_patch_count(shape) // (FIT_PATCHES_PER_DIMENSION * shape[1] * PATCH_SIZE**2)


class PatchMixture(torch.nn.Module):
    """A mixture of zero-mean Gaussians on mean-removed patches: ``K`` covariances and
    mixing weights, kept as buffers (saved in the model file). Unfitted (all zeros) until
    :meth:`fit`."""

    def __init__(self, components: int, channels: int = 1):
        super().__init__()
        d = channels * PATCH_SIZE**2
        self.channels = channels
        self.register_buffer("covariances", torch.zeros(components, d, d))
        self.register_buffer("log_weights", torch.zeros(components))

    @property
    def fitted(self) -> bool:
        return bool(self.covariances.abs().sum() > 0)

    @torch.no_grad()
    def fit(self, images: torch.Tensor, seed: int = 0, iterations: int = FIT_ITERATIONS,
            max_patches: int = FIT_PATCHES) -> float:
        """Fit by EM to up to ``max_patches`` patches (on a 4-pixel grid) of ``images``
        ``(N, C, H, W)``; the start sorts the patches by energy into ``K`` equal groups.
        Returns the mean log-likelihood per patch."""
        k = len(self.log_weights)
        patches = centred_patches(images.to(torch.float32), stride=FIT_STRIDE).flatten(0, 1)
        gen = torch.Generator().manual_seed(seed)
        patches = patches[torch.randperm(len(patches), generator=gen)[:max_patches]]
        n, d = patches.shape
        labels = torch.empty(n, dtype=torch.long)
        labels[patches.norm(dim=1).argsort()] = torch.arange(n) * k // n
        responsibilities = F.one_hot(labels, k).to(patches.dtype)
        eye = torch.eye(d, dtype=patches.dtype)
        weighted = torch.empty_like(patches)
        for _ in range(iterations):
            counts = responsibilities.sum(0) + 1e-10
            # one component at a time: no (n, K, d) product in memory (300 MB for grayscale)
            covariances = patches.new_empty(k, d, d)
            for j in range(k):   # in one buffer (see ALLOCATION)
                torch.mul(patches, responsibilities[:, j:j + 1], out=weighted)
                torch.mm(weighted.t(), patches, out=covariances[j])
            covariances = covariances / counts[:, None, None] + FIT_FLOOR * eye
            log_weights = torch.log(counts / n)
            likelihood = self._log_likelihoods(patches, covariances, log_weights)
            total = torch.logsumexp(likelihood, 1)
            responsibilities = torch.exp(likelihood - total[:, None])
        self.covariances.copy_(covariances)
        self.log_weights.copy_(log_weights)
        return float(total.mean())

    def fit_shortfall(self, shape: tuple[int, ...]) -> str | None:
        """Why a fit to images of ``shape`` ``(N, C, H, W)`` would be ill-determined (fewer than
        ``FIT_PATCHES_PER_DIMENSION d`` patches per component), or None."""
        k, d = self.covariances.shape[:2]
        count, enough = fit_patch_count(shape), supported_components(shape)
        if enough >= k:
            return None
        return (f"the patch mixture's fit has {count} patches for {k} components of {d} "
                f"pixels; fewer than {FIT_PATCHES_PER_DIMENSION * d} per component leave their "
                f"covariances ill-determined: "
                + (f"use at most {enough} components, or more images" if enough
                   else "it needs more (or larger) images"))

    @staticmethod
    def _log_likelihoods(patches, covariances, log_weights):
        """``(n, K)``: each component's log density times its weight at each patch (without
        the ``2 pi`` constant)."""
        # whitening factors L^-1 (S = L L^T), found in float64: a matrix product per component
        # instead of a triangular solve (80 components on 64 crops' patches: 0.35 s, not 1.8)
        cholesky = torch.linalg.cholesky(covariances.double())
        eye = torch.eye(cholesky.shape[1], dtype=cholesky.dtype, device=cholesky.device)
        whitening = torch.linalg.solve_triangular(cholesky, eye.expand_as(cholesky), upper=False)
        log_det = 2 * torch.log(torch.diagonal(cholesky, dim1=1, dim2=2)).sum(1)
        whitening, log_det = whitening.to(patches.dtype), log_det.to(patches.dtype)
        # one component at a time, in one buffer (see ALLOCATION)
        squared = patches.new_empty(len(covariances), len(patches))
        whitened = torch.empty_like(patches)
        for j in range(len(covariances)):
            torch.mm(patches, whitening[j].t(), out=whitened)
            torch.sum(whitened.square_(), 1, out=squared[j])
        return (-0.5 * squared - 0.5 * log_det[:, None] + log_weights[:, None]).t().contiguous()

    @torch.no_grad()
    def labels(self, u: torch.Tensor) -> torch.Tensor:
        """``(N, L)``: each patch of the images ``u`` its most likely component, the
        covariances widened by ``LABEL_VARIANCE`` (``u`` is an estimate)."""
        n = len(u)
        patches = centred_patches(u.to(torch.float32)).flatten(0, 1)
        eye = torch.eye(patches.shape[1], dtype=patches.dtype, device=patches.device)
        covariances = self.covariances.to(patches) + LABEL_VARIANCE * eye
        log_weights = self.log_weights.to(patches)
        # in chunks: the (patches, K) likelihoods of a large batch need not be held at once
        return torch.cat([self._log_likelihoods(chunk, covariances, log_weights).argmax(1)
                          for chunk in patches.split(LABEL_CHUNK)]).view(n, -1)

    def precisions(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``C W_k C``, ``W_k = (S_k + PRECISION_FLOOR I)^-1`` and ``C`` the removal of each
        channel's mean from a patch: ``(K, d, d)``, kept for the buffers' values."""
        def compute():
            d = self.covariances.shape[1]
            eye = torch.eye(d, dtype=torch.float64)
            inverse = torch.linalg.inv(self.covariances.double().cpu() + PRECISION_FLOOR * eye)
            size = PATCH_SIZE**2   # C: per channel, I - 1 1^T / p^2
            centring = eye - torch.block_diag(*[torch.full((size, size), 1 / size,
                                                           dtype=torch.float64)] * self.channels)
            product = centring @ inverse @ centring
            return (product + product.transpose(1, 2)).div(2).to(device=device, dtype=dtype)

        return cached_for_parameters(self, "_precisions", (dtype, torch.device(device)),
                                     [self.covariances], compute)

    def half_gradient(self, u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(1/2) grad Q(u) = sum_i P_i^T C W_k(i) C P_i u`` for images ``u`` and their
        patches' components ``labels`` (``(N, L)``). The patches are gathered straight from
        ``u`` in component order and their products added back with one scatter (64 images of
        64x64 on 2 CPU cores: 9.5 ms, against 17.7 through unfold, sort, unsort and fold)."""
        index, sizes = self._grouping(labels, tuple(u.shape))
        grouped = torch.take(u, index).view(-1, self.covariances.shape[1])  # C is in W
        precisions = self.precisions(u.dtype, u.device)
        products, start = [], 0
        for j, size in enumerate(sizes):   # the patches of one component at a time
            products.append(grouped[start:start + size] @ precisions[j])
            start += size
        flat = u.new_zeros(u.numel()).scatter_add(0, index, torch.cat(products).view(-1))
        return flat.view_as(u)

    def _grouping(self, labels: torch.Tensor, shape: tuple[int, ...]):
        """The flat indices in images of ``shape`` of every patch's pixels, the patches sorted
        by component, and each component's count; kept for the last ``labels`` tensor (a solve
        asks again every iteration until its working set changes)."""
        key = (labels, labels._version, shape)
        cached = getattr(self, "_grouped", None)
        if cached is None or cached[0] is not labels or cached[1:3] != key[1:]:
            flat = labels.reshape(-1)
            sizes = torch.bincount(flat, minlength=len(self.log_weights)).tolist()
            index = patch_index(shape, flat.argsort())
            cached = (*key, index.reshape(-1), sizes)
            self._grouped = cached
        return cached[3], cached[4]

    def value(self, u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``Q(u)`` per sample."""
        return (u * self.half_gradient(u, labels)).flatten(1).sum(1)

    def hessian_bound(self) -> float:
        """A bound on ``Q``'s Hessian, ``2 sum_i P_i^T C W C P_i``: each pixel lies in
        ``(p / stride)^2`` patches, and ``C`` and the extraction have norm 1."""
        smallest = float(torch.linalg.eigvalsh(self.covariances.double()).min())
        overlap = math.ceil(PATCH_SIZE / PATCH_STRIDE) ** 2
        return 2 * overlap / (max(smallest, 0.0) + PRECISION_FLOOR)


class PerChannelMixture(torch.nn.Module):
    """A single-channel :class:`PatchMixture` on each channel of images of several: each
    channel's patches take their own components, and ``Q(u) = sum_c Q(u_c)``. Labels are
    ``(N, C L)``, one row per sample, as the solver slices them."""

    def __init__(self, mixture: PatchMixture, channels: int):
        super().__init__()
        if mixture.channels != 1:
            raise ValueError("PerChannelMixture spreads a mixture of one channel")
        self.mixture, self.channels = mixture, channels
        self._view = None   # (labels, its version, the per-channel view handed on)

    @property
    def fitted(self) -> bool:
        return self.mixture.fitted

    def labels(self, u: torch.Tensor) -> torch.Tensor:
        return self.mixture.labels(channels_as_samples(u)).view(len(u), -1)

    def half_gradient(self, u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # the same view object while the labels are the same, so that the mixture's grouping
        # of the patches by component is kept between calls (PatchMixture._grouping)
        if self._view is None or self._view[0] is not labels or self._view[1] != labels._version:
            self._view = (labels, labels._version, labels.view(len(labels) * u.shape[1], -1))
        return self.mixture.half_gradient(channels_as_samples(u), self._view[2]).view_as(u)

    def hessian_bound(self) -> float:
        return self.mixture.hessian_bound()


class PatchAugmented:
    """The last pass's regularizer ``R_w(z) + lam Q(E z)`` (the module docstring), with the
    interface :func:`~drip_cli.solvers.drip.solve_drip` asks of a regularizer; the per-sample
    ``pixel_weights`` and ``patch_labels`` come as keywords. ``value`` without labels is the
    model's own ``R``, the figure reconstruction files report."""

    least_at_constants = True   # R is least at constants and Q is zero there

    def __init__(self, regularizer, embedding, mixture: PatchMixture, weight: float):
        self.regularizer, self.embedding, self.mixture, self.weight = (regularizer, embedding,
                                                                       mixture, weight)

    def _patch_term(self, z, patch_labels):
        u = self.embedding(z)
        return u, self.mixture.half_gradient(u, patch_labels)

    def gradient(self, z, pixel_weights=None, patch_labels=None):
        gradient = self.regularizer.gradient(z, pixel_weights=pixel_weights)
        if patch_labels is None:
            return gradient
        return gradient + 2 * self.weight * self.embedding.adjoint(self._patch_term(z, patch_labels)[1])

    def value(self, z, pixel_weights=None, patch_labels=None):
        value = self.regularizer.value(z, pixel_weights=pixel_weights)
        if patch_labels is None:
            return value
        u, half = self._patch_term(z, patch_labels)
        return value + self.weight * (u * half).flatten(1).sum(1)

    def value_and_gradient(self, z, pixel_weights=None, patch_labels=None):
        return (self.value(z, pixel_weights, patch_labels),
                self.gradient(z, pixel_weights, patch_labels))

    def curvature_and_lipschitz_bound(self, shape):
        """The model's ``R``'s; the patch term's share is :meth:`unweighted_lipschitz`, which
        the pixel weights do not scale."""
        return self.regularizer.curvature_and_lipschitz_bound(shape=shape)

    def unweighted_lipschitz(self, shape) -> float:
        """``lam ||E||^2`` times :meth:`PatchMixture.hessian_bound`: the Lipschitz constant of
        the patch term's gradient in ``z``, for latents of ``shape``."""
        embedding = self.embedding
        norm = cached_for_parameters(
            embedding, "_squared_norm", tuple(shape), list(embedding.parameters()),
            lambda: largest_eigenvalue_bound(lambda v: embedding.adjoint(embedding(v)),
                                             (1, *shape), dtype=torch.float64,
                                             device=embedding.weight.device))
        return self.weight * norm * self.mixture.hessian_bound()
