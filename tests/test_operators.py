"""Operators: exact adjoints, the contract's definitions, differentiability, HDF5 round trips."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from conftest import DEVICES, DTYPES, OPERATOR_CASES, make_operator, random_csr
from drip_cli.operators import (Blur, Inpainting, SparseMatrixOperator, Tomography,
                                adjointness_error, estimate_norm, gaussian_psf, limited_angles,
                                norm_bound, operator_from_hdf5)
from drip_cli.operators.base import LANCZOS_SLACK, largest_eigenvalue_bound, lanczos_steps
from drip_cli.operators.finite_differences import gradient, gradient_adjoint
from drip_cli.operators.sparse import transposed_csr


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", OPERATOR_CASES)
def test_adjoint_dot_product(kind, channels, dtype, device):
    op = make_operator(kind, (channels, 16, 20)).to(device)
    error = adjointness_error(op, dtype=dtype, device=device, trials=4)
    assert error <= (1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", OPERATOR_CASES)
def test_follows_input_dtype_device_and_shapes(kind, dtype, device):
    op = make_operator(kind, (3, 16, 20)).to(device)
    x = torch.randn(2, 3, 16, 20, dtype=dtype, device=device)
    y = op(x)
    assert y.shape == (2, *op.measurement_shape) and y.dtype == dtype and y.device.type == device
    back = op.adjoint(y)
    assert back.shape == x.shape and back.dtype == dtype
    with pytest.raises(ValueError):
        op(torch.randn(2, 1, 16, 21, dtype=dtype, device=device))
    # an empty batch (a solve whose samples all finished early) maps to an empty batch
    empty = op(x[:0])
    assert empty.shape == (0, *op.measurement_shape) and empty.dtype == dtype
    assert op.adjoint(empty).shape == x[:0].shape
    # moved to the device, an operator still measures CPU input on the CPU, to the bit as
    # before the move (drip evaluate simulates with the operator it solves with)
    fresh, cpu_x = make_operator(kind, (3, 16, 20)), torch.rand(2, 3, 16, 20, dtype=torch.float64)
    before = fresh(cpu_x)
    after = fresh.to(device)(cpu_x)
    assert after.device.type == "cpu" and torch.equal(after, before)


@pytest.mark.parametrize("kind", OPERATOR_CASES)
def test_channels_are_independent(kind):
    """The operator acts per channel: channel c of A x depends only on channel c of x."""
    op = make_operator(kind, (3, 16, 20))
    x = torch.randn(1, 3, 16, 20, dtype=torch.float64)
    single = make_operator(kind, (1, 16, 20))
    for c in range(3):
        assert torch.allclose(op(x)[:, c], single(x[:, c:c + 1])[:, 0], atol=1e-12)


def test_blur_matches_the_contract_formula():
    rng = np.random.default_rng(3)
    psf = rng.random((5, 3))
    x = rng.random((7, 9))
    op = Blur((1, 7, 9), psf)
    kh, kw = psf.shape
    expected = np.zeros_like(x)
    for i in range(7):
        for j in range(9):
            expected[i, j] = sum(psf[p, q] * x[(i - p + kh // 2) % 7, (j - q + kw // 2) % 9]
                                 for p in range(kh) for q in range(kw))
    got = op(torch.tensor(x)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_valid_blur_is_the_valid_convolution():
    """The valid boundary measures the pixels whose PSF stays inside the image: SciPy's
    ``convolve2d(mode="valid")``; a PSF larger than the image measures nothing and is refused."""
    from scipy.signal import convolve2d

    rng = np.random.default_rng(4)
    psf, x = rng.random((5, 3)), rng.random((2, 9, 11))
    op = Blur((2, 9, 11), psf, "valid")
    assert op.measurement_shape == (2, 5, 9) and not op.periodic
    got = op(torch.tensor(x)[None])[0].numpy()
    for c in range(2):
        np.testing.assert_allclose(got[c], convolve2d(x[c], psf, mode="valid"), atol=1e-12)
    with pytest.raises(ValueError, match="measures no pixel"):
        Blur((1, 4, 11), psf, "valid")
    with pytest.raises(ValueError, match="unsupported blur boundary"):
        Blur((1, 9, 11), psf, "reflect")


def test_gaussian_psf_is_normalised_and_odd():
    psf = gaussian_psf(2.0)
    assert psf.shape == (13, 13) and abs(psf.sum() - 1) < 1e-12
    with pytest.raises(ValueError):
        gaussian_psf(1.0, size=4)
    with pytest.raises(ValueError):
        Blur((1, 8, 8), np.ones((4, 3)))


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("angles", [np.arange(180.0), limited_angles(32, 120.0)],
                         ids=["full-180", "limited-120"])
def test_tomography_matches_skimage_radon(size, angles):
    from skimage.data import shepp_logan_phantom
    from skimage.transform import radon, resize

    image = resize(shepp_logan_phantom(), (size, size))
    op = Tomography((1, size, size), angles)
    ours = op(torch.tensor(image)[None, None])[0, 0].numpy()
    reference = radon(image, theta=angles, circle=False).T  # contract: rows are angles
    assert ours.shape == reference.shape
    assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) <= 0.01


@pytest.mark.parametrize("detectors", [9, 28, 30, 41])
def test_a_detector_window_is_the_centred_part_of_the_detector_line(detectors):
    """A Tomography with ``n_detectors`` other than the image's 29 measures detectors
    ``29 // 2 - D // 2 + j`` of the contract's line: its central part (9, 28), or the line
    with detectors beyond it, which measure nothing (30, 41); outside a factor 4 it is
    refused."""
    angles = limited_angles(7, 120.0)
    full = Tomography((1, 16, 20), angles)
    window = Tomography((1, 16, 20), angles, detectors)
    assert full.n_detectors == 29 and window.measurement_shape == (1, 7, detectors)
    x = torch.rand(2, 1, 16, 20, dtype=torch.float64)
    line, measured = full(x).numpy(), window(x).numpy()
    expected = np.zeros((2, 1, 7, detectors))
    for j in range(detectors):
        t = 29 // 2 - detectors // 2 + j
        if 0 <= t < 29:
            expected[..., j] = line[..., t]
    np.testing.assert_array_equal(measured, expected)
    for bad in (7, 117):
        with pytest.raises(ValueError, match="give 8 to 116"):
            Tomography((1, 16, 20), angles, bad)


def test_an_axis_off_centre_shifts_the_detectors_rays(tmp_path):
    """With ``center_offset = d`` detector ``t`` sums the ray of detector ``t - d`` of the
    centred geometry: for a whole ``d`` the sinogram shifted by ``d`` detectors, exactly; a
    fraction lies between its two neighbours. The offset is stored only where it is not 0,
    and a damaged or out-of-range one is refused by name."""
    angles = limited_angles(9, 150.0, 5.0)
    x = torch.rand(2, 1, 16, 20, dtype=torch.float64)
    centred = Tomography((1, 16, 20), angles)(x)
    shifted = Tomography((1, 16, 20), angles, center_offset=-3)(x)
    assert torch.equal(shifted[..., :-3], centred[..., 3:])
    half = Tomography((1, 16, 20), angles, center_offset=0.5)
    assert torch.equal(Tomography((1, 16, 20), angles, center_offset=1.5)(x)[..., 1:],
                       half(x)[..., :-1])
    # of a smooth image, the rays half a detector over: about the mean of their two
    # neighbours' (which is off by a curvature term, 1.1% here)
    r, c = np.meshgrid(np.arange(16) - 7.5, np.arange(20) - 9.5, indexing="ij")
    blob = torch.from_numpy(np.exp(-(r**2 + c**2) / 18))[None, None]
    sums, between = half(blob)[..., 1:], Tomography((1, 16, 20), angles)(blob)
    between = (between[..., 1:] + between[..., :-1]) / 2
    assert float((sums - between).norm() / between.norm()) < 0.02
    # a window wider than the line measures the rays the offset moves beyond its end
    wide = Tomography((1, 16, 20), angles, 35)(x)   # detectors 14 - 17 + j: rays j - 3
    moved = Tomography((1, 16, 20), angles, 35, center_offset=3)(x)
    assert torch.equal(moved[..., 3:], wide[..., :-3]) and not moved[..., :3].any()
    assert moved[..., 32:].abs().sum() > 0   # the line's detectors 26-28, beyond it once moved
    for offset in (0.0, 2.25):
        op = Tomography((1, 16, 20), angles, 24, center_offset=offset)
        with h5py.File(tmp_path / "op.h5", "w") as f:
            op.to_hdf5(f.create_group("operator"))
            assert ("center_offset" in f["operator"].attrs) == (offset != 0)
        with h5py.File(tmp_path / "op.h5", "r") as f:
            again = operator_from_hdf5(f["operator"])
        assert again.center_offset == offset and torch.equal(again(x), op(x))
    for bad, message in ((float("nan"), "must be one finite number"),
                         ("left", "must be one finite number"),
                         (14.5, "must be below 14.5 detectors")):
        with h5py.File(tmp_path / "op.h5", "a") as f:
            f["operator"].attrs["center_offset"] = bad
        with h5py.File(tmp_path / "op.h5", "r") as f, pytest.raises(ValueError, match=message):
            operator_from_hdf5(f["operator"])


def test_tomography_non_square_image():
    from skimage.transform import radon

    image = np.random.default_rng(0).random((20, 31))
    angles = np.array([0.0, 17.0, 45.0, 90.0, 133.0])
    ours = Tomography((1, 20, 31), angles)(torch.tensor(image)[None, None])[0, 0].numpy()
    reference = radon(image, theta=angles, circle=False).T
    assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) <= 0.01


@pytest.mark.parametrize("device", DEVICES)
def test_a_matrix_with_repeated_or_unsorted_columns_is_stored_as_torch_expects(device):
    """SciPy saves a COO matrix with its duplicates and a CSR one with its columns in any
    order; torch's CSR kernels (cuSPARSE's above all) want each row's columns sorted and
    distinct. The operator sums and sorts them, and its products are the matrix's."""
    rng = np.random.default_rng(3)
    rows, cols = rng.integers(0, 30, 400), rng.integers(0, 64, 400)
    values = rng.random(400)
    dense = np.zeros((30, 64))
    np.add.at(dense, (rows, cols), values)
    order = np.argsort(rows, kind="stable")   # rows grouped, columns as drawn: repeats, unsorted
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=30))])
    op = SparseMatrixOperator.from_csr((1, 8, 8), values[order],
                                       cols[order].astype(np.uint32), indptr, (30, 64))
    matrix = op.matrix(torch.float64, torch.device("cpu"))
    crow, col = matrix.crow_indices().numpy(), matrix.col_indices().numpy()
    assert all(np.all(np.diff(col[crow[i]:crow[i + 1]]) > 0) for i in range(30))
    assert op.nnz == np.count_nonzero(dense)
    swapped = SparseMatrixOperator.from_csr((1, 2, 4), np.array([1.0, 2.0]),
                                            np.array([5, 2], dtype=np.uint32), [0, 2], (1, 8))
    matrix = swapped.matrix(torch.float64, torch.device("cpu"))
    assert matrix.col_indices().tolist() == [2, 5] and matrix.values().tolist() == [2.0, 1.0]
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    y = torch.rand(2, 1, 30, dtype=torch.float64)
    op = op.to(device)
    np.testing.assert_allclose(op(x.to(device)).cpu().numpy().reshape(2, 30),
                               x.numpy().reshape(2, 64) @ dense.T, atol=1e-12)
    np.testing.assert_allclose(op.adjoint(y.to(device)).cpu().numpy().reshape(2, 64),
                               y.numpy().reshape(2, 30) @ dense, atol=1e-12)


def test_matrix_operator_is_the_sparse_product():
    rng = np.random.default_rng(0)
    data, indices, indptr, shape, dense = random_csr(50, 12 * 10, 0.1, rng)
    op = SparseMatrixOperator.from_csr((2, 12, 10), data, indices, indptr, shape)
    x = rng.standard_normal((3, 2, 12, 10))
    got = op(torch.tensor(x)).numpy()
    expected = np.einsum("mp,ncp->ncm", dense, x.reshape(3, 2, -1))
    np.testing.assert_allclose(got, expected, atol=1e-12)
    # the products use 32-bit indices (half the index traffic); the adjoint is the transpose
    matrix, transpose = (op.matrix(torch.float64, torch.device("cpu"), transpose=t)
                         for t in (False, True))
    assert matrix.col_indices().dtype == transpose.crow_indices().dtype == torch.int32
    y = rng.standard_normal((3, 2, 50))
    np.testing.assert_allclose(op.adjoint(torch.tensor(y)).numpy().reshape(3, 2, -1),
                               np.einsum("mp,ncm->ncp", dense, y), atol=1e-12)
    with pytest.raises(ValueError):
        SparseMatrixOperator.from_csr((1, 12, 10), data, indices, indptr[:-1], shape)
    with pytest.raises(ValueError):
        SparseMatrixOperator.from_csr((1, 12, 10), data * np.nan, indices, indptr, shape)


def test_matrix_operator_takes_scipy_numpy_and_torch_matrices():
    """The library's operator (README) from a SciPy sparse matrix of any format or a NumPy
    array, as from CSR arrays (each was "'csr_matrix' object has no attribute 'to'"), checked
    as a file's matrix is."""
    import scipy.sparse

    rng = np.random.default_rng(1)
    data, indices, indptr, shape, dense = random_csr(30, 8 * 6, 0.2, rng)
    expected = SparseMatrixOperator.from_csr((1, 8, 6), data, indices, indptr, shape)
    x = torch.tensor(rng.standard_normal((2, 1, 8, 6)))
    csr = scipy.sparse.csr_matrix((data, indices, indptr), shape=shape)
    for matrix in (csr, csr.tocoo(), csr.tocsc(), scipy.sparse.csr_array(csr), dense,
                   torch.tensor(dense), torch.tensor(dense).to_sparse()):
        op = SparseMatrixOperator((1, 8, 6), matrix)
        torch.testing.assert_close(op(x), expected(x), rtol=0, atol=1e-12)
    for matrix, needle in [(dense[:, :-1], "47 columns, the image has 48 pixels"),
                           (dense * np.nan, "NaN or Inf"), (0 * dense, "no nonzero entry")]:
        with pytest.raises(ValueError, match=needle):
            SparseMatrixOperator((1, 8, 6), matrix)
    with pytest.raises(ValueError, match=r"image_shape must be \(C, H, W\), got \(8, 6\)"):
        SparseMatrixOperator((8, 6), csr)


def test_a_norm_estimate_keeps_no_copies_of_a_matrix_unless_asked():
    """TV bounds ||A|| in float64 before a float32 solve: the float64 matrix and transpose it
    makes are dropped afterwards (they doubled the matrices' memory for the whole solve), and
    the estimate is the same either way; info's adjointness test keeps them."""
    rng = np.random.default_rng(1)
    data, indices, indptr, shape, dense = random_csr(40, 8 * 8, 0.2, rng)
    op = SparseMatrixOperator.from_csr((1, 8, 8), data, indices, indptr, shape)
    op(torch.zeros(1, 1, 8, 8))   # a float32 product: its matrix is the solve's, and stays
    before = set(op._cache)
    norm = estimate_norm(op, dtype=torch.float64)
    assert set(op._cache) == before
    exact = np.linalg.norm(dense, 2)   # power iteration: a lower bound that converges
    assert exact * 0.97 < norm <= exact * (1 + 1e-12)
    assert norm_bound(op) >= exact and set(op._cache) == before
    assert estimate_norm(op, dtype=torch.float64, keep_conversions=True) == norm
    assert {key[1] for key in set(op._cache) - before} == {torch.float64}


@pytest.mark.parametrize("top", [5, 2**16, 2**27, 2**40])
def test_radon_entries_are_summed_as_np_unique_sums_them(top):
    """The Radon matrix's duplicate entries are summed after a stable sort: the same keys and,
    bit for bit, the same sums (in order of appearance) as ``np.unique`` and ``np.bincount``."""
    from drip_cli.operators.tomography import _sum_by_key

    rng = np.random.default_rng(top)
    keys = rng.integers(0, top, 5000)
    keys = np.concatenate([keys, rng.permutation(keys)[:3000], keys[:10]])
    weights = rng.random(len(keys))
    unique, inverse = np.unique(keys, return_inverse=True)
    found, summed = _sum_by_key(keys, weights)
    np.testing.assert_array_equal(found, unique)
    np.testing.assert_array_equal(summed, np.bincount(inverse.ravel(), weights=weights))
    empty = _sum_by_key(np.zeros(0, dtype=np.int64), np.zeros(0))
    assert len(empty[0]) == len(empty[1]) == 0


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_transposed_csr_is_the_transpose_and_is_built_only_when_needed(index_dtype):
    """The transpose (SciPy's CSR-to-CSC conversion) equals torch's and keeps the index dtype;
    applying A alone, as drip simulate does, never builds it, and its gradient does."""
    rng = np.random.default_rng(1)
    data, indices, indptr, shape, dense = random_csr(40, 30, 0.2, rng)
    matrix = torch.sparse_csr_tensor(torch.tensor(indptr, dtype=index_dtype),
                                     torch.tensor(indices, dtype=index_dtype),
                                     torch.tensor(data, dtype=torch.float32), size=shape,
                                     check_invariants=True)
    transpose = transposed_csr(matrix)
    assert transpose.crow_indices().dtype == transpose.col_indices().dtype == index_dtype
    reference = matrix.t().to_sparse_csr()
    assert torch.equal(transpose.crow_indices().long(), reference.crow_indices().long())
    assert torch.equal(transpose.col_indices().long(), reference.col_indices().long())
    assert torch.equal(transpose.values(), reference.values())
    np.testing.assert_array_equal(transpose.to_dense().numpy(), dense.T.astype(np.float32))
    op = Tomography((1, 8, 8), [0.0, 60.0, 120.0])
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    built = lambda: {key[0] for key in op._cache}   # noqa: E731 (transpose flags of the cache)
    b = op(x)
    assert built() == {False}
    (grad,) = torch.autograd.grad(b.square().sum(), x)
    assert built() == {False, True}
    torch.testing.assert_close(grad, 2 * op.adjoint(b.detach()))


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_adjoint_first_keeps_only_the_matrices_of_its_device(device):
    """The transpose asked for before ``A`` itself is right, and on a GPU the CPU copy it was
    sorted from is not kept (host memory: about the matrix again)."""
    op = Tomography((1, 8, 8), [0.0, 60.0, 120.0])
    y = torch.rand(2, *op.measurement_shape, dtype=torch.float32)
    reference = op.adjoint(y.double())   # float64 CPU
    moved = op.to(device)
    back = moved.adjoint(y.to(device))
    torch.testing.assert_close(back.double().cpu(), reference, rtol=1e-5, atol=1e-5)
    kept = {(transpose, where.type) for transpose, dtype, where in moved._cache
            if dtype == torch.float32}   # the float64 reference's are on the CPU
    assert kept == ({(True, "cpu"), (False, "cpu")} if device == "cpu" else {(True, device)})


@pytest.mark.parametrize("kind", OPERATOR_CASES)
def test_gradients_flow_through_forward_and_adjoint(kind):
    """Autograd through A and A^T equals the analytic gradient, and gradcheck passes."""
    op = make_operator(kind, (1, 6, 7))
    x = torch.randn(2, 1, 6, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, *op.measurement_shape, dtype=torch.float64)
    loss = (op(x) * y).sum()
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.allclose(grad, op.adjoint(y).expand_as(grad), atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: op.adjoint(op(t)), (x,), eps=1e-6, atol=1e-6)


def test_estimate_norm():
    assert abs(estimate_norm(make_operator("denoise")) - 1.0) < 1e-9
    assert abs(estimate_norm(Blur((1, 16, 16), gaussian_psf(1.0))) - 1.0) < 1e-2  # sum(psf) = 1


@pytest.mark.parametrize("kind", OPERATOR_CASES)
def test_norm_bound_lies_above_the_norm_by_at_most_its_slack(kind):
    """TV's step sizes need ||A|| from above (``tau sigma ||K||^2 <= 1``): power iteration's
    estimate lies below it, the Lanczos bound above, within 1% (``1 / sqrt(1 - slack)``)."""
    op = make_operator(kind, (1, 12, 10))
    exact = estimate_norm(op, iterations=3000)
    assert exact * (1 - 1e-9) <= norm_bound(op) <= exact / (1 - LANCZOS_SLACK) ** 0.5 * (1 + 1e-9)
    assert estimate_norm(op) <= exact * (1 + 1e-9)


def test_largest_eigenvalue_bound():
    """Above the top eigenvalue, by at most the slack, for spectra with and without a gap; the
    step count grows with the dimension as the failure bound asks."""
    gen = torch.Generator().manual_seed(0)
    for spectrum in (torch.linspace(0, 1, 500, dtype=torch.float64),
                     torch.rand(500, generator=gen, dtype=torch.float64) ** 4,
                     torch.tensor([1.0] + [0.0] * 99, dtype=torch.float64)):
        basis, _ = torch.linalg.qr(torch.randn(len(spectrum), len(spectrum), generator=gen,
                                               dtype=torch.float64))
        matrix = basis @ torch.diag(spectrum) @ basis.T
        top = float(spectrum.max())
        bound = largest_eigenvalue_bound(lambda v: (matrix @ v.flatten()).view(v.shape),
                                         (1, len(spectrum)))
        assert top <= bound <= top / (1 - LANCZOS_SLACK) * (1 + 1e-9)
    assert lanczos_steps(4096) < lanczos_steps(65536) < 2 * lanczos_steps(4096)


def test_embedded_norm_bound_is_kept_on_the_operator_until_the_embedding_changes():
    """``||A E||`` bounded above (by at most the Lanczos slack), computed once for an operator
    and embedding weights, whichever ``EmbeddedOperator`` asks, and afresh when they change."""
    from drip_cli.operators.composed import EmbeddedOperator
    from drip_cli.regularizers import Embedding

    op = make_operator("tomography", (1, 8, 10))
    embedding = Embedding(1, 1).double()
    with torch.no_grad():
        embedding.weight.add_(0.1 * torch.randn(embedding.weight.shape, dtype=torch.float64,
                                                generator=torch.Generator().manual_seed(0)))
    composed = EmbeddedOperator(op, embedding)
    with torch.no_grad():
        matrix = composed(torch.eye(80, dtype=torch.float64).view(80, 1, 8, 10)).reshape(80, -1)
    norm = float(torch.linalg.matrix_norm(matrix, ord=2))
    cpu = torch.device("cpu")
    bound = composed.norm_bound(torch.float64, cpu)
    assert norm <= bound <= norm / (1 - LANCZOS_SLACK) ** 0.5 * (1 + 1e-9)
    calls = []
    normal = EmbeddedOperator.normal
    try:
        EmbeddedOperator.normal = lambda self, x: calls.append(1) or normal(self, x)
        assert EmbeddedOperator(op, embedding).norm_bound(torch.float64, cpu) == bound
        assert not calls
        with torch.no_grad():
            embedding.weight.mul_(2)
        assert abs(composed.norm_bound(torch.float64, cpu) / bound - 2) < 1e-9 and calls
    finally:
        EmbeddedOperator.normal = normal


def test_finite_difference_adjoint():
    u = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    p = torch.randn(2, 2, 3, 9, 11, dtype=torch.float64)
    assert abs((gradient(u) * p).sum() - (u * gradient_adjoint(p)).sum()) < 1e-10


@pytest.mark.parametrize("kernel,out_channels,in_channels,padding,dilation", [
    (kernel, *shape) for kernel in ("transpose", "flipped", "depthwise")
    for shape in [(8, 1, 0, 1), (8, 1, 0, 2), (1, 2, 1, 1), (4, 3, 2, 2), (3, 1, 2, 1)]
    if kernel != "depthwise" or shape[1] == 1])
def test_conv2d_adjoint_by_each_kernel(kernel, out_channels, in_channels, padding,
                                       dilation, monkeypatch):
    """Each kernel the CPU choice picks between is the exact adjoint of conv2d, with the
    gradients in the weights of conv_transpose2d (training differentiates through it)."""
    from drip_cli.operators import convolution

    monkeypatch.setattr(convolution, "_adjoint_kernel", lambda *args: kernel)
    weight = torch.randn(out_channels, in_channels, 5, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, in_channels, 13, 12, dtype=torch.float64)
    y = torch.nn.functional.conv2d(x, weight.detach(), padding=padding, dilation=dilation)
    g = torch.randn_like(y)
    adjoint = convolution.conv2d_adjoint(g, weight, padding, dilation)
    lhs, rhs = (y * g).sum(), (x * adjoint.detach()).sum()
    assert abs(lhs - rhs) < 1e-12 * weight.abs().sum() * x.norm() * g.norm()
    (grad,) = torch.autograd.grad((adjoint * x).sum(), weight)
    reference = torch.nn.functional.conv_transpose2d(g, weight, padding=padding, dilation=dilation)
    (expected,) = torch.autograd.grad((reference * x).sum(), weight)
    assert torch.allclose(grad, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding,dilation", [(0, 1), (1, 1), (0, 2), (3, 2)])
def test_single_channel_convolution_as_depthwise_is_exact(padding, dilation):
    """One input and one output channel run with the batch as depthwise channels: the values
    of conv2d, the exact adjoint, and the same gradients in the weights; an empty batch takes
    the ordinary path."""
    from drip_cli.operators import convolution

    weight = torch.randn(1, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 1, 13, 12, dtype=torch.float64)
    y = convolution.conv2d(x, weight, padding, dilation)
    expected = torch.nn.functional.conv2d(x, weight, padding=padding, dilation=dilation)
    assert torch.allclose(y, expected, rtol=0, atol=1e-13)
    g = torch.randn_like(y)
    adjoint = convolution.conv2d_adjoint(g, weight, padding, dilation)
    assert adjoint.shape == x.shape
    lhs, rhs = (y * g).sum(), (x * adjoint).sum()
    assert abs(lhs - rhs) < 1e-12 * weight.abs().sum() * x.norm() * g.norm()
    (grad,) = torch.autograd.grad((y * g).sum(), weight)
    (expected_grad,) = torch.autograd.grad((expected * g).sum(), weight)
    assert torch.allclose(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert convolution.conv2d(x[:0], weight, padding, dilation).shape == (0, *y.shape[1:])
    assert convolution.conv2d_adjoint(g[:0], weight, padding, dilation).shape == (0, *x.shape[1:])


@pytest.mark.parametrize("padding,dilation,size", [(0, 1, (13, 12)), (1, 1, (16, 16)),
                                                   (2, 2, (11, 17)), (4, 2, (9, 9))])
def test_a_large_single_channel_convolution_in_tiles_is_exact(monkeypatch, padding, dilation,
                                                              size):
    """A single-channel image above the tiling size (here made tiny: tiles of 5x5) runs as a
    batch of tiles: the values of conv2d and its adjoint, and the same gradients in the
    weights, wherever the tiles' edges fall."""
    from drip_cli.operators import convolution

    monkeypatch.setattr(convolution, "TILE", 5)
    monkeypatch.setattr(convolution, "TILE_FROM_PIXELS", 0)
    weight = torch.randn(1, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 1, *size, dtype=torch.float64)
    calls = []
    tiles = convolution._tiles
    monkeypatch.setattr(convolution, "_tiles", lambda *a: calls.append(1) or tiles(*a))
    y = convolution.conv2d(x, weight, padding, dilation)
    expected = torch.nn.functional.conv2d(x, weight, padding=padding, dilation=dilation)
    assert torch.allclose(y, expected, rtol=0, atol=1e-13)
    g = torch.randn_like(y)
    adjoint = convolution.conv2d_adjoint(g, weight, padding, dilation)
    reference = torch.nn.functional.conv_transpose2d(g, weight, padding=padding, dilation=dilation)
    assert len(calls) == 2
    assert torch.allclose(adjoint, reference, rtol=0, atol=1e-13)
    grads = torch.autograd.grad((y * g).sum() + (adjoint * x).sum(), weight)[0]
    expected_grads = torch.autograd.grad((expected * g).sum() + (reference * x).sum(), weight)[0]
    assert torch.allclose(grads, expected_grads, rtol=1e-12, atol=1e-12)
    assert convolution.conv2d(x[:0], weight, padding, dilation).shape == (0, *y.shape[1:])


@pytest.mark.parametrize("n", [0, 1, 3, 5, 8])
def test_batch_padded_convolutions_change_nothing(monkeypatch, n):
    """Where the batch is padded to a power of two (on GPUs, here forced on the CPU), the
    convolution, its adjoint and their gradients are those of the unpadded batch, and the
    output keeps the input's batch size."""
    from drip_cli.operators import convolution

    weight = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(n, 2, 11, 10, dtype=torch.float64)
    g = torch.randn(n, 6, 11, 10, dtype=torch.float64)
    results, batches = [], []
    conv = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d",
                        lambda x, *a, **k: batches.append(len(x)) or conv(x, *a, **k))
    for devices in (set(), {"cpu"}):
        monkeypatch.setattr(convolution, "PAD_BATCH_ON", devices)
        batches.clear()
        y = convolution.conv2d(x, weight, 2, 2)
        adjoint = convolution.conv2d_adjoint(g, weight, 2, 2)
        assert batches[0] == (n if not devices else {0: 1, 1: 1, 3: 4, 5: 8, 8: 8}[n])
        grad = (torch.autograd.grad((y * g).sum() + (adjoint * x).sum(), weight)[0] if n
                else torch.zeros_like(weight))
        results.append((y, adjoint, grad))
    for plain, padded in zip(*results):
        assert plain.shape == padded.shape
        assert torch.allclose(plain, padded, rtol=1e-12, atol=1e-12)


def test_cpu_adjoint_choice_is_made_once_per_kind(monkeypatch):
    """The first call of a kind times the kernels and records the choice; later calls of that
    kind (any batch size) use the recorded choice without timing again."""
    from drip_cli.operators import convolution

    weight = torch.randn(8, 1, 5, 5)
    monkeypatch.setattr(convolution, "_cpu_choice", {})
    # the first call may be an empty batch: the kernels are timed on a batch of their own
    empty = convolution.conv2d_adjoint(torch.randn(0, 8, 20, 20), weight, dilation=2)
    assert empty.shape == (0, 1, 28, 28)
    key = ((8, 1, 5, 5), (8, 20, 20), torch.float32, 0, 2)
    assert convolution._cpu_choice[key] in convolution.ADJOINT_KERNELS
    flipped_calls = []
    original = convolution._flipped_conv2d
    monkeypatch.setitem(convolution._ADJOINTS, "flipped",
                        lambda *args: flipped_calls.append(1) or original(*args))
    monkeypatch.setitem(convolution._cpu_choice, key, "flipped")
    convolution.conv2d_adjoint(torch.randn(5, 8, 20, 20), weight, dilation=2)
    assert len(flipped_calls) == 1
    monkeypatch.setitem(convolution._cpu_choice, key, "transpose")
    convolution.conv2d_adjoint(torch.randn(5, 8, 20, 20), weight, dilation=2)
    assert len(flipped_calls) == 1


def test_cpu_kernel_choices_round_trip(monkeypatch):
    """The choices a checkpoint stores are plain rows that another process adopts as its own;
    rows that are not choices are refused."""
    from drip_cli.operators import convolution

    key = ((8, 1, 5, 5), (8, 20, 20), torch.float64, 0, 2)
    monkeypatch.setattr(convolution, "_cpu_choice", {key: "depthwise"})
    rows = convolution.cpu_kernel_choices()
    assert rows == [[[8, 1, 5, 5], [8, 20, 20], "float64", 0, 2, "depthwise"]]
    monkeypatch.setattr(convolution, "_cpu_choice", {key: "flipped"})
    convolution.adopt_cpu_kernel_choices(rows)
    assert convolution._cpu_choice == {key: "depthwise"}
    # a checkpoint written before the depthwise kernel stored True for conv_transpose2d
    convolution.adopt_cpu_kernel_choices([[*rows[0][:5], True]])
    assert convolution._cpu_choice == {key: "transpose"}
    for bad in ([[8, 1, 5, 5], [8, 20, 20], "float64", 0, 2],
                [[8, 1, 5, 5], [8, 20, 20], "nn", 0, 2, True],
                [[8, 1, 5, 5], [8, 20, 20], "float64", 0, 2, "yes"],
                [[8, 1, 5, 5], [8, 20, 20], "float64", 0, 2, 1],
                [[8, 1, 5, 5], [8, 20, 20], "float64", False, 2, True],
                [[8, True, 5, 5], [8, 20, 20], "float64", 0, 2, True], "row"):
        with pytest.raises(ValueError, match="not a kernel choice"):
            convolution.adopt_cpu_kernel_choices([bad])
    assert convolution._cpu_choice == {key: "transpose"}


@pytest.mark.parametrize("boundary, numpy_mode", [("symmetric", "symmetric"),
                                                   ("periodic", "wrap")])
@pytest.mark.parametrize("h,w,pad", [(9, 11, 2), (8, 8, 4), (3, 5, 3), (1, 4, 1)])
def test_padding_and_its_adjoint(h, w, pad, boundary, numpy_mode):
    """The learned convolutions' padding is NumPy's 'symmetric' mode (edge sample repeated), a
    periodic embedding's its 'wrap' mode, also where the padding is as wide as the image, and
    each one's adjoint passes the dot-product test."""
    from drip_cli.operators.convolution import PADDINGS

    pad_fn, adjoint = PADDINGS[boundary]
    z = torch.randn(2, 3, h, w, dtype=torch.float64)
    g = torch.randn(2, 3, h + 2 * pad, w + 2 * pad, dtype=torch.float64)
    expected = np.pad(z.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode=numpy_mode)
    assert np.array_equal(pad_fn(z, pad).numpy(), expected)
    lhs, rhs = (pad_fn(z, pad) * g).sum(), (z * adjoint(g, pad)).sum()
    assert abs(lhs - rhs) < 1e-12 * z.norm() * g.norm() * (1 + 2 * pad)


@pytest.mark.parametrize("kind", OPERATOR_CASES)
def test_hdf5_round_trip(kind, tmp_path):
    op = make_operator(kind, (3, 16, 20))
    with h5py.File(tmp_path / "op.h5", "w") as f:
        op.to_hdf5(f.create_group("operator"))
    with h5py.File(tmp_path / "op.h5", "r") as f:
        assert f["operator"].attrs["kind"] == kind.split("-")[0]
        again = operator_from_hdf5(f["operator"])
    x = torch.randn(2, 3, 16, 20, dtype=torch.float64)
    assert type(again) is type(op)
    assert torch.allclose(again(x), op(x), atol=1e-12)


def test_blur_survives_module_dtype_casts():
    """Module.to(dtype) must not drop the imaginary part of the transfer function."""
    psf = np.random.default_rng(0).random((5, 3))  # not symmetric: a complex transfer function
    x = torch.rand(2, 1, 12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = Blur((1, 12, 10), psf)
    for cast in (lambda m: m.double(), lambda m: m.to(torch.float32), lambda m: m.to(torch.float64)):
        op = cast(Blur((1, 12, 10), psf))
        assert torch.allclose(op(x), reference(x), atol=1e-6)
        assert adjointness_error(op) <= 1e-5


@pytest.mark.parametrize("build,needle", [
    (lambda: Blur((1, 8, 8), np.full((3, 3), np.nan)), "NaN"),
    (lambda: Inpainting((1, 8, 8), np.zeros((8, 8), np.uint8)), "observes no pixel"),
    (lambda: SparseMatrixOperator.from_csr((1, 8, 8), np.zeros(0), np.zeros(0, np.int64),
                                           np.zeros(1, np.int64), (0, 64)), "measures nothing"),
    (lambda: Blur((1, 8, 8), np.zeros((3, 3))), "all zeros"),
    (lambda: SparseMatrixOperator.from_csr((1, 8, 8), np.zeros(2), np.array([0, 5]),
                                           np.array([0, 1, 2]), (2, 64)), "no nonzero entry"),
])
def test_degenerate_operators_are_refused(build, needle):
    """A NaN PSF, a mask with no observed pixel, a matrix with no rows, an all-zero PSF or
    matrix: each would give NaN discrepancy ratios (M = 0, NaN data, or noise levels of 0)
    downstream, so each is refused where it is built."""
    with pytest.raises(ValueError, match=needle):
        build()
