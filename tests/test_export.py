"""``drip export``: PNG files of a drip file's images, read back by ``drip simulate``, or a
dataset as a ``.npy`` array, read back by ``drip import``, or grayscale images as a float TIFF
stack."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import make_operator
from helpers import assert_one_line_error, run_cli, write_small_file


def _measurements(tmp_path, kind="blur", n=5, shape=(1, 16, 20), name="m.h5"):
    path = tmp_path / name
    truth = write_small_file(path, make_operator(kind, shape), n=n)
    return path, truth


@pytest.mark.parametrize("bits,step", [(8, 255), (16, 65535)])
def test_ground_truth_round_trips_through_png_and_simulate(tmp_path, bits, step):
    """Exported at 8 or 16 bits and read back as a folder of pictures by ``drip simulate``,
    the ground truth comes back within half a quantisation step, in the same order."""
    path, truth = _measurements(tmp_path, n=12)
    folder = tmp_path / "png"
    result = run_cli("export", path, folder, "--bits", bits, "--quiet")
    assert result.exit_code == 0, result.stderr
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"ground_truth_{i:04d}.png" for i in range(12)]
    with Image.open(folder / names[0]) as picture:
        # older Pillow (9.2 and 9.3 here) opens a 16-bit grayscale PNG as "I" (32-bit integers)
        assert picture.mode in (("L",) if bits == 8 else ("I;16", "I")) and picture.size == (20, 16)
    back = tmp_path / "back.h5"
    result = run_cli("simulate", folder, back, "--operator", "denoise", "--noise-percent", "1",
                     "--quiet")
    assert result.exit_code == 0, result.stderr
    with h5py.File(back) as f:
        again = f["ground_truth"][()]
    assert again.shape == truth.shape
    assert np.abs(again - np.clip(truth, 0, 1)).max() <= 0.5 / step + 1e-6


def test_reconstructions_are_clipped_and_counted(tmp_path):
    """A reconstruction file's images by default; values outside [0, 1] are clipped, and the
    summary gives their share."""
    path, _ = _measurements(tmp_path)
    recon = tmp_path / "r.h5"
    assert run_cli("reconstruct", path, "--method", "cgls", "--out", recon, "--quiet").exit_code == 0
    with h5py.File(recon) as f:
        images = f["reconstructions"][()]
    outside = np.mean((images < 0) | (images > 1))
    assert outside > 0   # CGLS overshoots somewhere: the clipping is exercised
    folder = tmp_path / "out" / "pictures"   # parents are made
    result = run_cli("export", recon, folder, "--max-samples", "3")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in folder.iterdir()) == [f"reconstructions_{i:04d}.png"
                                                       for i in range(3)]
    assert f"{100 * np.mean((images[:3] < 0) | (images[:3] > 1)):.2f}%" in result.stdout
    for i in range(3):
        with Image.open(folder / f"reconstructions_{i:04d}.png") as picture:
            levels = np.asarray(picture)
        expected = np.rint(np.clip(images[i, 0].astype(np.float64), 0, 1) * 255)
        assert np.array_equal(levels, expected.astype(np.uint8))


def test_one_image_as_a_png_file_and_file_names_that_are_not_folders(tmp_path):
    """``OUT.png`` takes one image (a file of one sample, or --max-samples 1) as that file,
    and is refused for more; other file names are refused, where they all became folders of
    PNG files (``drip export r.h5 x.png`` made a folder x.png). A folder so named is used."""
    path, truth = _measurements(tmp_path, n=3)
    result = run_cli("export", path, tmp_path / "first.png", "--max-samples", 1)
    assert result.exit_code == 0, result.stderr
    assert "wrote 1 PNG file " in result.stdout
    with Image.open(tmp_path / "first.png") as picture:
        levels = np.asarray(picture)
    assert np.array_equal(levels, np.rint(np.clip(truth[0, 0], 0, 1) * 255))
    assert_one_line_error(run_cli("export", path, tmp_path / "all.png"),
                          "is one PNG file, but dataset 'ground_truth' holds 3 images: give "
                          "--max-samples 1", tmp_path / "all.png")
    for name in ("x.jpg", "x.h5", "x.JSON"):
        assert_one_line_error(run_cli("export", path, tmp_path / name),
                              f"is named as a .{name[2:]} file, but drip export writes PNG "
                              "files", tmp_path / name)
    (tmp_path / "made.png").mkdir()
    result = run_cli("export", path, tmp_path / "made.png", "-q")
    assert result.exit_code == 0 and len(list((tmp_path / "made.png").iterdir())) == 3
    single, _ = _measurements(tmp_path, n=1, name="one.h5")
    result = run_cli("export", single, tmp_path / "one.png", "-q")
    assert result.exit_code == 0 and (tmp_path / "one.png").is_file(), result.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_colour_and_image_measurements(tmp_path):
    """Colour images become RGB files (8 bits only); measurements that are images export,
    a sinogram does not."""
    path, truth = _measurements(tmp_path, kind="inpainting", shape=(3, 12, 14), n=2)
    result = run_cli("export", path, tmp_path / "rgb", "--quiet")
    assert result.exit_code == 0, result.stderr
    with Image.open(tmp_path / "rgb" / "ground_truth_0001.png") as picture:
        assert picture.mode == "RGB"
        levels = np.asarray(picture)
    assert np.array_equal(levels, np.rint(np.moveaxis(np.clip(truth[1], 0, 1), 0, -1) * 255))
    result = run_cli("export", path, tmp_path / "b", "--dataset", "measurements", "--quiet")
    assert result.exit_code == 0 and len(list((tmp_path / "b").iterdir())) == 2
    assert_one_line_error(run_cli("export", path, tmp_path / "c", "--bits", "16"),
                          "grayscale images only", tmp_path / "c")
    tomo, _ = _measurements(tmp_path, kind="tomography", name="t.h5")
    assert_one_line_error(run_cli("export", tomo, tmp_path / "d", "--dataset", "measurements"),
                          "are not images", tmp_path / "d")
    with h5py.File(path, "r+") as f:   # a damaged kind is not an image kind either
        f["operator"].attrs["kind"] = np.array([1, 2])
    assert_one_line_error(run_cli("export", path, tmp_path / "e", "--dataset", "measurements"),
                          "operator kind array([1, 2]) are not images", tmp_path / "e")


def test_bad_inputs_leave_nothing(tmp_path):
    """One error line, exit status 1 and no folder for: a missing file, a model, a dataset the
    file does not hold, a NaN in a later sample (files already written are taken back), images
    of no pixels; a --bits other than 8 or 16 is a usage error."""
    path, _ = _measurements(tmp_path)
    out = tmp_path / "out"
    assert_one_line_error(run_cli("export", tmp_path / "none.h5", out), "no such file", out)
    assert_one_line_error(run_cli("export", path, out, "--dataset", "reconstructions"),
                          "not 'reconstructions'", out)
    recon = tmp_path / "r.h5"
    assert run_cli("reconstruct", path, "--method", "cgls", "--out", recon, "--quiet").exit_code == 0
    with h5py.File(recon, "r+") as f:
        f["reconstructions"][3, 0, 2, 2] = np.nan
    assert_one_line_error(run_cli("export", recon, out), "NaN or Inf at sample 3", out)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())   # no staging left
    with h5py.File(path, "r+") as f:
        del f["ground_truth"]
        f["ground_truth"] = np.zeros((5, 1, 0, 20), np.float32)
    assert_one_line_error(run_cli("export", path, out), "no images to write", out)
    result = run_cli("export", path, out, "--bits", "12")
    assert result.exit_code == 2 and not out.exists()


@pytest.mark.parametrize("kind", ["tomography", "matrix", "blur"])
def test_any_measurements_round_trip_through_npy_and_import(tmp_path, kind):
    """A ``.npy`` path gets the dataset as one array, values as stored (not clipped), of any
    operator's measurements; ``drip import --like`` reads it back to the same file's data."""
    path, truth = _measurements(tmp_path, kind=kind, n=4, shape=(1, 12, 12))
    sinograms, images = tmp_path / "b.npy", tmp_path / "x.npy"
    result = run_cli("export", path, sinograms, "--dataset", "measurements", "--bits", "16")
    assert result.exit_code == 0, result.stderr
    assert "--bits" in result.stderr and "ignored" in result.stderr
    assert run_cli("export", path, images, "--quiet").exit_code == 0
    with h5py.File(path) as f:
        b, sigma = f["measurements"][()], f["noise_std"][()]
    np.testing.assert_array_equal(np.load(sinograms), b)
    np.testing.assert_array_equal(np.load(images), truth)
    out = tmp_path / "back.h5"
    result = run_cli("import", sinograms, out, "--like", path, "--noise-std", float(sigma[0]),
                     "--ground-truth", images, "--quiet")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["measurements"][()], b)
        np.testing.assert_array_equal(f["ground_truth"][()], truth)


def test_reconstructions_as_npy_and_bad_arrays_leave_nothing(tmp_path):
    """A reconstruction file's reconstructions, the first ``--max-samples``, unclipped; a NaN
    in a later sample, a model or a dataset the file kind lacks give one line and no file."""
    path, _ = _measurements(tmp_path)
    recon = tmp_path / "r.h5"
    assert run_cli("reconstruct", path, "--method", "cgls", "--out", recon, "--quiet").exit_code == 0
    out = tmp_path / "r.npy"
    result = run_cli("export", recon, out, "--max-samples", 2)
    assert result.exit_code == 0, result.stderr
    assert "(2, 1, 16, 20)" in result.stdout
    with h5py.File(recon, "r+") as f:
        np.testing.assert_array_equal(np.load(out), f["reconstructions"][:2])
        f["reconstructions"][3, 0, 2, 2] = np.nan
    bad = tmp_path / "bad.npy"
    assert_one_line_error(run_cli("export", recon, bad), "NaN or Inf at sample 3", bad)
    assert_one_line_error(run_cli("export", path, bad, "--dataset", "reconstructions"),
                          "arrays are ground_truth or measurements", bad)
    model = Path(__file__).resolve().parent.parent / "sample_data" / "drip_blur.safetensors"
    assert_one_line_error(run_cli("export", model, bad), "a model holds no samples", bad)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())   # no temporary left


def test_simulate_reads_image_arrays_back(tmp_path):
    """``drip simulate`` takes a ``.npy`` image array as it takes an HDF5 image file: the ground
    truth exported as an array comes back exactly; uint8 is scaled to [0, 1]; one ``(H, W)``
    image is one sample; a channels-last array, a text file and an array of strings give one
    line and no file."""
    path, truth = _measurements(tmp_path, n=3)
    images = tmp_path / "x.npy"
    assert run_cli("export", path, images, "--quiet").exit_code == 0
    out = tmp_path / "again.h5"
    result = run_cli("simulate", images, out, "--operator", "tomography", "--angles", 6, "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["ground_truth"][()], truth)
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.save(tmp_path / "u8.npy", levels)
    result = run_cli("simulate", tmp_path / "u8.npy", out, "--operator", "denoise", "--channels",
                     3, "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out) as f:
        back = f["ground_truth"][()]
    assert back.shape == (1, 3, 16, 16)
    np.testing.assert_allclose(back[0, 1], levels / 255.0, rtol=1e-6)
    np.save(tmp_path / "hwc.npy", np.zeros((2, 16, 16, 3), np.float32))
    np.save(tmp_path / "words.npy", np.array(["a", "b"]))
    (tmp_path / "text.npy").write_text("1 2 3")
    bad = tmp_path / "bad.h5"
    for name, message in (("hwc.npy", "looks channels-last"), ("words.npy", "real numbers"),
                          ("text.npy", "not a .npy array")):
        assert_one_line_error(run_cli("simulate", tmp_path / name, bad, "--operator", "denoise"),
                              message, bad)


def test_reconstructions_as_a_float_tiff_stack_and_back(tmp_path):
    """A TIFF holds a grayscale dataset as 32-bit float pages, unclipped, one per sample, which
    ImageJ reads as a stack and ``drip simulate`` reads back exactly; colour, a NaN in a later
    sample and a model give one line and no file."""
    path, _ = _measurements(tmp_path)
    recon = tmp_path / "r.h5"
    assert run_cli("reconstruct", path, "--method", "cgls", "--out", recon, "--quiet").exit_code == 0
    out = tmp_path / "r.tif"
    result = run_cli("export", recon, out, "--max-samples", 3, "--bits", 16)
    assert result.exit_code == 0, result.stderr
    assert "--bits: a TIFF keeps the values as stored (ignored)" in result.stderr
    with h5py.File(recon) as f:
        images = f["reconstructions"][:3]
    assert ((images < 0) | (images > 1)).any()   # kept, not clipped
    with Image.open(out) as stack:
        assert stack.n_frames == 3 and stack.mode == "F" and stack.size == (20, 16)
    back = tmp_path / "back.h5"
    result = run_cli("simulate", out, back, "--operator", "denoise", "--noise-percent", 1, "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(back) as f:
        np.testing.assert_array_equal(f["ground_truth"][()], images)

    with h5py.File(recon, "r+") as f:
        f["reconstructions"][3, 0, 2, 2] = np.nan
    bad = tmp_path / "bad.tiff"
    assert_one_line_error(run_cli("export", recon, bad), "NaN or Inf at sample 3", bad)
    colour, _ = _measurements(tmp_path, shape=(3, 12, 14), n=2, name="c.h5")
    assert_one_line_error(run_cli("export", colour, bad), "has 3 channels; a TIFF is written "
                          "for grayscale images", bad)
    model = Path(__file__).resolve().parent.parent / "sample_data" / "drip_blur.safetensors"
    assert_one_line_error(run_cli("export", model, bad), "a model holds no images", bad)
    assert_one_line_error(run_cli("export", tmp_path, bad), "is a folder: export takes a "
                          "reconstruction or measurement file", bad)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())   # no temporary left


def test_sinograms_round_trip_through_a_float_tiff_and_import(tmp_path):
    """CT software keeps sinograms as float TIFF stacks: a measurement file's sinograms go out
    as one (rows the angles) and come back through ``drip import --like`` unchanged; a sparse
    operator's one-axis data has no page to fill."""
    path, _ = _measurements(tmp_path, kind="tomography", n=3, name="t.h5")
    out = tmp_path / "sinograms.tiff"
    result = run_cli("export", path, out, "--dataset", "measurements", "--quiet")
    assert result.exit_code == 0, result.stderr
    back = tmp_path / "back.h5"
    result = run_cli("import", out, back, "--like", path, "--noise-std", 0.01, "--quiet")
    assert result.exit_code == 0, result.stderr
    with h5py.File(path) as f, h5py.File(back) as g:
        assert f["measurements"].shape[2:] == (f["operator/angles_deg"].shape[0],
                                               f["operator"].attrs["n_detectors"])
        np.testing.assert_array_equal(g["measurements"][()], f["measurements"][()])
    matrix, _ = _measurements(tmp_path, kind="matrix", name="a.h5")
    bad = tmp_path / "bad.tif"
    assert_one_line_error(run_cli("export", matrix, bad, "--dataset", "measurements"),
                          "holds 1-axis samples; a TIFF page holds two", bad)
