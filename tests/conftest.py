"""Shared fixtures: devices (CUDA skipped cleanly without a GPU), operators, small files."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from drip_cli.operators import (Blur, Denoise, Inpainting, SparseMatrixOperator, Tomography,
                                limited_angles)

# Under pytest-xdist (`make test` runs one worker per core), each worker gets its share of the
# cores: small tensors gain little from intra-op threads, and oversubscribed threads slow every
# worker down. OMP_NUM_THREADS passes the share on to the subprocesses some tests start.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[CUDA, pytest.mark.cuda])]
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]
KINDS = ["denoise", "blur", "inpainting", "tomography", "matrix"]
# the operators the tests build: every kind, and the blur with the valid boundary
# the kinds, and the contract's extensions: a valid blur, a tomography detector narrower than
# the image's diagonal
OPERATOR_CASES = [*KINDS, "blur-valid", "tomography-window"]


def random_csr(rows: int, cols: int, density: float, rng: np.random.Generator):
    """A random CSR matrix as (data, indices, indptr, shape), without scipy."""
    dense = rng.standard_normal((rows, cols)) * (rng.random((rows, cols)) < density)
    indptr = np.concatenate([[0], np.cumsum((dense != 0).sum(1))])
    indices = np.concatenate([np.flatnonzero(row) for row in dense])
    data = dense[dense != 0]
    return data, indices, indptr, (rows, cols), dense


def make_operator(kind: str, image_shape=(1, 16, 20), seed: int = 0):
    """A small operator of each kind (non-square images catch transposed indexing)."""
    rng = np.random.default_rng(seed)
    if kind == "denoise":
        return Denoise(image_shape)
    if kind in ("blur", "blur-valid"):
        return Blur(image_shape, rng.random((5, 3)), "valid" if kind == "blur-valid" else "periodic")
    if kind == "inpainting":
        return Inpainting.random(image_shape, 0.6, rng)
    if kind in ("tomography", "tomography-window"):
        # the window: the extensions of the contract's geometry, a detector window and the
        # rotation axis off the detector's centre
        if kind == "tomography":
            return Tomography(image_shape, limited_angles(12, 120.0, 10.0))
        return Tomography(image_shape, limited_angles(12, 120.0, 10.0), max(image_shape[1:]),
                          center_offset=1.5)
    if kind == "matrix":
        pixels = image_shape[1] * image_shape[2]
        data, indices, indptr, shape, _ = random_csr(150, pixels, 0.05, rng)
        return SparseMatrixOperator.from_csr(image_shape, data, indices, indptr, shape)
    raise ValueError(kind)


@pytest.fixture(scope="session")
def photo_crops() -> np.ndarray:
    """16 grayscale 32x32 crops of scikit-image's bundled photographs, (16, 1, 32, 32)."""
    from drip_cli.data import SourceOptions, load_images

    options = SourceOptions(channels=1, crop_size=32, crops_per_image=4)
    return load_images("skimage:camera,coffee,astronaut,coins", options, np.random.default_rng(1))
