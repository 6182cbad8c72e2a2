"""The command line end to end on small files, including every bad input of CONTRACT.md."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import make_operator
from helpers import assert_one_line_error, run_cli, write_small_file
from test_io import BAD_FILES, corrupt


def simulate(tmp_path, kind: str, *extra: str, name: str = "m.h5", n: int = 6):
    out = tmp_path / name
    result = run_cli("simulate", "phantom:ellipses", out, "--operator", kind, "--num-images", n,
                     "--image-size", 24, "--quiet", *extra)
    assert result.exit_code == 0, result.stderr
    return out


@pytest.mark.parametrize("kind,extra", [
    ("denoise", []), ("blur", ["--blur-sigma", "1.5"]), ("inpainting", ["--keep-fraction", "0.4"]),
    ("tomography", ["--angles", "20", "--angle-range", "120"]),
])
def test_simulate_every_operator(kind, extra, tmp_path):
    out = simulate(tmp_path, kind, *extra, "--noise-percent", "1:5", "--seed", "3")
    with h5py.File(out) as f:
        assert f["operator"].attrs["kind"] == kind
        percent = f["noise_percent"][()]
        assert np.all((percent >= 1) & (percent <= 5)) and len(set(percent.tolist())) > 1
        assert f["measurements"].shape[0] == 6 and np.all(f["noise_std"][()] > 0)
        truth, b, noise_std = f["ground_truth"][()], f["measurements"][()], f["noise_std"][()]
    if kind == "denoise":  # the noise convention: sigma = p / 100 * mean|A x|, per sample
        sigma = percent / 100 * np.abs(truth).reshape(6, -1).mean(1)
        np.testing.assert_allclose(noise_std, sigma, rtol=1e-5)
        residual = (b - truth).reshape(6, -1)
        assert np.all(np.abs(residual.std(1) / sigma - 1) < 0.1)


def test_simulate_is_reproducible(tmp_path):
    a = simulate(tmp_path, "inpainting", "--seed", "7", name="a.h5")
    b = simulate(tmp_path, "inpainting", "--seed", "7", name="b.h5")
    c = simulate(tmp_path, "inpainting", "--seed", "8", name="c.h5")
    with h5py.File(a) as fa, h5py.File(b) as fb, h5py.File(c) as fc:
        np.testing.assert_array_equal(fa["measurements"][()], fb["measurements"][()])
        np.testing.assert_array_equal(fa["operator/mask"][()], fb["operator/mask"][()])
        assert not np.array_equal(fa["measurements"][()], fc["measurements"][()])


def test_simulate_matrix_from_npz(tmp_path):
    from conftest import random_csr

    data, indices, indptr, shape, dense = random_csr(200, 24 * 24, 0.05, np.random.default_rng(0))
    npz = tmp_path / "A.npz"
    np.savez(npz, data=data, indices=indices, indptr=indptr, shape=np.array(shape), format=b"csr")
    out = simulate(tmp_path, "matrix", "--matrix", npz)
    with h5py.File(out) as f:
        assert f["measurements"].shape == (6, 1, 200)
        expected = np.einsum("mp,np->nm", dense, f["ground_truth"][:, 0].reshape(6, -1))
        clean_error = np.linalg.norm(f["measurements"][:, 0] - expected) / np.linalg.norm(expected)
        assert clean_error < 0.1  # only the 2% noise


def test_simulate_reads_csc_and_coo_matrices_as_the_same_operator(tmp_path):
    """save_npz writes a matrix in its own format: a COO one (built by coordinates, entries in
    any order, repeated entries summed) and a CSC one give the CSR matrix's operator; other
    formats and damaged arrays are refused in one line."""
    import torch

    from conftest import random_csr
    from drip_cli.operators import operator_from_hdf5

    rng = np.random.default_rng(0)
    _, _, _, shape, dense = random_csr(60, 16 * 16, 0.1, rng)
    row, col = np.nonzero(dense)
    order = rng.permutation(len(row))   # any order, and the first ten entries split in two
    row, col, values = row[order], col[order], dense[row[order], col[order]]
    values = np.concatenate([values, values[:10] / 2])
    values[:10] /= 2
    row, col = np.concatenate([row, row[:10]]), np.concatenate([col, col[:10]])
    coo, csc = tmp_path / "coo.npz", tmp_path / "csc.npz"
    np.savez(coo, row=row.astype(np.int32), col=col.astype(np.int32), data=values,
             shape=np.array(shape), format=b"coo")
    columns = dense.T   # CSC of A is CSR of A^T
    nonzero = columns != 0
    np.savez(csc, data=columns[nonzero], indices=np.nonzero(nonzero)[1].astype(np.int32),
             indptr=np.concatenate([[0], np.cumsum(nonzero.sum(1))]).astype(np.int32),
             shape=np.array(shape), format=b"csc")
    x = torch.from_numpy(rng.random((2, 1, 16, 16)))
    for path in (coo, csc):
        result = run_cli("simulate", "phantom:ellipses", tmp_path / "m.h5", "--operator",
                         "matrix", "--matrix", path, "--num-images", 2, "--image-size", 16, "-q")
        assert result.exit_code == 0, result.stderr
        with h5py.File(tmp_path / "m.h5") as f:
            op = operator_from_hdf5(f["operator"])
        np.testing.assert_allclose(op(x).numpy()[:, 0], x.numpy().reshape(2, -1) @ dense.T,
                                   atol=1e-12)
        (tmp_path / "m.h5").unlink()
    for name, arrays, message in (
            ("dia.npz", dict(data=np.ones((1, 4)), offsets=[0], shape=[4, 4], format=b"dia"),
             "expected a CSR, CSC or COO matrix (scipy.sparse.save_npz), got dia"),
            ("far.npz", dict(row=[0, 9], col=[0, 1], data=[1.0, 2.0], shape=[4, 256],
                             format=b"coo"), "row indices out of range [0, 4)"),
            ("short.npz", dict(row=[0, 1], col=[0], data=[1.0, 2.0], shape=[4, 256],
                               format=b"coo"), "must be 1-D and of one length"),
            ("back.npz", dict(indices=[0, 1], indptr=[0, 2, 1] + [2] * 254, data=[1.0, 2.0],
                              shape=[4, 256], format=b"csc"), "not non-decreasing"),
            # unsigned pointers that go back: np.diff wrapped around and let them through
            ("unsigned.npz", dict(indices=[0, 1, 2, 3], indptr=np.array([0, 3, 1, 4, 4],
                                                                        dtype=np.uint32),
                                  data=[1.0] * 4, shape=[4, 256], format=b"csr"),
             "not non-decreasing"),
            ("bare.npz", dict(row=[0], col=[0], format=b"coo"), "has no array 'shape'"),
            # a 0-d shape was an unexpected TypeError; 2.5 rows were taken as 2
            ("flat.npz", dict(data=[1.0], indices=[0], indptr=[0, 1], shape=5, format=b"csr"),
             "shape must be two whole numbers, got 5"),
            ("half.npz", dict(data=[1.0], indices=[0], indptr=[0, 1, 1], shape=[2.5, 256],
                              format=b"csr"), "shape must be two whole numbers, got [2.5, 256.0]")):
        np.savez(tmp_path / name, **{k: np.asarray(v) for k, v in arrays.items()})
        result = run_cli("simulate", "phantom:ellipses", tmp_path / "m.h5", "--operator",
                         "matrix", "--matrix", tmp_path / name, "--num-images", 2,
                         "--image-size", 16)
        assert_one_line_error(result, message, tmp_path / "m.h5")
        assert name in result.stderr


def test_simulate_from_hdf5_folder_and_photos_in_colour(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = tmp_path / "images.h5"
    with h5py.File(images, "w") as f:
        f["images"] = (rng.random((3, 3, 20, 20)) * 255).astype(np.uint8)
    out = tmp_path / "from_h5.h5"
    assert run_cli("simulate", images, out, "--operator", "blur", "-q").exit_code == 0
    with h5py.File(out) as f:
        assert f["ground_truth"].shape == (3, 3, 20, 20) and f["ground_truth"][()].max() <= 1.0
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(2):
        Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "from_folder.h5"
    result = run_cli("simulate", folder, out, "--operator", "denoise", "--crop-size", 16,
                     "--crops-per-image", 3, "--channels", 3, "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out) as f:
        assert f["ground_truth"].shape == (6, 3, 16, 16)
    out = tmp_path / "photos.h5"
    result = run_cli("simulate", "skimage:camera,coffee", out, "--operator", "tomography",
                     "--crop-size", 16, "--crops-per-image", 2, "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out) as f:
        assert f["ground_truth"].shape == (4, 1, 16, 16)


@pytest.mark.parametrize("method", ["cgls", "tv"])
def test_reconstruct_writes_the_contract_file(method, tmp_path):
    data = simulate(tmp_path, "blur", "--noise-percent", "2")
    out, report = tmp_path / "r.h5", tmp_path / "r.json"
    result = run_cli("reconstruct", data, "--out", out, "--method", method, "--report", report, "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out) as f:
        assert f.attrs["drip_format"] == "reconstructions" and f.attrs["format_version"] == 1
        assert f.attrs["method"] == method and f.attrs["tau"] == 1.0
        assert "source_file" in f.attrs and "drip_version" in f.attrs
        assert f["reconstructions"].shape == (6, 1, 24, 24) and f["reconstructions"].dtype == np.float32
        ratio = f["discrepancy_ratio"][()]
        assert np.all(ratio <= 1.0) and np.all(f["converged"][()])
        for name in ("relative_residual", "regularizer_value", "iterations", "psnr", "ssim"):
            assert f[name].shape == (6,)
        assert np.all(np.isnan(f["regularizer_value"][()])) == (method == "cgls")
    summary = json.loads(report.read_text())
    assert summary["fit_fraction"] == 1.0 and summary["n_samples"] == 6
    assert "PSNR" in result.stdout
    info = run_cli("info", out)
    assert info.exit_code == 0 and "fit fraction" in info.stdout
    assert "seconds per image" in info.stdout   # (each sample's share of its batch's time)
    # a cap too small for the constraint: the samples are flagged, not passed
    capped = run_cli("reconstruct", data, "--out", out, "--method", method, "--max-iterations", 1,
                     "--report", report, "-q")
    assert capped.exit_code == 0, capped.stderr
    assert json.loads(report.read_text())["solver_converged_fraction"] < 1.0
    if method == "cgls":
        with h5py.File(out) as f:
            assert f["iterations"][()].max() <= 1 and not np.all(f["converged"][()])


def test_images_smaller_than_the_ssim_window_have_no_ssim_and_the_reports_stay_json(tmp_path):
    """SSIM's 7x7 window does not fit a 5-pixel-wide image: its SSIM is NaN in the file and null
    in the JSON reports (which hold no NaN, so strict parsers read them), PSNR as usual."""
    data = tmp_path / "m.h5"
    write_small_file(data, make_operator("blur", (1, 5, 12)))
    out, report = tmp_path / "r.h5", tmp_path / "r.json"
    result = run_cli("reconstruct", data, "--out", out, "--method", "cgls", "--report", report,
                     "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out) as f:
        assert np.all(np.isnan(f["ssim"][()])) and np.all(np.isfinite(f["psnr"][()]))

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))

    summary = strict(report.read_text())
    assert summary["ssim_mean"] is None and summary["regularizer_value_mean"] is None
    assert summary["psnr_mean"] > 0
    result = run_cli("evaluate", data, "--out", tmp_path / "rep", "--methods", "cgls",
                     "--noise-percent", "2", "-q")
    assert result.exit_code == 0, result.stderr
    rows = strict((tmp_path / "rep" / "robustness.json").read_text())["rows"]
    assert rows[0]["ssim_mean"] is None and rows[0]["psnr_mean"] > 0
    assert "nan" not in (tmp_path / "rep" / "robustness.md").read_text()


def test_reconstruct_with_noise_std_option_and_tau(tmp_path):
    data = tmp_path / "m.h5"
    op = make_operator("tomography", (1, 16, 20))
    write_small_file(data, op)
    with h5py.File(data, "a") as f:
        sigma = f["noise_std"][()]
        del f["noise_std"]
        del f["ground_truth"]
    out = tmp_path / "r.h5"
    result = run_cli("reconstruct", data, "--out", out, "--method", "cgls", "--tau", "1.5",
                     "--noise-std", float(sigma.mean()), "--report", tmp_path / "r.json", "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out) as f:
        assert np.all(f["discrepancy_ratio"][()] <= 1.5) and "psnr" not in f
        # the ratios are against the given level, and the file and the report say which
        assert f.attrs["noise_std"] == pytest.approx(float(sigma.mean()))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["noise_std"] == pytest.approx(float(sigma.mean()))
    assert "noise_std" in run_cli("info", out).stdout


def test_reconstruct_names_the_unfit_samples_and_what_to_do(tmp_path):
    """A noise level far below the file's leaves the samples unfit: the run still ends with
    status 0 and its file, and says how far off the fit is and that sigma may be too small."""
    data = simulate(tmp_path, "blur")
    out = tmp_path / "r.h5"
    result = run_cli("reconstruct", data, "--out", out, "--method", "cgls", "--noise-std", 1e-9,
                     "--max-iterations", 3, "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out) as f:
        largest = float(f["discrepancy_ratio"][()].max())
        assert not f["converged"][()].any() and largest > 1e3
    text = " ".join(result.stdout.split())
    assert "6 sample(s) do not fit the data" in text and f"{largest:.3g} against tau = 1" in text
    assert "give --noise-std or raise --tau" in text
    assert "All of them stopped at the solver's iteration cap: --max-iterations raises it" in text


def test_info_on_measurements_reports_norm_and_adjointness(tmp_path):
    data = simulate(tmp_path, "tomography")
    result = run_cli("info", data)
    assert result.exit_code == 0, result.stderr
    assert "||A||" in result.stdout and "adjointness error" in result.stdout
    # noise_std is optional in the contract: info shows such a file (it refused it before)
    with h5py.File(data, "a") as f:
        del f["noise_std"]
    result = run_cli("info", data)
    assert result.exit_code == 0, result.stderr
    assert "not stored (reconstruct needs --noise-std)" in result.stdout


def test_info_on_the_inputs_of_simulate_and_import(tmp_path):
    """Before a simulate or an import, ``drip info`` shows what drip will read of an array or
    of pictures: the pages of a TIFF, the sizes, how the values are scaled and their range as
    read; a folder without pictures is still taken for a run folder and refused as one."""
    from PIL import Image

    pages = np.full((2, 6, 5), 65535, np.uint16)
    pages[1] = 6554   # 0.1 of the scale, shown to 4 digits
    Image.fromarray(pages[0]).save(tmp_path / "s.tif", save_all=True,
                                   append_images=[Image.fromarray(pages[1])])
    result = run_cli("info", tmp_path / "s.tif")
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())
    for shown in ("TIFF picture", "images │ 2 (the pages of multi-page files)", "6x5",
                  "16-bit integers", "divided by 65535, to [0, 1]", "0.1 .. 1"):
        assert shown in text, text
    folder = _folder_of_pictures(tmp_path / "mixed", np.zeros((4, 4), np.uint8),
                                 np.full((5, 4, 3), 255, np.uint8))
    text = " ".join(run_cli("info", folder).stdout.split())
    for shown in ("folder of 2 pictures (PNG)", "4x4, 5x4, of several sizes",
                  "1 (grayscale) and 3 (colour)", "0 .. 1"):
        assert shown in text, text
    array = np.ones((3, 1, 4, 4), np.float32) * 2
    array[2, 0, 0, 0] = np.nan
    np.save(tmp_path / "a.npy", array)
    text = " ".join(run_cli("info", tmp_path / "a.npy").stdout.split())
    for shown in ("(3, 1, 4, 4)", "float32", "as they are", "values as read │ 2 │",
                  "NaN or Inf │ 1"):
        assert shown in text, text
    # an HDF5 file of images (no drip_format), the first dataset simulate would read
    with h5py.File(tmp_path / "images.h5", "w") as f:
        f["ground_truth"] = np.full((2, 3, 4, 4), 4, np.uint16)
        f["images"] = np.full((5, 4, 4), 51, np.uint8)
    text = " ".join(run_cli("info", tmp_path / "images.h5").stdout.split())
    for shown in ("dataset 'images'", "(5, 4, 4)", "uint8", "divided by 255, to [0, 1]",
                  "values as read │ 0.2 │", "drip simulate measures them"):
        assert shown in text, text
    (tmp_path / "empty").mkdir()
    result = run_cli("info", tmp_path / "empty")
    assert result.exit_code == 1 and "a folder without model.safetensors" in result.stderr
    # a folder of drip files (drip info sample_data/): the files it holds are named
    files = tmp_path / "files"
    files.mkdir()
    for name in ("m.h5", "notes.txt", "a.safetensors", "checkpoint.safetensors",
                 *(f"r{i}.h5" for i in range(4))):
        (files / name).touch()
    result = run_cli("info", files)
    assert result.exit_code == 1 and result.stderr.rstrip().endswith(
        "it holds a.safetensors, m.h5, r0.h5, r1.h5 and 2 more (give one of them)"), result.stderr
    result = run_cli("reconstruct", files / "m.h5", "--model", files, "--out", files / "o.h5")
    assert result.exit_code == 1 and result.stderr.rstrip().endswith(
        "it holds a.safetensors (give one of them)"), result.stderr


def test_info_on_a_folder_it_cannot_list(tmp_path, monkeypatch):
    """A folder that cannot be listed (no read permission; root reads any, so listing is made
    to fail) is taken for a run folder and refused as one, not 'unexpected PermissionError'."""
    folder = tmp_path / "locked"
    folder.mkdir()
    listing = Path.iterdir

    def refuse(self):
        if self == folder:
            raise PermissionError(13, "Permission denied")
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", refuse)
    assert_one_line_error(run_cli("info", folder), "a folder without model.safetensors",
                          tmp_path / "none")


def test_info_shows_the_file_before_measuring_its_operator_and_says_so(tmp_path, monkeypatch):
    """The operator's norm and adjointness take tens of seconds for a large Radon matrix:
    ``drip info`` prints the file's section first and tells the spinner what it measures."""
    import drip_cli.info as info

    data = simulate(tmp_path, "tomography")
    said = []
    sections = info.measurement_info(data, said.append)
    title, general = next(sections)
    assert title == data.name and general["samples"] == 6 and said == []
    monkeypatch.setattr(info, "operator_section", lambda op: {"kind": op.kind})
    title, section = next(sections)
    assert title == "operator" and section.pop("kind") == "tomography"
    assert list(section) == ["center offset, from the sinograms"]   # the sinograms' own axis
    assert said == ["measuring the tomography operator's norm and adjointness"]


def test_the_spinner_is_silent_when_quiet_or_not_on_a_terminal(capfd):
    from drip_cli.console import status

    for quiet in (True, False):   # pytest's stderr is no terminal
        with status("working", quiet) as say:
            say("still working")
    assert capfd.readouterr() == ("", "")


def test_on_a_terminal_every_command_draws_its_progress_and_writes_the_same(tmp_path,
                                                                            monkeypatch):
    """Progress is drawn on a terminal only, so the other tests never run that path: here stderr
    is taken for one (a rich console into a buffer), and every command that draws a bar or a
    spinner runs with it, gives the same results as with ``--quiet``, and leaves its error
    line alone on stderr."""
    import io

    from rich.console import Console

    import drip_cli.console as console

    screen = io.StringIO()
    monkeypatch.setattr(console, "err_console", Console(file=screen, force_terminal=True,
                                                         width=100))
    data = simulate(tmp_path, "blur")   # --quiet: the reference
    again = tmp_path / "again.h5"
    result = run_cli("simulate", "phantom:ellipses", again, "--operator", "blur",
                     "--num-images", 6, "--image-size", 24)
    assert result.exit_code == 0, result.stderr
    drawn = {"simulate": screen.getvalue()}
    with h5py.File(data) as quiet, h5py.File(again) as shown:
        assert np.array_equal(quiet["measurements"][()], shown["measurements"][()])
    import drip_cli.cli as cli

    described = []
    status = cli._train_status
    monkeypatch.setattr(cli, "_train_status",
                        lambda *args: described.append(status(*args)) or described[-1])
    runs = {
        "train": ("train", data, "--out", tmp_path / "run", "--max-steps", 1,
                  "--solver-iterations", 3),
        "reconstruct (tv)": ("reconstruct", data, "--method", "tv", "--out", tmp_path / "tv.h5"),
        "evaluate": ("evaluate", data, "--methods", "cgls", "--noise-percent", "2",
                     "--out", tmp_path / "report"),
        "writing": ("export", tmp_path / "tv.h5", tmp_path / "tv.npy"),
        "measuring": ("info", data),
    }
    for label, args in runs.items():
        screen.seek(0)
        screen.truncate()
        result = run_cli(*args)
        assert result.exit_code == 0, (label, result.stderr)
        drawn[label] = screen.getvalue()
        assert "Traceback" not in result.stderr
    for label, shown in drawn.items():
        assert label.split()[0] in shown, (label, shown[-300:])
    # train's bar is the share of its budget (here --max-steps 1), not of 100 epochs' steps,
    # and says what the run does between steps (the descriptions as set: rich draws only some)
    assert "100%" in drawn["train"], drawn["train"][-300:]
    assert described[0] == "train, validating the untrained model", described
    assert described[1].startswith("train, step 1, best validation "), described
    assert described[2:] == ["train, validating"], described   # where --max-steps stopped it
    result = run_cli("reconstruct", data, "--method", "tv", "--out", tmp_path / "tv_quiet.h5",
                     "--quiet")
    assert result.exit_code == 0, result.stderr
    with h5py.File(tmp_path / "tv.h5") as shown, h5py.File(tmp_path / "tv_quiet.h5") as quiet:
        assert np.array_equal(shown["reconstructions"][()], quiet["reconstructions"][()])
    assert np.array_equal(np.load(tmp_path / "tv.npy"),
                          h5py.File(tmp_path / "tv.h5")["reconstructions"][()])
    missing = tmp_path / "missing.h5"
    result = run_cli("reconstruct", missing, "--method", "tv", "--out", tmp_path / "x.h5")
    assert_one_line_error(result, "no such file", tmp_path / "x.h5")


@pytest.mark.parametrize("damage,message", [
    ("group", "'reconstructions' is not a dataset"),
    ("tau", "attribute tau = 'x' is not a positive number"),
    ("ratio", "'discrepancy_ratio' has dtype |S1, expected a numeric type"),
])
def test_info_on_a_damaged_reconstruction_file(damage, message, tmp_path):
    """A reconstruction file edited by hand: one line naming it and what is wrong (the first two
    were an AttributeError and a ValueError)."""
    data = simulate(tmp_path, "denoise")
    out = tmp_path / "r.h5"
    assert run_cli("reconstruct", data, "--out", out, "--method", "cgls", "-q").exit_code == 0
    with h5py.File(out, "a") as f:
        if damage == "group":
            del f["reconstructions"]
            f.create_group("reconstructions")
        elif damage == "tau":
            f.attrs["tau"] = "x"
        else:
            del f["discrepancy_ratio"]
            f["discrepancy_ratio"] = np.array([b"a"] * 6)
    result = run_cli("info", out)
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert f"{out}: " in result.stderr and message in result.stderr


def assert_clean_failure(result, path, tmp_path, before: set[str]):
    """Exit 1, one line on stderr naming the file, no traceback, no new file left behind."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()   # not stripped: a blank line above the error counts
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and lines[0].startswith("drip: error:")
    assert "Traceback" not in result.stderr + result.stdout
    assert {p.name for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("how", BAD_FILES)
def test_reconstruct_bad_file(how, tmp_path):
    data = tmp_path / "bad.h5"
    write_small_file(data, make_operator("blur", (1, 16, 20)))
    corrupt(data, how)
    before = {p.name for p in tmp_path.iterdir()}
    result = run_cli("reconstruct", data, "--out", tmp_path / "r.h5", "--method", "cgls")
    assert_clean_failure(result, data, tmp_path, before)
    result = run_cli("info", data)
    assert result.exit_code == 1 and "Traceback" not in result.stderr


def test_reconstruct_missing_file_and_unwritable_output(tmp_path):
    missing = tmp_path / "missing.h5"
    result = run_cli("reconstruct", missing, "--out", tmp_path / "r.h5", "--method", "cgls")
    assert_clean_failure(result, missing, tmp_path, set())
    data = tmp_path / "m.h5"
    write_small_file(data, make_operator("denoise"))
    target = tmp_path / "no-such-folder" / "r.h5"
    result = run_cli("reconstruct", data, "--out", target, "--method", "cgls")
    assert_clean_failure(result, target, tmp_path, {"m.h5"})
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        result = run_cli("reconstruct", data, "--out", locked / "r.h5", "--method", "cgls")
        assert result.exit_code == 1


def test_reconstruct_negative_noise_option(tmp_path):
    data = tmp_path / "m.h5"
    write_small_file(data, make_operator("denoise"))
    result = run_cli("reconstruct", data, "--out", tmp_path / "r.h5", "--method", "cgls",
                     "--noise-std", "-0.1")
    assert_clean_failure(result, data, tmp_path, {"m.h5"})


@pytest.mark.parametrize("args,needle", [
    (["--noise-percent", "-2"], "--noise-percent"),
    (["--noise-percent", "abc"], "--noise-percent"),
    (["--blur-size", "4"], "odd"),
    (["--blur-sigma", "nan"], "blur sigma must be a positive number"),
    # the default PSF of this sigma would take terabytes: refused before it is built
    (["--blur-sigma", "1e6"], "choose a smaller --blur-sigma"),
    (["--blur-size", "99"], "at most 65"),
])
def test_simulate_bad_options(args, needle, tmp_path):
    result = run_cli("simulate", "phantom:ellipses", tmp_path / "m.h5", "--operator", "blur",
                     "--num-images", 2, "--image-size", 16, *args)
    assert result.exit_code == 1 and needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def _npy_claiming(shape) -> bytes:
    """The start of a .npy file whose header claims ``shape`` (float32), cut after 64 bytes of
    data: as a damaged file looks to NumPy, which allocates what the header claims."""
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + bytes(64)


@pytest.mark.parametrize("name, message", [
    ("array.npy", "not an .npz archive"),   # np.load returned the array: a TypeError
    ("text.txt", "not an .npz archive"),    # np.load called it pickled data
    ("missing.npz", "no such file"),
    ("damaged.npz", "the archive's array 'indices' is damaged"),   # "unexpected error: Error -3"
    ("claims.npz", "the archive's array 'data' is cut short"),    # "out of memory"
])
def test_simulate_refuses_a_bad_matrix_file(tmp_path, name, message):
    import zipfile

    import scipy.sparse

    matrices = tmp_path / "in"
    matrices.mkdir()
    if name == "array.npy":
        np.save(matrices / name, np.eye(256))
    elif name == "text.txt":
        (matrices / name).write_text("1 0\n0 1\n")
    elif name == "damaged.npz":   # bytes of the compressed arrays flipped
        scipy.sparse.save_npz(matrices / name, scipy.sparse.random(
            100, 256, density=0.2, format="csr", random_state=0), compressed=True)
        damaged = bytearray((matrices / name).read_bytes())
        for k in range(200, 2000, 37):
            damaged[k] ^= 0x5A
        (matrices / name).write_bytes(bytes(damaged))
    elif name == "claims.npz":
        matrix = scipy.sparse.random(10, 256, density=0.2, format="csr", random_state=0)
        scipy.sparse.save_npz(matrices / name, matrix, compressed=False)
        with zipfile.ZipFile(matrices / name) as archive:
            members = {info.filename: archive.read(info) for info in archive.infolist()}
        members["data.npy"] = _npy_claiming((40_000_000_000,))
        with zipfile.ZipFile(matrices / name, "w") as archive:
            for member, content in members.items():
                archive.writestr(member, content)
    result = run_cli("simulate", "phantom:ellipses", tmp_path / "m.h5", "--operator", "matrix",
                     "--matrix", matrices / name, "--num-images", 2, "--image-size", 16)
    assert result.exit_code == 1 and message in result.stderr and name in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "m.h5").exists()


@pytest.mark.parametrize("name, psf, message", [
    ("psf.npz", None, "not an .npz archive"),                   # was a TypeError in isfinite
    ("psf.txt", None, "not a .npy array"),                      # was "pickled (object) data"
    ("zero.npy", np.zeros((3, 3)), "invalid PSF: PSF is all zeros"),   # A = 0 was simulated
    ("complex.npy", np.ones((3, 3), complex), "expected real numbers"),
    ("missing.npy", None, "No such file"),
    ("empty.npy", None, "the file is empty"),                   # was "unexpected EOFError"
    ("claims.npy", None, "or a truncated one"),   # a header claiming 160 GB: "out of memory"
    ("object.npy", None, "it holds Python objects, which drip does not unpickle"),  # "truncated"
])
def test_simulate_refuses_a_bad_psf_file(tmp_path, name, psf, message):
    inputs = tmp_path / "in"
    inputs.mkdir()
    if name == "empty.npy":
        (inputs / name).write_bytes(b"")
    elif name == "claims.npy":
        (inputs / name).write_bytes(_npy_claiming((200_000, 200_000)))
    elif name == "object.npy":
        np.save(inputs / name, np.array([{"psf": 1}], dtype=object), allow_pickle=True)
    elif name == "psf.npz":
        np.savez(inputs / name, psf=np.ones((3, 3)))
    elif name == "psf.txt":
        (inputs / name).write_text("0 1 0\n1 1 1\n0 1 0\n")
    elif psf is not None:
        np.save(inputs / name, psf)
    result = run_cli("simulate", "phantom:ellipses", tmp_path / "m.h5", "--operator", "blur",
                     "--psf", inputs / name, "--num-images", 2, "--image-size", 16)
    assert result.exit_code == 1 and message in result.stderr and name in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "m.h5").exists()


def test_an_images_file_or_a_reconstruction_given_for_measurements_is_named_as_such(tmp_path):
    images = tmp_path / "images.h5"
    with h5py.File(images, "w") as f:
        f["images"] = np.zeros((2, 8, 8), np.float32)
    result = run_cli("train", images, "--out", tmp_path / "run")
    assert_one_line_error(result, "not a drip measurement file (it has no drip_format attribute): "
                          "drip simulate makes one from images", tmp_path / "run")
    # drip info shows what simulate reads of it; of an HDF5 file with neither, what it lacks
    result = run_cli("info", images)
    assert result.exit_code == 0, result.stderr
    assert "HDF5 images (dataset 'images'; no drip_format)" in result.stdout
    with h5py.File(images, "a") as f:
        f.move("images", "frames")
    result = run_cli("info", images)
    assert_one_line_error(result, "not a drip file (it has no drip_format attribute), nor images "
                          "that drip simulate reads (it has no 'images' or 'ground_truth' "
                          "dataset)", tmp_path / "run")
    data = simulate(tmp_path, "denoise")
    assert run_cli("reconstruct", data, "--out", tmp_path / "r.h5", "--method", "cgls",
                   "-q").exit_code == 0
    result = run_cli("reconstruct", tmp_path / "r.h5", "--out", tmp_path / "rr.h5")
    assert_one_line_error(result, "has drip_format 'reconstructions', not a drip measurement file",
                          tmp_path / "rr.h5")


def test_simulate_names_the_options_it_does_not_use(tmp_path):
    """An option for another operator, or for another kind of source, is named in a warning
    and ignored; the file is written as without it."""
    out = tmp_path / "m.h5"
    result = run_cli("simulate", "phantom:ellipses", out, "--operator", "denoise", "-q",
                     "--num-images", 2, "--image-size", 16, "--blur-sigma", 3, "--angles", 10,
                     "--crop-size", 8)
    assert result.exit_code == 0 and out.exists()
    assert result.stderr.splitlines() == [
        "drip: warning: --blur-sigma, --angles: not used by --operator denoise (ignored)",
        "drip: warning: --crop-size: used only with photographs (a folder of pictures, or "
        "skimage:NAME), and these images are phantoms (ignored)"]
    psf = tmp_path / "psf.npy"
    np.save(psf, np.ones((3, 3)) / 9)
    result = run_cli("simulate", out, tmp_path / "b.h5", "--operator", "blur", "--psf", psf,
                     "--blur-size", 5, "--num-images", 4, "-q")
    assert result.exit_code == 0 and (tmp_path / "b.h5").exists()
    assert result.stderr.splitlines() == [
        "drip: warning: --blur-size: not used with --psf, which gives the PSF (ignored)",
        "drip: warning: --num-images: used only with phantom:NAME sources, and these images are "
        "from an HDF5 file (ignored)"]
    result = run_cli("simulate", "phantom:ellipses", tmp_path / "t.h5", "--operator", "tomography",
                     "--angles", 8, "--num-images", 2, "--image-size", 16, "-q")
    assert result.exit_code == 0 and result.stderr == ""


def test_black_images_are_refused_where_noise_is_a_percent_of_a_x(tmp_path):
    """sigma = p% of mean |A x| is 0 for a black image: simulate, train with fresh noise and
    evaluate refuse it by index (simulate wrote a file that every command then refused), while
    training on the file's own measurements keeps it. Simulate refuses images too large for
    float32 measurements likewise."""
    images = tmp_path / "images.h5"
    truth = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    truth[[0, 2]] = 0.0
    with h5py.File(images, "w") as f:
        f["images"] = truth
    result = run_cli("simulate", images, tmp_path / "m.h5", "--operator", "blur", "--blur-sigma", 1)
    assert_clean_failure(result, images, tmp_path, {"images.h5"})
    assert "ground-truth images 0, 2 give all-zero measurements" in result.stderr
    assert "leave such images out" in result.stderr
    # a mask that observes almost nothing is named as the likelier cause (seed 0 draws one
    # observed pixel of 256 here, where the phantom is black)
    result = run_cli("simulate", "phantom:ellipses", tmp_path / "m.h5", "--operator",
                     "inpainting", "--keep-fraction", 0.001, "--image-size", 16,
                     "--num-images", 2)
    assert_clean_failure(result, "phantom:ellipses", tmp_path, {"images.h5"})
    assert ("the operator measures only 1 of the 256 pixel values (raise --keep-fraction)"
            in result.stderr)
    with h5py.File(images, "w") as f:   # finite, but their measurements overflow float32
        f["images"] = np.full((2, 16, 16), 1e30, np.float32)
    result = run_cli("simulate", images, tmp_path / "m.h5", "--operator", "blur", "--blur-sigma", 1)
    assert_clean_failure(result, images, tmp_path, {"images.h5"})
    assert "overflow float32" in result.stderr
    data = tmp_path / "m.h5"
    write_small_file(data, make_operator("blur", (1, 16, 20)), n=4)
    with h5py.File(data, "r+") as f:
        f["ground_truth"][1] = 0.0
    for command in (["train", data, "--out", tmp_path / "run", "--noise-percent", "1:5"],
                    ["evaluate", data, "--out", tmp_path / "report", "--methods", "cgls"]):
        result = run_cli(*command, "-q")
        assert result.exit_code == 1 and "ground-truth image 1 gives all-zero" in result.stderr
        assert not (tmp_path / "run" / "model.safetensors").exists()
        assert not (tmp_path / "report").exists()
    result = run_cli("train", data, "--out", tmp_path / "run", "--max-steps", 1,
                     "--solver-iterations", 3, "-q")
    assert result.exit_code == 0, result.stderr


def test_simulate_keeps_signed_integer_images_and_warns_about_their_range(tmp_path):
    """Signed integers (CT numbers, say) are read as they are, like floats, with the warning
    that PSNR and SSIM assume [0, 1]; only uint8 and uint16 are scaled."""
    path = tmp_path / "ct.h5"
    values = np.arange(-512, 512, dtype=np.int16).reshape(4, 16, 16)
    with h5py.File(path, "w") as f:
        f["images"] = values
    result = run_cli("simulate", path, tmp_path / "m.h5", "--operator", "denoise", "-q")
    assert result.exit_code == 0
    assert result.stderr.startswith(f"drip: warning: {path}: the images take values in [-512, 511]")
    assert "drip scales uint8 and uint16 only" in result.stderr
    with h5py.File(tmp_path / "m.h5") as f:
        np.testing.assert_array_equal(f["ground_truth"][()][:, 0], values.astype(np.float32))


def test_simulate_bad_sources(tmp_path):
    nan_images = tmp_path / "nan.h5"
    with h5py.File(nan_images, "w") as f:
        f["images"] = np.full((2, 8, 8), np.nan, np.float32)
    result = run_cli("simulate", nan_images, tmp_path / "m.h5", "--operator", "denoise")
    assert_clean_failure(result, nan_images, tmp_path, {"nan.h5"})
    assert "images contain NaN or Inf (first at sample 0)" in result.stderr
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w") as f:
        f["other"] = np.zeros(3)
    result = run_cli("simulate", empty, tmp_path / "m.h5", "--operator", "denoise")
    assert_clean_failure(result, empty, tmp_path, {"nan.h5", "empty.h5"})
    result = run_cli("simulate", "phantom:unicorns", tmp_path / "m.h5", "--operator", "denoise")
    assert result.exit_code == 1 and "phantom:unicorns" in result.stderr
    # the message is made before the file is closed (it read the closed dataset's shape)
    # channels-last colour, as NumPy and PIL hold it, would pass as 8 channels of 8x3 images
    for name, images in (("5d", np.zeros((2, 1, 1, 8, 8), np.float32)),
                         ("bool", np.zeros((2, 8, 8), bool)), ("group", None),
                         ("channels_last", np.zeros((2, 8, 8, 3), np.uint8))):
        path = tmp_path / f"{name}.h5"
        with h5py.File(path, "w") as f:
            if images is None:
                f.create_group("images")
            else:
                f["images"] = images
        result = run_cli("simulate", path, tmp_path / "m.h5", "--operator", "denoise")
        assert_clean_failure(result, path, tmp_path, {p.name for p in tmp_path.iterdir()})
        assert ("'images' is a group (nor any other)" if name == "group" else
                "must be an (N, H, W) or (N, C, H, W) dataset") in result.stderr
        assert ("looks channels-last" in result.stderr) == (name == "channels_last")


def _folder_of_pictures(folder, *arrays, name="p"):
    from PIL import Image

    folder.mkdir()
    for i, array in enumerate(arrays):
        (array if isinstance(array, Image.Image) else Image.fromarray(array)).save(
            folder / f"{name}{i}.png")
    return folder


def _simulated_truth(tmp_path, source, *extra):
    out = tmp_path / "m.h5"
    result = run_cli("simulate", source, out, "--operator", "denoise", "-q", *extra)
    assert result.exit_code == 0, result.stderr
    with h5py.File(out) as f:
        return f["ground_truth"][()]


def test_simulate_scales_16_bit_and_palette_pictures(tmp_path, monkeypatch):
    """A 16-bit grayscale PNG is scaled by 65535 as uint16 HDF5 images are (it was converted to
    8-bit RGB first, which clipped every value above 255 to white), palette pictures are
    converted through RGB, and grayscale is repeated for --channels 3."""
    from PIL import Image

    values = (np.arange(400).reshape(20, 20) * 150).astype(np.uint16)
    folder = _folder_of_pictures(tmp_path / "sixteen", values)
    truth = _simulated_truth(tmp_path, folder)
    np.testing.assert_allclose(truth[0, 0], values / 65535, atol=1e-7)
    colour = _simulated_truth(tmp_path, folder, "--channels", 3)
    np.testing.assert_allclose(colour[0], np.repeat(truth[0], 3, axis=0))
    # some Pillow versions open 16-bit PNGs as 32-bit integers (mode "I")
    as_int32 = Image.fromarray(values.astype(np.int32))
    assert as_int32.mode == "I"
    with monkeypatch.context() as patch:
        patch.setattr(Image, "open", lambda path: as_int32.copy())
        np.testing.assert_allclose(_simulated_truth(tmp_path, folder)[0, 0], values / 65535,
                                   atol=1e-7)
        patch.setattr(Image, "open", lambda path: Image.fromarray(values.astype(np.int32) - 1))
        result = run_cli("simulate", folder, tmp_path / "n.h5", "--operator", "denoise")
        assert_one_line_error(result, "values outside 0..65535", tmp_path / "n.h5")
    rgb = (np.random.default_rng(0).random((20, 20, 3)) * 255).astype(np.uint8)
    palette = Image.fromarray(rgb).convert("P")
    truth = _simulated_truth(tmp_path, _folder_of_pictures(tmp_path / "palette", palette))
    direct = np.asarray(palette.convert("RGB"), np.float32) / 255
    np.testing.assert_allclose(truth[0, 0], direct @ np.float32([0.299, 0.587, 0.114]), atol=1e-6)


def test_simulate_reads_tiff_stacks_float_tiffs_and_single_pictures(tmp_path):
    """Scientific images often come as TIFF: every page of a multi-page 16-bit TIFF is an image
    (scaled by 65535, as a 16-bit PNG), a 32-bit float TIFF keeps its values (with simulate's
    warning outside [0, 1]), and one picture file is a source as a folder of one is. An
    inpainting mask is one picture: a stack is refused in one line."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pages = (rng.random((3, 24, 20)) * 65535).astype(np.uint16)
    stack = tmp_path / "stack.tif"
    Image.fromarray(pages[0]).save(stack, save_all=True,
                                   append_images=[Image.fromarray(p) for p in pages[1:]])
    truth = _simulated_truth(tmp_path, stack)
    assert truth.shape == (3, 1, 24, 20)
    np.testing.assert_allclose(truth[:, 0], pages / 65535, atol=1e-7)

    values = (rng.random((24, 20)) * 2).astype(np.float32)
    Image.fromarray(values).save(tmp_path / "float.tiff")
    out = tmp_path / "f.h5"
    result = run_cli("simulate", tmp_path / "float.tiff", out, "--operator", "denoise", "-q")
    assert result.exit_code == 0, result.stderr
    assert "not [0, 1]" in result.stderr
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["ground_truth"][0, 0], values)
    # so does one far below 1, whose PSNRs would read near 200 dB
    Image.fromarray(values * np.float32(1e-10)).save(tmp_path / "faint.tiff")
    result = run_cli("simulate", tmp_path / "faint.tiff", tmp_path / "faint.h5", "--operator",
                     "denoise", "-q")
    assert result.exit_code == 0, result.stderr
    assert "within 1% of 0: PSNR and SSIM use a data range of 1" in result.stderr

    picture = (rng.random((24, 20, 3)) * 255).astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "photo.png")
    folder = _folder_of_pictures(tmp_path / "one", picture)
    np.testing.assert_array_equal(_simulated_truth(tmp_path, tmp_path / "photo.png"),
                                  _simulated_truth(tmp_path, folder))

    out = tmp_path / "masked.h5"
    result = run_cli("simulate", tmp_path / "photo.png", out, "--operator", "inpainting",
                     "--mask", stack)
    assert_one_line_error(result, "stack.tif: holds 3 images (a multi-page file); one is "
                          "expected", out)

    # a float page with a NaN was reported as images too large for float32
    values[5, 5] = np.nan
    Image.fromarray(values[:, :10]).save(tmp_path / "nan.tif", save_all=True,
                                         append_images=[Image.fromarray(values[:, 10:])])
    for command in (("simulate",), ("import", "--noise-std", 0.1)):
        out = tmp_path / "nan.h5"
        result = run_cli(command[0], tmp_path / "nan.tif", out, "--operator", "denoise",
                         *command[1:])
        assert_one_line_error(result, "nan.tif: holds NaN or Inf (page 1)", out)
    result = run_cli("info", tmp_path / "nan.tif")
    assert result.exit_code == 0 and "NaN or Inf │ 1 │" in " ".join(result.stdout.split())


def test_a_picture_beyond_pillows_pixel_limit(tmp_path, monkeypatch):
    """Pillow warns of a picture over ``MAX_IMAGE_PIXELS`` as of a possible attack, and refuses
    one over twice that ("unexpected DecompressionBombError" before): the user's own large
    picture is read without that warning, and one too large for Pillow is refused in one line
    (here with the limit lowered to 100 pixels)."""
    import warnings

    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    folder = _folder_of_pictures(tmp_path / "large", np.full((12, 12), 128, np.uint8))
    out = tmp_path / "m.h5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_cli("simulate", folder, out, "--operator", "denoise", "--noise-percent", 1)
    assert result.exit_code == 0 and result.stderr == "", result.stderr
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    folder = _folder_of_pictures(tmp_path / "huge", np.full((15, 14), 128, np.uint8))
    result = run_cli("simulate", folder, tmp_path / "n.h5", "--operator", "denoise")
    assert_one_line_error(result, "p0.png: cannot read image: it has more pixels than Pillow "
                          "reads (twice 100); cut it into smaller pictures", tmp_path / "n.h5")


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or folder"),
    ("empty folder", "folder holds no PNG, JPEG or TIFF files"),
    ("not a picture", "cannot read image"),
    ("sizes differ", "images differ in size; choose --crop-size"),
    ("crop too large", "is smaller than --crop-size 32"),
    ("unknown photograph", "unknown scikit-image photograph 'unicorn'"),
    # was "skimage:: unknown scikit-image photograph ''", the source's name cut short
    ("empty name", "a photograph name is empty"),
])
def test_simulate_refuses_bad_picture_sources(case, message, tmp_path):
    extra = []
    source = tmp_path / "pictures"
    if case == "empty folder":
        source.mkdir()
    elif case == "not a picture":
        source.mkdir()
        (source / "a.png").write_bytes(b"not a png")
        source = source / "a.png"   # the message names the picture, not its folder
    elif case in ("sizes differ", "crop too large"):
        _folder_of_pictures(source, np.zeros((20, 20), np.uint8), np.zeros((24, 20), np.uint8))
        extra = ["--crop-size", 32] if case == "crop too large" else []
    elif case == "unknown photograph":
        source = "skimage:unicorn"
    elif case == "empty name":
        source = "skimage:camera,,coffee"
    out = tmp_path / "m.h5"
    argument = source.parent if case == "not a picture" else source
    result = run_cli("simulate", argument, out, "--operator", "denoise", *extra)
    assert_one_line_error(result, message, out)
    assert str(source) in result.stderr


def test_simulate_draws_a_black_crop_again(tmp_path):
    """A picture black but for one corner gives crops that are never black (an all-black crop
    would measure nothing, and simulate would refuse it by an index the user cannot leave
    out); a picture black everywhere is refused, naming the source and the crop size."""
    picture = np.zeros((40, 40), np.uint8)
    picture[:12, :12] = 200
    source = tmp_path / "pictures"
    _folder_of_pictures(source, picture)
    out = tmp_path / "m.h5"
    result = run_cli("simulate", source, out, "--operator", "blur", "--blur-sigma", 1,
                     "--crop-size", 16, "--crops-per-image", 12, "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out) as f:
        truth = f["ground_truth"][()]
        assert len(truth) == 12 and np.all(truth.reshape(12, -1).max(1) > 0)
        assert np.all(f["noise_std"][()] > 0)
    black = tmp_path / "black"
    _folder_of_pictures(black, np.zeros((40, 40), np.uint8))
    result = run_cli("simulate", black, tmp_path / "b.h5", "--operator", "denoise",
                     "--crop-size", 16)
    assert_one_line_error(result, "random crops of 16x16 of picture 0 were all black",
                          tmp_path / "b.h5")
    assert str(black) in result.stderr


def test_simulate_warns_about_images_outside_0_1(tmp_path):
    """Float images in [0, 255] are kept as they are (the contract scales only uint8), but PSNR
    and SSIM assume a data range of 1, so simulate says so, naming the file."""
    path = tmp_path / "bright.h5"
    with h5py.File(path, "w") as f:
        f["images"] = np.full((2, 8, 8), 200.0, np.float32)
    result = run_cli("simulate", path, tmp_path / "m.h5", "--operator", "denoise", "-q")
    assert result.exit_code == 0 and (tmp_path / "m.h5").exists()
    assert result.stderr.startswith(f"drip: warning: {path}: the images take values in [200, 200]")
    result = run_cli("simulate", "phantom:shepp-logan", tmp_path / "p.h5", "--operator", "denoise",
                     "--num-images", 1, "--image-size", 16, "-q")
    assert result.exit_code == 0 and result.stderr == ""


def test_commands_warn_about_a_ground_truth_outside_0_1(tmp_path):
    """A measurement file brought from elsewhere with its truth in [0, 255]: its PSNRs would be
    meaningless, so every command that reads it says so once, in one line, and carries on."""
    data = simulate(tmp_path, "denoise", n=2)
    with h5py.File(data, "r+") as f:
        f["ground_truth"][...] = f["ground_truth"][()] * 255
        high = float(f["ground_truth"][()].max())
    warning = f"drip: warning: {data}: ground truth: the images take values in [0, {high:.4g}]"
    for args in (("info", data), ("reconstruct", data, "--out", tmp_path / "r.h5", "-q"),
                 ("evaluate", data, "--out", tmp_path / "report", "--methods", "cgls",
                  "--noise-percent", 5, "-q")):
        result = run_cli(*args)
        assert result.exit_code == 0, result.stderr
        assert result.stderr.startswith(warning) and result.stderr.count("warning") == 1
    result = run_cli("info", simulate(tmp_path, "denoise", n=2, name="fine.h5"))
    assert result.exit_code == 0 and result.stderr == ""


def test_random_ellipse_phantoms_are_never_black():
    """Dark ellipses can clip a whole phantom to 0, which simulate refuses (noise would be 0):
    such a draw is redrawn. Seed 0 drew 5 black ones among 200 before."""
    from drip_cli.data.phantoms import random_ellipses

    images = random_ellipses(200, 64, 64, 1, np.random.default_rng(0))
    assert images.shape == (200, 1, 64, 64) and images.min() >= 0 and images.max() <= 1
    assert np.all(images.reshape(200, -1).max(axis=1) > 0)
    # a 1x1 grid (its one pixel in a corner) is seldom covered: the redraws are bounded
    assert random_ellipses(2, 1, 1, 1, np.random.default_rng(0)).shape == (2, 1, 1, 1)


def test_sigterm_removes_the_output_in_progress(tmp_path):
    """``kill`` (SIGTERM, as a batch system's time limit sends) is handled as Ctrl-C: one line,
    exit status 143, and neither the output nor its temporary file is left behind."""
    import signal
    import time

    data = tmp_path / "m.h5"
    write_small_file(data, make_operator("blur", (1, 48, 48)), n=64)
    out = tmp_path / "r.h5"
    child = subprocess.Popen([sys.executable, "-m", "drip_cli", "reconstruct", data, "--out", out,
                              "--method", "tv", "--max-iterations", "100000", "-q"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".r.h5.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.05)   # the temporary output exists: the solve has started
    assert child.poll() is None, child.communicate()
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 143, stderr
    assert stderr.strip() == "drip: error: terminated; no output was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.h5"]


def test_sigterm_turned_into_a_library_error_is_still_a_termination(capsys):
    """SIGTERM arriving inside h5py once came back as its own TypeError ("Operation not defined
    for data type class") and was reported as an unexpected error with status 1."""
    import os
    import signal

    import typer

    from drip_cli.cli import _errors

    with pytest.raises(typer.Exit) as stopped:
        with _errors(False):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            except BaseException as exc:   # what the library does with it
                raise TypeError("Operation not defined for data type class") from exc
    assert stopped.value.exit_code == 143
    assert capsys.readouterr().err.strip() == "drip: error: terminated; no output was written"


def test_usage_errors_exit_2(tmp_path):
    assert run_cli("reconstruct").exit_code == 2
    assert run_cli("simulate", "phantom:ellipses", tmp_path / "m.h5", "--operator", "fourier").exit_code == 2
    assert run_cli("reconstruct", tmp_path / "x.h5", "--out", tmp_path / "r.h5",
                   "--method", "magic").exit_code == 2
    data = simulate(tmp_path, "denoise")
    for args in (("simulate", "phantom:ellipses", tmp_path / "o.h5", "--operator", "denoise"),
                 ("train", data, "--out", tmp_path / "run"),
                 ("evaluate", data, "--out", tmp_path / "report", "--methods", "cgls")):
        assert run_cli(*args, "--seed", "-1").exit_code == 2  # NumPy takes no negative seed
        # torch's generators and HDF5 take signed 64-bit seeds: 2^63 was an unexpected error
        assert run_cli(*args, "--seed", str(2**63)).exit_code == 2
        assert not any(p.name in ("o.h5", "run", "report") for p in tmp_path.iterdir())


def test_module_entry_point_and_debug_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "drip_cli", "info", str(tmp_path / "nope.h5")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"drip: error: {tmp_path / 'nope.h5'}: no such file"
    done = subprocess.run([sys.executable, "-m", "drip_cli", "info", str(tmp_path / "nope.h5"),
                           "--debug"], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "Traceback" in done.stderr


def test_outputs_never_replace_the_commands_own_files(tmp_path):
    """An output named like the input (or like another output) is refused before anything is
    written: reconstruct --out / --report, and simulate from an HDF5 file."""
    data = tmp_path / "m.h5"
    write_small_file(data, make_operator("denoise"))
    before = data.read_bytes()
    result = run_cli("reconstruct", data, "--out", data, "--method", "cgls")
    assert_clean_failure(result, data, tmp_path, {"m.h5"})
    same = tmp_path / "." / "m.h5"   # another spelling of the same file
    result = run_cli("reconstruct", data, "--out", same, "--method", "cgls")
    assert_clean_failure(result, same, tmp_path, {"m.h5"})
    out = tmp_path / "r.h5"
    result = run_cli("reconstruct", data, "--out", out, "--report", out, "--method", "cgls")
    assert_clean_failure(result, out, tmp_path, {"m.h5"})
    images = tmp_path / "images.h5"
    with h5py.File(images, "w") as f:
        f["images"] = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    result = run_cli("simulate", images, images, "--operator", "denoise")
    assert_clean_failure(result, images, tmp_path, {"m.h5", "images.h5"})
    assert data.read_bytes() == before
    with h5py.File(images) as f:
        assert f["images"].shape == (2, 8, 8)


def test_output_that_is_a_folder(tmp_path):
    data = tmp_path / "m.h5"
    write_small_file(data, make_operator("denoise"))
    folder = tmp_path / "out"
    folder.mkdir()
    result = run_cli("reconstruct", data, "--out", folder, "--method", "cgls")
    assert_clean_failure(result, folder, tmp_path, {"m.h5", "out"})


def test_colour_images_end_to_end(tmp_path):
    out = simulate(tmp_path, "inpainting", "--channels", "3", n=3)
    result = run_cli("reconstruct", out, "--out", tmp_path / "r.h5", "--method", "tv", "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(tmp_path / "r.h5") as f:
        assert f["reconstructions"].shape == (3, 3, 24, 24) and np.all(f["converged"][()])


def test_train_option_defaults_are_the_configs_defaults():
    """`drip train`'s defaults are written out in the CLI (so that --help does not import
    torch); they must be the ones TrainConfig and ModelConfig document."""
    import typer

    from drip_cli.cli import app
    from drip_cli.regularizers.model import ModelConfig
    from drip_cli.training import TrainConfig
    from drip_cli.training.trainer import OPERATOR_EPS, SHARP_EPS, SHARP_SOLVES, TRAIN_REWEIGHT

    params = typer.main.get_command(app).commands["train"].params
    options = {p.name: p.default for p in params}
    train_fields = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
                    "lr_schedule": "lr_schedule", "cg_iterations": "cg_iterations", "tau": "tau",
                    "seed": "seed"}
    model_fields = {"architecture": "architecture", "width": "width", "filters": "n_filters",
                    "kernel_size": "kernel_size",
                    "potential_scales": "potential_scales", "dilation_levels": "dilation_levels",
                    "max_iterations": "max_iterations"}
    for option, name in train_fields.items():
        assert options[option] == getattr(TrainConfig, name), option
    for option, name in model_fields.items():
        assert options[option] == getattr(ModelConfig, name), option
    weights = tuple(float(w) for w in options["loss_weights"].split(","))
    assert weights == TrainConfig.__dataclass_fields__["loss_weights"].default
    # the operator's defaults (operator_defaults): their help names them
    by_name = {p.name: p for p in params}
    helps = {name: " ".join(by_name[name].help.split())
             for name in ("eps", "solver_tolerance", "solver_iterations", "reweight")}
    assert all(options[name] is None for name in helps)
    assert (f"{OPERATOR_EPS['tomography']:g} for tomography, {ModelConfig.eps:g} for other"
            in helps["eps"]) and f"at most {SHARP_EPS:g}" in helps["solver_tolerance"]
    assert (f"{SHARP_SOLVES['train_solver_tolerance']:g} for sharp models" in helps["solver_tolerance"]
            and f"else {TrainConfig.train_solver_tolerance:g}" in helps["solver_tolerance"])
    assert (f"{SHARP_SOLVES['train_solver_iterations']} for sharp models, else "
            f"{TrainConfig.train_solver_iterations}" in helps["solver_iterations"])
    assert f"Default: {TRAIN_REWEIGHT} for the convex architecture" in helps["reweight"]


def test_reconstruct_max_iterations_help_names_the_methods_defaults():
    """`drip reconstruct --max-iterations`'s help writes out each solver's default cap (so that
    --help does not import torch); they must be the caps the methods and models really use."""
    import typer

    from drip_cli.cli import app
    from drip_cli.methods import CGLSMethod, TVMethod
    from drip_cli.regularizers.model import ModelConfig

    options = {p.name: p for p in typer.main.get_command(app).commands["reconstruct"].params}
    text = " ".join(options["max_iterations"].help.split())
    assert f"({ModelConfig.max_iterations} for new models)" in text
    assert f"{TVMethod().max_iterations} for tv" in text
    assert f"{CGLSMethod().max_iterations} for cgls" in text


def test_reweight_options_are_refused_where_they_do_not_apply(tmp_path):
    data = tmp_path / "d.h5"
    write_small_file(data, make_operator("blur", (1, 12, 12)))
    for options in (["--method", "tv", "--reweight", "1"], ["--method", "cgls", "--edge-scale", "0.1"]):
        message = "--reweight and --edge-scale apply to --method drip"
        result = run_cli("reconstruct", data, "--out", tmp_path / "r.h5", *options)
        assert_one_line_error(result, message, tmp_path / "r.h5")


@pytest.mark.parametrize("option, value, message", [
    ("--edge-scale", "inf", "--edge-scale must be a finite number, got inf"),
    ("--edge-scale", "1e300", "--edge-scale must be at most 1e30, got 1e+300"),
    ("--patch-weight", "inf", "--patch-weight must be a finite number, got inf"),
])
def test_a_models_settings_given_on_the_command_line_are_checked_as_its_file_is(
        option, value, message, tmp_path):
    """(They were used as given: the reweighting weights became NaN, and the error blamed the
    model's weights as out of range for the data.)"""
    samples = Path(__file__).resolve().parent.parent / "sample_data"
    model = samples / "drip_blur.safetensors"
    result = run_cli("reconstruct", samples / "blur.h5", "--model", model, "--out",
                     tmp_path / "r.h5", option, value)
    assert_one_line_error(result, message, tmp_path / "r.h5")
    result = run_cli("evaluate", samples / "blur.h5", "--model", model, "--out", tmp_path / "ev",
                     "--methods", "drip", "--noise-percent", 2, option, value)
    assert_one_line_error(result, message, tmp_path / "ev")


def test_default_batch_size_follows_the_device_and_the_image_size():
    """64 samples on the CPU, fewer where they would hold more than 8 images of 256x256 (the
    memory grows with the batch); on a GPU, where an iteration costs about the same for any
    batch, as many as hold 512 grayscale 64x64 images (``drip reconstruct`` and ``drip
    evaluate`` without --batch-size)."""
    import torch

    from drip_cli.reconstruct import default_batch_size

    cpu, gpu = torch.device("cpu"), torch.device("cuda:0")
    assert default_batch_size(cpu, (1, 64, 64)) == default_batch_size(cpu, (1, 128, 64)) == 64
    assert default_batch_size(cpu, (3, 64, 64)) == 42
    assert default_batch_size(cpu, (1, 256, 256)) == 8
    assert default_batch_size(cpu, (3, 256, 256)) == 2
    assert default_batch_size(cpu, (1, 4096, 4096)) == 1
    assert default_batch_size(gpu, (1, 64, 64)) == 512
    assert default_batch_size(gpu, (3, 64, 64)) == 170
    assert default_batch_size(gpu, (1, 256, 256)) == 32
    assert default_batch_size(gpu, (3, 2048, 2048)) == 1


def test_running_out_of_memory_is_one_line(tmp_path):
    """A request larger than the machine (182 TiB for one phantom) is an out-of-memory line that
    says what needs less, not an 'unexpected MemoryError'."""
    out = tmp_path / "huge.h5"
    result = run_cli("simulate", "phantom:ellipses", out, "--operator", "denoise",
                     "--image-size", 5_000_000, "--num-images", 1, "-q")
    assert_one_line_error(result, "out of memory", out)
    assert "--batch-size" in result.stderr


@pytest.mark.parametrize("text,shown", [("2", "2"), ("1:5", "1:5"), ("0.5:2.25", "0.5:2.25"),
                                        ("2:2.0000001", "2")])
def test_noise_percent_is_shown_as_it_is_written(text, shown):
    from drip_cli.data import format_noise_percent, parse_noise_percent

    assert format_noise_percent(*parse_noise_percent(text)) == shown
    assert parse_noise_percent(shown) == pytest.approx(parse_noise_percent(text))


@pytest.mark.parametrize("noise,stored,shown", [("2", "2", "│ 2 "), ("1:5", "1:5", " .. ")])
def test_info_shows_one_noise_level_once(noise, stored, shown, tmp_path):
    """A file simulated at one noise level records it as `--noise-percent` takes it, and `drip
    info` shows one value where every sample agrees ("2", not "2 .. 2 (mean 2)")."""
    data = simulate(tmp_path, "denoise", "--noise-percent", noise)
    with h5py.File(data) as f:
        assert f.attrs["noise_percent_range"] == stored
    result = run_cli("info", data)
    assert result.exit_code == 0, result.stderr
    line = next(text for text in result.stdout.splitlines() if "noise percent" in text)
    assert shown in line


def test_the_readmes_own_measurements_example_runs(tmp_path, monkeypatch):
    """README's "Your own measurements" snippet, on a small blurred image of our own making,
    writes a file that `drip info` reads and `drip reconstruct` fits."""
    from pathlib import Path

    import torch

    from drip_cli.operators import Blur, gaussian_psf

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Your own measurements", 1)[1]
    snippet = section.split("```python", 1)[1].split("```", 1)[0]
    psf = gaussian_psf(1.5, 7)
    truth = torch.rand(2, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    blurred = Blur((1, 24, 24), psf)(truth)
    monkeypatch.chdir(tmp_path)
    np.save("my_psf.npy", psf)
    noise = torch.randn(blurred.shape, generator=torch.Generator().manual_seed(1))
    np.save("my_blurred.npy", (blurred + 0.01 * noise).numpy())
    exec(compile(snippet, "README.md", "exec"), {})
    assert run_cli("info", "mine.h5").exit_code == 0
    result = run_cli("reconstruct", "mine.h5", "--out", "mine_tv.h5", "--method", "tv", "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File("mine_tv.h5") as f:
        assert np.all(f["converged"][()]) and np.all(f["discrepancy_ratio"][()] <= 1.0)


def test_the_help_examples_name_real_options():
    """Every example under a command's --help parses: its options exist and take the values
    given (parsed, not run), so the examples cannot drift from the commands."""
    import shlex

    import typer

    from drip_cli.cli import EXAMPLES, app

    group = typer.main.get_command(app)
    assert set(EXAMPLES) == set(group.commands)
    for name, examples in EXAMPLES.items():
        for example in examples:
            words = shlex.split(example)
            assert words[:2] == ["drip", name], example
            command = group.commands[name]
            command.make_context(name, words[2:])   # raises on an unknown option or bad value
        shown = " ".join(run_cli(name, "--help").stdout.split()).replace(" │", "")
        assert examples[0] in shown.replace(" \\ ", " ")   # lines continued with a backslash


def test_every_option_has_help():
    """Each option and argument of every command says what it is in --help."""
    import typer

    from drip_cli.cli import app

    group = typer.main.get_command(app)
    missing = [f"{name} {p.name}" for name, command in group.commands.items()
               for p in command.params if not getattr(p, "help", None)]
    assert not missing, missing


def test_command_descriptions_are_whole_paragraphs():
    """Each command's description reaches typer as paragraphs of one line each: typer 0.2x
    keeps the line breaks of the paragraphs after the first, and the terminal wrapped those
    lines again ('... A\n.npy array\nkeeps the values ...' in drip export --help)."""
    import typer

    from drip_cli.cli import app

    for name, command in typer.main.get_command(app).commands.items():
        paragraphs = command.help.split("\n\n")
        assert len(paragraphs) >= 1 and all(text and "\n" not in text for text in paragraphs), name
    help_text = run_cli("export", "--help").stdout
    description = help_text.split("Usage:")[1].split("╭")[0].strip("\n").split("\n\n")[1:]
    for paragraph in description:   # wrapped to 80 columns: only a paragraph's last line short
        lines = [line.rstrip() for line in paragraph.splitlines()]
        assert all(len(line) > 60 for line in lines[:-1]), lines


def test_help_examples_fit_80_columns_and_run_as_one_command_each():
    """Typer wrapped an example longer than the terminal into lines that a shell runs as two
    commands (``... --report`` over ``blur_tv.json``). Each example now shows as lines of at
    most 76 characters continued with a backslash (where typer keeps an epilog's lines), which
    bash reads back as the example's words."""
    from drip_cli.cli import _EPILOG_KEEPS_LINES, EXAMPLES, example_lines

    for name, examples in EXAMPLES.items():
        for example in examples:
            lines = example_lines(example)
            assert all(len(line) <= 76 for line in lines), lines
            assert len(lines) == 1 or len(example) > 76, lines
            words = subprocess.run(["bash", "-c", 'printf "%s\\n" ' + "\n".join(lines)],
                                   capture_output=True, text=True, check=True).stdout
            assert words.splitlines() == example.split()
        if _EPILOG_KEEPS_LINES:
            shown = run_cli(name, "--help").stdout.split("Examples:")[1].splitlines()
            assert [line.strip() for line in shown if line.strip()] == \
                [line.strip() for example in examples for line in example_lines(example)]


def test_help_shows_switches_and_option_names_plainly():
    """Newer typer labels a switch ``<bool>`` in --help (``--quiet -q <bool>``), which reads as
    if it took a value: drip's switches carry no label, whatever typer's version. And at 80
    columns every option's name shows whole: the column of negative switches that
    ``--guide-gradient/--no-guide-gradient`` added cut nine of drip train's names short
    (``--latent-chann…``), nor a choice of values cut inside a word; nor does --seed show
    its range's top, 9223372036854775807."""
    import re

    import typer

    from drip_cli.cli import app

    group = typer.main.get_command(app)
    switches = {"": [p.name for p in group.params if getattr(p, "is_flag", False)]}
    switches.update({name: [p.name for p in command.params if getattr(p, "is_flag", False)]
                     for name, command in group.commands.items()})
    assert "quiet" in switches["reconstruct"] and "version" in switches[""]
    for name, names in switches.items():
        lines = run_cli(*[name] * bool(name), "--help").stdout.splitlines()
        assert not [line for line in lines if re.search(r"--[\w-]*…", line)], name
        assert "922337" not in "".join(lines)   # --seed's top, 2^63 - 1, wrapped in two
        # choices with spaces between, which wrap between words (was <denoise|blur|inpaint
        # over ing|tomography|matrix>)
        assert not [line for line in lines if re.search(r"\w\|\w+\|\w", line)], name
        for switch in names:
            option = "--" + switch.replace("_", "-")
            line = next(line for line in lines if f" {option} " in line)
            assert "bool" not in line and "BOOLEAN" not in line, line


def test_a_file_open_for_writing_elsewhere_is_named_so(tmp_path):
    """HDF5 locks a file that a process has open for writing; every command that reads it
    says so, where the message was 'truncated or corrupt'."""
    data = tmp_path / "m.h5"
    write_small_file(data, make_operator("blur", (1, 12, 12)))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import h5py, sys, time\n"
         f"f = h5py.File({str(data)!r}, 'a')\nprint('open', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        out = tmp_path / "r.h5"
        for command in (("reconstruct", data, "--method", "cgls", "--out", out),
                        ("info", data), ("simulate", data, out, "--operator", "blur")):
            result = run_cli(*command)
            assert_one_line_error(result, "m.h5: is open for writing in another process", out)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()   # else its pipe is left for the garbage collector (ResourceWarning)


def _drip_with_file_size_limit(limit: int, *args) -> subprocess.CompletedProcess:
    """``drip ARGS`` in a child process that may write no file larger than ``limit`` bytes
    (``ulimit -f``): writes beyond it fail with EFBIG, as writes on a full disk fail with
    ENOSPC, through the same paths. The child starts with no matplotlib font cache, as on a
    fresh machine, so that writing that cache fails under the limit too."""
    import resource

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    with tempfile.TemporaryDirectory() as matplotlib_config:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
               "MPLCONFIGDIR": matplotlib_config}
        return subprocess.run([sys.executable, "-m", "drip_cli", *map(str, args), "-q"],
                              capture_output=True, text=True, env=env,
                              preexec_fn=limit_file_size)


def test_a_refused_write_is_one_line_and_leaves_nothing(tmp_path):
    """A full disk (here a file-size limit) once ended a reconstruction in 'unexpected
    RuntimeError: Can't decrement id ref count' and a segmentation fault, and left half a
    report of drip evaluate behind."""
    data = tmp_path / "m.h5"
    write_small_file(data, make_operator("blur", (1, 32, 32)), n=32)
    before = sorted(p.name for p in tmp_path.iterdir())
    done = _drip_with_file_size_limit(40_000, "reconstruct", data, "--method", "cgls",
                                      "--out", tmp_path / "r.h5")
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (f"drip: error: {tmp_path / 'r.h5'}: cannot write output: "
                                   "File too large (nothing was written)")
    done = _drip_with_file_size_limit(20_000, "evaluate", data, "--methods", "cgls",
                                      "--noise-percent", "2", "--out", tmp_path / "a" / "report")
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (f"drip: error: {tmp_path / 'a' / 'report'}: cannot write "
                                   "output: File too large (nothing was written)")
    assert "PSNR dB (fit fraction)" in done.stdout   # its figures were shown all the same
    assert sorted(p.name for p in tmp_path.iterdir()) == before   # nor the folder made for it
    # a small contiguous dataset (a sparse matrix's row pointers) that HDF5 wrote only as h5py
    # freed it: refused there, the write crashed the interpreter at the file's close
    matrix = Path(__file__).resolve().parent.parent / "sample_data" / "downsample2x_64.npz"
    done = _drip_with_file_size_limit(50_000, "simulate", "phantom:ellipses", tmp_path / "s.h5",
                                      "--operator", "matrix", "--matrix", matrix,
                                      "--num-images", 32)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (f"drip: error: {tmp_path / 's.h5'}: cannot write output: "
                                   "File too large (nothing was written)")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_outputs_with_the_longest_names_and_unwritable_folders(tmp_path, monkeypatch):
    """A 253-character output name (a file name may have 255) was refused as 'File name too
    long': the temporary file beside it added its own characters. evaluate and train, given a
    folder they cannot write (a read-only disk, here simulated), computed everything first
    and then failed with 'unexpected OSError'; they now stop at once, naming the folder."""
    data = simulate(tmp_path, "denoise")
    long_name = tmp_path / ("r" * 250 + ".h5")
    assert run_cli("reconstruct", data, "--method", "cgls", "--out", long_name, "-q").exit_code == 0
    assert long_name.exists()
    report = tmp_path / ("e" * 250)
    assert run_cli("evaluate", data, "--methods", "cgls", "--noise-percent", "2", "--out", report,
                   "-q").exit_code == 0
    assert (report / "robustness.json").exists()

    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
        False if Path(path) == locked and mode & os.W_OK else access(path, mode, **kw)))
    for command in (("evaluate", data, "--methods", "cgls", "--out", locked / "a" / "report"),
                    ("train", data, "--out", locked / "run")):
        assert_one_line_error(run_cli(*command, "-q"), f"cannot write output: folder {locked} "
                              "is not writable", locked / "a")
    assert list(locked.iterdir()) == []


def test_an_output_named_by_a_pipe_or_device_is_refused(tmp_path):
    """Outputs are renamed onto their name when finished: --out fifo replaced the pipe with a
    regular file, and as root --out /dev/null would have replaced the device. Inputs that are
    pipes are refused before anything opens them."""
    data = simulate(tmp_path, "denoise")
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    for command in (("reconstruct", data, "--method", "cgls", "--out", pipe),
                    ("reconstruct", data, "--method", "cgls", "--out", tmp_path / "r.h5",
                     "--report", pipe),
                    ("simulate", data, pipe, "--operator", "denoise")):
        assert_one_line_error(run_cli(*command, "-q"), "pipe: is not a regular file (a device "
                              "or a pipe)", tmp_path / "r.h5")
        assert pipe.is_fifo()
    # read, a pipe that no process writes blocked for good (--model: not even SIGTERM ended it)
    for command in (("reconstruct", pipe, "--method", "cgls", "--out", tmp_path / "r.h5"),
                    ("reconstruct", data, "--model", pipe, "--out", tmp_path / "r.h5"),
                    ("simulate", pipe, tmp_path / "r.h5", "--operator", "denoise"),
                    ("info", pipe)):
        assert_one_line_error(run_cli(*command, "-q"), "pipe: is not a regular file (a device "
                              "or a pipe), expected", tmp_path / "r.h5")
    # the operators' own files too: --psf, --mask and --angle-file (a .npy array, a picture,
    # a text file) waited on the pipe until killed
    picture = tmp_path / "pipe.png"
    os.mkfifo(picture)
    phantoms = ("simulate", "phantom:ellipses", tmp_path / "r.h5", "--num-images", 1,
                "--image-size", 16, "--noise-percent", 1)
    for options, name in ((("--operator", "blur", "--psf", pipe), "pipe"),
                          (("--operator", "inpainting", "--mask", pipe), "pipe"),
                          (("--operator", "inpainting", "--mask", picture), "pipe.png"),
                          (("--operator", "tomography", "--angle-file", pipe), "pipe")):
        assert_one_line_error(run_cli(*phantoms, *options, "-q"), f"{name}: is not a regular "
                              "file (a device or a pipe), expected", tmp_path / "r.h5")


def test_a_dash_as_an_output_is_refused(tmp_path, monkeypatch):
    """'-', standard output to many tools, became a file or a folder named '-'."""
    data = simulate(tmp_path, "denoise")
    monkeypatch.chdir(tmp_path)
    for command in (("reconstruct", data, "--method", "cgls", "--out", "-"),
                    ("reconstruct", data, "--method", "cgls", "--out", "r.h5", "--report", "-"),
                    ("export", data, "-"), ("evaluate", data, "--methods", "cgls", "--out", "-")):
        assert_one_line_error(run_cli(*command, "-q"), "-: is not a name drip can write to",
                              tmp_path / "-")
        assert not (tmp_path / "r.h5").exists()


def test_broken_symbolic_links_are_named(tmp_path):
    """A loop of symbolic links as input ended in 'unexpected RuntimeError: Symlink loop', and
    a link to a missing folder as the report or run folder in 'unexpected FileExistsError'."""
    data = simulate(tmp_path, "denoise")
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    assert_one_line_error(run_cli("reconstruct", tmp_path / "loop_a", "--method", "cgls", "--out",
                                  tmp_path / "r.h5", "-q"), "loop_a: no such file", tmp_path / "r.h5")
    (tmp_path / "gone").symlink_to(tmp_path / "missing" / "folder")
    for command in (("train", data, "--out", tmp_path / "gone"),
                    ("evaluate", data, "--methods", "cgls", "--out", tmp_path / "gone")):
        assert_one_line_error(run_cli(*command, "-q"), f"gone: is a symbolic link to "
                              f"{tmp_path / 'missing' / 'folder'}, which does not exist",
                              tmp_path / "missing")


def test_a_discrepancy_constant_well_below_one_is_warned_about(tmp_path):
    """--tau 0.9 asks for a fit closer than the noise: on sample_data/blur.h5 CGLS fell from
    29.65 to 18.92 dB and DRIP from 33.35 to 20.10 dB (and 4 times slower), with no word
    from drip. 0.95, as in the README's sweep, stays quiet."""
    data = simulate(tmp_path, "denoise")
    for tau, warned in (("0.9", True), ("0.95", False), ("1.2", False)):
        result = run_cli("reconstruct", data, "--method", "cgls", "--tau", tau, "--out",
                         tmp_path / "r.h5", "-q")
        assert result.exit_code == 0, result.stderr
        assert ("asks for a fit closer than the noise level" in result.stderr) == warned
    result = run_cli("evaluate", data, "--methods", "cgls", "--tau", "0.9,1",
                     "--noise-percent", "2", "--out", tmp_path / "report", "-q")
    assert result.exit_code == 0 and "--tau 0.9 asks for a fit closer" in result.stderr


def test_a_signal_lost_in_a_destructor_still_stops_the_command(tmp_path, capsys):
    """Python prints an exception raised in a destructor as "Exception ignored" and goes on: a
    SIGTERM that arrived while h5py freed an object let drip simulate finish its file and
    exit 0. The signal is now recorded, and raised again before the output appears."""
    import signal

    import typer

    from drip_cli.cli import _errors
    from drip_cli.io import atomic_h5

    class SignalledWhenFreed:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)   # its exception is raised here, and lost

    target = tmp_path / "out.h5"
    with pytest.raises(typer.Exit) as stopped:
        with _errors(False):
            with atomic_h5(target) as handle:
                handle["x"] = np.zeros(3)
                SignalledWhenFreed()
                handle["y"] = np.zeros(3)   # the work went on
    assert stopped.value.exit_code == 143
    assert capsys.readouterr().err.strip() == "drip: error: terminated; no output was written"
    assert list(tmp_path.iterdir()) == []
    from drip_cli.errors import SIGNALS_RECEIVED

    assert SIGNALS_RECEIVED == []   # nor does it stop the next command of this process


def test_choices_are_read_whatever_their_case(tmp_path):
    """`--operator BLUR`, `--method TV`, `--device CPU` and `--methods CGLS,Tv` name what their
    lower-case spellings name, and the files record the canonical names."""
    data = tmp_path / "m.h5"
    result = run_cli("simulate", "phantom:ellipses", data, "--operator", "BLUR", "--num-images", 3,
                     "--image-size", 16, "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(data) as f:
        assert f["operator"].attrs["kind"] == "blur"
    out = tmp_path / "r.h5"
    result = run_cli("reconstruct", data, "--out", out, "--method", "TV", "--device", "CPU", "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out) as f:
        assert f.attrs["method"] == "tv" and np.all(f["converged"][()])
    result = run_cli("evaluate", data, "--out", tmp_path / "ev", "--methods", "CGLS,Tv",
                     "--noise-percent", "2", "-q")
    assert result.exit_code == 0, result.stderr
    rows = json.loads((tmp_path / "ev" / "robustness.json").read_text())["rows"]
    assert sorted(r["method"] for r in rows) == ["cgls", "tv"]


def test_noise_levels_below_what_float32_resolves_are_refused(tmp_path):
    """Noise stds whose squares near float32's bottom (the sample tomography file scaled down:
    DRIP's solve failed inside an SVD at 5.2e-20 and 9.9e-21, blaming the model's weights) are
    refused where they enter: a file's, --noise-std, simulate's and import's; 1e-14 still
    fits. So are noise levels whose discrepancy radius overflows float32."""
    data = simulate(tmp_path, "blur")
    with h5py.File(data, "r+") as f:
        f["measurements"][...] = f["measurements"][()] * 1e-12
        f["noise_std"][...] = f["noise_std"][()] * 1e-12
    result = run_cli("reconstruct", data, "--method", "cgls", "--out", tmp_path / "r.h5", "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(tmp_path / "r.h5") as f:
        assert np.all(f["discrepancy_ratio"][()] <= 1) and np.all(f["converged"][()])
    assert_one_line_error(
        run_cli("reconstruct", data, "--method", "cgls", "--noise-std", "1e-20", "--out",
                tmp_path / "s.h5", "-q"), "--noise-std 1e-20 is below 1e-18", tmp_path / "s.h5")
    # the other end: a radius sigma sqrt(M) beyond float32 (it was Inf, and every image fitted)
    assert_one_line_error(
        run_cli("reconstruct", data, "--method", "cgls", "--noise-std", "1e40", "--out",
                tmp_path / "s.h5", "-q"), "--noise-std 1e+40 gives a discrepancy radius",
        tmp_path / "s.h5")
    with h5py.File(data, "r+") as f:
        f["noise_std"][-1] = 1e-25
    assert_one_line_error(
        run_cli("reconstruct", data, "--method", "cgls", "--out", tmp_path / "s.h5", "-q"),
        "noise std 1e-25 (sample", tmp_path / "s.h5")
    assert_one_line_error(
        run_cli("simulate", "phantom:ellipses", tmp_path / "s.h5", "--operator", "denoise",
                "--num-images", 2, "--image-size", 16, "--noise-percent", "1e-17", "-q"),
        "is below 1e-18, too small for float32 arithmetic", tmp_path / "s.h5")
    np.save(tmp_path / "b.npy", np.full((2, 16, 16), 1e-25, np.float32))
    assert_one_line_error(
        run_cli("import", tmp_path / "b.npy", tmp_path / "s.h5", "--operator", "denoise",
                "--noise-percent", 1, "-q"), "is below 1e-18", tmp_path / "s.h5")
    # drip train's fresh noise: its lowest level (here 2.7e-20 on these phantoms) is refused
    # before a run folder is made (it trained before, with a validation fit of 0.00)
    assert_one_line_error(
        run_cli("train", data, "--out", tmp_path / "run", "--noise-percent", "1e-17:1", "-q"),
        "the noise std at --noise-percent's low end", tmp_path / "run")
    # and the other end, where each enters: the radius's square was Inf, or the simulated
    # measurements overflowed and "the images are too large"
    assert_one_line_error(
        run_cli("train", data, "--out", tmp_path / "run", "--noise-percent", "1:1e40", "-q"),
        "the noise std at --noise-percent's high end", tmp_path / "run")
    assert_one_line_error(
        run_cli("simulate", "phantom:ellipses", tmp_path / "s.h5", "--operator", "denoise",
                "--num-images", 2, "--image-size", 16, "--noise-percent", "1e40", "-q"),
        "gives a discrepancy radius sigma * sqrt(256) too large for float32 arithmetic: lower "
        "--noise-percent", tmp_path / "s.h5")
    np.save(tmp_path / "b.npy", np.full((2, 16, 16), 0.5, np.float32))
    for option in ("--noise-std", "--noise-percent"):
        assert_one_line_error(
            run_cli("import", tmp_path / "b.npy", tmp_path / "s.h5", "--operator", "denoise",
                    option, "1e40", "-q"), "gives a discrepancy radius", tmp_path / "s.h5")


def test_a_noise_level_as_large_as_the_measurements_is_named(tmp_path):
    """Where the discrepancy radius tau sigma sqrt(M) is at least ||b|| (of the measured
    entries), the zero image fits the data and the constraint says nothing: such samples are
    counted in one warning (a noise level in the wrong units gave a table of flat images that
    all 'fit'); the file's own noise levels give none, and the reconstruction is still made.
    drip import warns the same where it sets the noise level."""
    data = simulate(tmp_path, "inpainting")
    result = run_cli("reconstruct", data, "--method", "cgls", "--out", tmp_path / "r.h5", "-q")
    assert result.exit_code == 0 and "warning" not in result.stderr, result.stderr
    with h5py.File(data, "r+") as f:
        measured = np.linalg.norm(f["measurements"][2])
        f["noise_std"][2] = measured / np.sqrt(f["operator/mask"][()].sum()) * 1.01
    result = run_cli("reconstruct", data, "--method", "cgls", "--out", tmp_path / "r.h5", "-q")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith("drip: warning: 1 of 6 samples have measurements no larger "
                                    "than their discrepancy radius")
    assert "Is the noise level in the measurements' units?" in result.stderr
    result = run_cli("reconstruct", data, "--method", "cgls", "--noise-std", 1e3, "--tau", 1.5,
                     "--out", tmp_path / "r.h5", "-q")
    assert result.exit_code == 0, result.stderr
    assert "warning: 6 of 6 samples" in result.stderr and "tau = 1.5)" in result.stderr
    with h5py.File(tmp_path / "r.h5") as f:
        assert np.all(f["reconstructions"][()] == 0) and np.all(f["converged"][()])
    for method in ("cgls", "tv"):   # a radius beyond float32, infinite: any image fits
        result = run_cli("reconstruct", data, "--method", method, "--tau", 1e40,
                         "--out", tmp_path / "r.h5", "-q")
        assert result.exit_code == 0 and "warning: 6 of 6 samples" in result.stderr, \
            result.stderr
    # drip import says so where the noise level is set (at the contract's tau = 1)
    with h5py.File(data) as f:
        np.save(tmp_path / "b.npy", f["measurements"][:, 0])
    result = run_cli("import", tmp_path / "b.npy", tmp_path / "i.h5", "--operator", "denoise",
                     "--noise-std", 10, "-q")
    assert result.exit_code == 0 and (tmp_path / "i.h5").exists(), result.stderr
    assert result.stderr.startswith("drip: warning: 6 of 6 samples have measurements no larger")
    result = run_cli("import", tmp_path / "b.npy", tmp_path / "j.h5", "--operator", "denoise",
                     "--noise-std", 0.01, "-q")
    assert result.exit_code == 0 and "warning" not in result.stderr, result.stderr


def test_a_narrow_table_keeps_its_title_and_caption_on_one_line():
    """rich wraps a table's title and caption to the table's width: a one-method robustness
    table printed "robustness: test.h5, blur," over "tau 1" and its caption over three lines.
    titled_table is at least as wide as they are, up to the console's width."""
    from rich.console import Console

    from drip_cli.console import titled_table

    title, caption = "robustness: test.h5, blur, tau 1", "PSNR dB (fit fraction); * inside"
    table = titled_table(title, caption=caption)
    table.add_column("noise %")
    table.add_row("1")
    out = Console(width=80, record=True, file=io.StringIO())
    out.print(table)
    lines = out.export_text().splitlines()
    assert lines[0].rstrip() == title and lines[-1].rstrip() == caption
    long = titled_table("x" * 200)   # never wider than the console
    long.add_column("a")
    out.print(long)
    assert max(map(len, out.export_text().splitlines())) <= 80


def test_a_wide_table_drops_its_rules_before_cutting_a_cell():
    """On an 80-column terminal rich cut drip reconstruct's result table to ``meth…``,
    ``samp…``, an SSIM of ``0.82…`` and ``s/im…``. A table whose cells would be cut drops its
    vertical rules and outer padding first, and a table that fits keeps its box; a key-value
    table folds a value too long for the line (a sha256) instead of cutting it."""
    import re

    from rich.console import Console

    from drip_cli.cli import summary_table
    from drip_cli.console import key_value_table

    summary = {"method": "cgls", "n_samples": 16, "psnr_mean": 29.6512, "ssim_mean": 0.822513,
               "fit_fraction": 1.0, "discrepancy_ratio_max": 0.999, "discrepancy_ratio_mean":
               0.999, "regularizer_value_mean": None, "iterations_mean": 7.1875,
               "seconds_per_image": 0.0014663}
    for width, boxed in ((80, False), (120, True)):
        out = Console(width=width, record=True, file=io.StringIO())
        out.print(summary_table("cgls on blur.h5", [summary]))
        text = out.export_text()
        assert "…" not in text and max(map(len, text.splitlines())) <= width, text
        for cell in ("samples", "s/image", "0.8225", "0.001466", "7.188"):
            assert cell in text, text
        assert ("┃" in text) == boxed, text
    digest = "391c21ab7f34410028301bc08b22e97b29529dcfcf5b3e4a135ddac53f8a3e05"
    out = Console(width=80, record=True, file=io.StringIO())
    out.print(key_value_table("model", {"sha256": digest, "training data sha256": digest}))
    text = out.export_text()
    assert "…" not in text and re.sub(r"[\s│┌┐└┘─┬┴]", "", text).count(digest) == 2, text


def test_reconstruct_max_samples_takes_the_first_ones(tmp_path):
    """--max-samples N reconstructs the first N samples only, the same as a whole run does
    them, and the output records which (``source_samples``); N past the end takes all."""
    data = simulate(tmp_path, "blur")
    whole, part, over = tmp_path / "whole.h5", tmp_path / "part.h5", tmp_path / "over.h5"
    for out, extra in ((whole, ()), (part, ("--max-samples", 2)), (over, ("--max-samples", 99))):
        result = run_cli("reconstruct", data, "--method", "cgls", "--out", out, "-q", *extra)
        assert result.exit_code == 0, result.stderr
    with h5py.File(whole) as a, h5py.File(part) as b, h5py.File(over) as c:
        assert b["reconstructions"].shape[0] == 2 and b.attrs["source_samples"] == "0:2"
        np.testing.assert_allclose(b["reconstructions"][()], a["reconstructions"][:2], atol=1e-5)
        np.testing.assert_array_equal(b["iterations"][()], a["iterations"][:2])
        assert c["reconstructions"].shape[0] == 6 and "source_samples" not in c.attrs
        assert "source_samples" not in a.attrs
