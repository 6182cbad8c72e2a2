"""The learned regularizer and embedding: value/gradient agreement, convexity, adjoints, the TV start."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import DEVICES, random_csr
from drip_cli.operators import Blur, SparseMatrixOperator, gaussian_psf
from drip_cli.operators.composed import EmbeddedOperator
from drip_cli.operators import adjointness_error
from drip_cli.operators.base import LANCZOS_SLACK
from drip_cli.regularizers import ConvexFilterRegularizer, Embedding, LeapfrogRegularizer
from drip_cli.training.implicit import hessian_vector


GROUPS = [1, 2]
# the convex family's options: potentials per filter or pair, a mix of smoothing scales, dilations
CONVEX_VARIANTS = {"per-filter": dict(group_size=1), "pairs": dict(group_size=2),
                   "mixed-potentials": dict(group_size=2, potential_scales=3),
                   "multi-scale": dict(group_size=1, potential_scales=2, dilation_levels=3)}


def trained_looking(latent=3, channels=1, seed=0, architecture=ConvexFilterRegularizer,
                    **options) -> torch.nn.Module:
    """A regularizer with all parameters moved away from the initialisation."""
    options = {"group_size": 2, **options}
    reg = architecture(latent, channels, n_filters=8, kernel_size=3, eps=0.05, seed=seed, **options)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in reg.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return reg.double()


@pytest.mark.parametrize("variant", [*CONVEX_VARIANTS, "leapfrog"])
@pytest.mark.parametrize("device", DEVICES)
def test_gradient_matches_autograd_and_finite_differences(device, variant):
    reg = (trained_looking(architecture=LeapfrogRegularizer, layers=2) if variant == "leapfrog"
           else trained_looking(**CONVEX_VARIANTS[variant])).to(device)
    z = torch.randn(2, 3, 10, 12, dtype=torch.float64, device=device, requires_grad=True)
    (auto,) = torch.autograd.grad(reg.value(z).sum(), z)
    closed = reg.gradient(z)
    assert torch.allclose(auto, closed, rtol=1e-10, atol=1e-12)
    direction = torch.randn_like(z)
    h = 1e-6
    with torch.no_grad():
        fd = (reg.value(z + h * direction) - reg.value(z - h * direction)) / (2 * h)
    assert torch.allclose(fd, (closed * direction).flatten(1).sum(1), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("variant", CONVEX_VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
def test_closed_form_hessian_matches_autograd(device, variant):
    """The implicit trainer's Hessian products, and its preconditioner: where the filters do
    not reach the border and each potential has one filter, the diagonal is exact."""
    reg = trained_looking(**CONVEX_VARIANTS[variant]).to(device)
    z = torch.randn(2, 3, 10, 12, dtype=torch.float64, device=device)
    apply, diagonal = reg.hessian_at(z)
    h = torch.randn_like(z)
    assert torch.allclose(apply(h), hessian_vector(reg, z, h), rtol=1e-10, atol=1e-12)
    assert bool((diagonal > 0).all())
    if reg.group_size == 1:
        reach = reg.reach
        for c, y, x in ((0, 5, 6), (2, reach, 12 - 1 - reach)):
            unit = torch.zeros_like(z)
            unit[:, c, y, x] = 1.0
            exact = apply(unit)[:, c, y, x]
            assert torch.allclose(diagonal[:, c, y, x], exact, rtol=1e-10)


@pytest.mark.parametrize("architecture", [ConvexFilterRegularizer, LeapfrogRegularizer])
def test_gradient_is_differentiable_in_the_parameters(architecture):
    reg = trained_looking(architecture=architecture)
    z = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    loss = reg.gradient(z).pow(2).sum()
    grads = torch.autograd.grad(loss, list(reg.parameters()))
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():  # in the solver: no graph is kept
        assert not reg.gradient(z).requires_grad and not reg.value(z).requires_grad


@pytest.mark.parametrize("variant", CONVEX_VARIANTS)
@pytest.mark.parametrize("seed", range(5))
def test_convex_on_random_pairs(seed, variant):
    """R(t a + (1-t) b) <= t R(a) + (1-t) R(b) on random pairs and random parameters."""
    reg = trained_looking(seed=seed, **CONVEX_VARIANTS[variant])
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(16, 3, 8, 8, dtype=torch.float64, generator=gen)
    b = torch.randn(16, 3, 8, 8, dtype=torch.float64, generator=gen)
    t = torch.rand(16, 1, 1, 1, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        lhs = reg.value(t * a + (1 - t) * b)
        rhs = t.flatten() * reg.value(a) + (1 - t.flatten()) * reg.value(b)
    assert bool((lhs <= rhs + 1e-10).all())


@pytest.mark.parametrize("variant", CONVEX_VARIANTS)
def test_filter_bank_adjoint(variant):
    """<K z, t> = <z, K^T t> for the (padded, dilated) filter bank, normalised as for operators."""
    reg = trained_looking(**CONVEX_VARIANTS[variant])
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(2, 3, 9, 11, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        t = torch.randn(reg.responses(z).shape, dtype=torch.float64, generator=gen)
        lhs, rhs = (reg.responses(z) * t).sum(), (z * reg.responses_adjoint(t)).sum()
        v = torch.randn(z.shape, dtype=torch.float64, generator=gen)
        for _ in range(50):   # ||K|| by power iteration on K^T K
            v = reg.responses_adjoint(reg.responses(v))
            norm_sq, v = v.norm(), v / v.norm()
        scale = norm_sq.sqrt() * z.norm() * t.norm()
    assert float((lhs - rhs).abs() / scale) <= 1e-12


@pytest.mark.parametrize("variant", CONVEX_VARIANTS)
def test_lipschitz_bound_holds(variant):
    reg = trained_looking(**CONVEX_VARIANTS[variant])
    gen = torch.Generator().manual_seed(3)
    bound = float(reg.lipschitz_bound().detach())
    with torch.no_grad():
        for _ in range(20):
            a = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=gen)
            b = a + 1e-2 * torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=gen)
            ratio = (reg.gradient(a) - reg.gradient(b)).norm() / (a - b).norm()
            assert float(ratio) <= bound
    # the Hessian is largest at z = 0 (every potential at its most curved): power iteration
    h, zero = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=gen), torch.zeros(1, 3, 8, 8)
    for _ in range(100):
        h = hessian_vector(reg, zero.double(), h)
        top, h = float(h.norm()), h / h.norm()
    assert 0.1 * bound <= top <= bound   # holds, and is not vacuous


@pytest.mark.parametrize("variant", CONVEX_VARIANTS)
@pytest.mark.parametrize("shape", [(3, 8, 8), (3, 9, 13)])
def test_padded_lipschitz_bound_holds_for_its_shape(variant, shape):
    """The shape's bound against the exact constant, the top eigenvalue of the dense
    ``K^T diag(w/eps) K`` (the Hessian at z = 0, padding included): above it, by at most the
    Lanczos slack, and below the shape-free bound; recomputed when a parameter changes."""
    reg = trained_looking(**CONVEX_VARIANTS[variant])
    n = shape[0] * shape[1] * shape[2]
    zero = torch.zeros(1, *shape, dtype=torch.float64)
    with torch.no_grad():
        columns = [hessian_vector(reg, zero, e.view(1, *shape)).flatten()
                   for e in torch.eye(n, dtype=torch.float64)]
    exact = float(torch.linalg.eigvalsh(torch.stack(columns)).max())
    first_step, bound = (float(t.detach()) for t in reg.curvature_and_lipschitz_bound(shape=shape))
    assert exact <= bound <= exact / (1 - LANCZOS_SLACK) * (1 + 1e-9)
    assert first_step == bound <= float(reg.lipschitz_bound().detach())   # the shape-free one
    with torch.no_grad():
        reg.weight_logits.add_(1.0)   # larger weights: a larger constant, not the cached one
    assert float(reg.padded_lipschitz_bound(shape)) > bound


@pytest.mark.parametrize("group_size", GROUPS)
def test_starts_as_smoothed_tv(group_size):
    """A square of side 8 and height 1: anisotropic TV is 4 * 8 = 32; isotropic TV counts the
    two corners where both differences are 1 as sqrt(2) instead of 2 (forward differences).
    With only the TV pair, the regularizer is (smoothed) TV; further filters start switched on,
    at ``EXTRA_WEIGHT``, so that training can move them."""
    from drip_cli.regularizers.convex import EXTRA_WEIGHT
    from drip_cli.solvers.tv import total_variation

    reg = ConvexFilterRegularizer(4, 1, n_filters=2, eps=1e-4, group_size=group_size).double()
    z = torch.zeros(1, 4, 16, 16, dtype=torch.float64)
    z[:, 0, 4:12, 4:12] = 1.0
    with torch.no_grad():
        value = float(reg.value(z))
    expected = 32.0 if group_size == 1 else 30.0 + 2 ** 0.5
    assert abs(value - expected) < 1e-3 * expected
    if group_size == 2:  # the same functional as the TV baseline, up to smoothing
        assert abs(value - float(total_variation(z[:, :1]))) < 1e-3 * expected
    full = ConvexFilterRegularizer(4, 1, n_filters=8, group_size=group_size)
    n_tv = 2 // group_size
    assert torch.allclose(full.weights[:n_tv], torch.ones(n_tv))
    assert torch.allclose(full.weights[n_tv:], torch.full_like(full.weights[n_tv:], EXTRA_WEIGHT))


@pytest.mark.parametrize("boundary", ["symmetric", "periodic"])
@pytest.mark.parametrize("kernel", [1, 3])
def test_embedding_adjoint_and_identity_start(kernel, boundary):
    emb = Embedding(4, 3, kernel_size=kernel, boundary=boundary).double()
    with torch.no_grad():
        emb.weight.add_(0.1 * torch.randn_like(emb.weight))
    op = EmbeddedOperator(Blur((3, 12, 10), gaussian_psf(1.0)), emb)
    assert adjointness_error(op) <= 1e-10
    fresh = Embedding(4, 3, kernel_size=kernel, boundary=boundary).double()
    z = torch.randn(2, 4, 12, 10, dtype=torch.float64)
    assert torch.equal(fresh(z), z[:, :3])
    # either padding: a constant latent gives a constant image up to the border (zero padding
    # left a frame, darker or brighter by the share of E's weights outside the image)
    flat = emb(torch.ones(1, 4, 12, 10, dtype=torch.float64))
    assert torch.allclose(flat, emb.weight.sum(dim=(1, 2, 3))[None, :, None, None].expand_as(flat))


def test_a_periodic_embedding_is_a_circular_convolution_and_its_boundary_is_checked():
    """Periodically padded, E is the circular convolution of the latent: shifting the latent
    (with wrap-around) shifts the image; its CSR matrix is the same operator; a model file
    naming another boundary is refused."""
    from drip_cli.regularizers.model import ModelConfig

    emb = Embedding(1, 1, kernel_size=3, boundary="periodic").double()
    with torch.no_grad():
        emb.weight.add_(0.1 * torch.randn_like(emb.weight))
    z = torch.randn(2, 1, 9, 13, dtype=torch.float64)
    shifted = emb(torch.roll(z, (3, -5), dims=(-2, -1)))
    assert torch.allclose(shifted, torch.roll(emb(z), (3, -5), dims=(-2, -1)), atol=1e-13)
    matrix, transposed = emb.sparse_matrices(9, 13, torch.float64, torch.device("cpu"))
    flat = z.reshape(2, -1).T
    assert torch.allclose((matrix @ flat).T.reshape(z.shape), emb(z), atol=1e-13)
    assert torch.allclose((transposed @ flat).T.reshape(z.shape), emb.adjoint(z), atol=1e-13)
    with pytest.raises(ValueError, match="embedding_boundary"):
        ModelConfig.from_dict({"embedding_boundary": "wrap"})
    with pytest.raises(ValueError, match="boundary"):
        Embedding(1, 1, boundary="zero")


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_embedding_chained_with_a_sparse_matrix_is_the_same_operator(kernel):
    """Without gradients, ``A E`` for a sparse ``A`` multiplies by ``E``'s CSR matrix instead of
    convolving: the same products and adjoint (float64, non-square images), refreshed when the
    weights change; with gradients it convolves, differentiably in E's weights."""
    rng = np.random.default_rng(0)
    data, indices, indptr, shape, _ = random_csr(30, 9 * 13, 0.2, rng)
    op = SparseMatrixOperator.from_csr((1, 9, 13), data, indices, indptr, shape)
    emb = Embedding(1, 1, kernel_size=kernel).double()
    composed = EmbeddedOperator(op, emb)
    z = torch.randn(3, 1, 9, 13, dtype=torch.float64)
    y = torch.randn(3, *op.measurement_shape, dtype=torch.float64)
    for _ in range(2):
        with torch.no_grad():
            emb.weight.add_(0.1 * torch.randn_like(emb.weight))   # a new E each time
            assert composed._sparse_embedding(z) is not None   # the chained products run
            forward, adjoint = composed(z), composed.adjoint(y)
        assert torch.allclose(forward, op(emb(z)), rtol=0, atol=1e-12)
        assert torch.allclose(adjoint, emb.adjoint(op.adjoint(y)), rtol=0, atol=1e-12)
    with torch.no_grad():
        assert adjointness_error(composed) <= 1e-12
    twin = copy.deepcopy(emb)   # the cached CSR matrices stay behind (they cannot be copied)
    assert torch.equal(twin.weight, emb.weight) and not hasattr(twin, "_sparse")
    assert composed._sparse_embedding(z) is None   # a gradient may be wanted: convolutions
    composed(z).sum().backward()
    assert emb.weight.grad is not None and bool(emb.weight.grad.abs().sum() > 0)


@pytest.mark.parametrize("device", DEVICES)
def test_pixel_weights_weigh_each_pixels_terms(device):
    """R with pixel weights m (drip reconstruct --reweight) is linear in m, equals R at m = 1,
    and its closed-form gradient matches autograd."""
    reg = trained_looking(**CONVEX_VARIANTS["multi-scale"]).to(device)
    z = torch.randn(2, 3, 10, 12, dtype=torch.float64, device=device, requires_grad=True)
    gen = torch.Generator().manual_seed(3)
    a, b = (torch.rand(2, 1, 10, 12, dtype=torch.float64, generator=gen).to(device) for _ in range(2))
    with torch.no_grad():
        assert torch.allclose(reg.value(z, torch.ones_like(a)), reg.value(z), rtol=1e-12)
        assert torch.allclose(reg.value(z, a) + reg.value(z, b), reg.value(z, a + b), rtol=1e-12)
    (auto,) = torch.autograd.grad(reg.value(z, a).sum(), z)
    assert torch.allclose(auto, reg.gradient(z, a), rtol=1e-10, atol=1e-12)
    h = torch.randn_like(z)   # the closed-form Hessian product of the weighted R (training)
    (second,) = torch.autograd.grad(reg.gradient(z, a), z, grad_outputs=h)
    assert torch.allclose(reg.hessian_at(z.detach(), a)[0](h), second, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", CONVEX_VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
def test_the_solvers_gradient_is_the_recorded_ones_to_the_last_bit(device, variant, dtype):
    """Without autograd recording (the solver) the potentials' derivative is formed in place:
    the gradient must be the recorded path's, bit for bit, weighted or not, per dilation level."""
    options = {**CONVEX_VARIANTS[variant], "dilation_levels": 2}
    reg = trained_looking(latent=1, **options).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(3, 1, 16, 18, dtype=dtype, generator=gen).to(device)
    m = torch.rand(3, 1, 16, 18, dtype=dtype, generator=gen).to(device) + 0.5
    for weights in (None, m):
        recorded = reg.gradient(z.clone().requires_grad_(), weights).detach()
        with torch.no_grad():
            assert torch.equal(reg.gradient(z, weights), recorded)


@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_evaluation_equals_the_whole_batch(weighted, monkeypatch):
    """On the CPU R is evaluated in chunks of samples (cache-sized): values, gradients and the
    gradients in the parameters are those of one pass over the whole batch."""
    from drip_cli.regularizers import convex

    reg = trained_looking(**CONVEX_VARIANTS["multi-scale"])
    z = torch.randn(5, 3, 10, 12, dtype=torch.float64)
    m = torch.rand(5, 1, 10, 12, dtype=torch.float64) if weighted else None

    def evaluate():
        value, gradient = reg.value_and_gradient(z, m)
        params = torch.autograd.grad((value.sum() + gradient.pow(2).sum()), list(reg.parameters()))
        return value, gradient, reg.value(z, m), params

    whole = evaluate()
    per_sample = 8 * 10 * 12 * 8   # filters x pixels x bytes: one sample's responses
    monkeypatch.setattr(convex, "CPU_CHUNK_BYTES", 2 * per_sample)   # chunks of 2, 2 and 1
    assert len(reg._chunks(z, m)) == 3
    chunked = evaluate()
    for a, b in zip(whole[:3] + tuple(whole[3]), chunked[:3] + tuple(chunked[3])):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("weighted", [False, True])
def test_a_large_image_evaluated_in_strips_equals_the_whole_image(weighted, monkeypatch):
    """An image whose responses exceed CPU_CHUNK_BYTES is evaluated in strips of rows with a
    halo of twice the filters' reach: the same value, gradient and gradients in the parameters
    as one pass over the image, the borders' mirroring included."""
    from drip_cli.regularizers import convex

    reg = trained_looking(**CONVEX_VARIANTS["multi-scale"])   # reach 4: dilations 1, 2, 4
    z = torch.randn(2, 3, 45, 12, dtype=torch.float64)
    m = torch.rand(2, 1, 45, 12, dtype=torch.float64) if weighted else None

    def evaluate():
        value, gradient = reg.value_and_gradient(z, m)
        params = torch.autograd.grad((value.sum() + gradient.pow(2).sum()), list(reg.parameters()))
        return value, gradient, reg.value(z, m), reg.gradient(z, m), params

    whole = evaluate()
    bound = reg.padded_lipschitz_bound(z.shape[1:])
    assert len(list(reg._strips(z[:1], None))) == 1
    monkeypatch.setattr(convex, "CPU_CHUNK_BYTES", 8 * 12 * 8 * 8)   # 8 rows of responses
    strips = list(reg._strips(z[:1], None))
    assert len(strips) == 6 and strips[0][0].shape[2] == 8 + 8   # the first: no halo above
    parted = evaluate()
    for a, b in zip(whole[:4] + tuple(whole[4]), parted[:4] + tuple(parted[4])):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    del reg._padded_bound   # the step bound's Lanczos products, strip by strip
    assert torch.allclose(reg.padded_lipschitz_bound(z.shape[1:]), bound, rtol=1e-10)


def test_edge_weights_are_lower_at_edges_and_average_one():
    from drip_cli.regularizers.adaptive import edge_weights

    u = torch.zeros(2, 1, 16, 16, dtype=torch.float64)
    u[0, :, :, 8:] = 1.0                          # a vertical edge; the second image is flat
    m = edge_weights(u, 0.05)
    assert m.shape == (2, 1, 16, 16) and bool((m > 0).all())
    assert torch.allclose(m.mean(dim=(1, 2, 3)), torch.ones(2, dtype=torch.float64))
    assert float(m[0, 0, 5, 7]) < 0.1 * float(m[0, 0, 5, 2])   # at the edge (dilated) vs flat
    assert torch.allclose(m[1], torch.ones_like(m[1]))        # nothing to relieve: uniform
    colour = edge_weights(u.repeat(1, 3, 1, 1), 0.05)          # the magnitude spans the channels
    assert colour.shape == (2, 1, 16, 16) and float(colour[0, 0, 5, 7]) < float(m[0, 0, 5, 7])


@pytest.mark.parametrize("options", [dict(n_filters=8), dict(n_filters=6, group_size=1,
                                                             potential_scales=2, dilation_levels=3)])
@pytest.mark.parametrize("device", DEVICES)
def test_a_single_channel_model_on_each_channel_is_the_sum_over_channels(device, options):
    """--each-channel: the widened model's R, gradient, step bound, embedding and patch term on
    C channels are the single-channel model's on each channel (R summed), per sample; and so
    are those of the block-diagonal model that starts a colour run (drip train --init), rebuilt
    from its own config as a model file would be."""
    from drip_cli.regularizers.model import (DripModel, ModelConfig, per_channel_model,
                                             widened_model)

    torch.manual_seed(0)
    model = DripModel(ModelConfig(kernel_size=3, patch_components=2, **options))
    with torch.no_grad():   # away from the TV start: filters, weights and smoothings apart
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    model.patch_prior.fit(torch.rand(8, 1, 16, 16))
    model = model.double().to(device)
    wide = per_channel_model(model, 3)
    z = torch.rand(2, 3, 12, 14, dtype=torch.float64, device=device)
    flat = z.reshape(6, 1, 12, 14)
    weights = torch.rand(2, 1, 12, 14, dtype=torch.float64, device=device)
    each = weights.repeat_interleave(3, 0)
    with torch.no_grad():
        torch.testing.assert_close(wide.regularizer.value(z, weights),
                                   model.regularizer.value(flat, each).view(2, 3).sum(1))
        torch.testing.assert_close(wide.regularizer.gradient(z, weights),
                                   model.regularizer.gradient(flat, each).view_as(z))
        bound = wide.regularizer.curvature_and_lipschitz_bound(shape=(3, 12, 14))[1]
        single = model.regularizer.curvature_and_lipschitz_bound(shape=(1, 12, 14))[1]
        assert bound.item() == pytest.approx(single.item(), rel=1e-6)
        torch.testing.assert_close(wide.embedding(z), model.embedding(flat).view_as(z))
        torch.testing.assert_close(wide.embedding.adjoint(z),
                                   model.embedding.adjoint(flat).view_as(z))
    labels = wide.patch_prior.labels(z)
    assert torch.equal(labels, model.patch_prior.labels(flat).view(2, -1))
    torch.testing.assert_close(wide.patch_prior.half_gradient(z, labels),
                               model.patch_prior.half_gradient(flat, labels.view(6, -1)).view_as(z))
    assert wide.reach == model.reach and wide.runs_patch_pass(1.0)
    full = widened_model(model, 3)
    assert full.config.n_filters == 3 * options["n_filters"] and full.patch_prior is None
    rebuilt = DripModel(full.config).double().to(device)
    rebuilt.load_state_dict(full.state_dict())
    with torch.no_grad():
        for block in (full, rebuilt):
            torch.testing.assert_close(block.regularizer.value(z, weights),
                                       wide.regularizer.value(z, weights))
            torch.testing.assert_close(block.regularizer.gradient(z, weights),
                                       wide.regularizer.gradient(z, weights))
            torch.testing.assert_close(block.embedding(z), wide.embedding(z))
    # three groups over two dilation levels (2 + 1): nine would split 5 + 4, not 6 + 3
    uneven = DripModel(ModelConfig(kernel_size=3, n_filters=6))
    with pytest.raises(ValueError, match="do not split evenly"):
        widened_model(uneven, 3)
