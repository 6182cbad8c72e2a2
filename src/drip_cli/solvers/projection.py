"""Euclidean projection onto the data-fit set ``{z : ||B z - b|| <= radius}``, per sample.

The projection of ``v`` is ``v + d`` with ``d`` the smallest correction that reaches the radius:

    d(lam) = (I + lam B^T B)^{-1} lam B^T (b - B v),    ||B (v + d(lam)) - b|| = radius,

a Tikhonov problem whose weight ``lam`` is fixed by the radius. It is solved in a Krylov subspace
(a "hybrid" method): ``k`` steps of Golub-Kahan bidiagonalisation started at ``b - B v`` give
``B V_k = U_{k+1} C_k`` with a small ``(k+1) x k`` bidiagonal ``C_k``, and with ``d = V_k y``
the problem becomes ``min ||y|| s.t. ||C_k y - beta e_1|| <= radius``. Through the SVD of ``C_k``
the residual is a decreasing function of ``lam`` (the secular equation), solved by safeguarded
Newton steps. Steps are added until ``d`` changes by less than ``tolerance`` (relative) from one
step to the next, or, given a bound ``||B|| <= norm``, until the error bound below is within it;
both Krylov bases are re-orthogonalised, so float32 runs stay accurate.

The error bound. For the subspace's ``lam``, ``d_k = V_k y_k`` leaves the residual
``lam alpha_{k+1} beta_{k+1} (e_k^T y_k) v_{k+1}`` in the normal equations ``(I + lam B^T B) d =
lam B^T r`` (the Golub-Kahan relations; ``alpha``, ``beta`` the bidiagonal's entries), and
``I + lam B^T B`` has no eigenvalue below 1, so ``d_k`` is within ``lam ||B|| beta_{k+1}
|e_k^T y_k|`` of that equation's solution. A small correction has a small ``lam`` (``d ~ lam
B^T r``), and the bound often passes after the first step, where the change test needs two: on
the tomography sample model's solve of 64 bench crops at 2% noise it passed for 91% of the first
steps, and the solve made 36% fewer products with ``B``, in the same iterations, 0.002 dB apart
(the timings are in ``docs/design.md``). The full problem's ``lam`` differs a little from the
subspace's, so the bound, like the change between two subspaces' answers, estimates the error
rather than bounding it exactly: on small problems of every operator kind the projections it
stopped stayed within 0.62 times the tolerance of the dense projection.

Warm-started CGLS, which the published DRIP code uses instead, also lands in the set but not at
the nearest point; projected gradient with it converges to a point that is not a minimiser of the
constrained problem (measured: KKT stationarity residuals of 3-63% of ``||grad R||`` on 64x64
blur). With the Euclidean projection, fixed points of ``z = P(z - t grad R(z))`` are exactly the
KKT points, whatever the step ``t``.

Where ``B`` is a circulant convolution (a periodic blur or the identity after a periodic embedding,
:meth:`~drip_cli.operators.composed.EmbeddedOperator.fourier_spectrum`), ``B B^T`` is diagonal in
the Fourier basis with the gains ``g_k``, and the projection is exact and cheap there: with
``r = b - B v`` and ``q = rfft2(r)`` (per frequency, rotated to the eigenvectors of ``B B^T`` for
several channels; the half spectrum of a real image, each frequency also standing for its mirror
image), the residual of ``d(lam)`` is ``sum_k |q_k|^2 / (1 + lam g_k)^2``, the same secular
equation over the ``H W C`` frequencies instead of a subspace, and
``d = B^T irfft2(lam q / (1 + lam g))``: three FFTs and a product with ``B``. On the blur sample
model the solve of 64 bench crops at 2% noise took 9.7-10.1 s against 12.5-13.2 with the Krylov
projections, and four crops at 0.03% noise 1.95 s against 18.1 (``docs/design.md``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..batching import per_sample
from ..operators import LinearOperator


def _normalise(x: torch.Tensor, tiny: float):
    norm = x.flatten(1).norm(dim=1)
    return x / per_sample(norm.clamp_min(tiny), x), norm


def _orthogonalise(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove from each ``x_i`` its components along the rows of ``basis_i`` (``(N, k, D)``);
    classical Gram-Schmidt applied twice, which is as accurate as the modified form. (Written
    with row vectors, ``x - (x B^T) B``: the column form ``x - B^T (B x)`` ran 15x slower on the
    CPU, 10 ms against 0.7 ms for 64 samples, ``k = 10``, ``D = 4096``.)"""
    flat = x.flatten(1).unsqueeze(1)
    for _ in range(2):
        flat = torch.baddbmm(flat, flat @ basis.transpose(1, 2), basis, alpha=-1)
    return flat.view_as(x)


def _append_row(buffer: torch.Tensor, k: int, x: torch.Tensor) -> torch.Tensor:
    """Write each ``x_i`` as row ``k`` of ``buffer_i``, doubling the rows when it is full (growing
    the bases by ``torch.cat`` at every step copied them each time)."""
    if k == buffer.shape[1]:
        buffer = torch.cat([buffer, torch.empty_like(buffer)], 1)
    buffer[:, k] = x.flatten(1)
    return buffer


def _tikhonov_in_subspace(c: torch.Tensor, beta: torch.Tensor, radius: torch.Tensor,
                          lam0: torch.Tensor | None = None, newton_steps: int = 30):
    """``argmin ||y|| s.t. ||C y - beta e1|| <= radius`` per sample, ``C`` of shape ``(N, k+1, k)``
    (CPU tensors); where even ``lam -> infinity`` cannot reach the radius, the least-squares
    solution.

    With ``C = U S W^T`` the squared residual is ``F(lam) = sum_i c_i^2 / (1 + lam s_i^2)^2 + o``
    (``o`` the part of ``beta e1`` outside the range of ``C``): decreasing in ``lam``. Newton's
    method runs on ``F^{-1/2}``, nearly linear in ``lam`` (as in More & Sorensen's trust-region
    solver), from ``lam0`` (the root for a smaller subspace, which lies above this one's), with a
    bracket and bisection as safeguard. Returns ``(y, lam, newton_iterations)``.

    The arithmetic is NumPy's, in the tensors' precision: on these ``(N, k)`` arrays each
    operation is overhead: 2.7 ms per call against 4.8 ms with PyTorch (64 samples, ``k = 10``),
    whose calls had taken a fifth of a whole DRIP solve on the CPU. The SVD is PyTorch's (as
    fast as NumPy's here): NumPy's LAPACK is OpenBLAS, whose threads, woken at each call,
    contended with PyTorch's for the cores, and the products between the calls ran up to 6
    times slower (measured on 2 cores: four 64x64 blur crops at 0.01% noise, whose projections
    take some 30 Krylov steps each, took 126 s with NumPy's SVD and 56 s single-threaded)."""
    # (N, k+1, k), (N, k), (N, k, k)
    u, s, vh = (t.numpy() for t in torch.linalg.svd(c, full_matrices=False))
    c, beta, radius = c.numpy(), beta.numpy(), radius.numpy()
    tiny = np.finfo(c.dtype).tiny
    coeff = u[:, 0, :] * beta[:, None]                            # beta e1 in the left basis
    coeff2, s2 = coeff * coeff, s * s
    outside = np.maximum(beta * beta - coeff2.sum(1), 0)
    target = radius * radius
    reachable = outside < target
    accuracy = max(1e-10, 16 * np.finfo(c.dtype).eps)   # float32: 2e-6 on ||residual||^2
    lam = np.zeros_like(beta) if lam0 is None else lam0.numpy()
    lo, hi = np.zeros_like(beta), np.full_like(beta, np.inf)
    # no root to find: inside the set already (the correction is 0) or out of reach (least squares)
    settled = (beta <= radius) | ~reachable
    iterations = 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for iterations in range(1, newton_steps + 1):
            q = 1 + lam[:, None] * s2
            terms = coeff2 / (q * q)
            f = terms.sum(1) + outside
            df = -2 * (terms * s2 / q).sum(1)
            above = f > target
            lo, hi = np.where(above, lam, lo), np.where(above, hi, lam)
            # Newton on g = f^(-1/2) = target^(-1/2):  g' = -f'/(2 f^(3/2))
            g = 1 / np.sqrt(f)
            dg = -df * g / (2 * f)
            candidate = lam + (1 / np.sqrt(target) - g) / np.maximum(dg, tiny)
            bisect = np.where(np.isinf(hi), 2 * lam + 1 / np.maximum(s2[:, 0], 1e-30), (lo + hi) / 2)
            inside_bracket = (candidate > lo) & (candidate < hi) & np.isfinite(candidate)
            converged = np.abs(f - target) <= accuracy * target
            if (converged | settled).all():
                break
            # A sample that has converged keeps its lam. (Iterating on it cost 15.6 Newton steps
            # per call instead of 5.9: at the root the Newton step is zero, the candidate equals
            # the bracket's end and fails the strict test, and the bisection fallback threw it
            # far off.)
            lam = np.where(converged | settled, lam, np.where(inside_bracket, candidate, bisect))
        # A converged lam is the root (to ``accuracy``); otherwise prefer the bracket's side that
        # fits. (Taking ``hi`` even when converged was wrong: when Newton approached the root from
        # the side that does not fit, ``hi`` was still the warm start from the previous subspace,
        # and the projection landed 0.5% inside the radius, off the KKT point of the set.)
        lam = np.where(converged | np.isinf(hi), lam, hi)
        q = 1 + lam[:, None] * s2
        filt = np.where(reachable[:, None], lam[:, None] * s / q,
                        1 / np.maximum(s, tiny))                   # unreachable: least squares
    filt = np.where(s > 0, filt, 0).astype(c.dtype)
    y = np.einsum("nkj,nk->nj", vh, filt * coeff)
    y = np.where((beta <= radius)[:, None], 0, y).astype(c.dtype)
    lam = np.where(reachable, lam, 0).astype(c.dtype)
    return torch.from_numpy(y), torch.from_numpy(lam), iterations


@torch.no_grad()
def project_onto_datafit(op: LinearOperator, b: torch.Tensor, radius: torch.Tensor,
                         v: torch.Tensor, max_steps: int = 30,
                         tolerance: float | torch.Tensor = 1e-3, norm: float | None = None):
    """The projection of each ``v`` onto ``{||B z - b|| <= radius}`` (see the module docstring);
    ``norm``, where given, bounds ``||B||`` and lets a correction settle by the error bound.

    Returns ``(z, steps)``: ``steps`` is the number of Krylov steps each sample needed (0 for a
    sample already inside the set). A sample whose correction has not settled after ``max_steps``
    gets the best correction found (still ``||B z - b||`` as small as that subspace allows).

    A sample leaves the working set as soon as its correction settles, so each costs its own
    number of steps, not its batch's largest (``docs/design.md``). Where ``op`` is a circulant
    convolution the projection is exact instead (module docstring), and ``steps`` is 1 for
    every sample outside the set.
    """
    spectrum = getattr(op, "fourier_spectrum", None)
    spectrum = None if spectrum is None else spectrum(v.dtype, v.device)
    if spectrum is not None:
        return _project_in_fourier(op, spectrum, b, radius.to(dtype=v.dtype, device=v.device), v)
    tiny = torch.finfo(v.dtype).tiny
    n = len(v)
    radius = radius.to(dtype=v.dtype, device=v.device)
    tolerance = torch.as_tensor(tolerance, dtype=v.dtype, device=v.device).expand(n)
    u_vec, beta = _normalise(b - op(v), tiny)
    steps = torch.zeros(n, dtype=torch.int64, device=v.device)
    correction = torch.zeros_like(v)
    active = None   # the batch rows of the working set, once some have left it (None: all)
    # Samples inside the set already need no correction: they leave with the first step's
    # finishers (a test of their own here would cost a host synchronisation per call).
    inside = beta <= radius
    # The small problem in the subspace (an SVD of a (k+1) x k matrix and a few Newton steps,
    # each ending in a test of all samples) runs on the CPU: on a GPU it was a string of tiny
    # kernels and host synchronisations per Krylov step. Only C, and y back, cross over.
    host = torch.device("cpu")
    beta_host, radius_host = beta.to(host), radius.to(host)
    w, alpha = _normalise(op.adjoint(u_vec), tiny)
    # the two Krylov bases, (rows of the working set, k, M) and (..., k, D): rows 0..k-1 in use
    us = _append_row(v.new_empty(n, min(8, max_steps), u_vec[0].numel()), 0, u_vec)
    vs = _append_row(v.new_empty(n, min(8, max_steps), w[0].numel()), 0, w)
    c = torch.zeros(n, max_steps + 1, max_steps, dtype=v.dtype, device=v.device)
    c[:, 0, 0] = alpha
    y_prev, lam = c.new_zeros(n, 0), None
    for k in range(1, max_steps + 1):
        p = _orthogonalise(op(w) - per_sample(alpha, u_vec) * u_vec, us[:, :k])
        u_vec, beta_next = _normalise(p, tiny)
        c[:, k, k - 1] = beta_next
        y, lam, _ = _tikhonov_in_subspace(c[:, : k + 1, :k].to(host), beta_host, radius_host, lam)
        y = y.to(v.device)
        # V is orthonormal: the change of the correction is the change of its coordinates.
        change = (y - torch.nn.functional.pad(y_prev, (0, 1))).norm(dim=1)
        size = tolerance * y.norm(dim=1)
        done = (change <= size) | (beta_next <= tiny) | (k == max_steps)
        if norm is not None:   # the error bound (module docstring); lam = 0: out of reach
            lam_here = lam.to(v.device)
            done = done | ((lam_here > 0) & (lam_here * norm * beta_next * y[:, -1].abs() <= size))
        if k == 1:
            done = done | inside
        finishing = int(done.sum())
        if finishing:
            whole = finishing == len(y)   # the whole working set at once: no gathers
            rows = slice(None) if whole else done
            found = (y[rows].unsqueeze(1) @ vs[rows, :k]).view(-1, *v.shape[1:])
            count = torch.full((finishing,), k, dtype=torch.int64, device=v.device)
            if k == 1:   # the samples inside from the start: no steps (and y = 0, so no
                # correction: _tikhonov_in_subspace returns 0 where beta <= radius)
                count = torch.where(inside[rows], 0, count)
            if active is None:   # the working set is still the batch
                finished = slice(None) if whole else torch.nonzero(done).squeeze(1)
            else:
                finished = active[rows]
            correction[finished], steps[finished] = found, count
            if whole:
                break
            keep = ~done
            keep_host = keep.to(host)
            active = torch.nonzero(keep).squeeze(1) if active is None else active[keep]
            tolerance, y, c = tolerance[keep], y[keep], c[keep]
            u_vec, beta_next, w, alpha = u_vec[keep], beta_next[keep], w[keep], alpha[keep]
            us, vs = us[keep], vs[keep]
            beta_host, radius_host, lam = beta_host[keep_host], radius_host[keep_host], lam[keep_host]
        y_prev = y
        us = _append_row(us, k, u_vec)
        w, alpha = _normalise(_orthogonalise(op.adjoint(u_vec) - per_sample(beta_next, w) * w,
                                             vs[:, :k]), tiny)
        vs = _append_row(vs, k, w)
        c[:, k, k] = alpha
    return v + correction, steps


def _secular_filter(q2: torch.Tensor, gains: torch.Tensor, radius: torch.Tensor,
                    newton_steps: int = 100) -> torch.Tensor:
    """The filter ``lam / (1 + lam g)`` per sample and frequency for which the residual
    ``sum q2 / (1 + lam g)^2`` equals ``radius^2`` (``q2``: ``(N, K)``, ``gains``: ``(K,)``, real,
    in the data's precision; the sums and ``lam`` in float64); 0 for a sample inside the set,
    and where no ``lam`` reaches the radius (the unmeasured frequencies, ``g`` under ``eps
    max(g)`` with ``eps`` the data's precision, hold more than ``radius^2``) the least squares
    filter ``1 / g``. Newton's method on ``F^{-1/2}``, concave in ``lam`` (as in
    :func:`_tikhonov_in_subspace`), climbs to the root from ``lam = 0`` without overshooting it,
    to the accuracy of the subspace problems. (In float64 throughout, on 64 blur crops of 64x64,
    it took 8.9 of the projection's 13.7 ms.)"""
    eps = torch.finfo(q2.dtype).eps
    accuracy = max(1e-10, 16 * eps)
    target = radius.double() ** 2
    measured = gains > eps * gains.max()
    reachable = (q2 * ~measured).sum(1, dtype=torch.float64) < target
    active = (q2.sum(1, dtype=torch.float64) > target) & reachable
    lam = torch.zeros_like(target)
    for _ in range(newton_steps):
        q = 1 + lam.to(gains.dtype)[:, None] * gains
        terms = q2 / (q * q)
        f = terms.sum(1, dtype=torch.float64)
        settled = ~active | ((f - target).abs() <= accuracy * target)
        if bool(settled.all()):
            break
        df = -2 * (terms * gains / q).sum(1, dtype=torch.float64)
        root = f.rsqrt()
        step = (target.rsqrt() - root) / (-df * root / (2 * f))
        lam = torch.where(settled | ~torch.isfinite(step), lam, lam + step)
    lam = lam.to(gains.dtype)[:, None]
    least_squares = torch.where(measured, 1 / torch.where(measured, gains, 1), 0)
    return torch.where(reachable[:, None], lam / (1 + lam * gains), least_squares)


@torch.no_grad()
def _project_in_fourier(op: LinearOperator, spectrum, b: torch.Tensor, radius: torch.Tensor,
                        v: torch.Tensor):
    """:func:`project_onto_datafit` for a circulant ``op`` with ``spectrum = (T, g, U)``
    (module docstring) on the half spectrum of real images, each frequency of the other half
    counted by its mirror image's weight: ``(z, steps)``."""
    transfer, gains, basis = spectrum
    channels, shape = transfer.shape[2], v.shape[-2:]
    q = torch.fft.rfft2(b - op(v), norm="ortho").permute(0, 2, 3, 1)     # (N, H, W', C)
    if basis is not None:   # in the eigenvectors of T T^H
        q = (basis.conj().transpose(-1, -2) @ q.unsqueeze(-1)).squeeze(-1)
    # columns 1 .. (W - 1) // 2 stand for their mirror images too
    mirrored = torch.full((q.shape[2], 1), 2.0, dtype=q.real.dtype, device=q.device)
    mirrored[0] = 1
    if shape[-1] % 2 == 0:   # the Nyquist column is its own mirror image
        mirrored[-1] = 1
    q2 = (q.real ** 2 + q.imag ** 2) * mirrored
    filt = _secular_filter(q2.flatten(1), gains.flatten(), radius).view(q.shape)
    w = q * filt
    if basis is not None:
        w = (basis @ w.unsqueeze(-1)).squeeze(-1)
    if channels == 1:
        spectrum_d = transfer[:, :, 0].conj() * w                        # (N, H, W', L)
    else:
        spectrum_d = torch.einsum("hwcl,nhwc->nhwl", transfer.conj(), w)
    d = torch.fft.irfft2(spectrum_d.permute(0, 3, 1, 2), s=shape, norm="ortho")
    steps = (q2.flatten(1).sum(1, dtype=torch.float64) > radius.double() ** 2).to(torch.int64)
    return v + d.to(v.dtype), steps
