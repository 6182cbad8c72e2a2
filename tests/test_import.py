"""``drip import``: measurements a user took (arrays or pictures), an operator and a noise
level, written as a measurement file that ``reconstruct`` takes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse
import torch
from PIL import Image

from conftest import make_operator
from helpers import assert_one_line_error, run_cli, write_small_file

from drip_cli.data import SourceOptions, load_images, simulate_batch
from drip_cli.errors import DripError
from drip_cli.evaluation.metrics import psnr
from drip_cli.io import MeasurementFile, write_measurement_file
from drip_cli.operators import Blur, Tomography, gaussian_psf, limited_angles

SAMPLE_BLUR_MODEL = Path(__file__).resolve().parent.parent / "sample_data" / "drip_blur.safetensors"


def _read(path):
    with h5py.File(path) as f:
        return ({name: f[name][()] for name in ("measurements", "noise_std", "noise_percent")},
                dict(f.attrs))


def _same_operator(a, b, seed=0):
    """``a`` and ``b`` agree on a random image (and their shapes)."""
    assert a.kind == b.kind and a.image_shape == b.image_shape
    x = torch.from_numpy(np.random.default_rng(seed).random((2, *a.image_shape)))
    assert torch.allclose(a(x), b(x), rtol=1e-6, atol=1e-9)


def _blurred_photos(tmp_path, percent, n=16, size=32, seed=3, boundary="periodic"):
    """Crops of photographs blurred with sigma 2 (as the sample data), their noise std; with
    the valid boundary the crops are 12 pixels larger than the measurements."""
    size += 12 * (boundary == "valid")
    images = load_images("skimage:camera,coffee", SourceOptions(crop_size=size,
                                                                crops_per_image=n // 2),
                         np.random.default_rng(seed))
    op = Blur(images.shape[1:], gaussian_psf(2.0), boundary)
    b, sigma = simulate_batch(op, images, np.full(n, percent), np.random.default_rng(seed))
    return op, b, sigma, images


def test_source_options_refuse_settings_no_image_has():
    """The library's SourceOptions, as the CLI's options are bounded: crop_size=0 said its
    crops "were all black"; a NumPy integer is an integer."""
    assert SourceOptions(crop_size=np.int64(16)).crop_size == 16
    for settings, words in [({"crop_size": 0}, "crop_size must be a positive integer, got 0"),
                            ({"crops_per_image": 2.0}, "crops_per_image must be a positive"),
                            ({"num_images": True}, "num_images must be a positive"),
                            ({"channels": 2}, "channels must be 1 or 3, got 2")]:
        with pytest.raises(ValueError, match=words):
            SourceOptions(**settings)


@pytest.mark.parametrize("boundary", ["periodic", "valid"])
@pytest.mark.parametrize("percent", [1.0, 5.0])
def test_a_blur_array_is_imported_with_its_noise_estimated(tmp_path, percent, boundary):
    """Each sample's noise std is read from the frequencies the blur removes: on 32x32
    measurements of photographs (396 such frequencies, a standard error of about 2.5%) within
    10% of the truth, and so on 64x64 ones with the valid boundary (whose taper leaves about
    400 independent frequencies of 1551); the measurements and the operator (for the valid
    boundary, of images 12 pixels larger) are those simulated."""
    size = 32 if boundary == "periodic" else 64   # the taper leaves a quarter as many
    op, b, sigma, _ = _blurred_photos(tmp_path, percent, size=size, boundary=boundary)
    assert b.shape[-2:] == (size, size)
    np.save(tmp_path / "b.npy", b[:, 0])    # (N, H, W): one channel
    out = tmp_path / "m.h5"
    result = run_cli("import", tmp_path / "b.npy", out, "--operator", "blur", "--blur-sigma", 2,
                     "--blur-boundary", boundary, "--estimate-noise")
    assert result.exit_code == 0, result.stderr
    assert "noise std (estimated)" in result.stdout and "standard error" in result.stdout
    data, attrs = _read(out)
    assert attrs["noise_std_from"] == "estimated" and attrs["drip_format"] == "measurements"
    if boundary == "periodic":   # 396 complex coefficients, two degrees of freedom each
        assert attrs["noise_estimate_dof"] == 792
    np.testing.assert_array_equal(data["measurements"], b)
    ratio = data["noise_std"] / sigma
    assert np.all(np.abs(ratio - 1) < 0.1), ratio
    assert abs(np.median(ratio) - 1) < 0.04, ratio
    with MeasurementFile(out) as file:
        _same_operator(file.operator, op)
        assert not file.has_ground_truth


def test_pictures_round_trip_from_export_and_reconstruct(tmp_path):
    """``drip export --dataset measurements`` at 16 bits, imported back with the file's noise
    level: the measurements within half a step where export did not clip them, and CGLS fits
    every sample of the imported file."""
    truth_file = tmp_path / "m.h5"
    write_small_file(truth_file, Blur((1, 16, 20), gaussian_psf(1.0)), n=5)
    with h5py.File(truth_file) as f:
        b, sigma = f["measurements"][()], f["noise_std"][()]
    folder = tmp_path / "png"
    assert run_cli("export", truth_file, folder, "--dataset", "measurements", "--bits", 16,
                   "--quiet").exit_code == 0
    with h5py.File(truth_file) as f:
        truth = f["ground_truth"][()]
    np.save(tmp_path / "truth.npy", truth)
    out = tmp_path / "back.h5"
    result = run_cli("import", folder, out, "--operator", "blur", "--blur-sigma", 1,
                     "--noise-std", float(sigma[0]), "--ground-truth", tmp_path / "truth.npy",
                     "--quiet")
    assert result.exit_code == 0, result.stderr
    data, _ = _read(out)
    inside = (b >= 0) & (b <= 1)
    assert np.abs(data["measurements"] - b)[inside].max() <= 0.5 / 65535 + 1e-6
    assert np.all(data["noise_std"] == np.float32(sigma[0]))
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["ground_truth"][()], truth)
    recon = tmp_path / "r.h5"
    assert run_cli("reconstruct", out, "--method", "cgls", "--out", recon,
                   "--quiet").exit_code == 0
    with h5py.File(recon) as f:
        assert f["converged"][()].all() and f["discrepancy_ratio"][()].max() <= 1
        assert np.isfinite(f["psnr"][()]).all() and np.isfinite(f["ssim"][()]).all()


def test_colour_pictures_keep_their_channels_unless_converted(tmp_path):
    rng = np.random.default_rng(0)
    picture = (rng.random((12, 14, 3)) * 255).astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "photo.png")
    out = tmp_path / "m.h5"
    assert run_cli("import", tmp_path / "photo.png", out, "--operator", "denoise",
                   "--noise-std", 0.02, "--quiet").exit_code == 0
    data, _ = _read(out)
    np.testing.assert_allclose(data["measurements"][0], np.moveaxis(picture, -1, 0) / 255,
                               atol=1e-6)
    assert run_cli("import", tmp_path / "photo.png", out, "--operator", "denoise",
                   "--noise-std", 0.02, "--channels", 1, "--quiet").exit_code == 0
    assert _read(out)[0]["measurements"].shape == (1, 1, 12, 14)


def test_a_tiff_stack_is_a_sample_per_page(tmp_path):
    """A camera's or microscope's series often comes as one multi-page TIFF: each page is a
    sample, 16-bit pages scaled by 65535 and 32-bit float pages kept, as simulate reads them."""
    rng = np.random.default_rng(1)
    pages = (rng.random((4, 12, 14)) * 65535).astype(np.uint16)
    Image.fromarray(pages[0]).save(tmp_path / "series.tif", save_all=True,
                                   append_images=[Image.fromarray(p) for p in pages[1:]])
    floats = rng.random((2, 12, 14)).astype(np.float32)
    Image.fromarray(floats[0]).save(tmp_path / "floats.tiff", save_all=True,
                                    append_images=[Image.fromarray(floats[1])])
    for name, expected in (("series.tif", pages / 65535), ("floats.tiff", floats)):
        out = tmp_path / f"{name}.h5"
        assert run_cli("import", tmp_path / name, out, "--operator", "denoise",
                       "--noise-std", 0.02, "--quiet").exit_code == 0
        np.testing.assert_allclose(_read(out)[0]["measurements"][:, 0], expected, atol=1e-7)


def _photo_sinograms(size, angles, angle_range, percent, n=8, seed=3):
    images = load_images("skimage:camera,coffee", SourceOptions(crop_size=size,
                                                                crops_per_image=n // 2),
                         np.random.default_rng(seed))
    op = Tomography(images.shape[1:], limited_angles(angles, angle_range))
    b, sigma = simulate_batch(op, images, np.full(n, percent), np.random.default_rng(seed))
    return b, sigma


@pytest.mark.parametrize("geometry", [(32, 32, 120.0), (16, 60, 180.0)],
                         ids=["limited-angle", "more-rows-than-pixels"])
@pytest.mark.parametrize("percent", [1.0, 5.0])
def test_sinograms_are_imported_with_their_noise_estimated(tmp_path, geometry, percent):
    """A sinogram's noise std is read from its components along the Radon matrix's weak left
    singular vectors, its null space included: 32x32 photographs at 32 angles over 120 degrees
    (1472 measurements, 502 such components, of which 170 zero rows) and 16x16 ones at 60 over
    180 (1380 measurements for 256 pixels, found through ``A^T A``), within 10% of the truth."""
    size, angles, angle_range = geometry
    b, sigma = _photo_sinograms(size, angles, angle_range, percent)
    np.save(tmp_path / "s.npy", b)
    out = tmp_path / "m.h5"
    result = run_cli("import", tmp_path / "s.npy", out, "--operator", "tomography",
                     "--angle-range", angle_range, "--estimate-noise", "--quiet")
    assert result.exit_code == 0, result.stderr
    data, attrs = _read(out)
    assert attrs["noise_std_from"] == "estimated"
    assert attrs["noise_estimate_dof"] == (502 if size == 32 else 1124)
    ratio = data["noise_std"] / sigma
    assert np.all(np.abs(ratio - 1) < 0.1), ratio
    assert abs(np.median(ratio) - 1) < 0.05, ratio


def test_large_sparse_matrices_read_their_zero_rows(monkeypatch):
    """Beyond ``SPECTRAL_LIMIT`` only the matrix's zero rows are read: 32x32 images at 64
    angles over 180 degrees have 291 of them (the detectors outside the image's shadow), and
    the estimate stays within 15% of the truth (a standard error of about 4%)."""
    from drip_cli.data import measured

    b, sigma = _photo_sinograms(32, 64, 180.0, 2.0)
    op = Tomography((1, 32, 32), limited_angles(64, 180.0))
    zero_rows = int((np.diff(op.scipy_matrix().indptr) == 0).sum())
    assert zero_rows >= measured.ESTIMATE_MIN_COUNT
    spectral = measured.estimate_noise_std(op, b).std / sigma
    monkeypatch.setattr(measured, "SPECTRAL_LIMIT", 0)
    rows_only = measured.estimate_noise_std(op, b).std / sigma
    assert not np.array_equal(spectral, rows_only)
    for ratio in (spectral, rows_only):
        assert np.all(np.abs(ratio - 1) < 0.15), ratio
    few = Tomography((1, 16, 16), limited_angles(8, 120.0))   # 8 angles: too few zero rows
    with pytest.raises(DripError, match="too large for its spectrum"):
        measured.estimate_noise_std(few, np.ones((2, *few.measurement_shape), np.float32))


def test_colour_sinograms_count_every_channel():
    """Each channel is measured by the same matrix: its weak components count once per
    channel, and a sample's estimate pools them (channels of noise 1, 2 and 3 times sigma give
    sigma times the root mean square, sqrt(14 / 3))."""
    from drip_cli.data import measured

    op = Tomography((3, 32, 32), limited_angles(32, 120.0))
    rng = np.random.default_rng(4)
    b = op(torch.zeros(4, 3, 32, 32, dtype=torch.float64)).numpy()
    b += rng.standard_normal(b.shape) * np.array([1.0, 2.0, 3.0])[:, None, None] * 0.01
    ratio = measured.estimate_noise_std(op, b).std / (0.01 * np.sqrt(14 / 3))
    assert np.all(np.abs(ratio - 1) < 0.06), ratio


def _noisy_photos(percent, channels=1, n=16, size=64, seed=3):
    """Crops of photographs with white noise added (denoise measurements), and its std."""
    images = load_images("skimage:coffee,chelsea", SourceOptions(crop_size=size, channels=channels,
                                                                 crops_per_image=n // 2),
                         np.random.default_rng(seed))
    op = make_operator("denoise", images.shape[1:])
    return simulate_batch(op, images, np.full(n, percent), np.random.default_rng(seed))


@pytest.mark.parametrize("channels", [1, 3])
def test_a_noisy_picture_is_imported_with_its_noise_estimated(tmp_path, channels):
    """Denoise removes nothing, so its estimate reads the image's statistics: on 64x64 crops of
    photographs at 5% noise every estimate within 0.8-1.35 times the truth (on 64 such crops
    0.84-1.9: texture as strong as the noise reads as noise), their median within 5%; the file
    records how many weak-texture patches it rests on."""
    b, sigma = _noisy_photos(5.0, channels)
    np.save(tmp_path / "b.npy", b)
    out = tmp_path / "m.h5"
    result = run_cli("import", tmp_path / "b.npy", out, "--operator", "denoise",
                     "--estimate-noise")
    assert result.exit_code == 0, result.stderr
    shown = " ".join(result.stdout.replace("│", " ").split())   # as the table wraps its cell
    assert "weak-texture" in shown and "reads as noise" in shown
    data, attrs = _read(out)
    assert attrs["noise_std_from"] == "estimated" and "noise_estimate_dof" not in attrs
    assert attrs["noise_estimate_patches"] >= 4 * 36
    ratio = data["noise_std"] / sigma
    assert np.all((ratio > 0.8) & (ratio < 1.35)), ratio
    assert abs(np.median(ratio) - 1) < 0.05, ratio


@pytest.mark.parametrize("channels", [1, 3])
def test_noise_alone_is_estimated_within_its_standard_error(channels):
    """On white noise over a flat image every patch is of weak texture: the estimate is the
    noise's std to within a few percent, a little low (on 200 images of 64x64: 0.985 on average,
    0.91-1.02; the quantile's cut and the weakest eigenvalues' spread), the same for colour,
    whose orthonormal opponent channels keep the noise white."""
    from drip_cli.data import measured

    rng = np.random.default_rng(0)
    b = 0.5 + 0.03 * rng.standard_normal((8, channels, 64, 64))
    ratio = measured.estimate_noise_std(make_operator("denoise", (channels, 64, 64)), b).std / 0.03
    assert np.all((ratio > 0.88) & (ratio < 1.04)), ratio
    assert abs(ratio.mean() - 0.985) < 0.02, ratio


def test_inpainting_reads_the_noise_from_its_observed_patches(tmp_path):
    """Inpainting's estimate reads the patches all of whose pixels are observed: a mask of
    scratches (lines of unobserved pixels; a boolean array, as ``mask > 0`` saves it) leaves
    enough of them, and the estimate is within 0.8-1.35 times the truth, their median within 5%;
    a mask of pixels observed at random leaves none, which is one error line."""
    b, sigma = _noisy_photos(5.0)
    scratches = np.ones((64, 64), bool)
    scratches[::9] = False
    scratches[:, 30:33] = False
    np.save(tmp_path / "b.npy", b * scratches)
    np.save(tmp_path / "scratches.npy", scratches)
    out = tmp_path / "m.h5"
    result = run_cli("import", tmp_path / "b.npy", out, "--operator", "inpainting", "--mask",
                     tmp_path / "scratches.npy", "--estimate-noise", "--quiet")
    assert result.exit_code == 0, result.stderr
    ratio = _read(out)[0]["noise_std"] / sigma
    assert np.all((ratio > 0.8) & (ratio < 1.35)), ratio
    assert abs(np.median(ratio) - 1) < 0.05, ratio
    np.save(tmp_path / "random.npy", np.random.default_rng(0).random((64, 64)) < 0.5)
    out = tmp_path / "m2.h5"
    assert_one_line_error(run_cli("import", tmp_path / "b.npy", out, "--operator", "inpainting",
                                  "--mask", tmp_path / "random.npy", "--estimate-noise"),
                          "6x6 patches of observed pixels (at least 576 are needed), and these "
                          "measurements hold 0", out)


def test_a_matrix_without_weak_components_is_refused(tmp_path):
    """A random 150x64 matrix leaves fewer than 256 weak components (at most its 150 rows) to
    read the noise from: one line, and no file."""
    op = make_operator("matrix", (1, 8, 8))
    matrix = op.scipy_matrix()
    scipy.sparse.save_npz(tmp_path / "A.npz", matrix)
    np.save(tmp_path / "b.npy", np.ones((2, matrix.shape[0]), np.float32))
    out = tmp_path / "m.h5"
    assert_one_line_error(run_cli("import", tmp_path / "b.npy", out, "--operator", "matrix",
                                  "--matrix", tmp_path / "A.npz", "--estimate-noise", "--quiet"),
                          "at least 256 are needed", out)


@pytest.mark.parametrize("route", ["options", "like"])
def test_sinograms_take_their_image_size_and_angles_from_the_data(tmp_path, route):
    """A sinogram's detectors give the square image's side and its rows the number of angles;
    or ``--like`` copies a measurement file's operator."""
    op = Tomography((1, 18, 18), limited_angles(10, 120.0))
    like = tmp_path / "like.h5"
    write_small_file(like, op, n=3)
    with h5py.File(like) as f:
        b = f["measurements"][()]
    np.save(tmp_path / "s.npy", b)          # (N, C, n_angles, n_detectors)
    out = tmp_path / "m.h5"
    options = (["--operator", "tomography", "--angle-range", 120] if route == "options"
               else ["--like", like])
    result = run_cli("import", tmp_path / "s.npy", out, *options, "--noise-percent", 2, "--quiet")
    assert result.exit_code == 0, result.stderr
    data, attrs = _read(out)
    np.testing.assert_array_equal(data["measurements"], b)
    mean_abs = np.abs(b.astype(np.float64)).reshape(3, -1).mean(1)
    np.testing.assert_allclose(data["noise_std"], 0.02 * mean_abs, rtol=1e-5)
    np.testing.assert_allclose(data["noise_percent"], 2.0, rtol=1e-5)
    assert attrs["noise_std_from"] == "percent of mean |b|"
    with MeasurementFile(out) as file:
        _same_operator(file.operator, op)


def test_an_hdf5_dataset_is_imported_as_its_array(tmp_path):
    """``FILE.h5::DATASET`` reads a dataset of any HDF5 file (groups searched) as a ``.npy``
    array is read, for the measurements and the ground truth alike; a file of one dataset needs
    no name. Where the name is missing or wrong, the message lists the file's datasets."""
    op = Tomography((1, 18, 18), limited_angles(10, 120.0))
    like = tmp_path / "like.h5"
    write_small_file(like, op, n=3)
    with h5py.File(like) as f:
        b, truth = f["measurements"][()], f["ground_truth"][()]
    scan = tmp_path / "scan.h5"
    with h5py.File(scan, "w") as f:
        f["exchange/data"] = b[:, 0].astype(np.float64)   # (N, n_angles, n_detectors)
        f["exchange/theta"] = limited_angles(10, 120.0)
        f["truth"] = truth
    with h5py.File(tmp_path / "one.h5", "w") as f:
        f["sinograms"] = b
    tomography = ["--operator", "tomography", "--angle-range", 120, "--noise-std", 0.01, "-q"]
    out = tmp_path / "m.h5"
    result = run_cli("import", f"{scan}::/exchange/data", out, *tomography,
                     "--ground-truth", f"{scan}::truth")
    assert result.exit_code == 0, result.stderr
    data, attrs = _read(out)
    np.testing.assert_array_equal(data["measurements"], b)
    assert attrs["source"] == f"{scan}::/exchange/data"
    with MeasurementFile(out) as file:
        _same_operator(file.operator, op)
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["ground_truth"][()], truth)
    assert run_cli("import", tmp_path / "one.h5", out, *tomography).exit_code == 0
    np.testing.assert_array_equal(_read(out)[0]["measurements"], b)
    listing = "exchange/data (3, 10, 26), exchange/theta (10,), truth (3, 1, 18, 18)"
    for source, message in (
            (scan, f"holds 3 datasets ({listing}): name the one of the measurements as "
                   f"{scan}::DATASET"),
            (f"{scan}::exchange", f"'exchange' is a group (its datasets: {listing})"),
            (f"{scan}::nothing", f"has no dataset 'nothing' (its datasets: {listing})"),
            (f"{scan}::exchange/theta", "has shape (10,); expected S, (N, *S), (N, C, *S)"),
            (f"{tmp_path / 'missing.h5'}::data", "missing.h5: no such file"),
            (f"{tmp_path / 'one.h5'}::sinograms::x", "has no dataset 'sinograms::x'"),
            (like, f"is a drip measurement file: name the dataset to read in it, as "
                   f"{like}::DATASET")):
        assert_one_line_error(run_cli("import", source, tmp_path / "x.h5", *tomography),
                              message, tmp_path / "x.h5")
    # the output may not replace the file the dataset is read from
    assert_one_line_error(run_cli("import", f"{scan}::exchange/data", scan, *tomography),
                          "this is the measurements", tmp_path / "x.h5")
    assert h5py.is_hdf5(scan)
    # drip info on such a file names its datasets and how import reads one, and shows one;
    # on a file in the Data Exchange layout, it gives the import command
    result = run_cli("info", tmp_path / "one.h5")
    assert_one_line_error(result, "its datasets: sinograms (3, 1, 10, 26) (drip import reads "
                                  "one as one.h5::DATASET)", tmp_path / "x.h5")
    result = run_cli("info", scan)
    assert_one_line_error(result, "a scan in the Data Exchange layout, which drip import reads: "
                          "drip import scan.h5::exchange/data OUT.h5 --operator tomography "
                          "--projections --angle-file scan.h5::exchange/theta --center-offset "
                          "auto --estimate-noise", tmp_path / "x.h5")
    text = " ".join(run_cli("info", f"{scan}::exchange/data").stdout.split())
    for shown in ("scan.h5::exchange/data", "HDF5 dataset (3 axes)", "(3, 10, 26)", "float64"):
        assert shown in text, text
    # drip simulate reads images from a named dataset too, where 'images' and 'ground_truth'
    # are its default names
    result = run_cli("simulate", f"{scan}::truth", out, "--operator", "denoise",
                     "--noise-percent", 1, "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["ground_truth"][()], truth)
    assert_one_line_error(
        run_cli("simulate", scan, tmp_path / "x.h5", "--operator", "denoise", "--noise-percent", 1),
        f"has no 'images' or 'ground_truth' dataset (its datasets: {listing}; name one as "
        f"{scan}::DATASET)", tmp_path / "x.h5")


def test_a_psf_and_a_mask_are_read_from_hdf5_datasets(tmp_path):
    """``--psf`` and ``--mask`` take ``FILE.h5::DATASET`` as well, such as a measurement file's
    own operator: the operators built agree with the file's."""
    truth = tmp_path / "truth.npy"
    np.save(truth, np.random.default_rng(0).random((2, 16, 16)).astype(np.float32))
    for kind, options, stored in (("blur", ["--blur-sigma", 1.5], "psf"),
                                  ("inpainting", ["--keep-fraction", 0.5], "mask")):
        first, second = tmp_path / f"{kind}1.h5", tmp_path / f"{kind}2.h5"
        from_file = [f"--{stored}", f"{first}::operator/{stored}"]
        for out, extra in ((first, options), (second, from_file)):
            result = run_cli("simulate", truth, out, "--operator", kind, "--noise-percent", 1,
                             "-q", *extra)
            assert result.exit_code == 0, result.stderr
        with MeasurementFile(first) as a, MeasurementFile(second) as b:
            _same_operator(a.operator, b.operator)
        result = run_cli("import", f"{second}::measurements", tmp_path / f"{kind}3.h5",
                         "--operator", kind, "--noise-std", 0.01, "-q", *from_file)
        assert result.exit_code == 0, result.stderr
        with MeasurementFile(first) as a, MeasurementFile(tmp_path / f"{kind}3.h5") as b:
            _same_operator(a.operator, b.operator)


def test_inpainting_takes_its_mask_and_zeroes_what_it_does_not_observe(tmp_path):
    rng = np.random.default_rng(1)
    mask = (rng.random((16, 20)) < 0.5).astype(np.uint8)
    Image.fromarray(mask * 255).save(tmp_path / "mask.png")
    np.save(tmp_path / "mask.npy", mask.astype(np.float32))
    b = rng.random((4, 16, 20)).astype(np.float32)     # unobserved pixels not zero yet
    np.save(tmp_path / "b.npy", b)
    for mask_file in ("mask.png", "mask.npy"):
        out = tmp_path / f"m_{mask_file}.h5"
        result = run_cli("import", tmp_path / "b.npy", out, "--operator", "inpainting", "--mask",
                         tmp_path / mask_file, "--noise-std", 0.01, "--quiet")
        assert result.exit_code == 0, result.stderr
        data, _ = _read(out)
        np.testing.assert_array_equal(data["measurements"][:, 0], b * mask)
        with MeasurementFile(out) as file:
            assert file.operator.measured_count == mask.sum()


def test_a_sparse_matrix_of_square_images(tmp_path):
    op = make_operator("matrix", (1, 8, 8))
    matrix = op.matrix(torch.float64, torch.device("cpu")).to_dense().numpy()
    scipy.sparse.save_npz(tmp_path / "A.npz", scipy.sparse.csr_matrix(matrix))
    b = np.random.default_rng(2).standard_normal((3, 150)).astype(np.float32)
    np.save(tmp_path / "b.npy", b)
    out = tmp_path / "m.h5"
    result = run_cli("import", tmp_path / "b.npy", out, "--operator", "matrix", "--matrix",
                     tmp_path / "A.npz", "--noise-std", 0.1, "--quiet")
    assert result.exit_code == 0, result.stderr
    with MeasurementFile(out) as file:
        _same_operator(file.operator, op)


def test_options_the_operator_does_not_read_are_named(tmp_path):
    np.save(tmp_path / "b.npy", np.random.default_rng(0).random((2, 16, 16)).astype(np.float32))
    result = run_cli("import", tmp_path / "b.npy", tmp_path / "m.h5", "--operator", "denoise",
                     "--mask", tmp_path / "b.npy", "--angles", 4, "--noise-std", 0.1, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert "--mask" in result.stderr and "--angles" in result.stderr and "ignored" in result.stderr


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "b.npy", rng.random((2, 16, 16)).astype(np.float32))
    bad = rng.random((2, 16, 16)).astype(np.float32)
    bad[1, 3, 4] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    np.save(tmp_path / "rank5.npy", np.zeros((1, 1, 1, 16, 16), np.float32))
    np.save(tmp_path / "sino.npy", rng.random((2, 10, 23)).astype(np.float32))  # 16x16 images
    np.save(tmp_path / "odd.npy", rng.random((2, 10, 11)).astype(np.float32))   # no square
    (tmp_path / "text.npy").write_text("1 2 3")
    np.save(tmp_path / "flat.npy", np.full((2, 32, 32), 0.5, np.float32))
    np.save(tmp_path / "dark.npy", np.zeros((2, 64, 64), np.float32))
    whole = (tmp_path / "b.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(whole[:len(whole) // 2])
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "pic.png")
    like = tmp_path / "like.h5"
    write_small_file(like, make_operator("blur", (3, 16, 16)), n=1)
    out = tmp_path / "m.h5"
    blur = ["--operator", "blur", "--blur-sigma", 1]
    cases = [
        ([tmp_path / "b.npy", out, *blur], "exactly one way"),
        ([tmp_path / "b.npy", out, *blur, "--noise-std", 0.1, "--estimate-noise"],
         "exactly one way"),
        ([tmp_path / "b.npy", out, *blur, "--noise-std", -1], "must be a positive number"),
        ([tmp_path / "b.npy", out, "--operator", "denoise", "--estimate-noise"],
         "(at least 576 are needed), and these measurements hold 121"),
        ([tmp_path / "b.npy", out, *blur, "--estimate-noise"], "at least 256 are needed"),
        ([tmp_path / "b.npy", out, *blur, "--blur-boundary", "valid", "--estimate-noise"],
         "at least 256 are needed"),
        ([tmp_path / "b.npy", out, "--operator", "blur", "--noise-std", 0.1], "needs its PSF"),
        ([tmp_path / "b.npy", out, "--noise-std", 0.1], "give the operator"),
        ([tmp_path / "b.npy", out, *blur, "--like", like, "--noise-std", 0.1],
         "give the operator"),
        ([tmp_path / "b.npy", out, "--like", like, "--noise-std", 0.1], "3 channel(s)"),
        ([tmp_path / "nan.npy", out, *blur, "--noise-std", 0.1], "NaN or Inf (first at sample 1)"),
        ([tmp_path / "rank5.npy", out, *blur, "--noise-std", 0.1], "has shape (1, 1, 1, 16, 16)"),
        ([tmp_path / "text.npy", out, *blur, "--noise-std", 0.1], "not a .npy array"),
        ([tmp_path / "cut.npy", out, *blur, "--noise-std", 0.1], "or a truncated one"),
        ([tmp_path / "missing.npy", out, *blur, "--noise-std", 0.1], "no such file"),
        ([tmp_path / "b.npy", out, "--operator", "inpainting", "--noise-std", 0.1],
         "needs the mask"),
        ([tmp_path / "b.npy", out, "--operator", "inpainting", "--mask", tmp_path / "sino.npy",
          "--noise-std", 0.1], "the mask is shaped (2, 10, 23)"),
        ([tmp_path / "odd.npy", out, "--operator", "tomography", "--noise-std", 0.1],
         "no square image has sinograms of 11 detectors"),
        ([tmp_path / "sino.npy", out, "--operator", "tomography", "--angles", 12, "--noise-std",
          0.1], "--angles 12, where the sinograms have 10 rows, one per angle: leave --angles "
                "out to take one angle per row"),
        ([tmp_path / "sino.npy", out, "--operator", "tomography", "--angle-range", 0,
          "--noise-std", 0.1], "invalid tomography operator options: the angle range must be"),
        # a sinogram as an 8-bit picture would be read scaled to [0, 1]: only float TIFFs
        ([tmp_path / "pic.png", out, "--operator", "tomography", "--noise-std", 0.1],
         "pic.png: holds 8-bit integers, which drip reads as images scaled to [0, 1]; these "
         "measurements are not images: give them as a 32-bit float TIFF, a .npy array or an "
         "HDF5 dataset"),
        ([tmp_path / "pic.png", out, "--operator", "matrix", "--matrix", tmp_path / "a.npz",
          "--noise-std", 0.1], "pictures hold images"),
        ([tmp_path / "pic.png", out, "--operator", "denoise", "--noise-percent", 1],
         "would be 0 (its measurements are all zero)"),
        ([tmp_path / "flat.npy", out, "--operator", "denoise", "--estimate-noise"],
         "2 of the 2 samples hold fewer, leaving out the patches of their pixels at their "
         "channel's least or greatest value, where the image may be clipped (sample 0: 0 "
         "patches, 1024 such pixels; samples 0, 1)"),
        ([tmp_path / "dark.npy", out, "--operator", "blur", "--blur-sigma", 2,
          "--estimate-noise"], "would be 0 (nothing in its measurements varies as noise does)"),
        ([tmp_path / "b.npy", out, "--operator", "denoise", "--noise-std", 0.1,
          "--ground-truth", tmp_path / "pic.png"], "the ground truth is shaped (1, 1, 16, 16)"),
    ]
    for args, message in cases:
        assert_one_line_error(run_cli("import", *args, "--quiet"), message, out)


def test_the_imported_file_reconstructs_as_the_simulated_one(tmp_path):
    """The measurements of a simulated file, imported with its noise levels, give the same
    TV reconstructions as the file itself."""
    op, b, sigma, images = _blurred_photos(tmp_path, 2.0, n=4, size=24)
    original = tmp_path / "o.h5"
    write_measurement_file(original, op, b, sigma, images)
    np.save(tmp_path / "b.npy", b)
    imported = tmp_path / "i.h5"
    psf = tmp_path / "psf.npy"
    np.save(psf, gaussian_psf(2.0))
    assert run_cli("import", tmp_path / "b.npy", imported, "--operator", "blur", "--psf", psf,
                   "--noise-std", float(sigma[0]), "--quiet").exit_code == 0
    with h5py.File(imported, "r+") as f:   # the per-sample levels, as the original has them
        f["noise_std"][...] = sigma
    results = []
    for path in (original, imported):
        out = tmp_path / f"r_{path.stem}.h5"
        assert run_cli("reconstruct", path, "--method", "tv", "--max-iterations", 300, "--out",
                       out, "--quiet").exit_code == 0
        with h5py.File(out) as f:
            results.append(f["reconstructions"][()])
    np.testing.assert_allclose(results[0], results[1], atol=1e-6)


def test_simulate_takes_the_same_mask_for_training_data(tmp_path):
    """``drip simulate --mask`` makes training data with the mask of a user's measurements
    (``--keep-fraction`` is then named as ignored), and import of those measurements with the
    mask gives the same operator."""
    mask = np.zeros((16, 16), np.uint8)
    mask[::2, 1::3] = 1
    Image.fromarray(mask * 255).save(tmp_path / "mask.png")
    simulated = tmp_path / "train.h5"
    result = run_cli("simulate", "phantom:ellipses", simulated, "--operator", "inpainting",
                     "--mask", tmp_path / "mask.png", "--keep-fraction", 0.3, "--image-size", 16,
                     "--num-images", 4, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert "--keep-fraction: not used with --mask" in result.stderr
    with MeasurementFile(simulated) as file:
        op = file.operator
        b = file.read(0, 4).measurements
    np.testing.assert_array_equal(op.mask.numpy(), mask)
    np.save(tmp_path / "b.npy", b)
    out = tmp_path / "m.h5"
    assert run_cli("import", tmp_path / "b.npy", out, "--operator", "inpainting", "--mask",
                   tmp_path / "mask.png", "--noise-std", 0.01, "--quiet").exit_code == 0
    with MeasurementFile(out) as file:
        _same_operator(file.operator, op)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.ones((8, 8)))
    assert_one_line_error(run_cli("simulate", "phantom:ellipses", tmp_path / "x.h5", "--operator",
                                  "inpainting", "--mask", wrong, "--image-size", 16, "--quiet"),
                          "the mask is shaped (8, 8), where the images are 16x16",
                          tmp_path / "x.h5")


def test_simulate_and_reconstruct_with_the_valid_boundary(tmp_path):
    """``drip simulate --blur-boundary valid`` measures the pixels whose PSF stays inside each
    image, and TV reconstructs the whole image from them, fitting every sample."""
    out = tmp_path / "v.h5"
    result = run_cli("simulate", "phantom:ellipses", out, "--operator", "blur", "--blur-sigma", 1,
                     "--blur-boundary", "valid", "--image-size", 24, "--num-images", 3, "--quiet")
    assert result.exit_code == 0, result.stderr
    with MeasurementFile(out) as file:
        assert file.operator.boundary == "valid" and file.image_shape == (1, 24, 24)
        assert file.read(0, 3).measurements.shape == (3, 1, 18, 18)
    recon = tmp_path / "r.h5"
    assert run_cli("reconstruct", out, "--method", "tv", "--out", recon, "--quiet").exit_code == 0
    with h5py.File(recon) as f, h5py.File(out) as m:
        assert f["reconstructions"].shape == (3, 1, 24, 24) and f["converged"][()].all()
        # quality on the measured positions: the 3-pixel margin is seen only in part
        u, x = f["reconstructions"][()], m["ground_truth"][()]
        np.testing.assert_allclose(f["psnr"][()], psnr(u[..., 3:21, 3:21], x[..., 3:21, 3:21]),
                                   rtol=1e-6)
        assert np.all(f["psnr"][()] > psnr(u, x))
    # a model of another image size is refused, and the message says why the sizes differ
    result = run_cli("reconstruct", out, "--model", SAMPLE_BLUR_MODEL, "--out", tmp_path / "d.h5")
    assert_one_line_error(result, "larger than the measurements by the PSF's size less one",
                          tmp_path / "d.h5")
    assert_one_line_error(run_cli("simulate", "phantom:ellipses", tmp_path / "x.h5", "--operator",
                                  "blur", "--blur-sigma", 3, "--blur-boundary", "valid",
                                  "--image-size", 16, "--quiet"),
                          "measures no pixel", tmp_path / "x.h5")


def test_training_losses_leave_the_valid_blurs_margin_out():
    """Training compares images where quality is measured: an error in the margin that the
    valid blur sees only in part costs nothing in the image term."""
    from drip_cli.training.trainer import reconstruction_loss

    op = Blur((1, 12, 12), gaussian_psf(1.0), "valid")   # a 7x7 PSF: a 3-pixel margin
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    u = x.clone()
    u[..., :3, :] += 1.0
    assert torch.all(reconstruction_loss(op, u, x, 1.0, 0.0) == 0)
    u[..., 5, 5] += 1.0
    assert torch.all(reconstruction_loss(op, u, x, 1.0, 0.0) > 0)


def test_a_camera_blur_imported_as_periodic_is_doubted(tmp_path):
    """Measurements cut out of a larger blurred scene do not wrap around at their edges: import
    with the periodic blur warns and names --blur-boundary valid; periodic measurements, or
    the valid boundary, import without a word."""
    for boundary, doubted in (("valid", True), ("periodic", False)):
        _, b, _, _ = _blurred_photos(tmp_path, 2.0, n=8, size=64, boundary=boundary)
        np.save(tmp_path / "b.npy", b)
        for given in ("periodic", "valid"):
            out = tmp_path / f"{boundary}_{given}.h5"
            result = run_cli("import", tmp_path / "b.npy", out, "--operator", "blur",
                             "--blur-sigma", 2, "--blur-boundary", given, "--noise-std", 0.01,
                             "--quiet")
            assert result.exit_code == 0, result.stderr
            warned = "--blur-boundary valid" in result.stderr and "warning" in result.stderr
            assert warned == (doubted and given == "periodic"), result.stderr


def test_an_array_given_for_a_measurement_file_names_drip_import(tmp_path):
    """``drip reconstruct`` given an array or a picture instead of a measurement file says how
    to make one, in its one line; ``drip info`` summarises the array or picture, and says it
    too."""
    np.save(tmp_path / "b.npy", np.zeros((2, 8, 8), np.float32))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "b.png")
    for name in ("b.npy", "b.png"):
        assert_one_line_error(run_cli("reconstruct", tmp_path / name, "--out", tmp_path / "r.h5",
                                      "--method", "tv"),
                              "drip import makes a measurement file", tmp_path / "r.h5")
        result = run_cli("info", tmp_path / name)
        assert result.exit_code == 0, result.stderr
        assert "drip import makes a measurement file" in " ".join(result.stdout.split())


def test_an_object_beyond_the_image_is_named(tmp_path):
    """Sinograms of 48x48 crops cut to the 45 detectors of a 32x32 image: the detectors that no
    ray through the 32x32 image reaches see the object. Imported with a noise level, a warning
    says so; with --estimate-noise (which would read the object as noise), one error line and
    no file. The same crops' own 32x32 centres import without a word."""
    angles = limited_angles(32, 120.0)
    images = load_images("skimage:camera,coffee", SourceOptions(crop_size=48, crops_per_image=2),
                         np.random.default_rng(1))
    wide, op = Tomography(images.shape[1:], angles), Tomography((1, 32, 32), angles)
    first = wide.n_detectors // 2 - op.n_detectors // 2
    beyond = wide(torch.from_numpy(images)).numpy()[..., first:first + op.n_detectors]
    inside = op(torch.from_numpy(images[..., 8:40, 8:40].copy())).numpy()
    rng = np.random.default_rng(2)
    for name, clean in (("beyond", beyond), ("inside", inside)):
        noisy = clean + 0.02 * np.abs(clean).mean() * rng.standard_normal(clean.shape)
        np.save(tmp_path / f"{name}.npy", noisy.astype(np.float32))
    options = ["--operator", "tomography", "--angle-range", 120]
    out = tmp_path / "m.h5"
    result = run_cli("import", tmp_path / "beyond.npy", out, *options, "--noise-percent", 2, "-q")
    assert result.exit_code == 0 and "the object extends beyond the image" in result.stderr
    out.unlink()
    assert_one_line_error(run_cli("import", tmp_path / "beyond.npy", out, *options,
                                  "--estimate-noise"), "would take the object for it", out)
    result = run_cli("import", tmp_path / "inside.npy", out, *options, "--estimate-noise", "-q")
    assert result.exit_code == 0 and result.stderr == "", result.stderr


def test_a_detector_narrower_than_the_image(tmp_path):
    """``drip simulate --detectors 46`` measures 48x48 crops with the 46 detectors of a 32x32
    image's diagonal (a centred window of the 48x48 image's 68); ``drip import --image-size 48``
    takes such sinograms as they are, without the warning a 32x32 image gives (at import and at
    reconstruct), and TV fits every sample of it, where at 32x32 none fits."""
    data = tmp_path / "w.h5"
    result = run_cli("simulate", "skimage:camera,coffee", data, "--operator", "tomography",
                     "--angles", 16, "--angle-range", 120, "--detectors", 46, "--crop-size", 48,
                     "--crops-per-image", 2, "--noise-percent", 2, "-q")
    assert result.exit_code == 0, result.stderr
    with MeasurementFile(data) as file:
        assert file.operator.measurement_shape == (1, 16, 46)
        assert file.operator.describe()["detector window"] == "46 of the image's 68, centred"
        batch = file.read(0, 4)
    np.save(tmp_path / "s.npy", batch.measurements)
    np.save(tmp_path / "x.npy", batch.ground_truth)
    for size, fits in ((48, 1.0), (None, 0.0)):
        out = tmp_path / f"m{size}.h5"
        options = [] if size is None else ["--image-size", size]
        result = run_cli("import", tmp_path / "s.npy", out, "--operator", "tomography",
                         "--angle-range", 120, "--noise-percent", 2, *options, "-q")
        assert result.exit_code == 0, result.stderr
        assert ("extends beyond the image" in result.stderr) == (size is None), result.stderr
        report = tmp_path / f"r{size}.json"
        result = run_cli("reconstruct", out, "--method", "tv", "--out", tmp_path / f"r{size}.h5",
                         "--report", report, "--max-iterations", 300, "-q")
        assert json.loads(report.read_text())["fit_fraction"] == fits
        # reconstruct says so too, before it solves (a file written through the Python API)
        assert ("extends beyond the image" in result.stderr) == (size is None), result.stderr


def test_clipped_pixels_do_not_pass_for_noiseless_ones():
    """Where a picture is clipped (a white sky), its noise is clipped too: the patches that hold
    a pixel at its channel's least or greatest value are left out, so a photograph brightened
    until 17% of it is white, with 2% noise, rounded to 8 bits and clipped, still reads within
    10% of its noise (with those patches: 0.78 times it)."""
    from drip_cli.data import measured

    rng = np.random.default_rng(0)
    x = np.clip(load_images("skimage:camera", SourceOptions(), rng)[0, 0] + 0.2, 0, 1)
    assert (x >= 1).mean() > 0.15
    sigma = 0.02 * x.mean()
    b = np.clip(np.round((x + sigma * rng.standard_normal(x.shape)) * 255), 0, 255) / 255
    ratio = measured.estimate_noise_std(make_operator("denoise", (1, *x.shape)),
                                        b[None, None].astype(np.float32)).std[0] / sigma
    assert abs(ratio - 1) < 0.1, ratio


def test_clipped_pictures_are_named_at_import(tmp_path):
    """Measured pictures of which many values sit at their channel's extremes (a white sky)
    get a warning that the linear model does not hold there; unclipped ones none."""
    rng = np.random.default_rng(0)
    x = load_images("skimage:camera", SourceOptions(crop_size=128, crops_per_image=2), rng)
    noisy = x + 0.02 * rng.standard_normal(x.shape)
    for name, values in (("clipped", np.clip(noisy + 0.3, 0, 1)), ("plain", noisy)):
        np.save(tmp_path / f"{name}.npy", values.astype(np.float32))
        result = run_cli("import", tmp_path / f"{name}.npy", tmp_path / f"{name}.h5",
                         "--operator", "denoise", "--noise-std", 0.02, "--quiet")
        assert result.exit_code == 0, result.stderr
        assert ("as where a camera clipped them" in result.stderr) == (name == "clipped"), name


def test_tomography_takes_any_angles_from_a_file(tmp_path):
    """``--angle-file`` gives the angles themselves (a text file, a .npy array or an HDF5
    dataset), for scans whose angles are not equispaced: simulate and import build the same
    operator from it; radians are named (once, though import reads the angles for its axis
    estimate and for the operator), and bad lists refused in one line."""
    angles = np.sort(np.random.default_rng(1).uniform(0.0, 150.0, 12))
    text = tmp_path / "angles.txt"
    text.write_text("# degrees\n" + ",".join(f"{a:.17g}" for a in angles[:6]) + "\n"
                    + "\n".join(f"{a:.17g}" for a in angles[6:]) + "\n")
    np.save(tmp_path / "angles.npy", angles[:, None])   # a column
    with h5py.File(tmp_path / "scan.h5", "w") as f:
        f["exchange/theta"] = angles
    np.save(tmp_path / "truth.npy", np.random.default_rng(0).random((2, 18, 18)))
    simulated = tmp_path / "s.h5"
    result = run_cli("simulate", tmp_path / "truth.npy", simulated, "--operator", "tomography",
                     "--angle-file", text, "--angles", 5, "--noise-percent", 1, "-q")
    assert result.exit_code == 0, result.stderr
    assert "--angles: not used with --angle-file, which gives the angles (ignored)" in result.stderr
    with MeasurementFile(simulated) as file:
        np.testing.assert_allclose(file.operator.angles_deg, angles, rtol=0, atol=1e-12)
        op = file.operator
    with h5py.File(simulated) as f:
        np.save(tmp_path / "b.npy", f["measurements"][()])
    for source in (tmp_path / "angles.npy", f"{tmp_path / 'scan.h5'}::exchange/theta"):
        out = tmp_path / "i.h5"
        result = run_cli("import", tmp_path / "b.npy", out, "--operator", "tomography",
                         "--angle-file", source, "--noise-percent", 1, "-q")
        assert result.exit_code == 0, result.stderr
        with MeasurementFile(out) as file:
            _same_operator(file.operator, op)
    np.save(tmp_path / "radians.npy", np.radians(angles))
    result = run_cli("simulate", tmp_path / "truth.npy", tmp_path / "r.h5", "--operator",
                     "tomography", "--angle-file", tmp_path / "radians.npy", "--noise-percent", 1,
                     "-q")
    assert result.exit_code == 0 and "if these are radians, convert them" in result.stderr
    # import reads the file once, for the axis estimate and the operator: one warning
    np.save(tmp_path / "narrow.npy", np.linspace(0.0, 5.0, 10))
    result = run_cli("import", tmp_path / "b.npy", tmp_path / "x.h5", "--operator", "tomography",
                     "--angle-file", tmp_path / "narrow.npy", "--center-offset", "auto",
                     "--noise-percent", 1)
    assert result.exit_code == 1 and result.stderr.count("if these are radians") == 1, \
        result.stderr
    (tmp_path / "words.txt").write_text("0 10 twenty\n")
    np.save(tmp_path / "square.npy", np.zeros((3, 4)))
    np.save(tmp_path / "nan.npy", np.array([0.0, np.nan]))
    np.save(tmp_path / "few.npy", angles[:10])
    for source, message in ((tmp_path / "words.txt", "cannot read the angles: 'twenty' is not a "
                                                     "number"),
                            (tmp_path / "square.npy", "must be a list of numbers (degrees), got "
                                                      "shape (3, 4)"),
                            (tmp_path / "nan.npy", "the angles contain NaN or Inf"),
                            (tmp_path / "missing.txt", "missing.txt: no such file"),
                            (tmp_path, "cannot read the angles as text"),   # a folder
                            (tmp_path / "few.npy", "holds 10 angles, where the sinograms have "
                                                   "12 rows, one per angle")):
        result = run_cli("import", tmp_path / "b.npy", tmp_path / "x.h5", "--operator",
                         "tomography", "--angle-file", source, "--noise-percent", 1)
        assert_one_line_error(result, message, tmp_path / "x.h5")


def test_an_axis_off_centre_is_simulated_imported_and_shown(tmp_path):
    """``--center-offset`` puts the rotation axis off the detector's centre in simulate and
    import alike (the same operator from both), and ``drip info`` shows it."""
    np.save(tmp_path / "truth.npy", np.random.default_rng(0).random((2, 18, 18)))
    simulated = tmp_path / "s.h5"
    result = run_cli("simulate", tmp_path / "truth.npy", simulated, "--operator", "tomography",
                     "--angles", 10, "--center-offset", -1.25, "--noise-percent", 1, "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(simulated) as f:
        np.save(tmp_path / "b.npy", f["measurements"][()])
    imported = tmp_path / "i.h5"
    result = run_cli("import", tmp_path / "b.npy", imported, "--operator", "tomography",
                     "--center-offset", -1.25, "--noise-percent", 1, "-q")
    assert result.exit_code == 0, result.stderr
    with MeasurementFile(simulated) as a, MeasurementFile(imported) as b:
        assert a.operator.center_offset == b.operator.center_offset == -1.25
        _same_operator(a.operator, b.operator)
    shown = [word for word in run_cli("info", imported).stdout.split() if word != "│"]
    assert "-1.25 detectors (the rotation axis on detector 11.75)" in " ".join(shown)


def _sinograms_about(offset, angles, angle_range=180.0, channels=1, n=4, detectors=None,
                     percent=0.0, seed=0):
    """``n`` sinograms of random images in the disc the 24x24 square holds (which the 34
    detectors see whole at any angle with the axis up to 5 detectors off centre) about an axis
    ``offset`` detectors from the detector line's centre, and their operator."""
    rng = np.random.default_rng(seed)
    op = Tomography((channels, 24, 24), limited_angles(angles, angle_range), detectors, offset)
    rows, cols = np.mgrid[:24, :24] - 11.5
    disc = np.hypot(rows, cols) < 12
    b = op(torch.from_numpy(rng.random((n, channels, 24, 24)) * disc)).numpy()
    b += percent / 100 * np.abs(b).mean() * rng.standard_normal(b.shape)
    return b, op


@pytest.mark.parametrize("offset", [-1.25, 0.0, 2.6])
@pytest.mark.parametrize("angles, angle_range, channels", [(60, 180.0, 1), (32, 120.0, 3),
                                                           (45, 360.0, 1)])
def test_the_rotation_axis_is_found_from_the_sinograms(offset, angles, angle_range, channels):
    """The sinograms' centres of mass circle the axis's detector: without noise the estimate
    is within 0.05 detectors of the truth, full, limited (120 degrees) and 360-degree scans,
    colour too; with 2% noise within three standard errors, which stay below 0.1."""
    from drip_cli.data.axis import AXIS_TOLERANCE, estimate_axis

    b, op = _sinograms_about(offset, angles, angle_range, channels)
    estimate = estimate_axis(b, op.angles_deg)
    assert abs(estimate.offset - offset) < 0.05, estimate
    assert (estimate.used, estimate.total) == (4 * channels, 4 * channels)
    b, op = _sinograms_about(offset, angles, angle_range, channels, n=8, percent=2.0)
    noisy = estimate_axis(b, op.angles_deg)
    assert noisy.uncertainty < AXIS_TOLERANCE, noisy
    assert abs(noisy.offset - offset) < 3 * noisy.uncertainty, noisy


def test_the_rotation_axis_is_not_estimated_where_the_data_cannot_tell_it():
    """No estimate where projections lose part of the object (a detector narrower than its
    shadow), from fewer than five angles, from sinograms of zeros or NaN; an estimate from a
    narrow range of noisy angles carries an uncertainty above the tolerance."""
    from drip_cli.data.axis import AXIS_TOLERANCE, estimate_axis

    b, op = _sinograms_about(1.0, 32, detectors=22)   # the image's own line has 34
    assert "keeps its mass" in estimate_axis(b, op.angles_deg)
    assert "at least 5 different angles" in estimate_axis(b[..., :4, :], op.angles_deg[:4])
    for bad in (np.zeros_like(b), np.full_like(b, np.nan)):
        assert isinstance(estimate_axis(bad, op.angles_deg), str)
    b, op = _sinograms_about(1.0, 16, angle_range=30.0, percent=2.0)
    assert estimate_axis(b, op.angles_deg).uncertainty > AXIS_TOLERANCE


def test_import_finds_the_axis_and_doubts_a_wrong_one(tmp_path):
    """``--center-offset auto`` writes the estimated axis and says so; an import, and a
    reconstruction, whose axis is 1.5 detectors from the sinograms' are warned, naming the
    estimate; data that cannot tell the axis are refused in one line, and so is a word that is
    not a number."""
    b, op = _sinograms_about(1.5, 40, n=6, percent=1.0)
    np.save(tmp_path / "b.npy", b.astype(np.float32))
    common = ("--operator", "tomography", "--noise-percent", 1)
    found = tmp_path / "found.h5"
    result = run_cli("import", tmp_path / "b.npy", found, *common, "--center-offset", "auto")
    assert result.exit_code == 0 and "warning" not in result.stderr, result.stderr
    assert "center offset (estimated)" in result.stdout
    with MeasurementFile(found) as data:
        assert abs(data.operator.center_offset - 1.5) < 0.1
    with h5py.File(found) as f:
        assert f.attrs["center_offset_sinograms"] == "6 of 6"
        assert 0 < f.attrs["center_offset_uncertainty"] < 0.1
    wrong = tmp_path / "wrong.h5"
    result = run_cli("import", tmp_path / "b.npy", wrong, *common, "-q")
    assert result.exit_code == 0, result.stderr
    turn = re.search(r"the sinograms turn about detector ([\d.]+) .* not about detector 17,",
                     result.stderr)
    hint = re.search(r"--center-offset auto \(or ([\d.]+)\)", result.stderr)
    assert abs(float(turn[1]) - 18.5) < 0.1 and abs(float(hint[1]) - 1.5) < 0.1, result.stderr
    for source, warned in ((found, False), (wrong, True)):
        result = run_cli("reconstruct", source, "--out", tmp_path / "r.h5", "--method", "cgls",
                         "--max-iterations", 3, "-q")
        assert result.exit_code == 0, result.stderr
        assert ("the sinograms turn about" in result.stderr) == warned, result.stderr
        shown = " ".join(word for word in run_cli("info", source).stdout.split() if word != "│")
        assert re.search(r"center offset, from the sinograms 1\.[45]\d ± 0\.\d+ detectors, "
                         "from the centres of mass of 6 of 6 sinograms", shown), shown
    narrow, op = _sinograms_about(1.5, 40, detectors=22)
    np.save(tmp_path / "narrow.npy", narrow)
    result = run_cli("import", tmp_path / "narrow.npy", tmp_path / "x.h5", *common,
                     "--image-size", 24, "--center-offset", "auto")
    assert_one_line_error(result, "cannot estimate the rotation axis from the sinograms: no "
                          "sinogram keeps its mass", tmp_path / "x.h5")
    result = run_cli("import", tmp_path / "b.npy", tmp_path / "x.h5", *common,
                     "--center-offset", "left")
    assert_one_line_error(result, "--center-offset must be a number of detectors or auto, "
                          "got 'left'", tmp_path / "x.h5")


def test_info_checks_the_axis_on_every_sinogram_as_import_does(tmp_path):
    """``drip info`` estimates the axis from every sinogram of a measurement file, read 64
    samples at a time from the file, so that it shows what ``--center-offset auto`` found: the
    same offset to the digits shown, from the same 70 sinograms."""
    from drip_cli.data.axis import estimate_axis

    b, op = _sinograms_about(-0.7, 24, n=70, percent=1.0)
    np.save(tmp_path / "b.npy", b.astype(np.float32))
    out = tmp_path / "found.h5"
    result = run_cli("import", tmp_path / "b.npy", out, "--operator", "tomography",
                     "--noise-percent", 1, "--center-offset", "auto", "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out) as f:
        assert f.attrs["center_offset_sinograms"] == "70 of 70"
        from_file = estimate_axis(f["measurements"], op.angles_deg)   # read in two blocks
        whole = estimate_axis(f["measurements"][()], op.angles_deg)
    assert (from_file.offset, from_file.uncertainty) == (whole.offset, whole.uncertainty)
    with MeasurementFile(out) as data:
        assert data.operator.center_offset == pytest.approx(whole.offset, abs=1e-6)
    shown = " ".join(word for word in run_cli("info", out).stdout.split() if word != "│")
    assert f"center offset, from the sinograms {whole.describe()}" in shown, shown


def test_projections_are_read_as_the_sinograms_of_their_slices(tmp_path):
    """``--projections`` reads a scanner's projections, ``(angles, slices, detectors)`` as
    Data Exchange stores them (an HDF5 dataset, a ``.npy`` array, or a float TIFF page per
    angle), as the sinograms of the slices: the same file as the sinograms give; colour projections, and the option with
    another operator, are refused in one line."""
    b, op = _sinograms_about(0.0, 12, n=5, percent=1.0)   # (slices, 1, angles, detectors)
    np.save(tmp_path / "sinograms.npy", b.astype(np.float32))
    with h5py.File(tmp_path / "scan.h5", "w") as f:
        f["exchange/data"] = b[:, 0].transpose(1, 0, 2).astype(np.float32)
    np.save(tmp_path / "projections.npy", b[:, 0].transpose(1, 0, 2).astype(np.float32))
    pages = [Image.fromarray(page) for page in b[:, 0].transpose(1, 0, 2).astype(np.float32)]
    pages[0].save(tmp_path / "projections.tif", save_all=True, append_images=pages[1:])
    common = ("--operator", "tomography", "--noise-std", 0.01, "-q")
    result = run_cli("import", tmp_path / "sinograms.npy", tmp_path / "s.h5", *common)
    assert result.exit_code == 0, result.stderr
    expected = _read(tmp_path / "s.h5")[0]["measurements"]
    for source in (f"{tmp_path / 'scan.h5'}::exchange/data", tmp_path / "projections.npy",
                   tmp_path / "projections.tif"):   # a float page per angle
        result = run_cli("import", source, tmp_path / "p.h5", *common, "--projections")
        assert result.exit_code == 0, result.stderr
        data, attrs = _read(tmp_path / "p.h5")
        np.testing.assert_array_equal(data["measurements"], expected)
        assert attrs["source_layout"] == "projections (angles, slices, detectors)"
        with MeasurementFile(tmp_path / "p.h5") as imported:
            _same_operator(imported.operator, op)
        (tmp_path / "p.h5").unlink()
    np.save(tmp_path / "colour.npy", np.repeat(b.transpose(2, 1, 0, 3), 3, axis=1))
    result = run_cli("import", tmp_path / "colour.npy", tmp_path / "p.h5", *common,
                     "--projections")
    assert_one_line_error(result, "it has 3 channels: projections have one", tmp_path / "p.h5")
    result = run_cli("import", tmp_path / "sinograms.npy", tmp_path / "p.h5", "--like",
                     tmp_path / "s.h5", "--noise-std", 0.01, "--projections")
    assert result.exit_code == 1 and "shaped" in result.stderr   # 5 angles of 12 slices
    result = run_cli("import", tmp_path / "projections.npy", tmp_path / "p.h5", "--operator",
                     "denoise", "--noise-std", 0.01, "--projections", "-q")
    assert result.exit_code == 0 and "--projections: not used by --operator denoise" in \
        result.stderr, result.stderr


def test_a_detectors_counts_are_turned_into_line_integrals(tmp_path):
    """``--flat`` (and ``--dark``) read a scanner's raw counts, 16-bit integers kept as they
    are, and write their line integrals ``-log((I - dark) / (flat - dark))``: within the
    counts' rounding of the true ones, with a stack of flat fields averaged. A count at the
    dark field is warned of and taken as the least transmission; a flat field no brighter than
    the dark at a detector, a field of another shape and ``--dark`` alone are refused in one
    line."""
    b, op = _sinograms_about(0.0, 12, n=5)
    b = 0.05 * b                                    # line integrals up to about 1
    rng = np.random.default_rng(2)
    dark = rng.uniform(90, 110, (5, op.n_detectors))
    flats = rng.uniform(20000, 40000, (3, 5, op.n_detectors))
    counts = dark[:, None, None] + (flats.mean(0) - dark)[:, None, None] * np.exp(-b)
    projections = np.round(counts[:, 0].transpose(1, 0, 2)).astype(np.uint16)
    np.save(tmp_path / "counts.npy", projections)
    np.save(tmp_path / "flat.npy", flats.astype(np.float32))
    np.save(tmp_path / "dark.npy", dark.astype(np.float32))
    common = ("--operator", "tomography", "--projections", "--noise-std", 0.01)
    out = tmp_path / "m.h5"
    result = run_cli("import", tmp_path / "counts.npy", out, *common, "--flat",
                     tmp_path / "flat.npy", "--dark", tmp_path / "dark.npy", "-q")
    assert result.exit_code == 0 and "warning" not in result.stderr, result.stderr
    data, attrs = _read(out)
    np.testing.assert_allclose(data["measurements"], b, atol=2e-4)
    assert attrs["line_integrals_from"] == "-log((counts - dark) / (flat - dark))"
    out.unlink()
    projections[3, 2, 10] = 0                       # no light at all
    np.save(tmp_path / "counts.npy", projections)
    result = run_cli("import", tmp_path / "counts.npy", out, *common, "--flat",
                     tmp_path / "flat.npy", "--dark", tmp_path / "dark.npy", "-q")
    assert result.exit_code == 0 and "1 of the 2040 counts are at or below the dark field" in \
        result.stderr, result.stderr
    assert np.isfinite(_read(out)[0]["measurements"]).all()
    flats[:, 1, 4] = dark[1, 4]
    np.save(tmp_path / "flat.npy", flats)
    result = run_cli("import", tmp_path / "counts.npy", tmp_path / "x.h5", *common, "--flat",
                     tmp_path / "flat.npy", "--dark", tmp_path / "dark.npy")
    assert_one_line_error(result, "the flat field is not brighter than the dark field at 1 of "
                          "its 170 detectors (the first: slice 1, detector 4)", tmp_path / "x.h5")
    np.save(tmp_path / "flat.npy", flats[:, :4])
    result = run_cli("import", tmp_path / "counts.npy", tmp_path / "x.h5", *common, "--flat",
                     tmp_path / "flat.npy")
    assert_one_line_error(result, "the flat field is shaped (4, 34) with 1 channel(s)",
                          tmp_path / "x.h5")
    result = run_cli("import", tmp_path / "counts.npy", tmp_path / "x.h5", *common, "--dark",
                     tmp_path / "dark.npy")
    assert_one_line_error(result, "--dark needs --flat", tmp_path / "x.h5")


def test_slices_of_a_scan_are_read_alone(tmp_path):
    """``--slices START:STOP`` keeps those slices of a stack, reading only them: the samples
    of sinograms (a ``.npy`` array), the slices of projections (an HDF5 dataset) with their
    flat field's and ground truth's, the same values as the whole file's; a selection that
    keeps nothing, one past the end (not cut short in silence), one that is not START:STOP,
    and a lone sinogram are refused in one line."""
    b, op = _sinograms_about(0.0, 12, n=5)
    truth = np.random.default_rng(0).random((5, 1, 24, 24)).astype(np.float32)
    np.save(tmp_path / "sinograms.npy", b.astype(np.float32))
    np.save(tmp_path / "truth.npy", truth)
    flat = np.full((2, 5, op.n_detectors), 1000.0)
    counts = (flat[0][:, None, None] * np.exp(-0.05 * b)).astype(np.float32)
    with h5py.File(tmp_path / "scan.h5", "w") as f:
        f["exchange/data"] = counts[:, 0].transpose(1, 0, 2)
        f["exchange/data_white"] = flat
    common = ("--operator", "tomography", "--noise-std", 0.01, "-q")
    result = run_cli("import", tmp_path / "sinograms.npy", tmp_path / "s.h5", *common,
                     "--slices", "1:3", "--ground-truth", tmp_path / "truth.npy")
    assert result.exit_code == 0, result.stderr
    data, attrs = _read(tmp_path / "s.h5")
    np.testing.assert_array_equal(data["measurements"], b[1:3].astype(np.float32))
    with MeasurementFile(tmp_path / "s.h5") as imported:
        np.testing.assert_array_equal(imported.read(0, 2).ground_truth, truth[1:3])
    assert attrs["source_slices"] == "1:3"
    scan = tmp_path / "scan.h5"
    result = run_cli("import", f"{scan}::exchange/data", tmp_path / "p.h5", *common,
                     "--projections", "--flat", f"{scan}::exchange/data_white", "--slices", "4")
    assert result.exit_code == 0, result.stderr
    np.testing.assert_allclose(_read(tmp_path / "p.h5")[0]["measurements"], 0.05 * b[4:5],
                               atol=1e-5)
    assert ("--projections --flat scan.h5::exchange/data_white --center-offset auto"
            in run_cli("info", scan).stderr)   # the import command drip info gives
    for given, message in (("7:9", "--slices 7:9 keeps none of its 5 slices"),
                           ("3:9", "--slices 3:9 goes past the end of its 5 slices (0 to 4; "
                                   "the stop excluded, so at most 3:5)"),
                           ("3:2", "--slices must be START:STOP"),
                           ("a:b", "--slices must be START:STOP")):
        result = run_cli("import", tmp_path / "sinograms.npy", tmp_path / "x.h5", *common,
                         "--slices", given)
        assert_one_line_error(result, message, tmp_path / "x.h5")
    np.save(tmp_path / "one.npy", b[0, 0].astype(np.float32))
    result = run_cli("import", tmp_path / "one.npy", tmp_path / "x.h5", *common, "--slices", "0")
    assert_one_line_error(result, "which holds no stack of slices for --slices to pick from",
                          tmp_path / "x.h5")


def test_slices_of_pictures_decode_only_their_frames_and_rows(tmp_path):
    """``--slices`` on pictures reads only what it keeps, as it does on arrays: of a
    multi-page TIFF of sinograms (or a folder of them, the samples counted across the files)
    only the kept pages are decoded, and of a folder of float TIFF projections (one per angle)
    only the kept rows are kept; values the slices leave out (here NaN, which a page read whole
    refuses) do not matter. The same values as the array's slices; projections of different
    sizes, and slices past the end, are refused in one line."""
    b, _ = _sinograms_about(0.0, 12, n=5)
    b = b.astype(np.float32)
    sinograms = b[:, 0].copy()
    sinograms[0, 2, 3] = np.nan   # a page the slices leave out
    pages = [Image.fromarray(page) for page in sinograms]
    pages[0].save(tmp_path / "sinograms.tif", save_all=True, append_images=pages[1:])
    common = ("--operator", "tomography", "--noise-std", 0.01, "-q")
    result = run_cli("import", tmp_path / "sinograms.tif", tmp_path / "s.h5", *common,
                     "--slices", "2:5")
    assert result.exit_code == 0, result.stderr
    np.testing.assert_array_equal(_read(tmp_path / "s.h5")[0]["measurements"], b[2:5])
    stacks = tmp_path / "stacks"   # a folder of stacks: the samples counted across its files
    stacks.mkdir()
    pages[0].save(stacks / "a.tif", save_all=True, append_images=pages[1:3])
    pages[3].save(stacks / "b.tif", save_all=True, append_images=pages[4:])
    for given, kept in (("2:4", b[2:4]), ("3", b[3:4]), ("1:5", b[1:5])):
        result = run_cli("import", stacks, tmp_path / "f.h5", *common, "--slices", given)
        assert result.exit_code == 0, result.stderr
        np.testing.assert_array_equal(_read(tmp_path / "f.h5")[0]["measurements"], kept)
        (tmp_path / "f.h5").unlink()
    result = run_cli("import", stacks, tmp_path / "x.h5", *common, "--slices", "2:6")
    assert_one_line_error(result, "--slices 2:6 goes past the end of its 5 slices",
                          tmp_path / "x.h5")
    projections = b[:, 0].transpose(1, 0, 2).copy()   # (angles, slices, detectors)
    projections[:, 0, 5] = np.nan   # a slice the slices leave out
    folder = tmp_path / "projections"
    folder.mkdir()
    for angle, projection in enumerate(projections):
        Image.fromarray(projection).save(folder / f"p{angle:03d}.tif")
    result = run_cli("import", folder, tmp_path / "p.h5", *common, "--projections",
                     "--slices", "1:4")
    assert result.exit_code == 0, result.stderr
    np.testing.assert_array_equal(_read(tmp_path / "p.h5")[0]["measurements"], b[1:4])
    result = run_cli("import", folder, tmp_path / "x.h5", *common, "--projections",
                     "--slices", "5:9")
    assert_one_line_error(result, "--slices 5:9 keeps none of its 5 slices", tmp_path / "x.h5")
    result = run_cli("import", folder, tmp_path / "x.h5", *common, "--projections",
                     "--slices", "1:9")   # the rows of each projection
    assert_one_line_error(result, "--slices 1:9 goes past the end of its 5 slices",
                          tmp_path / "x.h5")
    Image.fromarray(projections[3, :4]).save(folder / "p003.tif")
    result = run_cli("import", folder, tmp_path / "x.h5", *common, "--projections",
                     "--slices", "1:4")
    assert_one_line_error(result, "is 4x", tmp_path / "x.h5")
    assert "the measurements of one file must share their shape" in result.stderr


@pytest.mark.parametrize("share", [0.3, 0.5, 0.8, 0.99])
def test_a_cut_tiff_stack_is_refused_in_one_line(share, tmp_path):
    """A multi-page TIFF cut short (a copy that stopped) is refused as an unreadable picture
    by every command that reads pictures, whole or a few pages of it: Pillow's error where it
    counts or seeks the pages of a cut file is a TypeError ('Missing dimensions'), which was
    reported as an unexpected error, after a Python warning of Pillow's."""
    b, _ = _sinograms_about(0.0, 12, n=6)
    pages = [Image.fromarray(page) for page in b[:, 0].astype(np.float32)]
    pages[0].save(tmp_path / "whole.tif", save_all=True, append_images=pages[1:])
    data = (tmp_path / "whole.tif").read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[:int(share * len(data))])
    out = tmp_path / "m.h5"
    common = ("--operator", "tomography", "--noise-std", 0.01, "-q")
    for args in (("import", cut, out, *common), ("import", cut, out, *common, "--slices", "0:2"),
                 ("import", cut, out, *common, "--projections", "--slices", "1:3"),
                 ("simulate", cut, out, "--operator", "denoise"), ("info", cut)):
        result = run_cli(*args)
        assert result.exit_code in (0, 1), result.stderr
        assert "unexpected" not in result.stderr, (args, result.stderr)
        if result.exit_code == 1:
            assert_one_line_error(result, "cut.tif: ", out)
        out.unlink(missing_ok=True)
    # in a process of its own, where Python shows warnings (pytest records them): one line
    done = subprocess.run([sys.executable, "-m", "drip_cli", "info", str(cut)],
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 1 and done.stderr.startswith(f"drip: error: {cut}: "), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr   # no "Corrupt EXIF data"
