"""HDF5 contract: round trips, validation on open, batched reading, atomic writes."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import OPERATOR_CASES, make_operator
from drip_cli.errors import DripError
from drip_cli.io import MeasurementFile, atomic_h5, write_measurement_file
from helpers import write_small_file


@pytest.mark.parametrize("kind", OPERATOR_CASES)
def test_measurement_round_trip(kind, tmp_path):
    op = make_operator(kind, (3, 16, 20))
    path = tmp_path / "m.h5"
    truth = write_small_file(path, op, n=5)
    with h5py.File(path) as f:
        assert f.attrs["drip_format"] == "measurements" and f.attrs["format_version"] == 1
        assert f["measurements"].dtype == np.float32 and f["ground_truth"].shape == (5, 3, 16, 20)
    with MeasurementFile(path) as data:
        assert data.n_samples == 5 and data.operator.kind == kind.split("-")[0]
        batches = list(data.batches(2))
        assert [(b.start, b.stop) for b in batches] == [(0, 2), (2, 4), (4, 5)]
        np.testing.assert_array_equal(np.concatenate([b.ground_truth for b in batches]), truth)
        assert np.all(np.concatenate([b.noise_std for b in batches]) > 0)


def test_noise_std_override_and_requirement(tmp_path):
    op = make_operator("denoise")
    path = tmp_path / "m.h5"
    write_small_file(path, op)
    with h5py.File(path, "a") as f:
        del f["noise_std"]
    with pytest.raises(DripError, match="noise_std"):
        MeasurementFile(path)
    with MeasurementFile(path, noise_std=0.1) as data:
        assert np.all(data.noise_std == np.float32(0.1))
    with pytest.raises(DripError, match="positive"):
        MeasurementFile(path, noise_std=-1.0)


def corrupt(path, how: str) -> None:
    """Break a valid measurement file in one of the ways CONTRACT.md lists."""
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return
    if how == "not-hdf5":
        path.write_text("this is not HDF5\n")
        return
    with h5py.File(path, "a") as f:
        if how == "missing-measurements":
            del f["measurements"]
        elif how == "wrong-shape":
            del f["measurements"]
            f["measurements"] = np.zeros((4, 1, 16, 19), np.float32)
        elif how == "wrong-dtype":
            values = f["measurements"][()]
            del f["measurements"]
            f["measurements"] = values.astype("S8")
        elif how == "nan":
            f["measurements"][1, 0, 3, 3] = np.nan
        elif how == "inf-truth":
            f["ground_truth"][2, 0, 0, 0] = np.inf
        elif how == "unknown-kind":
            f["operator"].attrs["kind"] = "fourier"
        elif how == "negative-noise":
            f["noise_std"][0] = -0.5
        elif how == "wrong-format":
            f.attrs["drip_format"] = "reconstructions"
        elif how == "wrong-version":
            f.attrs["format_version"] = 7
        elif how == "text-version":   # was "unexpected ValueError"
            f.attrs["format_version"] = "one"
        elif how == "kind-array":     # was "cannot read file (unhashable type ...)"
            f["operator"].attrs["kind"] = ["blur", "blur"]
        elif how == "missing-operator":
            del f["operator"]
        elif how == "noise-shape":
            del f["noise_std"]
            f["noise_std"] = np.ones(3, np.float32)
        elif how == "measurements-group":
            del f["measurements"]
            f.create_group("measurements")
        elif how == "nan-psf":
            f["operator/psf"][0, 0] = np.nan
        elif how == "zero-psf":
            f["operator/psf"][...] = 0.0
        elif how == "float32-overflow":   # finite, but its squared norm is Inf in float32
            f["measurements"][0] = 1e30
        elif how == "tiny-noise":   # positive, but its square underflows float32
            f["noise_std"][1] = 1e-30
        elif how == "huge-noise":   # finite in float32, but its radius sigma sqrt(M) is not
            f["noise_std"][1] = 2e18
        else:
            raise ValueError(how)


BAD_FILES = ["truncated", "not-hdf5", "missing-measurements", "wrong-shape", "wrong-dtype", "nan",
             "inf-truth", "unknown-kind", "negative-noise", "wrong-format", "wrong-version",
             "text-version", "kind-array", "missing-operator", "noise-shape",
             "measurements-group", "nan-psf", "zero-psf", "float32-overflow", "tiny-noise",
             "huge-noise"]


@pytest.mark.parametrize("how", BAD_FILES)
def test_bad_files_raise_drip_error(how, tmp_path):
    path = tmp_path / "bad.h5"
    write_small_file(path, make_operator("blur", (1, 16, 20)))
    corrupt(path, how)
    with pytest.raises(DripError) as info:
        MeasurementFile(path)
    assert info.value.path == str(path)
    # a bad value is located: the sample that corrupt() damaged first
    first = {"nan": 1, "inf-truth": 2, "negative-noise": 0, "float32-overflow": 0}
    if how in first:
        assert f"first at sample {first[how]}" in str(info.value)
    if how == "tiny-noise":
        assert "noise std 1e-30 (sample 1) is below 1e-18" in str(info.value)
    if how == "huge-noise":
        assert ("noise std 2e+18 (sample 1) gives a discrepancy radius sigma * sqrt(320) too "
                "large for float32" in str(info.value))


@pytest.mark.parametrize("kind,name", [("blur", "psf"), ("inpainting", "mask"),
                                       ("tomography", "angles_deg"), ("matrix", "data"),
                                       ("matrix", "indices"), ("matrix", "indptr")])
@pytest.mark.parametrize("as_group", [False, True])
def test_missing_operator_dataset_is_named(kind, name, as_group, tmp_path):
    # a blur file without its PSF was "cannot read file (Unable to synchronously open object ...)"
    path = tmp_path / "bad.h5"
    write_small_file(path, make_operator(kind, (1, 16, 20)))
    with h5py.File(path, "a") as f:
        del f["operator"][name]
        if as_group:
            f["operator"].create_group(name)
    with pytest.raises(DripError, match=f"operator group lacks dataset '{name}'"):
        MeasurementFile(path)


@pytest.mark.parametrize("kind,name", [("blur", "psf"), ("inpainting", "mask"),
                                       ("tomography", "angles_deg")])
@pytest.mark.parametrize("dtype", ["complex128", "S8"])
def test_an_operator_dataset_of_other_than_real_numbers_is_refused(kind, name, dtype, tmp_path):
    """Complex angles, PSFs or masks were cast to their real part (with NumPy's warning, found by
    randomised fuzzing), strings read as the numbers they spell."""
    path = tmp_path / "bad.h5"
    write_small_file(path, make_operator(kind, (1, 16, 20)))
    with h5py.File(path, "a") as f:
        values = f["operator"][name][()]
        del f["operator"][name]
        f["operator"][name] = values.astype(dtype)
    with pytest.raises(DripError, match=f"operator dataset '{name}' has dtype .*, expected real"):
        MeasurementFile(path)


def test_atomic_h5_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.h5"
    with pytest.raises(RuntimeError):
        with atomic_h5(target) as handle:
            handle["x"] = np.zeros(3)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_h5(target) as handle:
        handle["x"] = np.zeros(3)
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5"]


def test_an_interrupt_right_after_the_temporary_is_made_leaves_nothing(tmp_path, monkeypatch):
    """A Ctrl-C or SIGTERM raises its exception between any two steps; one that comes right
    after the temporary file or staging folder is made (before tempfile would have returned
    its name) must still find it to remove. Simulated: the call that makes it, then the
    interrupt."""
    import os

    from drip_cli.io.atomic import atomic_folder, atomic_path

    def interrupted(real):
        def make(path, *args, **kwargs):
            result = real(path, *args, **kwargs)
            if str(path).endswith(".tmp"):
                if isinstance(result, int):
                    os.close(result)
                raise KeyboardInterrupt
            return result
        return make

    monkeypatch.setattr(os, "open", interrupted(os.open))
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "out.h5"):
            pass
    monkeypatch.undo()   # (rmtree opens folders with os.open)
    monkeypatch.setattr(os, "mkdir", interrupted(os.mkdir))
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(tmp_path / "a" / "report"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_missing_folder(tmp_path):
    with pytest.raises(DripError, match="does not exist"):
        write_measurement_file(tmp_path / "nope" / "m.h5", make_operator("denoise"),
                               np.zeros((1, 1, 16, 20), np.float32), np.ones(1, np.float32))


def test_write_takes_one_noise_level_for_all_and_refuses_what_drip_would_not_read(tmp_path):
    """The library's writer (README, "Your own measurements"): one noise std for every sample
    is spread over them; arrays of the wrong shape, and data the reader refuses, leave no file
    (a noise std array one short once wrote a file whose last sample had noise std 0)."""
    op, path = make_operator("denoise"), tmp_path / "m.h5"
    b = np.full((4, 1, 16, 20), 0.5, np.float32)
    write_measurement_file(path, op, b, 0.01)
    with MeasurementFile(path) as data:
        np.testing.assert_array_equal(data.noise_std, np.full(4, 0.01, np.float32))
    write_measurement_file(path, op, b)   # no noise levels: --noise-std is asked for
    with pytest.raises(DripError, match="give the noise level with --noise-std"):
        MeasurementFile(path)
    with MeasurementFile(path, noise_std=0.02) as data:
        np.testing.assert_array_equal(data.noise_std, np.full(4, 0.02, np.float32))
    path.unlink()
    nan = b.copy()
    nan[2, 0, 3, 3] = np.nan
    for args, kw, error, words in [
            ((b, np.full(3, 0.01)), {}, ValueError, r"noise_std: expected one number or 4"),
            ((b[0], 0.01), {}, ValueError, r"measurements: expected shape \(1, 1, 16, 20\)"),
            ((b, 0.01), {"ground_truth": b[:3]}, ValueError, r"ground_truth: expected shape"),
            ((b, 0.0), {}, DripError, r"m\.h5: dataset 'noise_std' must be > 0"),
            ((nan, 0.01), {}, DripError, r"m\.h5: dataset 'measurements' contains NaN")]:
        with pytest.raises(error, match=words):
            write_measurement_file(path, op, *args, **kw)
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.3, 0.6, 0.9, 0.99])
def test_truncation_anywhere_raises_drip_error(fraction, tmp_path):
    """A file cut at any point fails with the project's error, never an h5py/OS exception."""
    path = tmp_path / "cut.h5"
    write_small_file(path, make_operator("tomography", (1, 16, 20)), n=8)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(DripError):
        with MeasurementFile(path) as opened:
            for _ in opened.batches(3):
                pass


@pytest.mark.parametrize("kind,name,value", [
    ("tomography", "n_detectors", np.inf),    # was an OverflowError (found by fuzzing)
    ("tomography", "n_detectors", 92.5),
    ("tomography", "n_detectors", "many"),
    ("blur", "image_shape", np.array([1.0, np.inf, 20.0])),
    ("blur", "image_shape", np.array([1.0, 16.5, 20.0])),   # was read as 16
    ("blur", "image_shape", np.array(["1", "16", "20"], dtype="S2")),
    ("matrix", "shape", np.array([np.nan, 320.0])),
])
def test_operator_attributes_must_be_whole_numbers(kind, name, value, tmp_path):
    path = tmp_path / "bad.h5"
    write_small_file(path, make_operator(kind, (1, 16, 20)))
    with h5py.File(path, "a") as f:
        f["operator"].attrs[name] = value
    with pytest.raises(DripError, match=f"operator attribute '{name}' must be"):
        MeasurementFile(path)


@pytest.mark.parametrize("damage,message", [
    # text in place of numbers is shown as it is ("got not numbers" before)
    ("text-shape", "'image_shape' must be 3 whole numbers, got '1,16,20'"),
    # a one-axis shape reads as Python writes it ("expected (4)" before)
    ("noise-shape", r"'noise_std' has shape \(3,\), expected \(4,\)"),
    # no angles: said so, not a measurement shape "expected (?, 1, 0, 29)"
    ("no-angles", "angles_deg must be a non-empty 1-D array of finite angles"),
])
def test_messages_name_what_is_wrong(damage, message, tmp_path):
    path = tmp_path / "bad.h5"
    write_small_file(path, make_operator("tomography", (1, 16, 20)))
    with h5py.File(path, "a") as f:
        if damage == "text-shape":
            f["operator"].attrs["image_shape"] = "1,16,20"
        elif damage == "noise-shape":
            del f["noise_std"]
            f["noise_std"] = np.ones(3, np.float32)
        else:
            del f["operator/angles_deg"]
            f["operator/angles_deg"] = np.zeros(0, np.float32)
    with pytest.raises(DripError, match=message):
        MeasurementFile(path)


def test_a_damaged_image_shape_with_its_detectors_is_refused(tmp_path):
    """A tomography file keeps its n_detectors while image_shape is damaged: detector windows
    are allowed (a contract extension), but only within a factor 4 of the image's own count,
    so the Radon matrix of a 30000x30000 image is never built for 29 detectors."""
    path = tmp_path / "bad.h5"
    write_small_file(path, make_operator("tomography", (1, 16, 20)))
    with h5py.File(path, "a") as f:
        f["operator"].attrs["image_shape"] = np.array([1, 30000, 30000])
    with pytest.raises(DripError, match="a centred window of 10607 to 169708 is allowed"):
        MeasurementFile(path)


@pytest.mark.parametrize("kind", ["blur", "tomography", "matrix"])
def test_a_damaged_image_shape_is_refused_before_the_operator_is_built(kind, tmp_path):
    """An image_shape that does not match the measurements is refused from the shapes alone: a
    blur file took 60 s to build its 30000x30000 operator before the shapes were compared, and a
    tomography file without n_detectors was killed for memory."""
    path = tmp_path / "bad.h5"
    write_small_file(path, make_operator(kind, (1, 16, 20)))
    with h5py.File(path, "a") as f:
        f["operator"].attrs["image_shape"] = np.array([1, 30000, 30000])
        f["operator"].attrs.pop("n_detectors", None)
    expected = "matrix has 320 columns" if kind == "matrix" else "dataset .measurements. has shape"
    with pytest.raises(DripError, match=expected):
        MeasurementFile(path)


def test_a_dataset_of_an_hdf5_file_is_named_after_two_colons(tmp_path):
    """``FILE.h5::DATASET`` names a dataset (leading and trailing slashes dropped); a path
    without the separator, or one that exists whatever its name, is a path."""
    from drip_cli.io.datasets import split_dataset

    assert split_dataset("scan.h5::/exchange/data/") == (Path("scan.h5"), "exchange/data")
    assert split_dataset("scan.h5::") == (Path("scan.h5"), None)
    assert split_dataset("scan.h5") == (Path("scan.h5"), None)
    odd = tmp_path / "a::b.h5"
    odd.write_bytes(b"")
    assert split_dataset(odd) == (odd, None)
    assert split_dataset(f"{odd}::x") == (odd, "x")
