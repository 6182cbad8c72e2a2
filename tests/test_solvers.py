"""Solvers: the data-fit guarantee as an inequality on every sample, and TV beating CGLS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DEVICES, make_operator
from drip_cli.data import add_noise, noise_std_for
from drip_cli.evaluation import psnr
from drip_cli.operators import Blur, Inpainting, Tomography, gaussian_psf, limited_angles
from drip_cli.solvers import cgls, constrained_tv, discrepancy_radius, discrepancy_ratio, total_variation
from drip_cli.solvers.drip import solve_drip


def noisy(op, x: torch.Tensor, percent: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    clean = op(x)
    sigma = noise_std_for(op, clean, torch.full((len(x),), percent))
    b = add_noise(op, clean, sigma, torch.randn(clean.shape, generator=gen, dtype=clean.dtype))
    return b, sigma


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tau", [1.0, 1.3])
@pytest.mark.parametrize("kind", ["denoise", "blur", "inpainting", "tomography", "matrix",
                                  "blur-valid", "tomography-window"])
def test_cgls_fits_every_sample(kind, tau, device):
    op = make_operator(kind, (1, 16, 20)).to(device)
    x = torch.rand(6, 1, 16, 20, dtype=torch.float64, device=device)
    percent = torch.tensor([0.5, 1, 2, 5, 10, 20.0])
    clean = op(x)
    sigma = noise_std_for(op, clean, percent.to(device))
    b = add_noise(op, clean, sigma, torch.randn_like(clean))
    result = cgls(op, b, discrepancy_radius(op, sigma, tau))
    ratio = discrepancy_ratio(op, result.solution, b, sigma)
    assert bool((ratio <= tau).all()), ratio
    assert bool(result.converged.all())
    # stopped early: the first iterate inside the set, close to its boundary (not overfitting)
    assert bool((ratio >= 0.99 * tau).all()), ratio


def test_cgls_stops_per_sample():
    """Each sample stops at its own iteration, unaffected by the rest of the batch."""
    op = Blur((1, 24, 24), gaussian_psf(1.5))
    x = torch.rand(4, 1, 24, 24, dtype=torch.float64)
    b, sigma = noisy(op, x, 2.0)
    sigma = sigma * torch.tensor([1.0, 2.0, 4.0, 1.5], dtype=torch.float64)
    batch = cgls(op, b, discrepancy_radius(op, sigma, 1.0))
    assert len(set(batch.iterations.tolist())) > 1
    for i in range(4):
        alone = cgls(op, b[i:i + 1], discrepancy_radius(op, sigma[i:i + 1], 1.0))
        assert int(alone.iterations[0]) == int(batch.iterations[i])
        assert torch.allclose(alone.solution[0], batch.solution[i], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["blur", "tomography"])
def test_cgls_does_not_depend_on_the_data_scale(kind):
    """In float32, tomography data scaled by 1e10 overflowed the landing step's quadratic (the
    step jumped past the target: discrepancy ratio 0.84), by 1e13 overflowed ||A p||^2 (zeros,
    not converged) and by 1e-15 underflowed it. CGLS now works on the data scaled per sample by
    a power of two, exactly: a power-of-two scale of the data scales its result bit for bit,
    and data of 1e13, 1e-15 or 1e-25 lands on the target as data of 1 does (1e-25 took the zero
    image for a fit while the power came from ||b||, whose squares flush to zero)."""
    op = make_operator(kind, (1, 16, 20)).to(torch.float32)
    x = torch.rand(3, 1, 16, 20)
    b, sigma = noisy(op, x, 2.0)
    radius = discrepancy_radius(op, sigma, 1.0)
    reference = cgls(op, b, radius)
    for power in (-60, 40):
        scaled = cgls(op, b * 2.0**power, radius * 2.0**power)
        assert torch.equal(scaled.solution, reference.solution * 2.0**power)
        assert torch.equal(scaled.iterations, reference.iterations)
    for factor in (1.0, 1e13, 1e-15, 1e-25):
        result = cgls(op, b * factor, radius * factor)
        ratio = discrepancy_ratio(op, result.solution, b * factor, sigma * factor)
        assert bool(result.converged.all()) and bool(((ratio > 0.99) & (ratio <= 1)).all()), \
            (factor, ratio)


def test_cgls_flags_an_unreachable_target():
    op = Tomography((1, 12, 12), limited_angles(4, 90.0))
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    b, sigma = noisy(op, x, 5.0)
    result = cgls(op, b, discrepancy_radius(op, sigma * 1e-6, 1.0), max_iterations=30)
    assert not bool(result.converged.any())


def test_cgls_is_differentiable():
    op = Blur((1, 10, 10), gaussian_psf(1.0))
    b = torch.randn(2, 1, 10, 10, dtype=torch.float64)
    radius = torch.full((2,), 0.5, dtype=torch.float64)

    def run(u0):
        return cgls(op, b, radius, u0=u0, max_iterations=3).solution

    u0 = torch.randn(2, 1, 10, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (u0,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", ["blur", "inpainting", "tomography"])
def test_tv_fits_every_sample_and_lowers_tv(kind, photo_crops):
    x = torch.from_numpy(photo_crops[:6]).double()
    op = {"blur": Blur((1, 32, 32), gaussian_psf(2.0)),
          "inpainting": Inpainting.random((1, 32, 32), 0.5, np.random.default_rng(0)),
          "tomography": Tomography((1, 32, 32), limited_angles(16, 120.0))}[kind]
    b, sigma = noisy(op, x, 2.0)
    radius = discrepancy_radius(op, sigma, 1.0)
    result = constrained_tv(op, b, radius, max_iterations=3000)
    ratio = discrepancy_ratio(op, result.solution, b, sigma)
    assert bool((ratio <= 1.0).all()), ratio
    baseline = cgls(op, b, radius).solution
    assert bool((total_variation(result.solution) < total_variation(baseline)).all())


@pytest.mark.parametrize("kind", ["blur", "inpainting"])
def test_tv_beats_cgls_in_mean_psnr(kind, photo_crops):
    x = torch.from_numpy(photo_crops).double()
    op = {"blur": Blur((1, 32, 32), gaussian_psf(2.0)),
          "inpainting": Inpainting.random((1, 32, 32), 0.5, np.random.default_rng(0))}[kind]
    b, sigma = noisy(op, x, 2.0)
    radius = discrepancy_radius(op, sigma, 1.0)
    tv = constrained_tv(op, b, radius, max_iterations=3000).solution.numpy()
    cg = cgls(op, b, radius).solution.numpy()
    assert psnr(tv, photo_crops).mean() > psnr(cg, photo_crops).mean() + 0.5


def _perturbed_model(latent=3, seed=0, architecture="convex"):
    from drip_cli.regularizers.model import DripModel, ModelConfig

    model = DripModel(ModelConfig(latent_channels=latent, n_filters=8, kernel_size=3, eps=0.05,
                                  architecture=architecture, layers=2))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.double()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, architecture", [("blur", "convex"), ("inpainting", "convex"),
                                                ("tomography", "convex"), ("matrix", "convex"),
                                                ("blur-valid", "convex"),
                                                ("blur", "leapfrog"), ("tomography", "leapfrog")])
def test_drip_solver_fits_every_sample_or_flags_it(kind, architecture, device):
    op = make_operator(kind, (1, 16, 20)).to(device)
    model = _perturbed_model(architecture=architecture).to(device)
    x = torch.rand(4, 1, 16, 20, dtype=torch.float64, device=device)
    b, sigma = noisy(op, x, 3.0)
    sigma = sigma.to(device)
    result = model.solve(op, b.to(device), discrepancy_radius(op, sigma, 1.0), max_iterations=60)
    ratio = discrepancy_ratio(op, result.solution, b.to(device), sigma)
    assert bool((ratio <= 1.0).all()), ratio
    assert result.regularizer_value.shape == (4,) and bool(torch.isfinite(result.regularizer_value).all())
    # an unreachable data fit is flagged, never passed silently
    hopeless = model.solve(op, b.to(device), discrepancy_radius(op, sigma * 1e-9, 1.0),
                           max_iterations=5, final_projection_iterations=5)
    if kind != "inpainting":  # inpainting can fit exactly: nothing to flag there
        assert not bool(hopeless.converged.any())


def test_samples_out_of_reach_are_flagged_at_once_and_leave_the_others_alone():
    """A radius below what the data allow (--tau far under 1, a noise level given too low):
    the CGLS start cannot fit the sample, so no iterate would; it is returned at CGLS's closest
    point, flagged, without iterations, by every pass, and its batch mates are solved as alone."""
    from drip_cli.operators.composed import EmbeddedOperator

    op = Blur((1, 16, 16), gaussian_psf(2.0))
    model = _perturbed_model()
    model.config.reweight = 1
    x = torch.rand(4, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    b, sigma = noisy(op, x, 2.0)
    radius = discrepancy_radius(op, sigma, 1.0)
    radius[[1, 3]] *= 1e-6
    result = model.solve(op, b, radius, max_iterations=1000, final_projection_iterations=40)
    assert result.converged.tolist() == [True, False, True, False]
    start = cgls(EmbeddedOperator(op, model.embedding), b[[1, 3]], radius[[1, 3]],
                 max_iterations=40)
    assert torch.equal(result.latent[[1, 3]], start.solution)
    # the first pass's CGLS start, which found them out of reach; the second returns them
    assert result.iterations[[1, 3]].tolist() == [40, 40]
    alone = model.solve(op, b[[0, 2]], radius[[0, 2]], max_iterations=1000,
                        final_projection_iterations=40)
    assert torch.allclose(result.solution[[0, 2]], alone.solution, rtol=0, atol=1e-10)
    assert torch.equal(result.iterations[[0, 2]], alone.iterations)


def test_solvers_take_one_radius_for_all_and_refuse_inputs_they_cannot_solve():
    """The solvers of the library (README): one radius is every sample's; measurements of
    another shape than the operator's, a radius per sample of another count, and an array
    instead of a tensor are refused before any work, where they once failed deep inside a solve
    (a matrix product's shapes; ``'float' object has no attribute 'to'``), or, for one image's
    measurements without the batch axis, were solved as a batch of the wrong shape; and so are
    measurements holding NaN and a negative or NaN radius, which gave NaN images."""
    from drip_cli.regularizers.model import ModelConfig, build_model

    op = Blur((1, 16, 16), gaussian_psf(1.5))
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    b, sigma = noisy(op, x, 2.0)
    sigma = torch.full_like(sigma, float(sigma.mean()))
    radius = discrepancy_radius(op, sigma, 1.0)
    assert torch.equal(discrepancy_radius(op, sigma.numpy(), 1.0), radius)
    unrolled = build_model(ModelConfig(architecture="unrolled", layers=2, width=4)).double()
    solvers = {"cgls": cgls, "tv": lambda *a: constrained_tv(*a, max_iterations=50),
               "drip": lambda *a: _perturbed_model().solve(*a, max_iterations=20),
               "unrolled": unrolled.solve}
    for name, solve in solvers.items():
        one, each = solve(op, b, float(radius[0])), solve(op, b, radius)
        assert torch.equal(one.solution, each.solution), name
        assert torch.equal(one.converged, each.converged), name
        for args, error, words in [
                ((op, b[0], radius[:1]), ValueError, r"b has shape \(1, 16, 16\), expected "
                                                     r"\(N, 1, 16, 16\)"),
                ((Blur((1, 8, 8), gaussian_psf(1.5)), b, radius), ValueError,
                 r"expected \(N, 1, 8, 8\)"),
                ((op, b, radius[:2]), ValueError, r"radius has shape \(2,\), expected one "
                                                  r"number or \(3,\)"),
                ((op, b.numpy(), radius), TypeError, "b must be a torch.Tensor"),
                ((op, b * torch.nan, radius), ValueError, "b holds NaN or Inf"),
                ((op, b, -radius), ValueError, "radius must be >= 0"),
                ((op, b, radius * torch.nan), ValueError, "radius must be >= 0")]:
            with pytest.raises(error, match=words):
                solve(*args)


@pytest.mark.parametrize("architecture", ["convex", "leapfrog"])
def test_drip_solver_lowers_the_regularizer_from_the_cgls_start(architecture):
    op = Blur((1, 16, 16), gaussian_psf(1.5))
    model = _perturbed_model(architecture=architecture)
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    b, sigma = noisy(op, x, 2.0)
    radius = discrepancy_radius(op, sigma, 1.0)
    from drip_cli.operators.composed import EmbeddedOperator

    start = cgls(EmbeddedOperator(op, model.embedding), b, radius).solution
    result = model.solve(op, b, radius, max_iterations=200)
    with torch.no_grad():
        assert bool((result.regularizer_value < model.regularizer.value(start)).all())


def test_reweighted_solve_fits_every_sample_and_uniform_weights_change_nothing():
    """drip reconstruct --reweight: uniform pixel weights give the unweighted solve; a
    reweighting pass fits every sample, counts all iterations and reports the unweighted R."""
    op = make_operator("tomography", (1, 16, 20))
    model = _perturbed_model()
    x = torch.rand(4, 1, 16, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    b, sigma = noisy(op, x, 3.0)
    radius = discrepancy_radius(op, sigma, 1.0)
    plain = model.solve(op, b, radius, max_iterations=200)
    uniform = model.solve(op, b, radius, max_iterations=200,
                          pixel_weights=torch.ones(4, 1, 16, 20, dtype=torch.float64))
    assert torch.allclose(uniform.solution, plain.solution, rtol=0, atol=1e-12)
    model.config.reweight = 1
    again = model.solve(op, b, radius, max_iterations=200)
    assert bool((discrepancy_ratio(op, again.solution, b, sigma) <= 1.0).all())
    assert bool((again.iterations > plain.iterations).all())
    assert not torch.allclose(again.solution, plain.solution, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(again.regularizer_value, model.regularizer.value(again.latent))
        # the last pass starts from the first pass's solution and ends lower in the weighted R
        # than the same pass started from CGLS (the earlier default)
        weights, config = again.pixel_weights, model.config
        cold = solve_drip(op, model.embedding, model.regularizer, b, radius,
                          pixel_weights=weights, max_iterations=200, tolerance=config.tolerance,
                          projection_iterations=config.projection_iterations,
                          projection_tolerance=config.projection_tolerance)
        reached = model.regularizer.value(again.latent, pixel_weights=weights)
        assert bool((reached < model.regularizer.value(cold.latent, pixel_weights=weights)).all())
    leapfrog = _perturbed_model(architecture="leapfrog")
    leapfrog.config.reweight = 1
    with pytest.raises(ValueError, match="convex"):
        leapfrog.solve(op, b, radius, max_iterations=5)


def _assert_rising_to_one(fractions: list[float]) -> None:
    assert fractions, "no progress was reported"
    assert all(0 <= f <= 1 for f in fractions), fractions
    assert fractions == sorted(fractions), fractions
    assert fractions[-1] == 1.0, fractions


def test_solvers_report_progress_as_samples_finish(tmp_path):
    """Progress moves within a batch: TV and DRIP (both passes of a reweighted model) report
    the share of samples finished, rising to 1, and reconstruct_file turns that into samples
    done, from (0, n) to (n, n)."""
    from helpers import write_small_file
    from drip_cli.io.models import ModelInfo
    from drip_cli.methods import LearnedMethod, TVMethod
    from drip_cli.reconstruct import reconstruct_file

    op = make_operator("tomography", (1, 16, 20))
    model = _perturbed_model(latent=1)
    model.config.reweight, model.config.max_iterations = 1, 200
    x = torch.rand(4, 1, 16, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    b, sigma = noisy(op, x, 3.0)
    sigma = sigma * torch.tensor([1.0, 2.0, 4.0, 1.5], dtype=torch.float64)
    radius = discrepancy_radius(op, sigma, 1.0)
    drip = []
    model.solve(op, b, radius, progress=drip.append)
    _assert_rising_to_one(drip)
    assert min(drip) <= 0.5 < max(drip)   # the first pass reports, then the second
    tv = []
    TVMethod().solve(op, b, radius, progress=tv.append)
    _assert_rising_to_one(tv)

    data = tmp_path / "m.h5"
    write_small_file(data, op, n=5)
    info = ModelInfo(config=model.config, operator_kind="tomography", image_shape=(1, 16, 20),
                     noise_percent=(1, 5))
    calls = []
    reconstruct_file(data, tmp_path / "r.h5", LearnedMethod(model.float(), info, ""),
                     batch_size=3, progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 5) and calls[-1] == (5, 5)
    assert all(total == 5 for _, total in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done) and any(d != int(d) for d in done), done   # within batches too


def _dense_projection(op, v, b, radius):
    """The Euclidean projection of one sample by dense linear algebra and bisection on lam."""
    n = v.numel()
    basis = torch.eye(n, dtype=torch.float64).view(n, *op.image_shape)
    matrix = op(basis).reshape(n, -1).T                      # (M, n)
    vv, bb = v.flatten().double(), b.flatten().double()
    if (matrix @ vv - bb).norm() <= radius:
        return vv
    lo, hi = -30.0, 30.0
    for _ in range(200):
        lam = 10 ** ((lo + hi) / 2)
        d = torch.linalg.solve(torch.eye(n, dtype=torch.float64) + lam * matrix.T @ matrix,
                               lam * matrix.T @ (bb - matrix @ vv))
        lo, hi = ((lo + hi) / 2, hi) if (matrix @ (vv + d) - bb).norm() > radius else (lo, (lo + hi) / 2)
    return vv + d


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["blur", "inpainting", "tomography", "matrix", "blur-valid",
                                  "tomography-window"])
def test_projection_is_the_nearest_point_of_the_datafit_set(kind, dtype):
    from drip_cli.solvers.projection import project_onto_datafit

    op = make_operator(kind, (1, 8, 10))  # operators follow the dtype of their input
    gen = torch.Generator().manual_seed(1)
    v = torch.rand(4, 1, 8, 10, dtype=torch.float64, generator=gen)
    b = op(torch.rand(4, 1, 8, 10, dtype=torch.float64, generator=gen))
    start = (op(v) - b).flatten(1).norm(dim=1)
    radius = start * torch.tensor([0.1, 0.5, 0.95, 1.2], dtype=torch.float64)  # last: inside
    z, steps = project_onto_datafit(op, b.to(dtype), radius.to(dtype), v.to(dtype),
                                    max_steps=80, tolerance=1e-10)
    assert int(steps[3]) == 0 and torch.equal(z[3], v[3].to(dtype))
    accuracy = 1e-8 if dtype == torch.float64 else 2e-3
    for i in range(3):
        exact = _dense_projection(op, v[i], b[i], radius[i])
        moved = (exact - v[i].flatten()).norm().clamp_min(1e-12)
        assert float((z[i].flatten().double() - exact).norm() / moved) <= accuracy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["blur", "inpainting", "tomography", "matrix", "blur-valid",
                                  "tomography-window"])
def test_projection_stopped_by_its_error_bound_stays_within_the_tolerance(kind, device):
    """Given ``||B||``, a Krylov projection also stops where its error bound (the module
    docstring of ``solvers.projection``) is within the tolerance: it stays that close to the
    nearest point, in no more steps than the change test alone, and a small correction (the
    radius 1% inside the residual) settles after one step at the solver's accuracy of 0.1."""
    from drip_cli.operators.base import largest_eigenvalue_bound
    from drip_cli.solvers.projection import project_onto_datafit

    op = make_operator(kind, (1, 8, 10))
    norm = largest_eigenvalue_bound(op.normal, (1, 1, 8, 10)) ** 0.5
    gen = torch.Generator().manual_seed(1)
    v = torch.rand(3, 1, 8, 10, dtype=torch.float64, generator=gen)
    b = op(torch.rand(3, 1, 8, 10, dtype=torch.float64, generator=gen))
    start = (op(v) - b).flatten(1).norm(dim=1)
    radius = start * torch.tensor([0.3, 0.9, 0.99], dtype=torch.float64)
    exact = [_dense_projection(op, v[i], b[i], radius[i]) for i in range(3)]
    op, b, radius, v = op.to(device), b.to(device), radius.to(device), v.to(device)
    for tolerance in (0.1, 1e-2, 1e-3):
        z, steps = project_onto_datafit(op, b, radius, v, max_steps=80, tolerance=tolerance,
                                        norm=norm)
        _, change_steps = project_onto_datafit(op, b, radius, v, max_steps=80,
                                               tolerance=tolerance)
        assert (steps <= change_steps).all()
        if tolerance == 0.1:
            assert int(steps[2]) == 1
        for i in range(3):
            moved = (exact[i] - v[i].flatten().cpu()).norm()
            assert float((z[i].flatten().cpu() - exact[i]).norm() / moved) <= tolerance


def _circulant(channels, latent, psf, shape=(8, 10), seed=3):
    """Blur after a periodic embedding with perturbed weights: a circulant ``A E``."""
    from drip_cli.operators.composed import EmbeddedOperator
    from drip_cli.regularizers import Embedding

    embedding = Embedding(latent, channels, boundary="periodic").double()
    with torch.no_grad():
        embedding.weight.add_(0.1 * torch.randn(embedding.weight.shape, dtype=torch.float64,
                                                generator=torch.Generator().manual_seed(seed)))
    return EmbeddedOperator(Blur((channels, *shape), psf), embedding)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels, latent", [(1, 1), (1, 2), (3, 3)])
def test_projection_of_a_circulant_is_exact_in_fourier(channels, latent, dtype, device):
    """Blur after a periodic embedding is diagonal in the Fourier basis: its projection is
    solved there in one step, and it is the nearest point of the data-fit set (the dense
    projection), for one or several latent and image channels; a sample inside stays put."""
    from drip_cli.solvers.projection import project_onto_datafit

    op = _circulant(channels, latent, gaussian_psf(1.0))
    assert op.fourier_spectrum(torch.float64, torch.device("cpu")) is not None
    gen = torch.Generator().manual_seed(1)
    v = torch.rand(4, latent, 8, 10, dtype=torch.float64, generator=gen)
    b = op(torch.rand(4, latent, 8, 10, dtype=torch.float64, generator=gen))
    start = (op(v) - b).flatten(1).norm(dim=1)
    radius = start * torch.tensor([0.1, 0.5, 0.95, 1.2], dtype=torch.float64)  # last: inside
    with torch.no_grad():
        exact = [_dense_projection(op, v[i], b[i], radius[i]) for i in range(3)]
    like = dict(dtype=dtype, device=device)
    z, steps = project_onto_datafit(op.to(device), b.to(**like), radius.to(**like), v.to(**like))
    assert steps.tolist() == [1, 1, 1, 0] and torch.equal(z[3], v[3].to(**like))
    accuracy = 1e-9 if dtype == torch.float64 else 1e-4
    for i in range(3):
        moved = (exact[i] - v[i].flatten()).norm()
        assert float((z[i].flatten().cpu().double() - exact[i]).norm() / moved) <= accuracy


def test_projection_of_a_circulant_out_of_reach_is_the_least_squares_correction():
    """A box PSF of 3 pixels on a width of 9 measures no frequency 3 or 6 across: where the
    data there alone exceed the radius, the correction is the least-squares one of least norm,
    as the Krylov projection returns."""
    from drip_cli.solvers.projection import project_onto_datafit

    op = _circulant(1, 1, np.full((1, 3), 1 / 3), shape=(6, 9))
    gen = torch.Generator().manual_seed(2)
    v = torch.rand(2, 1, 6, 9, dtype=torch.float64, generator=gen)
    b = torch.rand(2, 1, 6, 9, dtype=torch.float64, generator=gen)
    z, _ = project_onto_datafit(op, b, torch.full((2,), 1e-6, dtype=torch.float64), v)
    n = v[0].numel()
    with torch.no_grad():
        matrix = op(torch.eye(n, dtype=torch.float64).view(n, 1, 6, 9)).reshape(n, -1).T
    for i in range(2):
        least = torch.linalg.pinv(matrix) @ (b[i].flatten() - matrix @ v[i].flatten())
        assert torch.allclose(z[i].flatten() - v[i].flatten(), least, atol=1e-9)


def test_projection_of_a_sample_does_not_depend_on_its_batch():
    """Settled samples leave the projection's working set: each sample gets what it gets when
    projected alone, in its own number of Krylov steps, whatever its companions need."""
    from drip_cli.solvers.projection import project_onto_datafit

    op = make_operator("blur", (1, 12, 12))
    gen = torch.Generator().manual_seed(4)
    v = torch.rand(6, 1, 12, 12, dtype=torch.float64, generator=gen)
    b = op(torch.rand(6, 1, 12, 12, dtype=torch.float64, generator=gen))
    start = (op(v) - b).flatten(1).norm(dim=1)
    radius = start * torch.tensor([0.3, 0.9, 1.1, 0.5, 0.99, 0.6], dtype=torch.float64)
    tolerance = torch.tensor([1e-5, 1e-3, 1e-3, 1e-4, 1e-2, 1e-6], dtype=torch.float64)
    z, steps = project_onto_datafit(op, b, radius, v, max_steps=40, tolerance=tolerance)
    assert len(set(steps.tolist())) >= 5   # the batch mixes short and long projections
    for i in range(6):
        alone, alone_steps = project_onto_datafit(op, b[i:i + 1], radius[i:i + 1], v[i:i + 1],
                                                  max_steps=40, tolerance=tolerance[i:i + 1])
        assert int(steps[i]) == int(alone_steps[0])
        # equal up to the rounding of batched against single products, which long Krylov
        # runs on this ill-conditioned blur amplify
        moved = (z[i] - v[i]).norm().clamp_min(1e-12)
        assert float((z[i] - alone[0]).norm() / moved) <= 1e-7


@pytest.mark.parametrize("seed", range(3))
def test_secular_equation_converges_in_few_newton_steps(seed):
    """The Tikhonov weight of each projection: every reachable sample lands on the radius, and
    samples that converge early are left alone while the others finish. (Iterating on them
    threw them off -- a zero Newton step fails the strict bracket test -- and 32 float32
    samples took 21-27 Newton steps instead of 7-8.)"""
    from drip_cli.solvers.projection import _tikhonov_in_subspace

    gen = torch.Generator().manual_seed(seed)
    n, k = 32, 5
    c = torch.zeros(n, k + 1, k, dtype=torch.float64)
    diagonal = torch.arange(k)
    c[:, diagonal, diagonal] = 0.1 + torch.rand(n, k, generator=gen, dtype=torch.float64)
    c[:, diagonal + 1, diagonal] = 0.1 + torch.rand(n, k, generator=gen, dtype=torch.float64)
    beta = torch.ones(n, dtype=torch.float64)
    u = torch.linalg.svd(c, full_matrices=False)[0]
    outside = 1 - u[:, 0, :].pow(2).sum(1)      # the residual no correction can remove
    radius = (outside + torch.rand(n, generator=gen, dtype=torch.float64) * (1 - outside)).sqrt()
    c, beta, radius = c.float(), beta.float(), radius.float()
    y, lam, newton_iterations = _tikhonov_in_subspace(c, beta, radius)
    target = torch.nn.functional.pad(beta[:, None], (0, k))   # beta e1
    residual = (torch.einsum("nij,nj->ni", c, y) - target).norm(dim=1)
    assert bool(((residual / radius - 1).abs() <= 1e-4).all()) and bool((lam > 0).all())
    assert newton_iterations <= 12


@pytest.mark.parametrize("architecture", ["convex", "leapfrog"])
def test_convex_solves_step_by_the_shapes_bound_without_evaluating_r(architecture, monkeypatch):
    """With the Lipschitz bound for the latents' shape (within 1-3% of the curvature estimate)
    the convex family's steps are 1 / L and need no sufficient-decrease test: R is evaluated
    once, for the report, and each step asks for the gradient alone. The leapfrog variant has no
    such bound and still backtracks."""
    op = Blur((1, 16, 16), gaussian_psf(1.5))
    model = _perturbed_model(architecture=architecture)
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    b, sigma = noisy(op, x, 2.0)
    calls = {"value": [], "value_and_gradient": []}

    def counted(name):
        method = getattr(model.regularizer, name)

        def call(*args, **kwargs):
            calls[name].append(1)
            return method(*args, **kwargs)
        return call

    for name in calls:
        monkeypatch.setattr(model.regularizer, name, counted(name))
    result = model.solve(op, b, discrepancy_radius(op, sigma, 1.0), max_iterations=50)
    assert bool((result.iterations > 2).all())
    if architecture == "convex":
        assert len(calls["value"]) == 1 and not calls["value_and_gradient"], calls
    else:
        assert len(calls["value"]) > 1 and len(calls["value_and_gradient"]) > 2, calls


@pytest.mark.parametrize("boundary", ["symmetric", "periodic"])
def test_drip_solution_satisfies_the_kkt_conditions(boundary):
    """At the solution grad R is anti-parallel to the data-fit gradient B^T (B z - b): the solver
    converges to the constrained minimiser, not just to some feasible point (with a periodic
    embedding, through the exact Fourier projections)."""
    from drip_cli.batching import batch_dot
    from drip_cli.operators.composed import EmbeddedOperator

    op = Blur((1, 16, 16), gaussian_psf(1.5))
    model = _perturbed_model(latent=1)  # extra latent channels converge too slowly for a unit test
    model.embedding.boundary = boundary
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    b, sigma = noisy(op, x, 2.0)
    result = model.solve(op, b, discrepancy_radius(op, sigma, 1.0), max_iterations=300,
                         tolerance=1e-10, projection_tolerance=1e-10, projection_iterations=100)
    forward_op = EmbeddedOperator(op, model.embedding)
    with torch.no_grad():
        grad_r = model.regularizer.gradient(result.latent)
        g = forward_op.adjoint(forward_op(result.latent) - b)
    cosine = batch_dot(grad_r, g) / (grad_r.flatten(1).norm(dim=1) * g.flatten(1).norm(dim=1))
    assert bool((cosine < -0.9999).all()), cosine
    # ... and on the boundary the solver aims at, (1 - MARGIN) times the radius: a projection that
    # landed inside it (as one did, 0.5% in, from a stale secular-equation root) gives KKT points
    # of another, parameter-dependent set, and implicit gradients 2-3% off
    from drip_cli.solvers.cgls import MARGIN

    ratio = discrepancy_ratio(op, result.solution, b, sigma)
    assert torch.allclose(ratio, torch.full_like(ratio, 1 - MARGIN), rtol=1e-7), ratio


def test_drip_solver_does_not_stop_on_short_steps(photo_crops):
    """A sharp regularizer (eps = 0.001) has a small 1/L: the first steps barely move the CGLS
    start, so the iterate change alone said 'converged' after one iteration (training then
    learned from the start point and collapsed). The stationarity condition keeps it going."""
    from drip_cli.regularizers.model import DripModel, ModelConfig

    op = Tomography((1, 32, 32), limited_angles(16, 120.0))
    x = torch.from_numpy(photo_crops[:4])
    b, sigma = noisy(op, x, 2.0)
    radius = discrepancy_radius(op, sigma, 1.0)
    model = DripModel(ModelConfig(eps=0.001))
    loose = model.solve(op, b, radius, max_iterations=400, tolerance=1e-3)
    tight = model.solve(op, b, radius, max_iterations=2000, tolerance=1e-6, stationarity_tolerance=1e-3)
    blind = model.solve(op, b, radius, max_iterations=400, tolerance=1e-3,
                        stationarity_tolerance=float("inf"))
    # before: 1 iteration for every sample; now 62-138, 0.5-7% of the start's distance away
    start_gap = (blind.latent - tight.latent).flatten(1).norm(dim=1)
    gap = (loose.latent - tight.latent).flatten(1).norm(dim=1)
    assert bool((gap < 0.2 * start_gap).all()), (gap, start_gap)
    assert bool((loose.iterations > blind.iterations).all())
    assert bool(loose.converged.all())


def test_low_noise_solves_tighten_their_projections_and_stop_when_stuck(monkeypatch):
    """At low noise the inexact projections inside the steps put a floor under the stationarity:
    each stalled sample gets tenfold more accurate projections, and converges where fixed ones
    run to the cap at a higher R; a sample stalled at the accuracy floor (here its projection
    still at its Krylov cap), whose iterate no longer moves, stops early, flagged, and fits the
    data."""
    import h5py

    import drip_cli.solvers.drip as drip_solver
    from drip_cli.io.models import load_model

    root = Path(__file__).resolve().parent.parent / "sample_data"
    model = load_model(root / "drip_blur.safetensors")[0].double()
    model.embedding.boundary = "symmetric"   # the Krylov projections (a periodic one is exact)
    with h5py.File(root / "blur.h5") as f:
        x = torch.from_numpy(f["ground_truth"][[0, 5], :, :32, :32]).double()
    op = Blur((1, 32, 32), gaussian_psf(2.0))

    def solve(percent, projection_iterations, max_iterations):
        b, sigma = noisy(op, x, percent)
        result = solve_drip(op, model.embedding, model.regularizer, b,
                            discrepancy_radius(op, sigma, 1.0), max_iterations=max_iterations,
                            projection_iterations=projection_iterations, projection_tolerance=3e-2)
        assert bool((discrepancy_ratio(op, result.solution, b, sigma) <= 1.0).all())
        return result

    adaptive = solve(0.03, 50, 200)
    assert bool(adaptive.converged.all()) and bool((adaptive.iterations < 200).all())
    # sample 0: the 10 Krylov steps bind at every accuracy; it stops (some 180 iterations, then
    # the closing CGLS run) long before the cap
    stuck = solve(0.003, 10, 2000)
    assert not bool(stuck.converged[0]) and int(stuck.iterations[0]) < 1000
    monkeypatch.setattr(drip_solver, "STALL_PATIENCE", 10**9)   # projections of fixed accuracy
    fixed = solve(0.03, 50, 200)
    assert not bool(fixed.converged.any())
    assert bool((adaptive.regularizer_value < fixed.regularizer_value).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", ["blur", "tomography", "inpainting"])
def test_best_constant_fits_flat_images_only(kind, channels, device):
    """The least-squares constant per channel, and whether it fits: it does for a flat image's
    noisy data (and lies near the image's level), not for a textured one's."""
    from drip_cli.solvers.datafit import best_constant

    op = make_operator(kind, (channels, 16, 20))
    gen = torch.Generator().manual_seed(0)
    levels = torch.tensor([0.3, 0.8, 0.5][:channels], dtype=torch.float64)
    flat = levels[None, :, None, None].expand(1, channels, 16, 20)
    x = torch.cat([flat, torch.rand(1, channels, 16, 20, dtype=torch.float64, generator=gen)])
    b, sigma = noisy(op, x, 2.0)
    op, flat, b, sigma = op.to(device), flat.to(device), b.to(device), sigma.to(device)
    fits, u = best_constant(op, b, discrepancy_radius(op, sigma, 1.0))
    assert fits.tolist() == [True, False]
    assert u.shape == x.shape and torch.allclose(u[0], flat[0], atol=0.02)
    assert bool((u.flatten(2).std(dim=2) == 0).all())   # constant in each channel
    assert bool((discrepancy_ratio(op, u[:1], b[:1], sigma[:1]) <= 1.0).all())
    # the least-squares constant: no other constant leaves a smaller residual
    for shift in (-1e-3, 1e-3):
        moved = discrepancy_ratio(op, u[:1] + shift, b[:1], sigma[:1])
        assert float(moved) > float(discrepancy_ratio(op, u[:1], b[:1], sigma[:1]))


@pytest.mark.parametrize("method", ["tv", "drip"])
def test_a_sample_a_constant_fits_is_solved_without_iterations(method):
    """A flat image at high noise: the constraint is inactive, and the minimiser of TV or of the
    learned R (both zero on constants, their least value) is a constant. The solvers return the
    least-squares constant at once, converged, where their stopping tests never passed before
    (2 x 1000 iterations); the other samples of the batch are solved as they are alone."""
    op = make_operator("tomography", (1, 16, 20))
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.full((1, 1, 16, 20), 0.7, dtype=torch.float64),
                   torch.rand(2, 1, 16, 20, dtype=torch.float64, generator=gen)])
    b, sigma = noisy(op, x, 5.0)
    radius = discrepancy_radius(op, sigma, 1.0)
    model = _perturbed_model()
    model.config.reweight = 1

    def solve(rows):
        if method == "tv":
            return constrained_tv(op, b[rows], radius[rows], max_iterations=300)
        return model.solve(op, b[rows], radius[rows], max_iterations=300)

    batch = solve(slice(None))
    assert int(batch.iterations[0]) == 0 and bool(batch.converged[0])
    assert bool((discrepancy_ratio(op, batch.solution, b, sigma) <= 1.0).all())
    assert float(batch.solution[0].std()) < 1e-12   # E of a constant latent: constant
    assert abs(float(batch.solution[0].mean()) - 0.7) < 0.02
    if method == "drip":
        assert abs(float(batch.regularizer_value[0])) < 1e-10
    else:
        assert float(total_variation(batch.solution[:1])) < 1e-10
    assert bool((batch.iterations[1:] > 0).all())
    rest = solve(slice(1, None))
    assert torch.equal(rest.iterations, batch.iterations[1:])
    assert torch.allclose(rest.solution, batch.solution[1:], rtol=0, atol=1e-12)
    # a batch of flat samples alone is finished at once, and says so
    from drip_cli.methods import TVMethod

    fractions = []
    solver = TVMethod() if method == "tv" else model
    alone = solver.solve(op, b[:1], radius[:1], progress=fractions.append)
    assert torch.allclose(alone.solution, batch.solution[:1], rtol=0, atol=1e-12)
    assert int(alone.iterations[0]) == 0
    _assert_rising_to_one(fractions)


def test_relative_residual_of_a_sample_with_zero_measurements():
    """``||A u - b|| / ||b||`` per sample; a sample measured as exactly zero (possible only in a
    hand-made file) gets 0 where ``u`` reproduces it and infinity where not (it was NaN)."""
    from drip_cli.solvers import relative_residual

    op = make_operator("blur", (1, 8, 8))
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    b = op(x)
    b[1:] = 0
    u = x.clone()
    u[1] = 0
    rel = relative_residual(op, u.float(), b)
    assert rel.dtype == torch.float64
    assert float(rel[0]) < 1e-6 and float(rel[1]) == 0.0 and rel[2] == float("inf")
    u[0] *= 1.1
    assert float(relative_residual(op, u, b)[0]) == pytest.approx(0.1, rel=1e-12)
