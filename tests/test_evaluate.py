"""The unrolled baseline network and `drip evaluate` (robustness tables, plot, previews)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from conftest import DEVICES, make_operator
from drip_cli.io.models import load_model
from helpers import assert_one_line_error, run_cli, write_small_file

TINY = ["--batch-size", "4", "--filters", "4", "--kernel-size", "3", "--cg-iterations", "5",
        "--device", "cpu", "--seed", "5", "-q"]
CONTRACT_ROW_KEYS = {"method", "noise_percent", "n_samples", "psnr_mean", "ssim_mean",
                     "discrepancy_ratio_max", "fit_fraction", "regularizer_value_mean",
                     "seconds_per_image"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A small blur file, a DRIP model and an unrolled model trained on it for one epoch."""
    from drip_cli.operators import Blur, gaussian_psf

    folder = tmp_path_factory.mktemp("evaluate")
    data = folder / "blur.h5"
    write_small_file(data, Blur((1, 12, 12), gaussian_psf(1.0)), n=6)
    for name, extra in (("drip_run", []), ("unrolled_run", ["--architecture", "unrolled",
                                                            "--layers", "2", "--width", "4"])):
        result = run_cli("train", data, "--out", folder / name, "--epochs", 1,
                         "--noise-percent", "1:5", *TINY, *extra)
        assert result.exit_code == 0, result.stderr
    return folder


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["blur", "tomography", "inpainting"])
def test_exact_line_search_minimises_the_residual_along_the_gradient(kind, device):
    from drip_cli.regularizers.unrolled import steepest_descent_step

    op = make_operator(kind).to(device).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((3, *op.image_shape), generator=gen, dtype=torch.float64).to(device)
    b = op(torch.rand((3, *op.image_shape), generator=gen, dtype=torch.float64).to(device))
    step = steepest_descent_step(op, x, b)
    g = op.adjoint(op(x) - b)

    def residual(a):
        return ((op(x - a[:, None, None, None] * g) - b) ** 2).flatten(1).sum(1)

    a = ((x - step).flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1))
    for factor in (0.9, 1.1):   # the line-search step beats a shorter and a longer one, per sample
        assert torch.all(residual(a) < residual(factor * a))
    assert torch.all(residual(a) < residual(torch.zeros_like(a)))


def test_untrained_unrolled_network_is_steepest_descent_and_trains_by_backprop(tmp_path):
    from drip_cli.regularizers.unrolled import UnrolledNetwork, steepest_descent_step

    op = make_operator("blur", (1, 12, 12))
    b = op(torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1)))
    # seeded, and 8 channels: at width 4, 3 of 300 random starts had a block whose ReLUs were
    # all off on this input, so its last layer got no gradient (a flaky failure)
    torch.manual_seed(0)
    network = UnrolledNetwork(1, layers=3, width=8)
    expected = torch.zeros(2, 1, 12, 12)
    for _ in range(4):
        expected = steepest_descent_step(op, expected, b)
    assert torch.allclose(network(op, b), expected, atol=1e-6)
    network(op, b).pow(2).sum().backward()   # the zero last layers still receive gradients
    assert all(block.layers[-1].weight.grad.abs().sum() > 0 for block in network.blocks)
    result = network.solve(op, b)
    assert result.regularizer_value is None and torch.all(result.iterations == 3)


def test_unrolled_model_reconstructs_and_reports_its_fit_as_it_is(runs, tmp_path):
    import h5py

    model, info, _ = load_model(runs / "unrolled_run")
    assert info.config.architecture == "unrolled" and len(model.blocks) == 2
    out = tmp_path / "r.h5"
    result = run_cli("reconstruct", runs / "blur.h5", "--model", runs / "unrolled_run",
                     "--out", out, "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out) as f:
        assert f.attrs["method"] == "unrolled"
        ratio = f["discrepancy_ratio"][()]
        assert np.array_equal(f["converged"][()], ratio <= 1.0)
        assert np.all(np.isnan(f["regularizer_value"][()]))
    # its unfit samples are not the noise level's or a cap's: the note said "--max-iterations
    # raises it", an option refused for this network
    unfit = run_cli("reconstruct", runs / "blur.h5", "--model", runs / "unrolled_run",
                    "--noise-std", 1e-6, "--out", out, "-q")
    note = " ".join(unfit.stdout.split())
    assert unfit.exit_code == 0 and "sample(s) do not fit the data" in note, unfit.stderr
    assert "runs its fixed number of steps and does not enforce the fit" in note
    assert "--max-iterations" not in note and "--noise-std" not in note
    wrong = run_cli("reconstruct", runs / "blur.h5", "--model", runs / "unrolled_run",
                    "--method", "drip", "--out", tmp_path / "r2.h5")
    assert wrong.exit_code == 1 and "unrolled" in wrong.stderr and not (tmp_path / "r2.h5").exists()
    capped = run_cli("reconstruct", runs / "blur.h5", "--model", runs / "unrolled_run",
                     "--max-iterations", 5, "--out", tmp_path / "r2.h5")
    assert capped.exit_code == 1 and "--layers" in capped.stderr and not (tmp_path / "r2.h5").exists()
    reweighted = run_cli("reconstruct", runs / "blur.h5", "--model", runs / "unrolled_run",
                         "--reweight", 1, "--out", tmp_path / "r2.h5")
    assert reweighted.exit_code == 1 and not (tmp_path / "r2.h5").exists()
    assert "apply to drip models, not the unrolled network" in reweighted.stderr
    shown = run_cli("info", runs / "unrolled_run")
    assert shown.exit_code == 0 and "unrolled" in shown.stdout and "Lipschitz" not in shown.stdout
    assert "width" in shown.stdout and "n_filters" not in shown.stdout   # only what it uses
    refused = run_cli("train", runs / "blur.h5", "--out", tmp_path / "run", "--architecture",
                      "unrolled", "--loss-weights", "1,1,0", "-q")
    assert refused.exit_code == 1 and "--loss-weights" in refused.stderr


def test_evaluate_writes_every_file_with_the_contract_keys(runs, tmp_path):
    report = tmp_path / "report"
    result = run_cli("evaluate", runs / "blur.h5", "--model", runs / "drip_run",
                     "--model", runs / "unrolled_run", "--out", report,
                     "--noise-percent", "2,10", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.stderr
    # trained on blur, a periodic operator: the model's embedding is periodic too
    assert load_model(runs / "drip_run")[0].config.embedding_boundary == "periodic"
    for name in ("robustness.json", "robustness.csv", "robustness.md", "robustness.png",
                 "samples.csv", "previews.png"):
        assert (report / name).stat().st_size > 0, name
    rows = json.loads((report / "robustness.json").read_text())["rows"]
    assert {(r["method"], r["noise_percent"]) for r in rows} == {
        (m, p) for m in ("cgls", "tv", "drip", "unrolled") for p in (2.0, 10.0)}
    for row in rows:
        assert CONTRACT_ROW_KEYS <= row.keys()
        assert row["n_samples"] == 6
        if row["method"] != "unrolled":   # the methods with a data-fit guarantee keep it
            assert row["fit_fraction"] == 1.0 and row["discrepancy_ratio_max"] <= 1.0
    drip = [r for r in rows if r["method"] == "drip"]
    assert all(np.isfinite(r["regularizer_value_mean"]) and r["in_training_range"] is not None
               for r in drip)
    assert [r["in_training_range"] for r in drip] == [True, False]   # trained on 1-5%
    # the truth, measured through E z = x, is a feasible point: min R over the data-fit set is below it
    assert all(r["regularizer_value_truth_mean"] >= r["regularizer_value_mean"] for r in drip)
    with open(report / "samples.csv") as handle:
        samples = list(csv.DictReader(handle))
    assert len(samples) == 4 * 2 * 6
    # per sample and per row: how many stopped by the solver's own criterion, not its cap
    for row in rows:
        solved = [s["solver_converged"] == "True" for s in samples
                  if (s["method"], float(s["noise_percent"])) == (row["method"], row["noise_percent"])]
        assert row["solver_converged_fraction"] == pytest.approx(np.mean(solved))
    markdown = (report / "robustness.md").read_text()
    assert "| 2 * |" in markdown and "| 10 |" in markdown and "unrolled" in markdown
    assert "2 *" in result.stdout   # the console table marks the training range
    # every other method paired with TV on the same samples, as the rows' means say
    paired = json.loads((report / "robustness.json").read_text())["paired"]
    means = {(r["method"], r["noise_percent"]): r["psnr_mean"] for r in rows}
    assert {(p["method"], p["noise_percent"]) for p in paired} == {
        (m, p) for m in ("cgls", "drip", "unrolled") for p in (2.0, 10.0)}
    for p in paired:
        assert p["reference"] == "tv" and p["n_samples"] == 6
        assert p["psnr_difference_mean"] == pytest.approx(
            means[p["method"], p["noise_percent"]] - means["tv", p["noise_percent"]], abs=1e-9)
        assert p["psnr_difference_ci_low"] < p["psnr_difference_mean"] < p["psnr_difference_ci_high"]
    assert "paired with tv" in markdown and "paired with tv" in result.stdout


def test_psnr_and_ssim_per_sample_of_arrays_or_tensors_of_one_shape():
    """The metrics of the library: per sample, of NumPy arrays or tensors alike (ssim failed on
    tensors: "'Tensor' object has no attribute 'astype'"), and refused for shapes that differ,
    which psnr broadcast in silence (a batch of 1 against 2 scored the one twice)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from drip_cli.evaluation import psnr, ssim

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    u = (x + 0.05 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    for metric, one in [(psnr, lambda a, b: peak_signal_noise_ratio(b, a, data_range=1.0)),
                        (ssim, lambda a, b: np.mean([structural_similarity(
                            b[c], a[c], data_range=1.0) for c in range(3)]))]:
        expected = [one(u[i].numpy(), x[i].numpy()) for i in range(2)]
        np.testing.assert_allclose(metric(u, x), expected, rtol=1e-12)
        np.testing.assert_allclose(metric(u.numpy(), x.float().numpy()), expected, rtol=1e-6)
        for a, b in [(u[:1], x), (u[0], x[0])]:
            with pytest.raises(ValueError, match="expected two .N, C, H, W. arrays of one shape"):
                metric(a, b)
    assert np.isnan(ssim(u[..., :6, :6], x[..., :6, :6])).all()   # smaller than its window


def test_paired_differences_are_the_t_interval_of_the_per_sample_differences():
    from drip_cli.evaluation.comparison import paired_differences

    def records(method, values, tau=1.0):
        return [{"method": method, "noise_percent": 2.0, "tau": tau, "sample": i, "psnr": v,
                 "ssim": v / 100} for i, v in enumerate(values)]

    rows = [{"method": m, "base_method": m, "noise_percent": 2.0, "tau": 1.0}
            for m in ("drip", "tv", "cgls")]
    samples = (records("drip", [31, 32, 30, 33, np.inf]) + records("tv", [30, 31, 30.5, 31, 40])
               + records("cgls", [29, 29, 29, 29, 29]))
    drip, cgls = paired_differences(rows, samples)
    difference = np.array([1, 1, -0.5, 2])   # the exact reconstruction's sample left out
    half = 3.182446305284263 * difference.std(ddof=1) / 2   # t(0.975, 3 degrees), sqrt(4)
    assert (drip["method"], drip["reference"], drip["n_samples"]) == ("drip", "tv", 4)
    assert drip["psnr_difference_mean"] == pytest.approx(0.875)
    assert drip["psnr_difference_ci_low"] == pytest.approx(0.875 - half)
    assert drip["psnr_difference_ci_high"] == pytest.approx(0.875 + half)
    assert drip["ssim_difference_mean"] == pytest.approx(0.00875)
    assert drip["ahead_fraction"] == 0.75
    assert cgls["n_samples"] == 5 and cgls["ahead_fraction"] == 0.0
    # CGLS is the reference where TV was not evaluated; with neither there is none
    without_tv = [r for r in rows if r["method"] != "tv"]
    (only,) = paired_differences(without_tv, samples)
    assert (only["method"], only["reference"]) == ("drip", "cgls")
    assert paired_differences(rows[:1], samples) == []


def test_evaluate_pairs_with_the_reference_asked_for(runs, tmp_path):
    out = tmp_path / "report"
    result = run_cli("evaluate", runs / "blur.h5", "--model", runs / "drip_run", "--out", out,
                     "--methods", "cgls,tv,drip", "--noise-percent", "2", "--reference", "drip",
                     "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "robustness.json").read_text())
    assert [(p["method"], p["reference"]) for p in report["paired"]] == [("cgls", "drip"),
                                                                         ("tv", "drip")]
    assert "paired with drip" in result.stdout


def test_evaluate_reweight_applies_to_the_drip_models(runs, tmp_path):
    iterations = {}
    for passes in ("0", "1"):
        out = tmp_path / passes
        result = run_cli("evaluate", runs / "blur.h5", "--model", runs / "drip_run", "--out", out,
                         "--methods", "drip", "--noise-percent", "2", "--reweight", passes, "-q")
        assert result.exit_code == 0, result.stderr
        (row,) = json.loads((out / "robustness.json").read_text())["rows"]
        assert row["fit_fraction"] == 1.0
        iterations[passes] = row["iterations_mean"]
    assert iterations["1"] > iterations["0"]   # a second, weighted solve


def test_evaluate_caps_every_solver_and_names_those_stopped_short(runs, tmp_path):
    """``--max-iterations`` caps every method's solver, as reconstruct's does its one (the
    unrolled network keeps its fixed steps), and a method stopped at its cap on some samples is
    named in a warning line with where: its figures are not of converged solutions."""
    out = tmp_path / "capped"
    result = run_cli("evaluate", runs / "blur.h5", "--model", runs / "drip_run", "--model",
                     runs / "unrolled_run", "--out", out, "--methods", "tv,drip,unrolled",
                     "--noise-percent", "2,5", "--max-iterations", "3", "-q")
    assert result.exit_code == 0, result.stderr
    rows = json.loads((out / "robustness.json").read_text())["rows"]
    tv = [row for row in rows if row["method"] == "tv"]
    assert len(tv) == 2 and all(row["n_stopped_at_cap"] + row["n_unfit_at_cap"] == 6
                                for row in tv)
    warned = [line for line in result.stderr.splitlines() if line.startswith("drip: warning:")]
    assert "drip: warning: tv stopped short of converging on 6/6 at 2%, 6/6 at 5% noise" in \
        result.stderr, result.stderr
    assert not any("unrolled stopped" in line for line in warned), warned
    (learned,) = [line for line in warned if "drip stopped short" in line]
    assert "where it stalled" in learned, learned
    result = run_cli("evaluate", runs / "blur.h5", "--out", tmp_path / "free", "--methods", "tv",
                     "--noise-percent", "2", "-q")
    assert result.exit_code == 0 and "stopped short" not in result.stderr, result.stderr


def test_evaluate_runs_every_method_at_every_tau_and_finds_each_best(runs, tmp_path):
    out = tmp_path / "report"
    result = run_cli("evaluate", runs / "blur.h5", "--model", runs / "drip_run", "--out", out,
                     "--methods", "tv,drip", "--noise-percent", "2", "--tau", "1,0.97", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "robustness.json").read_text())
    assert report["tau"] == [0.97, 1.0]
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"tv@0.97", "tv@1", "drip@0.97", "drip@1"}
    for row in rows.values():   # each row is judged against its own constant
        assert row["fit_fraction"] == 1.0 and row["discrepancy_ratio_max"] <= row["tau"]
    assert rows["tv@0.97"]["discrepancy_ratio_max"] <= 0.97 < rows["tv@1"]["discrepancy_ratio_max"]
    for base in ("tv", "drip"):
        best = max((rows[f"{base}@{t}"] for t in ("0.97", "1")), key=lambda r: r["psnr_mean"])
        line = f"| {base} | 2 | {best['tau']:g} | {best['psnr_mean']:.2f} |"
        assert line in (out / "robustness.md").read_text()
    assert "best tau" in result.stdout
    # each constant's DRIP is paired with TV at the same constant
    assert {(p["method"], p["reference"]) for p in report["paired"]} == {
        ("drip@0.97", "tv@0.97"), ("drip@1", "tv@1")}
    with open(out / "samples.csv") as handle:
        assert {s["tau"] for s in csv.DictReader(handle)} == {"0.97", "1.0"}


def test_evaluate_noise_is_fixed_per_level(runs, tmp_path):
    """The same level gets the same noise whatever the other levels: equal PSNR for CGLS."""
    psnr = {}
    for levels in ("2,10", "5,10"):
        out = tmp_path / levels.replace(",", "_")
        result = run_cli("evaluate", runs / "blur.h5", "--out", out, "--noise-percent", levels,
                         "--methods", "cgls", "-q")
        assert result.exit_code == 0, result.stderr
        rows = json.loads((out / "robustness.json").read_text())["rows"]
        psnr[levels] = {r["noise_percent"]: r["psnr_mean"] for r in rows}
    assert psnr["2,10"][10.0] == psnr["5,10"][10.0]
    assert psnr["2,10"][2.0] != psnr["5,10"][5.0]


@pytest.mark.parametrize("device", DEVICES)
def test_evaluate_measures_on_the_cpu_whatever_the_device(runs, tmp_path, device):
    """Each level is simulated when it is reached (one level's measurements in memory at a
    time) by a CPU copy of the operator, so a GPU run sees the noise of a CPU run: for CGLS,
    the same PSNR to float32 rounding, and every sample fitting."""
    rows = {}
    for where in ("cpu", device):
        out = tmp_path / where
        result = run_cli("evaluate", runs / "blur.h5", "--out", out, "--noise-percent", "2,10",
                         "--methods", "cgls", "--device", where, "-q")
        assert result.exit_code == 0, result.stderr
        rows[where] = json.loads((out / "robustness.json").read_text())["rows"]
    for cpu, other in zip(rows["cpu"], rows[device]):
        assert cpu["noise_percent"] == other["noise_percent"]
        assert other["psnr_mean"] == pytest.approx(cpu["psnr_mean"], abs=1e-3)
        assert other["fit_fraction"] == 1.0


def test_evaluate_with_the_operator_of_another_file(runs, tmp_path):
    inpaint = tmp_path / "inpaint.h5"
    write_small_file(inpaint, make_operator("inpainting", (1, 12, 12)))
    out = tmp_path / "report"
    result = run_cli("evaluate", runs / "blur.h5", "--model", runs / "drip_run", "--out", out,
                     "--operator-from", inpaint, "--noise-percent", "2", "--methods", "drip,tv")
    assert result.exit_code == 0, result.stderr
    assert "warning" in result.stderr.lower()            # blur model, inpainting operator
    report = json.loads((out / "robustness.json").read_text())
    assert report["operator_kind"] == "inpainting" and report["operator_from"] == str(inpaint)
    assert all(r["fit_fraction"] == 1.0 for r in report["rows"])
    assert "transfer" in (out / "robustness.md").read_text()


@pytest.mark.parametrize("options, message", [
    (["--methods", "drip"], "--methods drip"),
    (["--methods", "cgls,magic"], "magic"),
    (["--methods", " , "], "--methods: no method named"),
    (["--noise-percent", "2,x"], "--noise-percent"),
    (["--noise-percent", "0,2"], "--noise-percent"),
    (["--preview-noise", "7"], "--preview-noise"),
    (["--tau", "1,x"], "--tau"),
    (["--tau", "0.9,-1"], "--tau"),
    (["--methods", "cgls", "--reweight", "1"], "--reweight and --edge-scale apply to drip models"),
    (["--methods", "cgls,tv", "--reference", "drip"], "--reference drip is not one of"),
])
def test_bad_evaluate_options_are_one_line_errors(runs, tmp_path, options, message):
    out = tmp_path / "report"
    result = run_cli("evaluate", runs / "blur.h5", "--out", out, *options, "-q")
    assert_one_line_error(result, message, out)


def test_truth_regularizer_value_of_an_identity_embedding_is_r_of_the_truth():
    from drip_cli.evaluation.robustness import truth_regularizer_values
    from drip_cli.methods import LearnedMethod
    from drip_cli.io.models import ModelInfo
    from drip_cli.regularizers.model import DripModel, ModelConfig

    config = ModelConfig(n_filters=4, kernel_size=3, eps=0.05)
    model = DripModel(config).double()
    method = LearnedMethod(model, ModelInfo(config, "blur", (1, 12, 12), (1.0, 5.0)), "0" * 64)
    truth = np.random.default_rng(0).random((3, 1, 12, 12))
    values = truth_regularizer_values(method, truth, batch_size=2, device=torch.device("cpu"))
    direct = model.regularizer.value(torch.from_numpy(truth)).detach().numpy()
    assert values == pytest.approx(direct, rel=1e-3)
    assert np.all(values <= direct * (1 + 1e-6))   # a minimum over a set that holds x itself


def test_several_models_of_one_kind_are_named_by_their_run_folders_or_files(runs, tmp_path):
    import shutil

    from drip_cli.errors import DripError
    from drip_cli.evaluation.robustness import choose_methods

    copy = tmp_path / "longer_run"
    shutil.copytree(runs / "drip_run", copy)
    names = [m.name for m in choose_methods([runs / "drip_run", copy / "model.safetensors"], None)]
    assert names == ["cgls", "tv", "drip:drip_run", "drip:longer_run"]
    assert [m.name for m in choose_methods([copy], ["drip", "tv"])] == ["drip", "tv"]
    # model files of other names, side by side in one folder, go by their names
    shutil.copy(copy / "model.safetensors", tmp_path / "sharp.safetensors")
    shutil.copy(copy / "model.safetensors", tmp_path / "smooth.safetensors")
    names = [m.name for m in choose_methods([tmp_path / "sharp.safetensors",
                                             tmp_path / "smooth.safetensors"], ["drip"])]
    assert names == ["drip:sharp", "drip:smooth"]
    with pytest.raises(DripError, match="given twice"):   # the folder and its file: one model
        choose_methods([runs / "drip_run", runs / "drip_run" / "model.safetensors"], None)
    other = tmp_path / "elsewhere" / "drip_run"
    shutil.copytree(runs / "drip_run", other)
    with pytest.raises(DripError, match="both named drip:drip_run"):
        choose_methods([runs / "drip_run", other], None)
    heard = []
    assert [m.name for m in choose_methods([copy], ["tv"], warn=heard.append)] == ["tv"]
    assert len(heard) == 1 and "not compared" in heard[0]


def test_evaluate_progress_counts_batches_and_moves_within_them(runs):
    """The progress of drip evaluate: from (0, total) to (total, total) in solved batches,
    never backwards, with fractions while a batch is solved, each naming the method and level
    at work."""
    from drip_cli.evaluation.robustness import choose_methods, evaluate

    calls = []
    evaluate(runs / "blur.h5", choose_methods([runs / "drip_run"], ["tv", "drip"]), [2.0, 5.0],
             batch_size=4, progress=lambda done, total, what: calls.append((done, total, what)))
    total = 2 * 2 * 2   # levels x methods x batches of 4 of the 6 samples
    assert calls[0] == (0, total, "simulating") and calls[-1] == (total, total, "drip at 5% noise")
    done = [d for d, _, _ in calls]
    assert done == sorted(done) and any(d != int(d) for d in done), done
    order = list(dict.fromkeys(what for _, _, what in calls[1:]))
    assert order == [f"{name} at {level}% noise" for level in (2, 5) for name in ("tv", "drip")]
