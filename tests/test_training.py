"""Training: exact resume, model files without pickle, the model/data checks of reconstruct."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_operator
from drip_cli.io.models import load_model
from helpers import assert_one_line_error, run_cli, write_small_file

# two latent channels make solves slow (hundreds of iterations): validation stops at 300
TINY = ["--batch-size", "4", "--latent-channels", "2", "--filters", "4", "--kernel-size", "3",
        "--cg-iterations", "5", "--max-iterations", "300", "--device", "cpu", "--seed", "5", "-q"]
# TINY without the options that shape the model, for runs that take them from --init's model
TINY_SETTINGS = [a for i, a in enumerate(TINY)
                 if a not in ("--latent-channels", "--filters", "--kernel-size")
                 and TINY[i - 1] not in ("--latent-channels", "--filters", "--kernel-size")]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "train.h5"
    from drip_cli.operators import Blur, gaussian_psf

    write_small_file(path, Blur((1, 12, 12), gaussian_psf(1.0)), n=12)
    return path


def _differing_weights(run_a, run_b) -> list[str]:
    """The checkpoint tensors that differ between two runs (or are in only one of them)."""
    a = load_file(str(run_a / "checkpoint.safetensors"))
    b = load_file(str(run_b / "checkpoint.safetensors"))
    return sorted(key for key in a.keys() | b.keys()
                  if key not in a or key not in b or not torch.equal(a[key], b[key]))


def test_resumed_run_ends_with_the_same_weights(train_file, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_cli("train", train_file, "--out", whole, "--epochs", 2, *TINY).exit_code == 0
    first = run_cli("train", train_file, "--out", split, "--epochs", 2, "--max-steps", 2, *TINY)
    assert first.exit_code == 0, first.stderr
    # the options left out (all but the device) are the run's: seed, batch size, architecture,
    # and its budget, --epochs 2 (--resume alone, as the Ctrl-C message says, trained to the
    # default of 100 epochs, and without a run's --max-minutes)
    second = run_cli("train", train_file, "--out", split, "--resume", "--device", "cpu", "-q")
    assert second.exit_code == 0, second.stderr
    assert _differing_weights(whole, split) == []
    history = (split / "history.csv").read_text().splitlines()
    # header, the untrained start, the validation where the first call stopped (mid-epoch), one
    # row per epoch
    assert len(history) == 5 and history[2].startswith("stop")
    assert json.loads((split / "config.json").read_text())["model"]["n_filters"] == 4
    other = run_cli("train", train_file, "--out", split, "--epochs", 3, "--resume", *TINY,
                    "--filters", "6", "--lr", "0.01")
    assert other.exit_code == 1 and "Traceback" not in other.stderr
    assert "n_filters (run: 4, now: 6)" in other.stderr and "lr (run: 0.003, now: 0.01)" in other.stderr
    # a damaged run folder: one line naming the file that is damaged, and what is wrong
    settings = json.loads((split / "config.json").read_text())
    checkpoint = split / "checkpoint.safetensors"
    intact = checkpoint.read_bytes()
    checkpoint.write_bytes(intact[:100])
    damaged = run_cli("train", train_file, "--out", split, "--epochs", 3, "--resume", "-q")
    assert_one_line_error(damaged, f"{checkpoint}: cannot read checkpoint", split / "nothing")
    # NaN weights (were met by the divergence check, as if the resumed run had diverged), and a
    # folder in place of the history (was an unexpected IsADirectoryError)
    from safetensors.torch import save_file
    checkpoint.write_bytes(intact)
    nan_weights = {name: w * float("nan") for name, w in load_file(str(checkpoint)).items()}
    save_file(nan_weights, checkpoint)
    damaged = run_cli("train", train_file, "--out", split, "--epochs", 3, "--resume", "-q")
    assert_one_line_error(damaged, f"{checkpoint}: damaged checkpoint: weights", split / "nothing")
    integers = load_file(str(split / "model.safetensors"))
    save_file({name: w.to(torch.int64) for name, w in integers.items()}, checkpoint)
    damaged = run_cli("train", train_file, "--out", split, "--epochs", 3, "--resume", "-q")
    assert_one_line_error(damaged, "damaged checkpoint: weights embedding.weight, ", split / "nothing")
    assert "are not floating-point" in damaged.stderr
    checkpoint.write_bytes(intact)
    history = split / "history.csv"
    history_text = history.read_text()
    history.unlink()
    history.mkdir()
    damaged = run_cli("train", train_file, "--out", split, "--epochs", 3, "--resume", "-q")
    assert_one_line_error(damaged, f"{history}: cannot read the run's history", split / "nothing")
    history.rmdir()
    history.write_text(history_text)
    for text, message in (("{not json", ""), ("[]", "not a JSON object"),
                          (json.dumps({**settings, "lr": "fast"}), "setting lr = 'fast' is not a finite"),
                          (json.dumps({**settings, "model": {**settings["model"], "n_filters": 4.5}}),
                           "model setting n_filters = 4.5 is not an integer"),
                          (json.dumps({**settings, "max_minutes": -2}),
                           "max_minutes = -2 is not a positive number of minutes"),
                          # values of the right type but out of range (were a ZeroDivisionError,
                          # PyTorch's ValueError and the model's, all found by fuzzing)
                          (json.dumps({**settings, "batch_size": 0}),
                           "--batch-size must be at least 1, got 0"),
                          (json.dumps({**settings, "lr": -1.0}), "--lr must be a positive number"),
                          (json.dumps({**settings, "loss_weights": None}),
                           "--loss-weights must be three non-negative numbers"),
                          (json.dumps({**settings, "model": {**settings["model"],
                                                             "architecture": "x"}}),
                           "--architecture must be one of"),
                          # (session 57's fuzzing: a negative seed was reported as a damaged
                          # checkpoint's sample order, no model settings as "None-channel images")
                          (json.dumps({**settings, "seed": -1}), "--seed must be between 0 and"),
                          (json.dumps({**settings, "model": {}}),
                           "the model settings lack image_channels"),
                          (json.dumps({k: v for k, v in settings.items() if k != "model"}),
                           "the model settings are not a JSON object")):
        (split / "config.json").write_text(text)
        damaged = run_cli("train", train_file, "--out", split, "--resume", "-q")
        assert_one_line_error(damaged, f"config.json: cannot read the run's settings ({message}",
                              split / "nothing")
    # a checkpoint state whose counters or sample order were damaged (was an unexpected
    # TypeError, or an index error mid-run)
    (split / "config.json").write_text(json.dumps(settings))
    state_path = split / "checkpoint_state.pt"
    state = torch.load(state_path, weights_only=True)
    for key, value, message in (("epoch", "x", "epoch = 'x' is not a count"),
                                ("elapsed", -1.0, "elapsed = -1.0 is not a time"),
                                ("permutation", state["permutation"][:-1], "not a permutation")):
        torch.save({**state, key: value}, state_path)
        damaged = run_cli("train", train_file, "--out", split, "--epochs", 3, "--resume", "-q")
        assert_one_line_error(damaged, f"{state_path}: damaged checkpoint: ", split / "nothing")
        assert message in damaged.stderr
    # a state that lacks an entry or is no dict, a cut file and one that needs pickle (were a
    # KeyError's "('optimizer')", a paragraph on miniz, and a page of PyTorch's advice)
    from fractions import Fraction
    for content, message in (({k: v for k, v in state.items() if k != "optimizer"},
                               "damaged checkpoint: it has no optimizer"),
                             ([1, 2], "damaged checkpoint: it holds no checkpoint state"),
                             (None, "cannot read checkpoint: not one drip wrote, or a truncated one"),
                             ({**state, "epoch": Fraction(1, 3)},
                              "cannot read checkpoint: it holds objects other than tensors")):
        if content is None:   # the state cut short
            torch.save(state, state_path)
            state_path.write_bytes(state_path.read_bytes()[:500])
        else:
            torch.save(content, state_path)
        damaged = run_cli("train", train_file, "--out", split, "--epochs", 3, "--resume", "-q")
        assert_one_line_error(damaged, f"{state_path}: {message}", split / "nothing")
    torch.save(state, state_path)   # a history.csv that is not the run's: not appended to
    (split / "history.csv").write_text("x\n")
    damaged = run_cli("train", train_file, "--out", split, "--epochs", 3, "--resume", "-q")
    assert_one_line_error(damaged, "history.csv: is not this run's history", split / "nothing")
    assert (split / "history.csv").read_text() == "x\n"


def test_a_resumed_run_convolves_with_the_checkpoints_kernels(train_file, tmp_path, monkeypatch):
    """A run resumed in a new process could time the CPU convolution kernels differently and
    pick the other one (the same result up to rounding); it adopts the checkpoint's choices, so
    it still ends with exactly the uninterrupted run's weights."""
    from drip_cli.operators import convolution
    from drip_cli.training import trainer

    monkeypatch.setattr(convolution, "_cpu_choice", {})   # as in a fresh process
    fast = [*TINY, "--latent-channels", "1"]
    whole = tmp_path / "whole"
    assert run_cli("train", train_file, "--out", whole, "--epochs", 1, *fast).exit_code == 0
    made = dict(convolution._cpu_choice)
    assert made
    for name, adopt in (("adopted", trainer.adopt_cpu_kernel_choices),
                        ("ignored", lambda rows: None)):
        split = tmp_path / name
        first = run_cli("train", train_file, "--out", split, "--epochs", 1, "--max-steps", 1, *fast)
        assert first.exit_code == 0, first.stderr
        state = torch.load(split / "checkpoint_state.pt", weights_only=True)
        assert state["kernel_choices"] == convolution.cpu_kernel_choices()
        # the new process: its own timing chose the other kernel for every kind
        monkeypatch.setattr(convolution, "_cpu_choice",
                            {k: "transpose" if v != "transpose" else "flipped"
                             for k, v in made.items()})
        monkeypatch.setattr(trainer, "adopt_cpu_kernel_choices", adopt)
        second = run_cli("train", train_file, "--out", split, "--epochs", 1, "--resume",
                         "--device", "cpu", "-q")
        assert second.exit_code == 0, second.stderr
        monkeypatch.setattr(convolution, "_cpu_choice", dict(made))
    assert _differing_weights(whole, tmp_path / "adopted") == []
    assert _differing_weights(whole, tmp_path / "ignored") != []   # the choice does show in the bits


def test_a_run_without_validation_resumes(tmp_path):
    """One sample leaves no validation set, so the best PSNR stays NaN; the checkpoint check
    must accept it."""
    data = tmp_path / "one.h5"
    write_small_file(data, make_operator("blur", (1, 12, 12)), n=1)
    run = tmp_path / "run"
    assert run_cli("train", data, "--out", run, "--max-steps", 1, *TINY).exit_code == 0
    assert np.isnan(torch.load(run / "checkpoint_state.pt", weights_only=True)["best_psnr"])
    result = run_cli("train", data, "--out", run, "--epochs", 2, "--resume", "-q")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("architecture", ["convex", "unrolled"])
def test_a_diverging_run_stops_and_keeps_its_best_model(architecture, train_file, tmp_path):
    """A learning rate far too large: the run stops at the step where its numbers overflow, in
    one line naming --lr, and its model file stays the finite model validated before. (The
    unrolled run went on with NaN weights, took its NaN validation PSNR for "no validation" and
    kept the NaN model; the convex one ended in "unexpected _LinAlgError".)"""
    run = tmp_path / "run"
    settings = TINY_SETTINGS if architecture == "convex" else ["--batch-size", "4", "-q"]
    result = run_cli("train", train_file, "--out", run, "--epochs", 3, "--lr", "1e6",
                     "--architecture", architecture, *settings)
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "training diverged at step" in result.stderr and "smaller --lr" in result.stderr
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr
    weights = load_file(str(run / "model.safetensors"))
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_a_start_that_overflows_is_named(tmp_path):
    """--init with a model whose finite weights overflow the arithmetic fails at the start's
    validation, before any step: the starting model is named, not the learning rate, and the
    run leaves no folder it made, nor a config.json in one it did not (a run folder holding
    only its config.json was left behind)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shipped = str(Path(__file__).resolve().parent.parent / "sample_data" / "drip_blur.safetensors")
    with safe_open(shipped, framework="pt") as handle:
        meta = handle.metadata()
    weights = load_file(shipped)
    weights["regularizer.weight_logits"][0] = 1e30
    bad = tmp_path / "bad.safetensors"
    save_file(weights, bad, metadata=meta)
    data = tmp_path / "blur.h5"
    write_small_file(data, make_operator("blur", (1, 64, 64)), n=4)
    result = run_cli("train", data, "--out", tmp_path / "run", "--init", bad, "--epochs", 1, "-q")
    assert_one_line_error(result, f"{bad}: the starting model's weights are out of range",
                          tmp_path / "run")   # no folder holding only a config.json
    kept = tmp_path / "kept"   # a folder that was there stays, without the failed run's files
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    result = run_cli("train", data, "--out", kept, "--init", bad, "--epochs", 1, "-q")
    assert_one_line_error(result, "the starting model's weights are out of range",
                          kept / "config.json")
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]


def test_resume_refuses_other_data(train_file, tmp_path):
    """--resume continues a run on its own data, known by content: another file (even of the
    same shape) is refused, before anything in the run changes; the run's data under another
    name resumes. A run whose config.json predates the record falls back on the model file's."""
    run = tmp_path / "run"
    assert run_cli("train", train_file, "--out", run, "--max-steps", 1, *TINY).exit_code == 0
    other = tmp_path / "other.h5"
    from drip_cli.operators import Blur, gaussian_psf

    write_small_file(other, Blur((1, 12, 12), gaussian_psf(1.0)), n=12, seed=7)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    settings = json.loads((run / "config.json").read_text())
    for config in (settings, {k: v for k, v in settings.items() if k != "data_sha256"}):
        (run / "config.json").write_text(json.dumps(config))
        before["config.json"] = (run / "config.json").read_bytes()
        result = run_cli("train", other, "--out", run, "--resume", "-q")
        assert_one_line_error(result, f"{other}: --resume: the run in {run} was trained on other "
                              "data", tmp_path / "nothing")
        assert f"--init {run}" in result.stderr
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    (run / "config.json").write_text(json.dumps({**settings, "data_sha256": 7}))
    result = run_cli("train", train_file, "--out", run, "--resume", "-q")
    assert_one_line_error(result, "config.json: cannot read the run's settings (data_sha256 = 7 "
                          "is not a sha256)", tmp_path / "nothing")
    (run / "config.json").write_text(json.dumps(
        {k: v for k, v in settings.items() if k != "data_sha256"}))
    renamed = tmp_path / "renamed.h5"
    renamed.write_bytes(Path(train_file).read_bytes())
    result = run_cli("train", renamed, "--out", run, "--max-steps", 1, "--resume", "-q")
    assert result.exit_code == 0, result.stderr


def test_ctrl_c_says_whether_the_run_can_be_resumed(train_file, tmp_path, monkeypatch):
    """Ctrl-C in drip train: exit status 130 and one line that points to --resume where the
    run folder has a checkpoint, and says there is nothing to resume where it has none."""
    from drip_cli.training import Trainer

    def interrupt(self):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "fit", interrupt)
        result = run_cli("train", train_file, "--out", run, "--epochs", 1, *TINY)
    assert result.exit_code == 130 and "nothing to resume" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert run_cli("train", train_file, "--out", run, "--epochs", 1, *TINY).exit_code == 0
    monkeypatch.setattr(Trainer, "fit", interrupt)
    result = run_cli("train", train_file, "--out", run, "--epochs", 2, "--resume", "-q")
    assert result.exit_code == 130 and f"--out {run} --resume" in result.stderr


def test_a_new_run_never_overwrites_a_trained_one(train_file, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", train_file, "--out", run, "--epochs", 1, *TINY).exit_code == 0
    model = (run / "model.safetensors").read_bytes()
    history = (run / "history.csv").read_text()
    result = run_cli("train", train_file, "--out", run, "--epochs", 1, "--seed", 3, *TINY)
    assert_one_line_error(result, "already holds a training run (model.safetensors): continue it "
                          "with --resume", tmp_path / "nothing")
    assert (run / "model.safetensors").read_bytes() == model
    assert (run / "history.csv").read_text() == history


def test_options_the_run_ignores_are_named_in_a_warning(train_file, tmp_path):
    result = run_cli("train", train_file, "--out", tmp_path / "unrolled", "--architecture",
                     "unrolled", "--layers", 1, "--width", 4, "--filters", 4, "--eps", 0.1,
                     "--max-steps", 1, "-q")
    assert result.exit_code == 0, result.stderr
    assert ("warning: --filters, --eps: not used by --architecture unrolled (ignored)"
            in result.stderr)
    result = run_cli("train", train_file, "--out", tmp_path / "convex", "--width", 4,
                     "--max-steps", 1, *TINY)
    assert result.exit_code == 0, result.stderr
    assert "warning: --width: not used by --architecture convex" in result.stderr
    assert "--filters" not in result.stderr   # TINY's options all shape the convex model
    # --guide-gradient differentiates through the reweighting passes: with none it does nothing
    result = run_cli("train", train_file, "--out", tmp_path / "single", "--reweight", 0,
                     "--guide-gradient", "--max-steps", 1, *TINY)
    assert result.exit_code == 0, result.stderr
    assert ("warning: --guide-gradient: not used without reweighting passes (--reweight 0) "
            "(ignored)" in result.stderr)
    result = run_cli("train", train_file, "--out", tmp_path / "leapfrog", "--architecture",
                     "leapfrog", "--layers", 1, "--guide-gradient", "--max-steps", 1, *TINY)
    assert result.exit_code == 0, result.stderr
    assert "warning: --guide-gradient: not used by --architecture leapfrog" in result.stderr


def test_init_starts_from_a_models_weights_and_architecture(train_file, tmp_path):
    """--init: a run starts where the given model is (its architecture and weights, the file's
    sha256 recorded); architecture options that contradict the model are refused by name."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_cli("train", train_file, "--out", first, "--epochs", 1, *TINY).exit_code == 0
    _, start_info, start_sha = load_model(first)
    result = run_cli("train", train_file, "--out", second, "--epochs", 2, "--max-steps", 1,
                     "--init", first, *TINY_SETTINGS)
    assert result.exit_code == 0, result.stderr
    config = json.loads((second / "config.json").read_text())
    assert config["init_sha256"] == start_sha
    assert {k: config["model"][k] for k in ("latent_channels", "n_filters", "kernel_size")} == \
        {"latent_channels": 2, "n_filters": 4, "kernel_size": 3}
    # the same validation set and noise: the new run's start is the first run's best model
    start_row = (second / "history.csv").read_text().splitlines()[1].split(",")
    assert start_row[0] == "start"
    assert float(start_row[3]) == pytest.approx(start_info.extra["val_psnr"], rel=1e-6)
    assert load_model(second)[1].extra["init_model_sha256"] == start_sha
    # resuming takes the architecture and the starting model's record from the run, so neither
    # the options nor the starting model's file are needed again
    moved = first.rename(tmp_path / "moved")
    resumed = run_cli("train", train_file, "--out", second, "--epochs", 2, "--resume",
                      *TINY_SETTINGS)
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads((second / "config.json").read_text())["init_sha256"] == start_sha
    assert load_model(second)[1].extra["init_model_sha256"] == start_sha
    other = run_cli("train", train_file, "--out", second, "--epochs", 3, "--resume",
                    *TINY_SETTINGS, "--init", second)
    assert other.exit_code == 1 and "Traceback" not in other.stderr
    assert "--init names another model than the run started from" in other.stderr
    first = moved
    refused = run_cli("train", train_file, "--out", tmp_path / "third", "--epochs", 1,
                      "--init", first, *TINY_SETTINGS, "--filters", "6")
    assert_one_line_error(refused, "n_filters (model: 4, given: 6)", tmp_path / "third")


def test_training_with_reweighting_makes_it_the_models_default(train_file, tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", train_file, "--out", run, "--epochs", 1, "--reweight", "1", *TINY)
    assert result.exit_code == 0, result.stderr
    assert load_model(run)[0].config.reweight == 1
    out = tmp_path / "r.h5"
    assert run_cli("reconstruct", train_file, "--model", run, "--out", out, "-q").exit_code == 0
    with h5py.File(out) as f:
        assert f.attrs["reweight"] == 1 and np.all(f["discrepancy_ratio"][()] <= 1.0)
    off = tmp_path / "off.h5"   # --reweight 0 turns the model's default off
    assert run_cli("reconstruct", train_file, "--model", run, "--out", off, "--reweight", "0",
                   "-q").exit_code == 0
    with h5py.File(off) as f:
        assert "reweight" not in f.attrs
    refused = run_cli("train", train_file, "--out", tmp_path / "lf", "--epochs", 1,
                      "--reweight", "1", "--architecture", "leapfrog", *TINY)
    assert_one_line_error(refused, "--reweight needs the convex architecture", tmp_path / "lf")


def test_fresh_runs_take_the_operators_defaults(tmp_path):
    """Settings left out follow the operator (training.trainer.operator_defaults): on
    tomography sharp potentials, so tighter training solves; one reweighting pass for convex
    models; no patch mixture where the images determine too few components. The run says
    what it chose and records it."""
    data = tmp_path / "tomo.h5"
    write_small_file(data, make_operator("tomography", (1, 12, 12)), n=6)
    run = tmp_path / "run"
    result = run_cli("train", data, "--out", run, "--epochs", 1, "--max-steps", 1, "--filters",
                     "4", "--kernel-size", "3", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert ("defaults for tomography data: --eps 0.001, --solver-tolerance 0.0003, "
            "--solver-iterations 300, --reweight 1, --patch-components 0") in \
        " ".join(result.stdout.split())
    # six 12x12 images determine no mixture: the run says why it has none
    assert "no patch mixture: the training images determine fewer than 20 components" in \
        " ".join(result.stdout.split())
    # (the file's own measurements, one noise level: the run says so, and how to draw a range)
    assert "training on the file's own measurements (noise percent 2): --noise-percent A:B" in \
        " ".join(result.stdout.split())
    config = json.loads((run / "config.json").read_text())
    assert (config["model"]["eps"], config["model"]["reweight"]) == (0.001, 1)
    assert (config["train_solver_tolerance"], config["train_solver_iterations"]) == (3e-4, 300)
    assert load_model(run)[0].config.reweight == 1


def test_guide_gradient_run_trains_and_is_recorded(tmp_path):
    """drip train --guide-gradient (with the operator's default reweighting pass) takes finite
    optimiser steps through both passes and records the setting in config.json."""
    data = tmp_path / "tomo.h5"
    write_small_file(data, make_operator("tomography", (1, 12, 12)), n=6)
    run = tmp_path / "run"
    result = run_cli("train", data, "--out", run, "--epochs", 1, "--max-steps", 2, "--filters",
                     "4", "--kernel-size", "3", "--device", "cpu", "--guide-gradient", "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads((run / "config.json").read_text())["guide_gradient"] is True
    model, _, _ = load_model(run)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_operator_defaults_leave_given_settings_alone():
    from drip_cli.regularizers.model import ModelConfig
    from drip_cli.training import TrainConfig
    from drip_cli.training.trainer import operator_defaults

    def chosen(kind, given=(), init=None, **model):
        config = TrainConfig(data="", out="", init=init, model=ModelConfig(**model))
        picked = operator_defaults(config, kind, set(given))
        return picked, config

    picked, config = chosen("blur")
    assert picked == {"eps": 0.01, "reweight": 1}
    # a periodic operator: a periodic embedding too, but not for a model started from another
    config = TrainConfig(data="", out="", model=ModelConfig())
    assert operator_defaults(config, "blur", set(), periodic=True)["embedding_boundary"] == \
        "periodic" and config.model.embedding_boundary == "periodic"
    config = TrainConfig(data="", out="", init="model", model=ModelConfig())
    assert "embedding_boundary" not in operator_defaults(config, "blur", set(), periodic=True)
    assert (config.train_solver_tolerance, config.train_solver_iterations) == (1e-3, 150)
    # a sharp eps, given on any operator, brings the tighter solves unless they are given too
    picked, config = chosen("blur", {"eps", "train_solver_iterations"}, eps=0.002)
    assert picked == {"train_solver_tolerance": 3e-4, "reweight": 1}
    assert (config.model.eps, config.train_solver_iterations) == (0.002, 150)
    assert chosen("tomography", {"reweight"})[0] == {"eps": 0.001, "train_solver_tolerance": 3e-4,
                                                     "train_solver_iterations": 300}
    # --init: the starting model's eps (adopted before) decides; no reweighting off convex
    picked, config = chosen("tomography", init="model", eps=0.01, architecture="leapfrog")
    assert picked == {} and config.model.eps == 0.01 and config.model.reweight == 0
    assert chosen("tomography", architecture="unrolled")[0] == {}


def test_patch_mixture_default_follows_the_training_images():
    """Convex models get 80 mixture components where the training images determine them (640
    patches each for grayscale 8x8 patches), fewer where they determine fewer, none below 20;
    started from a model (--init), as many as it has, within the same limits; never where
    --patch-components is given or off the convex architecture. Where it wanted a mixture
    and the images determine none, it reports the 0."""
    from drip_cli.regularizers.model import ModelConfig
    from drip_cli.training import TrainConfig
    from drip_cli.training.trainer import patch_default

    def chosen(shape, given=(), init=None, **model):
        config = TrainConfig(data="", out="", init=init, model=ModelConfig(**model))
        return patch_default(config, shape, set(given)), config.model.patch_components

    assert chosen((900, 1, 64, 64)) == ({"patch_components": 80}, 80)   # 60 000 patches
    assert chosen((100, 1, 64, 64)) == ({"patch_components": 35}, 35)   # 22 500: 35 x 640
    assert chosen((50, 1, 64, 64)) == ({"patch_components": 0}, 0)      # 17: none, said so
    assert chosen((900, 3, 64, 64)) == ({"patch_components": 31}, 31)   # 1920 per component
    assert chosen((900, 1, 7, 64)) == ({"patch_components": 0}, 0)      # no 8x8 patch
    assert chosen((900, 1, 64, 64), {"patch_components"}) == ({}, 0)
    assert chosen((900, 1, 64, 64), init="model") == ({}, 0)           # the model has none
    assert chosen((900, 1, 64, 64), init="model", patch_components=40) == ({}, 40)
    assert chosen((900, 3, 64, 64), init="model", patch_components=80) == \
        ({"patch_components": 31}, 31)                                  # a grayscale start
    assert chosen((50, 1, 64, 64), init="model", patch_components=80) == \
        ({"patch_components": 0}, 0)
    assert chosen((900, 1, 64, 64), architecture="leapfrog") == ({}, 0)


def test_fresh_run_on_enough_images_builds_the_default_mixture(tmp_path):
    """The trainer applies the default: 64 crops of 64x64 (58 to train on, 13 050 patches)
    determine 20 components; the run reports the choice and the model carries the mixture."""
    from drip_cli.training import TrainConfig, Trainer

    data = tmp_path / "blur.h5"
    write_small_file(data, make_operator("blur", (1, 64, 64)), n=64)
    trainer = Trainer(TrainConfig(data=str(data), out=str(tmp_path / "run")), torch.device("cpu"))
    assert trainer.operator_defaults["patch_components"] == 20
    assert trainer.model.patch_prior is not None and len(trainer.model.patch_prior.log_weights) == 20


def test_model_file_metadata_and_pickle_free_loading(train_file, tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", train_file, "--out", run, "--epochs", 1, "--noise-percent", "1:5",
                     "--solver-tolerance", "5e-4", "--solver-iterations", "40", *TINY)
    assert result.exit_code == 0, result.stderr
    config = json.loads((run / "config.json").read_text())
    assert (config["train_solver_tolerance"], config["train_solver_iterations"]) == (5e-4, 40)
    model, info, sha = load_model(run)  # safetensors: no pickle involved
    assert info.operator_kind == "blur" and info.image_shape == (1, 12, 12)
    assert info.noise_percent == (1.0, 5.0) and len(info.training_data_sha256) == 64
    assert model.config.latent_channels == 2 and model.config.max_iterations == 300
    assert len(sha) == 64
    state = torch.load(run / "checkpoint_state.pt", weights_only=True)  # refuses pickled objects
    assert "optimizer" in state and "generator" in state


@pytest.mark.parametrize("damage,message", [
    ({"config": '{"n_filters": "16"}'}, "n_filters = '16' is not an integer"),
    ({"config": '{"max_iterations": 0}'}, "max_iterations = 0 must be at least 1"),
    ({"config": '{"edge_scale": -1}'}, "edge_scale = -1 must be positive"),
    ({"config": '{"edge_scale": 1e300}'}, "edge_scale = 1e+300 must be at most 1e30"),
    ({"config": "[1, 2]"}, "not a JSON object"),
    ({"image_shape": "5"}, "is not [C, H, W]"),
    ({"noise_percent": '["a", 2]'}, "is not [low, high]"),
    ({"extra": "[]"}, "extra is not a JSON object"),
    # filters wider than the images: was a RuntimeError from the padding (found by fuzzing)
    ({"config": '{"dilation_levels": 7}'}, "filters reach 128 pixels, more than its 64x64"),
    ("nan", "weights embedding.weight contain NaN or Inf"),
    # integers were copied into the float parameters: an all-zero embedding fitting no data
    ("int", "weights embedding.weight are not floating-point"),
    # finite but overflowing: an eigensolver and an SVD that did not converge, found by fuzzing
    ("huge-embedding", "weights are out of range for this data"),
    ("huge-regularizer", "weights are out of range for this data"),
    ("truncated", "not a readable safetensors model file"),
    ("hdf5", "is an HDF5 file, not a model"),   # --model given the measurements
])
def test_damaged_model_files_are_refused_by_name(damage, message, tmp_path):
    """A model file whose header was edited or whose weights are not finite: one line that
    names the file and the entry, and no output file (these were a TypeError, an
    AttributeError, or an SVD that did not converge)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shipped = str(Path(__file__).resolve().parent.parent / "sample_data" / "drip_blur.safetensors")
    with safe_open(shipped, framework="pt") as handle:
        meta = handle.metadata()
    weights = load_file(shipped)
    if damage == "nan":
        weights["embedding.weight"] = weights["embedding.weight"] * float("nan")
    elif damage == "int":
        weights["embedding.weight"] = weights["embedding.weight"].to(torch.int32)
    elif damage == "huge-embedding":
        weights["embedding.weight"][0, 0, 1, 1] = 1e30
    elif damage == "huge-regularizer":
        weights["regularizer.weight_logits"][0] = 1e30
    elif isinstance(damage, dict):
        meta = {**meta, **damage}
    bad = tmp_path / "bad.safetensors"
    save_file(weights, bad, metadata=meta)
    data = tmp_path / "blur.h5"
    write_small_file(data, make_operator("blur", (1, 64, 64)), n=1)
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:100])
    elif damage == "hdf5":
        bad = data
    out = tmp_path / "r.h5"
    result = run_cli("reconstruct", data, "--model", bad, "--out", out, "-q")
    assert_one_line_error(result, message, out)
    assert str(bad) in result.stderr
    if damage in ("huge-embedding", "huge-regularizer"):
        # drip evaluate (which also solves for R at the truth) and drip info (which shows the
        # step bound) ended in "unexpected _LinAlgError" (session 57's fuzzing)
        report = tmp_path / "report"
        result = run_cli("evaluate", data, "--model", bad, "--out", report, "--methods", "drip",
                         "--noise-percent", "2", "-q")
        assert_one_line_error(result, message, report)
        info = run_cli("info", bad)
        assert info.exit_code == 0 and "Traceback" not in info.stderr, info.stderr
        if damage == "huge-regularizer":
            assert "not finite: the weights overflow" in info.stdout


def test_training_on_the_files_own_measurements(train_file, tmp_path):
    """Without --noise-percent the file's measurements and noise levels are the training data
    (the file holds 2% noise), and the model records that range."""
    run = tmp_path / "run"
    result = run_cli("train", train_file, "--out", run, "--epochs", 1, *TINY)
    assert result.exit_code == 0, result.stderr
    _, info, _ = load_model(run)
    assert info.noise_percent == pytest.approx((2.0, 2.0), rel=1e-5)
    config = json.loads((run / "config.json").read_text())
    assert config["noise_percent"] is None
    assert (config["train_solver_tolerance"], config["train_solver_iterations"]) == (1e-3, 150)
    history = (run / "history.csv").read_text().splitlines()
    assert float(history[-1].split(",")[4]) == 1.0  # validation fit fraction
    # a file without noise levels: drip train has no --noise-std, so it points to fresh noise
    bare = tmp_path / "bare.h5"
    bare.write_bytes(Path(train_file).read_bytes())
    with h5py.File(bare, "a") as f:
        del f["noise_std"]
    other = tmp_path / "other"
    result = run_cli("train", bare, "--out", other, "--epochs", 1, *TINY)
    assert_one_line_error(result, "has no dataset 'noise_std' for its measurements; train on "
                          "fresh noise instead, with --noise-percent A:B", other)


def test_one_sample_trains_without_validation_and_says_so(tmp_path):
    """A file of one sample leaves nothing to validate on: the run says so once, its epoch
    lines say "no validation" instead of NaN, and it keeps the last weights."""
    from drip_cli.operators import Blur, gaussian_psf

    data = tmp_path / "one.h5"
    write_small_file(data, Blur((1, 12, 12), gaussian_psf(1.0)), n=1)
    run = tmp_path / "run"
    result = run_cli("train", data, "--out", run, "--epochs", 2, *TINY[:-1])
    assert result.exit_code == 0, result.stderr
    assert "one sample, so no validation split" in result.stderr
    assert "no validation" in result.stdout and "nan" not in result.stdout
    assert (run / "model.safetensors").is_file()


@pytest.mark.parametrize("architecture", [["--reweight", "0"],   # a single solve by default
                                          ["--architecture", "leapfrog", "--layers", "2"]],
                         ids=["convex", "leapfrog"])
def test_reconstruct_with_model_fits_and_records_sha(train_file, tmp_path, architecture):
    run = tmp_path / "run"
    trained = run_cli("train", train_file, "--out", run, "--epochs", 1, *TINY, *architecture)
    assert trained.exit_code == 0, trained.stderr
    leapfrog = "leapfrog" in architecture
    if leapfrog:
        assert load_model(run)[0].config.architecture == "leapfrog"
        assert not load_model(run)[0].regularizer.convex
    out = tmp_path / "r.h5"
    result = run_cli("reconstruct", train_file, "--model", run, "--out", out, "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out) as f:
        assert f.attrs["method"] == "drip" and len(f.attrs["model_sha256"]) == 64
        ratio, converged = f["discrepancy_ratio"][()], f["converged"][()]
        assert np.all(converged == (ratio <= 1.0)) and np.all(ratio <= 1.0)
        assert np.all(np.isfinite(f["regularizer_value"][()]))
        plain_iterations = f["iterations"][()]
    # a model of another kind is refused; a classical method says it leaves the model out
    wrong = run_cli("reconstruct", train_file, "--model", run, "--out", tmp_path / "u.h5",
                    "--method", "unrolled", "-q")
    assert_one_line_error(wrong, "--method unrolled needs an unrolled model; this one is a drip "
                          "model", tmp_path / "u.h5")
    classical = run_cli("reconstruct", train_file, "--model", run, "--out", tmp_path / "c.h5",
                        "--method", "cgls", "-q")
    assert classical.exit_code == 0
    assert classical.stderr == "drip: warning: --model: not used by --method cgls (ignored)\n"
    reweighted = run_cli("reconstruct", train_file, "--model", run, "--out", tmp_path / "w.h5",
                         "--reweight", "1", "--edge-scale", "0.1", "-q")
    if leapfrog:   # the leapfrog regularizer is not convex: refused, nothing written
        assert_one_line_error(reweighted, "--reweight needs a model with the convex regularizer",
                              tmp_path / "w.h5")
        info = run_cli("info", run)   # (it asked this regularizer for a bound it has not)
        assert info.exit_code == 0 and "non-convex" in info.stdout, info.stderr
        return
    assert reweighted.exit_code == 0, reweighted.stderr
    with h5py.File(tmp_path / "w.h5") as f:
        assert f.attrs["reweight"] == 1 and f.attrs["edge_scale"] == 0.1
        assert np.all(f["discrepancy_ratio"][()] <= 1.0) and np.all(f["converged"][()])
        assert np.all(f["iterations"][()] > plain_iterations)   # both passes are counted


def test_colour_training_and_reconstruction(tmp_path):
    """C = 3: the latent variable gets the images' three channels by default, the TV start acts
    on each colour, and every reconstruction fits; fewer latent channels than colours is refused."""
    from drip_cli.operators import Blur, gaussian_psf

    data = tmp_path / "colour.h5"
    write_small_file(data, Blur((3, 12, 12), gaussian_psf(1.0)), n=6)
    tiny = [o for o in TINY if o not in ("--latent-channels", "2")]
    run = tmp_path / "run"
    trained = run_cli("train", data, "--out", run, "--epochs", 1, *tiny, "--filters", "6")
    assert trained.exit_code == 0, trained.stderr
    model, info, _ = load_model(run)
    assert info.image_shape == (3, 12, 12) and model.config.latent_channels == 3
    out = tmp_path / "r.h5"
    assert run_cli("reconstruct", data, "--model", run, "--out", out, "-q").exit_code == 0
    with h5py.File(out) as f:
        assert f["reconstructions"].shape == (6, 3, 12, 12)
        assert np.all(f["discrepancy_ratio"][()] <= 1.0) and np.all(f["converged"][()])
    refused = run_cli("train", data, "--out", tmp_path / "r2", "--latent-channels", "2", "-q")
    assert refused.exit_code == 1 and "--latent-channels" in refused.stderr


def test_model_and_data_that_do_not_match(train_file, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", train_file, "--out", run, "--epochs", 1, *TINY).exit_code == 0
    other = tmp_path / "other.h5"
    write_small_file(other, make_operator("denoise", (1, 16, 20)))
    result = run_cli("reconstruct", other, "--model", run, "--out", tmp_path / "r.h5")
    assert result.exit_code == 1 and "shape" in result.stderr and not (tmp_path / "r.h5").exists()
    assert "--any-size" in result.stderr   # the refusal names the way round it
    # --any-size: the convolutional model serves images of another height and width, every
    # sample fits, and the file records the size the model was trained on
    result = run_cli("reconstruct", other, "--model", run, "--out", tmp_path / "r.h5",
                     "--any-size", "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(tmp_path / "r.h5") as f:
        assert f["reconstructions"].shape == (4, 1, 16, 20)
        assert np.all(f["discrepancy_ratio"][()] <= 1.0) and np.all(f["converged"][()])
        assert list(f.attrs["model_image_shape"]) == [1, 12, 12]
    assert "[1, 12, 12]" in run_cli("info", tmp_path / "r.h5").stdout   # a list, not numpy's
    report = tmp_path / "report"
    result = run_cli("evaluate", other, "--model", run, "--out", report, "--methods", "drip",
                     "--noise-percent", "2", "--any-size", "-q")
    assert result.exit_code == 0, result.stderr
    written = json.loads((report / "robustness.json").read_text())
    assert written["rows"][0]["fit_fraction"] == 1
    assert written["model_image_shape"] == {"drip": [1, 12, 12]}
    # but not other channels, nor images the filters do not fit in, nor a classical method
    for kind, shape, needle in (("denoise", (3, 12, 12), "3 channels"),
                                ("denoise", (1, 1, 16), "smaller than the model's filters")):
        odd = tmp_path / f"odd{shape[0]}.h5"
        write_small_file(odd, make_operator(kind, shape))
        result = run_cli("reconstruct", odd, "--model", run, "--out", tmp_path / "o.h5",
                         "--any-size")
        assert_one_line_error(result, needle, tmp_path / "o.h5")
    result = run_cli("reconstruct", other, "--method", "cgls", "--any-size", "--out",
                     tmp_path / "c.h5")
    assert_one_line_error(result, "--any-size applies to models (--model), not cgls",
                          tmp_path / "c.h5")
    inpaint = tmp_path / "inpaint.h5"
    write_small_file(inpaint, make_operator("inpainting", (1, 12, 12)))
    result = run_cli("reconstruct", inpaint, "--model", run, "--out", tmp_path / "r.h5", "-q")
    assert result.exit_code == 0 and "warning" in result.stderr.lower()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a model")
    result = run_cli("reconstruct", inpaint, "--model", broken, "--out", tmp_path / "r2.h5")
    assert result.exit_code == 1 and str(broken) in result.stderr
    result = run_cli("reconstruct", inpaint, "--method", "drip", "--out", tmp_path / "r3.h5")
    assert result.exit_code == 1 and "--model" in result.stderr


def test_a_grayscale_model_serves_colour_images_with_each_channel(train_file, tmp_path):
    """--each-channel: a single-channel model on each channel of colour images, the data fit
    over the whole sample; refused without the option, and for models it cannot widen. And
    drip train --init starts a colour run from it."""
    from drip_cli.operators import Blur, gaussian_psf

    run = tmp_path / "run"
    trained = run_cli("train", train_file, "--out", run, "--epochs", 1, *TINY,
                      "--latent-channels", "1")
    assert trained.exit_code == 0, trained.stderr
    colour = tmp_path / "colour.h5"
    write_small_file(colour, Blur((3, 12, 12), gaussian_psf(1.0)), n=4)
    out = tmp_path / "r.h5"
    refused = run_cli("reconstruct", colour, "--model", run, "--out", out)
    assert_one_line_error(refused, "--each-channel uses this single-channel model", out)
    result = run_cli("reconstruct", colour, "--model", run, "--out", out, "--each-channel", "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out) as f:
        assert f["reconstructions"].shape == (4, 3, 12, 12)
        assert np.all(f["discrepancy_ratio"][()] <= 1.0) and np.all(f["converged"][()])
        assert np.all(np.isfinite(f["regularizer_value"][()]))
        assert list(f.attrs["model_image_shape"]) == [1, 12, 12]
    two = tmp_path / "two"   # two latent channels: no single channel to repeat
    assert run_cli("train", train_file, "--out", two, "--epochs", 1, *TINY).exit_code == 0
    result = run_cli("reconstruct", colour, "--model", two, "--out", out.with_name("t.h5"),
                     "--each-channel")
    assert_one_line_error(result, "--each-channel serves single-channel drip models",
                          out.with_name("t.h5"))
    # drip train --init: the single-channel model starts a colour run on each channel, as one
    # block-diagonal model (filters that mix the channels start at zero); not the two-channel one
    write_small_file(colour, Blur((3, 12, 12), gaussian_psf(1.0)), n=8)
    wide = tmp_path / "wide"
    result = run_cli("train", colour, "--out", wide, "--epochs", 1, "--max-steps", 1,
                     "--init", run, *TINY_SETTINGS)
    assert result.exit_code == 0, result.stderr
    model = json.loads((wide / "config.json").read_text())["model"]
    assert (model["image_channels"], model["latent_channels"], model["n_filters"]) == (3, 3, 12)
    filters = load_model(wide)[0].regularizer.filters
    assert filters.shape == (12, 3, 3, 3)
    # --each-channel with a colour model is said to change nothing (it was silently ignored);
    # beside a grayscale model it serves, nothing is said
    result = run_cli("reconstruct", colour, "--model", wide, "--out", out.with_name("w.h5"),
                     "--each-channel", "-q")
    assert result.exit_code == 0, result.stderr
    assert "the model is for 3-channel images already" in " ".join(result.stderr.split())
    both = run_cli("evaluate", colour, "--model", wide, "--model", run, "--each-channel",
                   "--methods", "drip", "--noise-percent", "2", "--out", tmp_path / "rep", "-q")
    assert both.exit_code == 0 and "--each-channel" not in both.stderr, both.stderr
    given = run_cli("train", colour, "--out", tmp_path / "wide3", "--epochs", 1,
                    "--init", run, *TINY_SETTINGS, "--filters", "4")
    assert_one_line_error(given, "n_filters (model: 12, given: 4) (the model on each of 3 "
                          "channels)", tmp_path / "wide3")
    refused = run_cli("train", colour, "--out", tmp_path / "wide2", "--epochs", 1,
                      "--init", two, *TINY_SETTINGS)
    assert_one_line_error(refused, "the model is for 1-channel images, the training data has 3",
                          tmp_path / "wide2")


def test_info_on_a_model(train_file, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", train_file, "--out", run, "--epochs", 1, *TINY).exit_code == 0
    for target in (run, run / "model.safetensors"):
        result = run_cli("info", target)
        assert result.exit_code == 0, result.stderr
        assert "blur" in result.stdout and "latent_channels" in result.stdout
        assert "│ width" not in result.stdout   # the unrolled network's setting
        # header figures to 6 significant digits, not float64's 17
        shown = next(line for line in result.stdout.splitlines() if "val_psnr" in line)
        assert len(shown.split("│")[2].strip().lstrip("-").replace(".", "")) <= 6, shown
    # the folder also shows the run: its data, budget, validations and how to resume it
    text = " ".join(run_cli("info", run).stdout.split())
    assert "budget │ 1 epoch " in text and "validations │ 2 rows, the last at step" in text
    # how it serves other images: any size; not colour, with two latent channels
    assert "other sizes with --any-size" in text and "--each-channel" not in text
    assert "--resume (its budget is spent" in text.replace("│ │", "")   # wrapped in its cell
    (run / "history.csv").write_text("")   # damaged: shown as such, the rest still shown
    result = run_cli("info", run)
    assert result.exit_code == 0 and "history.csv │ unreadable" in result.stdout
    # the run's checkpoints and a folder without a model are named for what they are (they
    # were "not a drip model file" and "model.safetensors: no such model file")
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "zero.h5").touch()
    out = tmp_path / "r.h5"
    for target, message in ((run / "checkpoint.safetensors", "a training checkpoint"),
                            (run / "checkpoint_state.pt", "a training checkpoint"),
                            (empty, "a folder without model.safetensors")):
        for command in (("info", target), ("reconstruct", train_file, "--model", target,
                                           "--out", out)):
            result = run_cli(*command)
            assert_one_line_error(result, message, out)
            assert str(target) in result.stderr
    assert_one_line_error(run_cli("info", tmp_path / "zero.h5"), "zero.h5: an empty file", out)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "pixel-weights"])
def test_implicit_gradient_matches_finite_differences(weighted):
    """dL/dtheta through the converged lower-level solution, against central differences of L;
    also for a solve with pixel weights (a reweighting pass; the weights held fixed)."""
    from drip_cli.operators import Blur, gaussian_psf
    from drip_cli.regularizers.model import DripModel, ModelConfig
    from drip_cli.training.implicit import implicit_surrogate
    from drip_cli.training.trainer import upper_loss

    torch.manual_seed(0)
    op = Blur((1, 10, 10), gaussian_psf(1.0))
    # eps = 0.3: with 0.1 this tiny problem converges so slowly that differences of L scatter
    # (0.025-0.14 for h = 1e-6-1e-3 along one direction); at 0.3 they agree to 1e-6
    model = DripModel(ModelConfig(latent_channels=1, n_filters=4, kernel_size=3, eps=0.3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(2, 1, 10, 10, dtype=torch.float64)
    b = op(x) + 0.05 * torch.randn(2, 1, 10, 10, dtype=torch.float64)
    # Only the first sample: the second converges too slowly (KKT residual 7e-7 after 3000
    # iterations) for central differences to be meaningful.
    x, b = x[:1], b[:1]
    radius = torch.full((1,), 0.5, dtype=torch.float64)
    weights = ({"pixel_weights": 0.5 + torch.rand(1, 1, 10, 10, dtype=torch.float64)}
               if weighted else {})

    def loss_of(z):  # all three terms: solution, pre-projection iterate, predicted data
        return upper_loss(model, op, z, x, (1.0, 1.0, 1.0))

    def solve():
        return model.solve(op, b, radius, max_iterations=1000, tolerance=1e-13,
                           final_projection_iterations=2000, projection_iterations=100,
                           projection_tolerance=1e-12, **weights).latent

    z = solve().requires_grad_(True)
    loss = loss_of(z)
    (v,) = torch.autograd.grad(loss, z, retain_graph=True)
    surrogate = implicit_surrogate(op, model.embedding, model.regularizer, b, z, v, cg_iterations=200,
                                   **weights)
    model.zero_grad()
    (loss + surrogate).backward()
    # directional derivatives along random directions, over all parameters and over E alone
    gen = torch.Generator().manual_seed(1)
    params = list(model.parameters())
    h = 1e-4
    for group in (params, [model.embedding.weight]):
        directions = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in group]
        implicit = sum(float((p.grad * d).sum()) for p, d in zip(group, directions))
        with torch.no_grad():
            for p, d in zip(group, directions):
                p.add_(h * d)
            plus = float(loss_of(solve()))
            for p, d in zip(group, directions):
                p.sub_(2 * h * d)
            minus = float(loss_of(solve()))
            for p, d in zip(group, directions):
                p.add_(h * d)
        numeric = (plus - minus) / (2 * h)
        assert abs(implicit - numeric) <= 0.01 * abs(numeric), (implicit, numeric)


def test_guide_gradient_matches_finite_differences_through_both_passes():
    """drip train --guide-gradient: with one reweighting pass, whose pixel weights come from the
    first pass's solution, the gradient chained through both passes (surrogate_through_passes)
    matches central differences of the loss at the reweighted solution; holding the weights
    constant misses the part through them (measured: 0.05% off against 2-5%)."""
    from drip_cli.operators import Blur, gaussian_psf
    from drip_cli.regularizers.model import DripModel, ModelConfig
    from drip_cli.training.implicit import implicit_surrogate, surrogate_through_passes
    from drip_cli.training.trainer import upper_loss

    torch.manual_seed(0)
    op = Blur((1, 10, 10), gaussian_psf(1.0))
    config = ModelConfig(latent_channels=1, n_filters=4, kernel_size=3, eps=0.3, reweight=1,
                         edge_scale=0.3, guide_tolerance=1e-13)
    model = DripModel(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(1, 1, 10, 10, dtype=torch.float64)
    b = op(x) + 0.05 * torch.randn(1, 1, 10, 10, dtype=torch.float64)
    radius = torch.full((1,), 0.5, dtype=torch.float64)

    def loss_of(z):
        return upper_loss(model, op, z, x, (1.0, 0.0, 0.0))

    def solve():
        return model.solve(op, b, radius, max_iterations=3000, tolerance=1e-13,
                           stationarity_tolerance=1e-9, final_projection_iterations=2000,
                           projection_iterations=100, projection_tolerance=1e-12)

    solution = solve()
    assert len(solution.guide_latents) == 1 and bool(solution.converged.all())
    z = solution.latent.requires_grad_(True)
    (v,) = torch.autograd.grad(loss_of(z), z)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    directions = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    derivatives = {}
    for name in ("held", "chained"):
        model.zero_grad()
        if name == "held":
            surrogate = implicit_surrogate(op, model.embedding, model.regularizer, b, z, v, 300,
                                           pixel_weights=solution.pixel_weights)
        else:
            surrogate = surrogate_through_passes(
                op, model.embedding, model.regularizer, b, [*solution.guide_latents, z], v,
                model.pass_weights, 300)
        (loss_of(z) + surrogate).backward()
        derivatives[name] = sum(float((p.grad * d).sum()) for p, d in zip(params, directions))
    h = 1e-4
    with torch.no_grad():
        for p, d in zip(params, directions):
            p.add_(h * d)
        plus = float(loss_of(solve().latent))
        for p, d in zip(params, directions):
            p.sub_(2 * h * d)
        minus = float(loss_of(solve().latent))
    numeric = (plus - minus) / (2 * h)
    assert abs(derivatives["chained"] - numeric) <= 0.005 * abs(numeric), (derivatives, numeric)
    assert abs(derivatives["held"] - numeric) > 0.01 * abs(numeric), (derivatives, numeric)


def test_cosine_schedule_decays_from_lr_to_its_floor():
    from drip_cli.training.trainer import LR_FLOOR, learning_rate

    values = [learning_rate(1e-2, "cosine", p / 10) for p in range(11)]
    assert values[0] == pytest.approx(1e-2) and values[-1] == pytest.approx(LR_FLOOR * 1e-2)
    assert all(a > b for a, b in zip(values, values[1:]))
    assert learning_rate(1e-2, "cosine", 3.0) == values[-1]      # past the budget: the floor
    assert learning_rate(1e-2, "constant", 0.7) == 1e-2


@pytest.mark.parametrize("options, message", [
    (["--filters", "5"], "--filters"),
    (["--kernel-size", "4"], "--kernel-size"),
    (["--noise-percent", "0:3"], "--noise-percent"),
    (["--architecture", "resnet"], "--architecture"),
    (["--lr-schedule", "step"], "--lr-schedule"),
    (["--loss-weights", "1,1"], "--loss-weights"),
    (["--loss-weights", "0,1,1"], "--loss-weights"),
    (["--dilation-levels", "9"], "--dilation-levels"),
    (["--dilation-levels", "3", "--kernel-size", "9"], "reach"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--tau", "0"], "--tau must be a positive number"),
    (["--lr", "inf"], "--lr must be a positive number"),
    (["--tau", "inf"], "--tau must be a positive number"),
    (["--tau", "nan"], "--tau must be a positive number"),
    (["--max-minutes", "-1"], "--max-minutes must be a positive number"),
    (["--max-minutes", "inf"], "--max-minutes must be a positive number"),
    (["--eps", "inf"], "--eps must be a positive number"),
    (["--eps", "1e300"], "--eps must be at most 1e30"),   # was "weights out of range"
    (["--solver-tolerance", "inf"], "--solver-tolerance must be a positive number"),
    (["--loss-weights", "nan,1,1"], "--loss-weights"),
    (["--loss-weights", "1,inf,1"], "--loss-weights"),
])
def test_bad_training_options_are_one_line_errors(train_file, tmp_path, options, message):
    result = run_cli("train", train_file, "--out", tmp_path / "run", *options, "-q")
    assert_one_line_error(result, message, tmp_path / "run")


def test_reconstruct_reports_samples_stopped_at_the_iteration_cap(train_file, tmp_path):
    """A model whose solver cap is too small still fits every sample (the final projection),
    and says which samples stopped short of the minimiser: per sample in the file, as a fraction
    in the report, and in a console note."""
    from drip_cli.io.models import ModelInfo, save_model
    from drip_cli.regularizers.model import DripModel, ModelConfig

    config = ModelConfig(latent_channels=1, n_filters=4, kernel_size=3, max_iterations=2)
    model_path = tmp_path / "capped.safetensors"
    save_model(model_path, DripModel(config), ModelInfo(config, "blur", (1, 12, 12), (2.0, 2.0)))
    out, report = tmp_path / "r.h5", tmp_path / "r.json"
    result = run_cli("reconstruct", train_file, "--model", model_path, "--out", out,
                     "--report", report, "-q")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(report.read_text())
    with h5py.File(out) as f:
        solved = f["solver_converged"][()]
        assert np.all(f["converged"][()]) and not np.all(solved)
        assert np.all(f["iterations"][()][~solved] >= 2)
    assert summary["fit_fraction"] == 1.0
    assert summary["solver_converged_fraction"] == pytest.approx(solved.mean())
    assert summary["n_unfit"] == 0 and summary["n_stopped_at_cap"] == int((~solved).sum())
    assert (f"{int((~solved).sum())} sample(s) fit the data but the solver stopped before "
            "converging") in " ".join(result.stdout.split())
    # --max-iterations overrides the model's cap
    result = run_cli("reconstruct", train_file, "--model", model_path, "--out", out,
                     "--max-iterations", 1000, "--report", report, "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads(report.read_text())["solver_converged_fraction"] == 1.0
    with h5py.File(out) as f:
        assert np.all(f["solver_converged"][()]) and np.all(f["iterations"][()] > 2)
    # a noise level given far too low puts every sample out of reach of the CGLS start: each
    # is returned unfit at once (the solver used to iterate on them, for over four minutes here)
    result = run_cli("reconstruct", train_file, "--model", model_path, "--out", out,
                     "--max-iterations", 1000, "--noise-std", 1e-9, "-q")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out) as f:
        assert not np.any(f["converged"][()]) and np.all(f["iterations"][()] <= 1000)
    assert ("All of them were out of reach of the 1000 CGLS iterations that start and end "
            "DRIP's solve") in " ".join(result.stdout.split())


def test_a_refused_checkpoint_keeps_the_pair_whole(train_file, tmp_path):
    """The checkpoint's weights and optimiser state are written as one: when the state does
    not fit on the disk (here under a file-size limit that the weights fit), neither file is
    replaced, and the message says that there is nothing to resume."""
    from test_cli import _drip_with_file_size_limit

    run = tmp_path / "run"
    done = _drip_with_file_size_limit(6_000, "train", train_file, "--out", run, "--epochs", 1,
                                      *TINY)
    assert done.returncode == 1, done.stderr
    assert "checkpoint_state.pt: cannot write output: File too large" in done.stderr
    assert done.stderr.strip().endswith("nothing to resume")
    assert (run / "model.safetensors").exists() and not (run / "checkpoint.safetensors").exists()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_resume_drops_the_history_written_after_the_checkpoint(tmp_path):
    """A run stopped between its history row and its checkpoint writes that row again when it
    resumes: the row is dropped first, so no epoch is listed twice."""
    from drip_cli.training.trainer import _drop_rows_after

    history = tmp_path / "history.csv"
    rows = ["epoch,step,train_loss\r\n", "start,0,nan\r\n", "0,2,0.5\r\n", "1,4,0.4\r\n"]
    history.write_bytes("".join(rows).encode())
    _drop_rows_after(history, 4)
    assert history.read_bytes() == "".join(rows).encode()
    _drop_rows_after(history, 2)
    assert history.read_bytes() == "".join(rows[:3]).encode()


def test_a_refused_history_row_is_not_left_half_written(tmp_path):
    """``append_text`` cuts the file back when the disk refuses part of a row."""
    history = tmp_path / "history.csv"
    history.write_text("epoch,step\n")
    script = ("import resource\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
              "from drip_cli.io import append_text\n"
              "from drip_cli.errors import OutputError\n"
              "try:\n"
              f"    append_text({str(history)!r}, 'x' * 10000)\n"
              "except OutputError as exc:\n"
              "    print(exc)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.stdout.strip() == f"{history}: cannot write output: File too large (nothing was written)"
    assert history.read_text() == "epoch,step\n"


def test_a_run_folder_in_use_is_refused(train_file, tmp_path):
    """Two drip train runs on one folder, the second started before the first had saved a
    model: the second deleted the first's history and checkpoints and wrote its own among them.
    A run now holds its folder (an advisory lock), here held as another process would."""
    import fcntl

    done, fresh = tmp_path / "done", tmp_path / "fresh"
    assert run_cli("train", train_file, "--out", done, "--epochs", 1, *TINY).exit_code == 0
    fresh.mkdir()
    (fresh / "history.csv").write_text("epoch,step\nstart,0\n")   # the running one's
    for run, extra in ((fresh, ()), (done, ("--resume",))):
        holder = os.open(run, os.O_RDONLY)
        try:
            fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            result = run_cli("train", train_file, "--out", run, "--epochs", 2, *extra, *TINY)
            assert_one_line_error(result, f"{run.name}: is in use by another drip train, "
                                  "running now", fresh / "model.safetensors")
            if run == done:   # and drip info says so
                assert "a drip train runs in this folder now" in run_cli("info", run).stdout
        finally:
            os.close(holder)
    assert (fresh / "history.csv").read_text() == "epoch,step\nstart,0\n"
    assert "--resume" in run_cli("info", done).stdout
    assert run_cli("train", train_file, "--out", done, "--epochs", 2, "--resume",
                   *TINY).exit_code == 0


def test_the_budget_spent_is_the_furthest_of_the_limits():
    """The share of a run's budget (its progress bar; the learning-rate schedule without
    ``--max-steps``) is the furthest of the epochs' steps, ``--max-minutes`` and ``--max-steps``:
    a 10-minute run of the default 100 epochs is half done after 5 minutes, not 2%."""
    from types import SimpleNamespace

    from drip_cli.training.trainer import Trainer

    def spent(max_minutes, max_steps, step, seconds, steps_here=None):
        run = SimpleNamespace(config=SimpleNamespace(max_minutes=max_minutes,
                                                     max_steps=max_steps), global_step=step)
        return Trainer._budget_spent(run, seconds, 12100, steps_here)

    assert spent(None, None, 242, 300.0) == pytest.approx(0.02)
    assert spent(10, None, 242, 300.0) == pytest.approx(0.5)
    assert spent(10, None, 9075, 300.0) == pytest.approx(0.75)   # the epochs end it first
    assert spent(10, 40, 242, 60.0, steps_here=30) == pytest.approx(0.75)
    assert spent(10, 40, 242, 60.0) == pytest.approx(0.1)   # the schedule ignores --max-steps
