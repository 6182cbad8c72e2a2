"""The patch-mixture pass: the term's gradient and convexity, the fit, the solve's data fit, and
the CLI (drip train --patch-components, drip reconstruct / evaluate --patch-weight)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import DEVICES
from drip_cli.io.models import load_model
from drip_cli.operators import Blur, gaussian_psf
from drip_cli.regularizers import ConvexFilterRegularizer, Embedding
from drip_cli.regularizers.model import DripModel, ModelConfig
from drip_cli.regularizers.patches import (FIT_STRIDE, LABEL_VARIANCE, PATCH_SIZE,
                                          PRECISION_FLOOR, PatchAugmented, PatchMixture,
                                          centred_patches)
from drip_cli.solvers import discrepancy_radius, discrepancy_ratio
from helpers import assert_one_line_error, run_cli, write_small_file
from test_training import TINY

# TINY with one latent channel: solves of tens of iterations instead of hundreds
FAST = [("1" if previous == "--latent-channels" else a) for previous, a in zip([None, *TINY], TINY)]


def random_mixture(components=3, channels=1, seed=0) -> PatchMixture:
    """A mixture with random covariances, as if fitted (float64)."""
    gen = torch.Generator().manual_seed(seed)
    mixture = PatchMixture(components, channels).double()
    d = channels * PATCH_SIZE**2
    factors = torch.randn(components, d, d // 4, dtype=torch.float64, generator=gen) * 0.1
    mixture.covariances.copy_(factors @ factors.transpose(1, 2) + 1e-4 * torch.eye(d))
    mixture.log_weights.copy_(torch.log_softmax(torch.randn(components, generator=gen,
                                                            dtype=torch.float64), 0))
    return mixture


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_patch_term_gradient_matches_autograd(device, channels):
    """grad Q = 2 half_gradient, Q >= 0, and Q is zero at images constant in each channel."""
    mixture = random_mixture(channels=channels).to(device)
    u = torch.randn(2, channels, 13, 12, dtype=torch.float64, device=device, requires_grad=True)
    labels = mixture.labels(u.detach())
    assert labels.shape == (2, 3 * 3) and int(labels.max()) < 3
    (auto,) = torch.autograd.grad(mixture.value(u, labels).sum(), u)
    assert torch.allclose(auto, 2 * mixture.half_gradient(u, labels), rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        assert bool((mixture.value(u, labels) > 0).all())
        flat = torch.ones_like(u) * torch.tensor([0.3, -1.0, 2.0][:channels], dtype=u.dtype,
                                                 device=device)[:, None, None]
        assert float(mixture.value(flat, labels).abs().max()) < 1e-6 * float(
            mixture.value(u, labels).min())


@pytest.mark.parametrize("channels", [1, 3])
def test_patch_term_is_the_sum_over_unfolded_patches(channels):
    """Q(u) = sum_i c_i^T (S_k(i) + eps I)^-1 c_i over the centred patches c_i that
    centred_patches unfolds: the gathered form picks the same pixels in the same order."""
    mixture = random_mixture(channels=channels, seed=1)
    u = torch.randn(2, channels, 15, 18, dtype=torch.float64)
    labels = mixture.labels(u)
    patches = centred_patches(u)   # (N, L, d)
    d = patches.shape[-1]
    inverse = torch.linalg.inv(mixture.covariances + PRECISION_FLOOR * torch.eye(d))[labels]
    expected = torch.einsum("nld,nlde,nle->n", patches, inverse, patches)
    assert torch.allclose(mixture.value(u, labels), expected, rtol=1e-7)


def test_patch_term_is_convex_and_its_hessian_bounded():
    """Q(t a + (1-t) b) <= t Q(a) + (1-t) Q(b), and the bound the solver's step uses holds
    (the Rayleigh quotient of the Hessian, maximised by power iteration)."""
    mixture = random_mixture(seed=1)
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randn(8, 1, 12, 12, dtype=torch.float64, generator=gen) for _ in range(2))
    labels = torch.randint(0, 3, (8, 9), generator=gen)
    t = torch.rand(8, 1, 1, 1, dtype=torch.float64, generator=gen)
    mid = mixture.value(t * a + (1 - t) * b, labels)
    assert bool((mid <= t.flatten() * mixture.value(a, labels)
                 + (1 - t.flatten()) * mixture.value(b, labels) + 1e-9).all())
    v = a
    for _ in range(100):
        hv = 2 * mixture.half_gradient(v, labels)
        quotient = (v * hv).flatten(1).sum(1) / (v * v).flatten(1).sum(1)
        v = hv / hv.flatten(1).norm(dim=1)[:, None, None, None]
    assert float(quotient.max()) <= mixture.hessian_bound()
    assert float(quotient.max()) > 0.05 * mixture.hessian_bound()   # and is not loose


def test_fit_is_deterministic_and_separates_patch_kinds():
    """EM on flat images and on vertically striped ones puts their patches in different
    components; the same seed gives the same mixture."""
    gen = torch.Generator().manual_seed(0)
    flat = 0.5 + 0.01 * torch.randn(20, 1, 16, 16, generator=gen)
    stripes = (0.5 + 0.3 * torch.sign(torch.sin(torch.arange(16) * 1.3))).expand(20, 1, 16, 16)
    stripes = stripes + 0.01 * torch.randn(20, 1, 16, 16, generator=gen)
    images = torch.cat([flat, stripes])
    first, second = PatchMixture(2), PatchMixture(2)
    likelihood = first.fit(images, seed=3)
    second.fit(images, seed=3)
    assert np.isfinite(likelihood) and first.fitted
    assert torch.equal(first.covariances, second.covariances)
    labels = first.labels(images)
    assert len(set(labels[:20].flatten().tolist())) == 1
    assert set(labels[20:].flatten().tolist()).isdisjoint(labels[:20].flatten().tolist())
    colour = PatchMixture(2, channels=3)   # colour patches: each channel's mean removed
    assert np.isfinite(colour.fit(images.expand(-1, 3, -1, -1) * torch.tensor(
        [1.0, 0.8, 0.5])[:, None, None], seed=0))
    assert colour.covariances.shape == (2, 192, 192)
    assert colour.labels(images.expand(-1, 3, -1, -1)).shape == (40, 25)


def test_labels_are_the_likeliest_components():
    """Each patch's label maximises its component's Gaussian log density (the covariance widened
    by LABEL_VARIANCE) plus the log weight, as torch.distributions computes it; and the fit's
    mean log-likelihood is the same mixture density's, up to the 2 pi constant."""
    mixture = random_mixture(components=4).float()
    u = 0.5 + 0.1 * torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    patches = centred_patches(u).flatten(0, 1)
    d = patches.shape[1]
    densities = torch.distributions.MultivariateNormal(
        torch.zeros(d, dtype=torch.float64),
        covariance_matrix=mixture.covariances.double() + LABEL_VARIANCE * torch.eye(d))
    expected = densities.log_prob(patches.double()[:, None]) + mixture.log_weights.double()
    assert torch.equal(mixture.labels(u).flatten(), expected.argmax(1))
    images = 0.5 + 0.1 * torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    fitted = PatchMixture(2)
    likelihood = fitted.fit(images, iterations=5)
    patches = centred_patches(images, stride=FIT_STRIDE).flatten(0, 1).double()
    densities = torch.distributions.MultivariateNormal(
        torch.zeros(d, dtype=torch.float64), covariance_matrix=fitted.covariances.double())
    mixture_density = torch.logsumexp(densities.log_prob(patches[:, None])
                                      + fitted.log_weights.double(), 1)
    assert likelihood == pytest.approx(float(mixture_density.mean()) + d / 2 * np.log(2 * np.pi),
                                       rel=1e-4)


def test_patch_augmented_gradient_matches_autograd():
    """The last pass's regularizer R_w(z) + lam Q(E z), with pixel weights and labels; without
    labels its value is the model's R."""
    reg = ConvexFilterRegularizer(2, 1, n_filters=4, kernel_size=3, eps=0.05).double()
    embedding = Embedding(2, 1).double()
    with torch.no_grad():
        embedding.weight.add_(0.1 * torch.randn_like(embedding.weight))
    term = PatchAugmented(reg, embedding, random_mixture(), weight=0.3)
    z = torch.randn(2, 2, 12, 12, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 1, 12, 12, dtype=torch.float64) + 0.5
    labels = torch.randint(0, 3, (2, 9))
    (auto,) = torch.autograd.grad(term.value(z, weights, labels).sum(), z)
    assert torch.allclose(auto, term.gradient(z, weights, labels), rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        assert torch.allclose(term.value(z), reg.value(z))
        value, gradient = term.value_and_gradient(z, weights, labels)
        assert torch.allclose(value, term.value(z, weights, labels))


def small_model(reweight=1) -> DripModel:
    config = ModelConfig(n_filters=4, kernel_size=3, eps=0.05, reweight=reweight,
                         patch_components=3, patch_weight=1e-3)
    model = DripModel(config).double()
    fitted = random_mixture()
    model.patch_prior.covariances.copy_(fitted.covariances)
    model.patch_prior.log_weights.copy_(fitted.log_weights)
    return model


@pytest.mark.parametrize("reweight", [0, 1])
@pytest.mark.parametrize("device", DEVICES)
def test_solve_with_the_patch_pass_fits_every_sample(device, reweight):
    """The pass ends inside the data-fit set, converged, at a lower patch-augmented objective
    than where it started; its iterations add to the others'; weight 0 skips it."""
    model = small_model(reweight).to(device)
    op = Blur((1, 16, 16), gaussian_psf(1.0)).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 16, 16, dtype=torch.float64, generator=gen).to(device)
    clean = op(x)
    sigma = 0.02 * clean.abs().flatten(1).mean(1)
    b = clean + sigma[:, None, None, None] * torch.randn(clean.shape, generator=gen,
                                                         dtype=torch.float64).to(device)
    radius = discrepancy_radius(op, sigma, 1.0)
    before = model.solve(op, b, radius, patch_weight=0)
    after = model.solve(op, b, radius)
    assert bool(after.converged.all())
    assert bool((discrepancy_ratio(op, after.solution, b, sigma) <= 1.0).all())
    assert bool((after.iterations > before.iterations).all())
    assert torch.allclose(after.regularizer_value, model.regularizer.value(after.latent))
    term = PatchAugmented(model.regularizer, model.embedding, model.patch_prior, 1e-3)
    labels = model.patch_prior.labels(before.solution)
    objective = [term.value(s.latent, before.pixel_weights, labels) for s in (before, after)]
    assert bool((objective[1] < objective[0]).all())
    config = model.config
    model.config.patch_weight = 0.0
    assert torch.equal(model.solve(op, b, radius).solution, before.solution)
    assert config.patch_weight == 0.0


@pytest.fixture(scope="module")
def patch_run(tmp_path_factory):
    """A tiny run with a patch mixture, on 12 images of 12x12 (blur)."""
    folder = tmp_path_factory.mktemp("patches")
    data = folder / "train.h5"
    write_small_file(data, Blur((1, 12, 12), gaussian_psf(1.0)), n=12)
    result = run_cli("train", data, "--out", folder / "run", "--epochs", 1,
                     "--patch-components", 2, *FAST)
    assert result.exit_code == 0, result.stderr
    # 11 training images of 12x12 give 44 patches: too few for even one component of 64 pixels
    assert ("warning: --patch-components: the patch mixture's fit has 44 patches for 2 "
            "components" in result.stderr and "needs more (or larger) images" in result.stderr)
    return data, folder / "run"


def test_train_fits_the_mixture_and_chooses_its_weight(patch_run, tmp_path):
    """The model file holds the fitted mixture and the weight validation chose (recorded in
    history.csv); reconstruct records it, and --patch-weight 0 gives the solve without it."""
    data, run = patch_run
    model, info, _ = load_model(run)
    assert model.patch_prior is not None and model.patch_prior.fitted
    history = (run / "history.csv").read_text().splitlines()
    assert history[0].split(",")[-2] == "val_patch_weight"
    chosen = float(history[-1].split(",")[-2])
    assert info.config.patch_weight == chosen
    outputs = {}
    for name, extra in (("default", []), ("without", ["--patch-weight", 0]),
                        ("heavy", ["--patch-weight", 0.01])):
        outputs[name] = tmp_path / f"{name}.h5"
        result = run_cli("reconstruct", data, "--model", run, "--out", outputs[name], "-q", *extra)
        assert result.exit_code == 0, result.stderr
    with h5py.File(outputs["heavy"]) as heavy, h5py.File(outputs["without"]) as without:
        assert heavy.attrs["patch_weight"] == 0.01 and "patch_weight" not in without.attrs
        assert np.all(heavy["discrepancy_ratio"][:] <= 1.0) and np.all(heavy["converged"][:])
        assert np.all(heavy["iterations"][:] > without["iterations"][:])


def test_patch_options_refused_where_they_do_not_apply(patch_run, tmp_path):
    data, run = patch_run
    plain = tmp_path / "plain"
    assert run_cli("train", data, "--out", plain, "--max-steps", 1, *FAST).exit_code == 0
    out = tmp_path / "r.h5"
    result = run_cli("reconstruct", data, "--model", plain, "--out", out, "--patch-weight", 0.001)
    assert_one_line_error(result, "--patch-weight needs a drip model with a patch mixture", out)
    result = run_cli("reconstruct", data, "--method", "tv", "--out", out, "--patch-weight", 0.001)
    assert_one_line_error(result, "--patch-weight applies to --method drip", out)
    result = run_cli("evaluate", data, "--out", tmp_path / "ev", "--patch-weight", 0.001)
    assert_one_line_error(result, "--patch-weight applies to drip models", tmp_path / "ev")
    result = run_cli("train", data, "--out", tmp_path / "leap", "--architecture", "leapfrog",
                     "--patch-components", 2, *TINY)
    assert_one_line_error(result, "--patch-components needs the convex architecture",
                          tmp_path / "leap")
    small = tmp_path / "small.h5"
    write_small_file(small, Blur((1, 6, 6), gaussian_psf(1.0)), n=4)
    result = run_cli("train", small, "--out", tmp_path / "small", "--patch-components", 2,
                     "--filters", 2, "--kernel-size", 3, "--dilation-levels", 1, "-q")
    assert_one_line_error(result, "smaller than the mixture's 8x8 patches",
                          tmp_path / "small" / "model.safetensors")
    # --init from a model with a mixture into a run without one, and back: each run fits its own
    result = run_cli("train", data, "--out", tmp_path / "from_patch", "--init", run,
                     "--max-steps", 1, "-q", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert load_model(tmp_path / "from_patch")[0].patch_prior is None
    result = run_cli("train", data, "--out", tmp_path / "to_patch", "--init", plain,
                     "--patch-components", 2, "--max-steps", 1, "-q", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert load_model(tmp_path / "to_patch")[0].patch_prior.fitted
    assert json.loads((tmp_path / "to_patch" / "config.json").read_text())["model"][
        "patch_components"] == 2


def test_resumed_run_with_a_mixture_ends_with_the_same_weights(patch_run, tmp_path):
    """The mixture is fitted once, at the start, and travels in the checkpoint: a run stopped
    and resumed ends with exactly the weights, mixture and chosen weight of an uninterrupted
    one."""
    data, _ = patch_run
    whole, split = tmp_path / "whole", tmp_path / "split"
    options = ["--epochs", 2, "--patch-components", 2, *FAST]
    assert run_cli("train", data, "--out", whole, *options).exit_code == 0
    first = run_cli("train", data, "--out", split, "--max-steps", 2, *options)
    assert first.exit_code == 0, first.stderr
    second = run_cli("train", data, "--out", split, "--resume", "--device", "cpu", "-q")
    assert second.exit_code == 0, second.stderr
    a = load_file(str(whole / "checkpoint.safetensors"))
    b = load_file(str(split / "checkpoint.safetensors"))
    assert a.keys() == b.keys() and "patch_prior.covariances" in a
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert load_model(whole)[1].config.patch_weight == load_model(split)[1].config.patch_weight
