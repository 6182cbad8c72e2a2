"""The DRIP lower-level problem, per sample:

    minimize_z  R(z)   subject to   ||A E z - b|| <= radius         (u = E z)

solved by accelerated projected gradient: a gradient step on ``R``, then the Euclidean projection
onto the data-fit set (:mod:`.projection`, a Krylov method on ``A E``), so that the fixed points
are exactly the minimisers. The step is ``1 / L`` per sample, ``L`` the regularizer's bound on
the Lipschitz constant of ``grad R`` for latents of this shape (times the sample's largest pixel
weight), where the sufficient-decrease condition always holds: for the convex family a Lanczos
bound on the padded filter bank, within a few percent of the curvature estimate on the infinite
grid (:meth:`~drip_cli.regularizers.convex.ConvexFilterRegularizer.padded_lipschitz_bound`), so
no step needs an evaluation of ``R``. Where a regularizer's first guess lies above ``1 / L``, the
step starts there and is halved whenever the condition fails, never below ``1 / L``. So however the
parameters were trained, the solver never takes a step longer than the curvature allows. (For the
non-convex leapfrog regularizer there is no bound: its floor is a safeguard, and the solver finds
a stationary point, not necessarily the global minimiser; the data fit is enforced all the same.)
Before the shape's bound, the convex family's floor was the bound for every shape, 4 times the
estimate (the symmetric padding's worst case), so every step started at the estimate and was
tested by an evaluation of ``R`` at the new point: a fifth of a tomography solve's time, and a
flat crop's rounding could fail a test late and quarter its step for good. (The tomography
sample model on the bench's 64 crops: 15.5 / 16.5 s against 21.1 / 21.5 before, alternating,
with the same PSNR; a flat crop of sky took 387-601 iterations depending on its batch, now
319-320 in every batch.) Nesterov momentum is restarted per sample when the step turns against
the momentum, ``<y - z_new, z_new - z> > 0`` (the gradient restart of O'Donoghue & Candes),
which needs no evaluation of ``R``.

A sample stops when its latent iterate changes by less than ``tolerance`` (relative) between two
iterations *and* its stationarity, ``||y - z_new|| / (t ||grad R(y)||)`` (the projected-gradient
step per unit step length, relative to the gradient: the share of ``grad R`` that the data-fit
constraint does not balance; 1 far from the solution, 0 at it), is at most
``stationarity_tolerance``; stopped samples leave the batch. The change alone is fooled by short
steps: with a sharp regularizer (``eps = 0.001``, so ``1 / L`` is small) on limited-angle
tomography, the first step moved the CGLS start by less than 1e-3, and every training solve
stopped after one iteration, at stationarity 0.9; the training gradient then pointed at cosine
0.2 to the true one and runs collapsed (validation 30.5 -> 28.1 dB in two epochs). On the blur
sample model the stationarity is 0.02-0.06 where the change reaches 1e-3 and below 2e-3 where
it reaches 1e-4, so ``stationarity_tolerance = 0.05`` costs a few iterations at most there. The
last operation on every sample is a CGLS run into the set (with a small margin, so the figure
survives rounding), so every returned ``z`` fits the data unless CGLS could not get there, which
is reported as ``converged = False``.

Where a latent constant in each channel fits the data (a flat crop at high noise), the
constraint is inactive and that constant is a minimiser, for the convex family's ``R`` is zero
there, its least value: :func:`~drip_cli.solvers.datafit.best_constant` finds it before any
iteration. The stationarity above compares the gradient with what the constraint balances, so on
such a sample it stayed near 1 and the solve ran to the cap: a crop of sky in 256 tomography crops at 5%
noise took 2 x 1000 iterations, and held its batch of 64 for them (the batch: 21.8 / 23.2 s
against 24.7 / 27.7 before, alternating; PSNR 29.413 against 29.409 dB, the constant 0.27 dB
closer to the truth).

The projections inside the steps are inexact (``projection_tolerance``, relative to the
correction), which is cheap and enough at the noise levels models are trained for. When the
constraint is tight (low noise), their error sets a floor under the stationarity: on a 64x64
photograph blurred at 0.1% noise it wandered between 0.2 and 0.9 for 1000 iterations, with
``R`` 470.6 where the minimiser has 468.9. So each sample's projection accuracy is tightened
tenfold whenever its stationarity has not reached a new low for ``STALL_PATIENCE`` iterations,
down to ``MIN_PROJECTION_TOLERANCE``; that sample then converged in 139 iterations, 0.22 dB
higher. On 19 such crops ``drip reconstruct`` took 1.42 s per image instead of 4.97 (PSNR
36.08 against 36.07 dB); at 0.3% and 1% noise, and on tomography at 0.1%, nothing changed.
A sample can still be stuck: at the accuracy floor its projection at its Krylov cap (0.01%
noise), its iterate no longer moving (less than ``tolerance`` per iteration over the stall).
It is retired then, with ``converged = False``, instead of running to ``max_iterations``. On
four 0.01% phantoms the two such samples stopped near 200 iterations, where they had run to
the cap; the four took 52 s per image as before (the others now converge, with costlier
projections), at 32.26 dB against 31.66.

Measured on the tomography sample model and not adopted (it needs 290 iterations per sample on
``sample_data/tomography.h5``, where TV is faster): letting the step grow by 1.5 after every
step that needed no backtracking cut the iterations by 28% on 32 held-out crops at 2 and 5%
noise, but each backtrack costs a projection, and the time rose from 0.51 to 0.79 s per image
(growing by 1.1: 208 instead of 290 iterations on ``tomography.h5``, 13.4 against 12.9 s);
starting the backtracking at 4 times the curvature estimate gave 254 iterations and 12.1 s,
within the spread between runs; a warm start by L-BFGS on the
Lagrangian ``R + mu/2 ||A E z - b||^2`` (``mu`` from the KKT conditions at the start, rescaled
by the squared residual ratio after each of 8 rounds of 30 steps) made a single pass on 8 crops
faster (4.3 against 5.5 s) and as converged, but with the reweighting pass the whole solve was
not (11.5 against 12.5 s at 2%, 12.8 against 11.3 at 5%), and shorter warm starts let the
stopping test pass 1-2% above the minimiser's ``R`` on some crops.

Nor a diagonal preconditioner: iterating on ``s = z / d``, ``d = (h / median h)^(-1/2)`` from
the regularizer's Hessian diagonal ``h`` at the start (its ratio to the median clamped to
[0.1, 10]), with ``A E d`` in the projections and a first step 3 times the estimate. From the
CGLS start (the first pass) it was worse: on 16 bench crops in float64 a higher ``R`` at the
same tolerances (1675.1 against 1671.9) and 587 instead of 414 iterations at tight ones. On
the reweighted pass, which starts near its solution, it halved the iterations (float64, 16
crops: 75 instead of 146, ``R`` 1076.36 against 1076.45). In float32, though, a flat crop
(``R = 0.22``) moved its iterate by 5e-8 per step, below the rounding, and hovered at
stationarity 0.05-0.1 up to the cap of 1000 iterations (22 s for the pass on the 64 bench
crops at 2%); with such samples retired once stalled at the projections' accuracy floor, the
pass took 10.4-11.4 instead of 16-18 s, at 30.140 instead of 30.157 dB, and at the
stationarity that restored the PSNR (0.01) as long as without (16.0 s). On the first set of
32 held-out crops at 1 / 2 / 5 / 10% noise it was 0.01 / 0.03 / 0.01 / 0.00 dB lower after
20-28% fewer iterations, and no faster per image (the slowest samples set a batch's time).

Neither the step nor the momentum is what limits such a slow sample. The slowest crop of that
set at 5% noise took 913 iterations over its two passes (the set's mean: 331), its
stationarity falling steadily (0.94 to 0.05 in the first pass, 0.44 to 0.02 in the second);
its step never backtracked below the first guess, and first guesses 2 and 4 times larger,
accepted without backtracking, took 882 and 883 iterations; the momentum restarted twice in
913 iterations, and without restarts it took 1075.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batching import batch_dot, per_sample
from ..operators import LinearOperator
from ..operators.composed import EmbeddedOperator
from .cgls import MARGIN, cgls
from .datafit import SolverResult, best_constant
from .projection import project_onto_datafit


# A sample whose stationarity has not reached a new low for this many iterations gets projections
# ten times more accurate, down to the floor (module docstring).
STALL_PATIENCE = 50
MIN_PROJECTION_TOLERANCE = 1e-3


class _StallWatch:
    """Per-sample projection accuracy, tightened where the stationarity stalls, and the test for
    a sample that is stuck: stalled with nothing left to tighten (the projection at the floor
    and still at its Krylov cap) while its iterate has moved less than ``tolerance`` per
    iteration over the whole stall, so that the change criterion alone would have stopped it."""

    def __init__(self, z0: torch.Tensor, projection_tolerance: float):
        n, like = len(z0), dict(dtype=z0.dtype, device=z0.device)
        self.accuracy = torch.full((n,), projection_tolerance, **like)
        self.best = torch.full((n,), float("inf"), **like)
        self.stalled_for = torch.zeros(n, dtype=torch.int64, device=z0.device)
        self.anchor = z0   # the iterate where the current stall began

    def update(self, z, stationarity, capped, tolerance: float) -> torch.Tensor:
        improved = stationarity < self.best
        self.best = torch.where(improved, stationarity, self.best)
        self.stalled_for = torch.where(improved, 0, self.stalled_for + 1)
        stalled = self.stalled_for >= STALL_PATIENCE
        stuck = stalled & capped & (self.accuracy <= MIN_PROJECTION_TOLERANCE)
        if bool(stuck.any()):   # only then is the distance moved worth a pass over z
            moved = ((z - self.anchor).flatten(1).norm(dim=1)
                     / z.flatten(1).norm(dim=1).clamp_min(1e-12))
            stuck = stuck & (moved <= STALL_PATIENCE * tolerance)
        # tenfold, to the floor; a tolerance set below the floor is kept, never loosened
        tighter = torch.minimum(self.accuracy,
                                (self.accuracy / 10).clamp_min(MIN_PROJECTION_TOLERANCE))
        self.accuracy = torch.where(stalled, tighter, self.accuracy)
        restart = improved | stalled
        self.stalled_for = torch.where(stalled, 0, self.stalled_for)
        self.anchor = torch.where(per_sample(restart, z), z, self.anchor)
        return stuck

    def keep(self, rows: torch.Tensor) -> None:
        self.accuracy, self.best = self.accuracy[rows], self.best[rows]
        self.stalled_for, self.anchor = self.stalled_for[rows], self.anchor[rows]


@dataclass
class DripSolution(SolverResult):
    latent: torch.Tensor | None = None     # (N, latent_channels, H, W); solution = E latent
    pixel_weights: torch.Tensor | None = None   # (N, 1, H, W) where R was weighted per pixel


def project(forward_op: EmbeddedOperator, b, radius, z, max_iterations: int):
    """Move ``z`` into ``{||A E z - b|| <= radius}`` by warm-started CGLS."""
    return cgls(forward_op, b, radius, u0=z, max_iterations=max_iterations)


@torch.no_grad()
def solve_drip(
    op: LinearOperator,
    embedding: torch.nn.Module,
    regularizer: torch.nn.Module,
    b: torch.Tensor,
    radius: torch.Tensor,
    z0: torch.Tensor | None = None,
    max_iterations: int = 300,
    tolerance: float = 1e-4,
    stationarity_tolerance: float = 0.05,
    projection_iterations: int = 50,
    final_projection_iterations: int = 1000,
    projection_tolerance: float = 1e-3,
    pixel_weights: torch.Tensor | None = None,
    progress=None,
) -> DripSolution:
    """Solve the lower-level problem for a batch (see the module docstring).

    ``projection_iterations`` caps the Krylov steps of the projection inside each step, and
    ``projection_tolerance`` is its relative accuracy (:mod:`.projection`);
    ``final_projection_iterations`` caps the CGLS runs that start (from zero) and end the solve.
    ``pixel_weights`` (``(N, 1, H, W)``, positive; convex regularizers only) weighs ``R``'s
    terms per pixel (:mod:`drip_cli.regularizers.adaptive`); the steps and their bound scale
    with each sample's largest weight. The returned ``regularizer_value`` is the unweighted ``R``.
    ``progress(fraction)``, where given, is called with the share of samples finished whenever
    some finish.
    """
    forward_op = EmbeddedOperator(op, embedding)
    radius = radius.to(device=b.device, dtype=b.dtype)
    n = b.shape[0]
    solution = torch.zeros(n, *forward_op.image_shape, dtype=b.dtype, device=b.device)
    iterations = torch.full((n,), max_iterations, dtype=torch.int64, device=b.device)
    stopped = torch.zeros(n, dtype=torch.bool, device=b.device)
    rows = torch.arange(n, device=b.device)
    # Iterate on the set CGLS will aim at, so the closing CGLS run finds every converged sample
    # already in place and leaves the minimiser where it is.
    radius_work = (1 - MARGIN) * radius
    if getattr(regularizer, "least_at_constants", False):
        # where a latent constant per channel fits, it is a minimiser: no iteration
        flat, constant = best_constant(forward_op, b, radius_work)
        solution[flat], iterations[flat], stopped[flat] = constant[flat], 0, True
        rows = rows[~flat]
        if progress is not None and len(rows) < n:
            progress(1 - len(rows) / n)
    b_work, radius_work = b[rows], radius_work[rows]
    weights_work = None if pixel_weights is None else pixel_weights[rows]
    if z0 is not None:
        z0 = z0[rows]
    elif len(rows):  # the discrepancy-principle CGLS solution in latent space: feasible
        z0 = cgls(forward_op, b_work, radius[rows],
                  max_iterations=final_projection_iterations).solution
    else:
        z0 = solution[rows]
    bounds = regularizer.curvature_and_lipschitz_bound(shape=forward_op.image_shape)
    curvature, lipschitz = (t.to(b.dtype) for t in bounds)
    # a pixel weight m scales R's curvature by at most max(m)
    scale = (torch.ones(len(rows), dtype=b.dtype, device=b.device) if weights_work is None
             else weights_work.to(b.dtype).flatten(1).amax(1))
    safe_step = 1.0 / (lipschitz * scale)                         # guaranteed: 1 / L
    step = 1.0 / (curvature * scale)                  # first guess, backtracked if above 1 / L

    z, z_prev = z0, z0
    momentum_t = torch.ones(len(rows), dtype=b.dtype, device=b.device)
    watch = _StallWatch(z0, projection_tolerance)
    for it in range(1, max_iterations + 1):
        if len(rows) == 0:
            break
        t_next = (1 + torch.sqrt(1 + 4 * momentum_t**2)) / 2
        beta = (momentum_t - 1) / t_next
        y = z + per_sample(beta, z) * (z - z_prev)
        z_new, step, stationarity, capped = _backtracking_step(
            forward_op, regularizer, b_work, radius_work, y, step, safe_step,
            projection_iterations, watch.accuracy, weights_work)
        stuck = watch.update(z_new, stationarity, capped, tolerance)
        against = ((y - z_new) * (z_new - z)).flatten(1).sum(1) > 0
        momentum_t = torch.where(against, torch.ones_like(t_next), t_next)
        change = (z_new - z).flatten(1).norm(dim=1) / z_new.flatten(1).norm(dim=1).clamp_min(1e-12)
        z_prev, z = torch.where(per_sample(against, z), z_new, z), z_new
        small = (change <= tolerance) & (stationarity <= stationarity_tolerance)
        done = small | stuck | (it == max_iterations)
        if bool(done.any()):  # retire finished samples; keep iterating on the rest only
            finished = rows[done]
            solution[finished], iterations[finished], stopped[finished] = z[done], it, small[done]
            keep = ~done
            rows = rows[keep]
            z, z_prev, momentum_t, step = z[keep], z_prev[keep], momentum_t[keep], step[keep]
            b_work, radius_work, safe_step = b_work[keep], radius_work[keep], safe_step[keep]
            watch.keep(keep)
            if weights_work is not None:
                weights_work = weights_work[keep]
            if progress is not None:
                progress(1 - len(rows) / n)
    # Every iterate was projected, but a projection capped at projection_iterations may have
    # fallen short: the last word is a projection run to the tolerance.
    final = project(forward_op, b, radius, solution, final_projection_iterations)
    latent = final.solution
    return DripSolution(solution=embedding(latent), iterations=iterations + final.iterations,
                        converged=stopped & final.converged, latent=latent,
                        regularizer_value=regularizer.value(latent), pixel_weights=pixel_weights)


def _backtracking_step(forward_op, regularizer, b, radius, y, step, safe_step,
                       projection_iterations, projection_tolerance, pixel_weights=None):
    """``P(y - t grad R(y))`` with the per-sample step ``t`` halved (never below ``safe_step``)
    until the sufficient-decrease condition of Beck & Teboulle holds along ``d = z - y``:
    ``R(z) <= R(y) + <grad R(y), d> + ||d||^2 / (2 t)``, the local form of ``t <= 1 / L``.
    ``projection_tolerance`` is per sample. Returns ``z``, the steps, the stationarity
    ``||d|| / (t ||grad R(y)||)`` and whether the projection reached ``projection_iterations``
    Krylov steps, per sample."""
    def weighted(rows):   # R's keyword for the pixel weights of these rows, if any
        return {} if pixel_weights is None else {"pixel_weights": pixel_weights[rows]}

    step = torch.maximum(step, safe_step)
    if bool((step > safe_step).any()):   # a step may backtrack: its test needs R(y)
        value_y, gradient_y = regularizer.value_and_gradient(y, **weighted(slice(None)))
    else:   # every step at 1 / L: no test, no value (the convex family's usual case)
        value_y, gradient_y = None, regularizer.gradient(y, **weighted(slice(None)))

    capped = torch.zeros(len(y), dtype=torch.bool, device=y.device)

    def projected(rows, t):
        z, krylov_steps = project_onto_datafit(
            forward_op, b[rows], radius[rows], y[rows] - per_sample(t, y[rows]) * gradient_y[rows],
            projection_iterations, projection_tolerance[rows])
        capped[rows] = krylov_steps >= projection_iterations
        return z

    z = projected(slice(None), step)
    pending = torch.arange(len(y), device=y.device)
    while True:
        pending = pending[step[pending] > safe_step[pending]]   # at 1 / L the condition holds
        if len(pending) == 0:
            break
        d = z[pending] - y[pending]
        model = (value_y[pending] + batch_dot(gradient_y[pending], d)
                 + batch_dot(d, d) / (2 * step[pending]))
        slack = 1e-6 * value_y[pending].abs()   # rounding in R must not trigger a backtrack
        failed = regularizer.value(z[pending], **weighted(pending)) > model + slack
        if not bool(failed.any()):
            break
        pending = pending[failed]
        step[pending] = torch.maximum(step[pending] / 2, safe_step[pending])
        z[pending] = projected(pending, step[pending])
    stationarity = ((z - y).flatten(1).norm(dim=1)
                    / (step * gradient_y.flatten(1).norm(dim=1)).clamp_min(1e-30))
    return z, step, stationarity, capped
