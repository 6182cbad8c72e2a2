"""The DRIP lower-level problem, per sample:

    minimize_z  R(z)   subject to   ||A E z - b|| <= radius         (u = E z)

solved by accelerated projected gradient: a gradient step on ``R``, then the Euclidean projection
onto the data-fit set (:mod:`.projection`, a Krylov method on ``A E``), so that the fixed points
are exactly the minimisers.

Step. ``1 / L`` per sample, ``L`` the regularizer's bound on the Lipschitz constant of
``grad R`` for latents of this shape (times the sample's largest pixel weight). For the convex
family it is a Lanczos bound on the padded filter bank, within a few percent of the curvature
(:meth:`~drip_cli.regularizers.convex.ConvexFilterRegularizer.padded_lipschitz_bound`), so the
sufficient-decrease condition always holds and no step needs an evaluation of ``R``. Where a
regularizer's first guess lies above ``1 / L``, the step starts there and is halved whenever the
condition fails, never below ``1 / L``: however the parameters were trained, the solver never
takes a step longer than the curvature allows. (The non-convex leapfrog regularizer has no
bound: its floor is a safeguard, and the solver finds a stationary point, not necessarily the
global minimiser; the data fit is enforced all the same.) Nesterov momentum is restarted per
sample when the step turns against it, ``<y - z_new, z_new - z> > 0`` (the gradient restart of
O'Donoghue & Candes), which needs no evaluation of ``R`` either.

Stopping. A sample stops when its latent iterate changes by less than ``tolerance`` (relative)
between two iterations *and* its stationarity, ``||y - z_new|| / (t ||grad R(y)||)`` (the
projected-gradient step per unit step length, relative to the gradient: 1 far from the
solution, 0 at it), is at most ``stationarity_tolerance``; stopped samples leave the batch. The
change alone is fooled by short steps (a sharp regularizer's ``1 / L`` is small). The last
operation on every sample is a CGLS run into the set (with a small margin, so the figure survives
rounding), so every returned ``z`` fits the data unless CGLS could not get there, which is
reported as ``converged = False``.

Flat samples. Where a latent constant in each channel fits the data (a flat crop at high noise),
the constraint is inactive and that constant is a minimiser, for the convex family's ``R`` is
zero there, its least value: :func:`~drip_cli.solvers.datafit.best_constant` finds it before any
iteration (the stationarity test, which compares the gradient with what the constraint
balances, would never pass there).

Out of reach. Where the start's CGLS run (``final_projection_iterations`` steps) cannot bring a
sample into the set, as when the radius lies below what the data allow (``--tau`` far under 1,
or a noise level given too low), no projected-gradient iterate will fit it either: the sample
is returned at once, at CGLS's closest point, with ``converged = False``; the passes that
start from a solution (``z0``) return such a sample as they find it. Iterating on such a
sample took about 0.09 s per iteration on one 64x64 blur crop at ``tau = 0.5`` (653 iterations
of the first pass in 58 s, of up to 1000 per pass), each projection taking 25 Krylov steps.

Projection accuracy. The projections inside the steps are inexact (``projection_tolerance``,
relative to the correction), which is cheap and enough at the noise levels models are trained
for. When the constraint is tight (low noise), their error sets a floor under the stationarity,
so each sample's projection accuracy is tightened tenfold whenever its stationarity has not
reached a new low for ``STALL_PATIENCE`` iterations, down to ``MIN_PROJECTION_TOLERANCE``. A
sample can still be stuck: stalled at that floor while its iterate no longer moves, because its
projections stay at their Krylov cap (very low noise), or because it drifts along the set too
slowly for the stationarity to fall (a nearly flat crop, whose minimiser no constant reaches:
one ran all three passes of the tomography model to their cap of 1000 iterations, 3000 where
the 63 other crops of its set took at most 717; ``docs/design.md``). It is retired then, with
``converged = False``, instead of running to ``max_iterations``.

The measurements behind these choices, and the alternatives measured and not adopted (a growing
step, an L-BFGS warm start, a diagonal preconditioner, Greedy FISTA's longer steps and momentum
1), are in ``docs/design.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batching import batch_dot, per_sample
from ..operators import LinearOperator
from ..operators.composed import EmbeddedOperator
from .cgls import MARGIN, cgls
from .datafit import SolverResult, best_constant, checked_problem, residual_norm
from .projection import project_onto_datafit


# A sample whose stationarity has not reached a new low for this many iterations gets projections
# ten times more accurate, down to the floor (module docstring).
STALL_PATIENCE = 50
MIN_PROJECTION_TOLERANCE = 1e-3
# The cap of the CGLS runs that start a solve (and so find the samples out of reach) and end it.
CGLS_ITERATIONS = 1000


class _StallWatch:
    """Per-sample projection accuracy, tightened where the stationarity stalls, and the test for
    a sample that is stuck: stalled with nothing left to tighten (the projection at the floor)
    while its iterate has moved less than ``tolerance`` per iteration over the whole stall, so
    that the change criterion alone would have stopped it."""

    def __init__(self, z0: torch.Tensor, projection_tolerance: float):
        n, like = len(z0), dict(dtype=z0.dtype, device=z0.device)
        self.accuracy = torch.full((n,), projection_tolerance, **like)
        self.best = torch.full((n,), float("inf"), **like)
        self.stalled_for = torch.zeros(n, dtype=torch.int64, device=z0.device)
        self.anchor = z0   # the iterate where the current stall began

    def update(self, z, stationarity, tolerance: float) -> torch.Tensor:
        improved = stationarity < self.best
        self.best = torch.where(improved, stationarity, self.best)
        self.stalled_for = torch.where(improved, 0, self.stalled_for + 1)
        stalled = self.stalled_for >= STALL_PATIENCE
        stuck = stalled & (self.accuracy <= MIN_PROJECTION_TOLERANCE)
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


class Overflow(ArithmeticError):
    """A model's finite weights overflow the arithmetic of a solve (``LINALG_FAILURES``)."""


@dataclass
class DripSolution(SolverResult):
    latent: torch.Tensor | None = None     # (N, latent_channels, H, W); solution = E latent
    pixel_weights: torch.Tensor | None = None   # (N, 1, H, W) where R was weighted per pixel
    # with reweighting: the latent solution of each pass before the last, whose image set the
    # next pass's pixel weights (first pass first)
    guide_latents: list[torch.Tensor] | None = None


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
    final_projection_iterations: int = CGLS_ITERATIONS,
    projection_tolerance: float = 1e-3,
    pixel_weights: torch.Tensor | None = None,
    terms: dict[str, torch.Tensor] | None = None,
    progress=None,
) -> DripSolution:
    """Solve the lower-level problem for a batch (see the module docstring), from ``z0`` (a
    solution of an earlier pass, in the set unless that pass found a sample out of reach) or,
    without it, from the CGLS solution.

    ``projection_iterations`` caps the Krylov steps of the projection inside each step, and
    ``projection_tolerance`` is its relative accuracy (:mod:`.projection`);
    ``final_projection_iterations`` caps the CGLS runs that start (from zero) and end the solve.
    ``pixel_weights`` (``(N, 1, H, W)``, positive; convex regularizers only) weighs ``R``'s
    terms per pixel (:mod:`drip_cli.regularizers.adaptive`); the steps and their bound scale
    with each sample's largest weight. ``terms``: more per-sample tensors (first dimension ``N``)
    the regularizer takes as keywords, such as the patch labels of
    :class:`~drip_cli.regularizers.patches.PatchAugmented`, whose ``unweighted_lipschitz(shape)``
    adds to the bound after the pixel weights' scaling. The returned ``regularizer_value`` is
    the unweighted ``R`` (without ``terms``).
    ``progress(fraction)``, where given, is called with the share of samples finished whenever
    some finish.
    """
    radius = checked_problem(op, b, radius).to(dtype=b.dtype)
    forward_op = EmbeddedOperator(op, embedding)
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
    # what the regularizer takes per sample, sliced with the working set
    terms = {**(terms or {}), **({} if pixel_weights is None else {"pixel_weights": pixel_weights})}
    terms_work = {name: value[rows] for name, value in terms.items()}
    z0, reachable, start_iterations = _feasible_start(
        forward_op, b_work, radius[rows], None if z0 is None else z0[rows],
        final_projection_iterations)
    out_of_reach = torch.zeros(n, dtype=torch.bool, device=b.device)
    if not bool(reachable.all()):   # CGLS could not fit them: no iterate would (module docstring)
        out = rows[~reachable]
        solution[out], iterations[out] = z0[~reachable], start_iterations[~reachable]
        out_of_reach[out] = True
        rows, z0 = rows[reachable], z0[reachable]
        b_work, radius_work = b_work[reachable], radius_work[reachable]
        terms_work = {name: value[reachable] for name, value in terms_work.items()}
        if progress is not None:
            progress(1 - len(rows) / n)
    bounds = regularizer.curvature_and_lipschitz_bound(shape=forward_op.image_shape)
    curvature, lipschitz = (t.to(b.dtype) for t in bounds)
    # a pixel weight m scales R's curvature by at most max(m)
    scale = (torch.ones(len(rows), dtype=b.dtype, device=b.device) if pixel_weights is None
             else terms_work["pixel_weights"].to(b.dtype).flatten(1).amax(1))
    unweighted = getattr(regularizer, "unweighted_lipschitz", None)
    offset = 0.0 if unweighted is None else unweighted(forward_op.image_shape)
    safe_step = 1.0 / (lipschitz * scale + offset)                # guaranteed: 1 / L
    step = 1.0 / (curvature * scale + offset)         # first guess, backtracked if above 1 / L

    # ||A E|| lets a Krylov projection stop by its error bound (solvers.projection); the
    # Fourier projections are exact without it
    norm = (None if len(rows) == 0 or forward_op.fourier_spectrum(b.dtype, b.device) is not None
            else forward_op.norm_bound(b.dtype, b.device))
    z, z_prev = z0, z0
    momentum_t = torch.ones(len(rows), dtype=b.dtype, device=b.device)
    watch = _StallWatch(z0, projection_tolerance)
    for it in range(1, max_iterations + 1):
        if len(rows) == 0:
            break
        t_next = (1 + torch.sqrt(1 + 4 * momentum_t**2)) / 2
        beta = (momentum_t - 1) / t_next
        y = z + per_sample(beta, z) * (z - z_prev)
        z_new, step, stationarity = _backtracking_step(
            forward_op, regularizer, b_work, radius_work, y, step, safe_step,
            projection_iterations, watch.accuracy, terms_work, norm)
        stuck = watch.update(z_new, stationarity, tolerance)
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
            terms_work = {name: value[keep] for name, value in terms_work.items()}
            if progress is not None:
                progress(1 - len(rows) / n)
    # Every iterate was projected, but a projection capped at projection_iterations may have
    # fallen short: the last word is a projection run to the tolerance. (The samples out of
    # reach had theirs: the CGLS run that could not fit them.)
    inside = ~out_of_reach
    final = project(forward_op, b[inside], radius[inside], solution[inside],
                    final_projection_iterations)
    latent, converged = solution, stopped
    latent[inside], iterations[inside] = final.solution, iterations[inside] + final.iterations
    converged[inside] = stopped[inside] & final.converged
    return DripSolution(solution=embedding(latent), iterations=iterations, converged=converged,
                        latent=latent, regularizer_value=regularizer.value(latent),
                        pixel_weights=pixel_weights)


def _feasible_start(forward_op, b, radius, z0, max_iterations: int):
    """``(z0, reachable, iterations)``: the start of the iterations and which samples it puts in
    ``{||A E z - b|| <= radius}``. Without ``z0``, the discrepancy-principle CGLS solution (run
    for at most ``max_iterations``, its ``iterations``); a sample it cannot fit (a radius below
    what the data allow: ``--tau`` far under 1, or a noise level given too low) keeps CGLS's
    closest point. A given ``z0`` is a previous pass's solution, in the set but where that pass
    found a sample out of reach."""
    if z0 is None and len(b):
        start = cgls(forward_op, b, radius, max_iterations=max_iterations)
        # CGLS's own test is on its recurred residual, which rounding can carry far below the
        # true one: at a noise level of 1e-9 in float32 it "converged" where no point fits
        reachable = start.converged & _near(forward_op, start.solution, b, radius)
        if not bool(reachable.all()):   # or an embedding whose weights overflow the products
            first = forward_op(forward_op.adjoint(b[~reachable]))   # CGLS's first direction
            if not bool(torch.isfinite(first).all()):
                raise Overflow("the products with the embedding overflow")
        return start.solution, reachable, start.iterations
    iterations = torch.zeros(len(b), dtype=torch.int64, device=b.device)
    if len(b) == 0:   # every sample flat (best_constant)
        return (b.new_zeros(0, *forward_op.image_shape),
                torch.zeros(0, dtype=torch.bool, device=b.device), iterations)
    return z0, _near(forward_op, z0, b, radius), iterations


def _near(forward_op, z, b, radius) -> torch.Tensor:
    """Whether each ``z`` lies in the set or within 1% of its radius, where rounding rather than
    the data can keep a point out (the iterations may still bring it in)."""
    return residual_norm(forward_op, z, b) <= 1.01 * radius


def _backtracking_step(forward_op, regularizer, b, radius, y, step, safe_step,
                       projection_iterations, projection_tolerance, terms, norm=None):
    """``P(y - t grad R(y))`` with the per-sample step ``t`` halved (never below ``safe_step``)
    until the sufficient-decrease condition of Beck & Teboulle holds along ``d = z - y``:
    ``R(z) <= R(y) + <grad R(y), d> + ||d||^2 / (2 t)``, the local form of ``t <= 1 / L``.
    ``projection_tolerance`` is per sample; ``terms`` are the regularizer's per-sample keywords.
    Returns ``z``, the steps and the stationarity ``||d|| / (t ||grad R(y)||)``, per sample."""
    def weighted(rows=None):   # R's per-sample keywords, of these rows (None: all, as they are)
        return terms if rows is None else {name: value[rows] for name, value in terms.items()}

    step = torch.maximum(step, safe_step)
    if bool((step > safe_step).any()):   # a step may backtrack: its test needs R(y)
        value_y, gradient_y = regularizer.value_and_gradient(y, **weighted())
    else:   # every step at 1 / L: no test, no value (the convex family's usual case)
        value_y, gradient_y = None, regularizer.gradient(y, **weighted())

    def projected(rows, t):
        return project_onto_datafit(
            forward_op, b[rows], radius[rows], y[rows] - per_sample(t, y[rows]) * gradient_y[rows],
            projection_iterations, projection_tolerance[rows], norm)[0]

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
    return z, step, stationarity
