"""Bi-level training of a DRIP model.

Upper level: ``theta`` (regularizer) and ``E`` (embedding) minimise, over training images ``x``
with noise drawn per sample from a range of noise percents, the relative squared error of the
reconstruction ``E z`` at the lower-level solution ``z``, optionally with the paper's two other
terms, the pre-projection iterate against ``x`` and the predicted data ``A E z`` against ``A x``
(:func:`upper_loss`, ``loss_weights``).
Adam, with a cosine decay of the learning rate over the run's budget.

Lower level: the solution is computed the way ``drip reconstruct`` computes it (accelerated
projected gradient with steps bounded by ``1/L``, run until the iterates change by less than
``train_solver_tolerance``), without gradients; the gradient then comes from implicit
differentiation of its KKT conditions (:mod:`.implicit`). The model is thus trained on the
solutions the solver converges to, not on a fixed number of unrolled steps it could learn to
exploit.

The same trainer trains the unrolled baseline (``--architecture unrolled``,
:mod:`drip_cli.regularizers.unrolled`): there the reconstruction is a differentiable function of
the data, and its loss (the solution and data terms) is backpropagated through its steps.

What the sample models' 10-minute runs reach against TV is in the README (*Quality against
TV*); what was tried to improve on them is in ``docs/quality.md``.

Runs are reproducible and resumable: one seeded ``torch.Generator`` drives the data order and the
noise, and the checkpoint holds the model, the optimiser, the position in the epoch, the
generator state and the CPU convolution kernels chosen (:mod:`drip_cli.operators.convolution`),
so a resumed run, in this process or a new one, ends with exactly the weights of an
uninterrupted one (CPU).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import pickle
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from .. import __version__
from ..data import add_noise, noise_std_for, require_measurable
from ..errors import (SEED_MAX, DripError, DripWarning, is_finite_number, require_positive,
                      setting_type_problem)
from ..evaluation import psnr
from ..io import MeasurementFile, append_text, write_bytes, write_json, write_text
from ..io.measurements import require_representable_radius, require_resolvable_noise
from ..io.models import (CHECKPOINT_STATE, CHECKPOINT_WEIGHTS, CONFIG, HISTORY, MODEL_FILE,
                         ModelInfo, file_sha256, load_model, resolve_model_path, run_folder_lock,
                         save_model, weights_problem)
from ..operators.convolution import adopt_cpu_kernel_choices, cpu_kernel_choices
from ..regularizers.model import (ARCHITECTURES, DripModel, ModelConfig, build_model,
                                  require_setting_value, widened_model)
from ..regularizers.patches import PATCH_SIZE, supported_components
from ..solvers import LINALG_FAILURES, discrepancy_radius, discrepancy_ratio
from .implicit import implicit_surrogate, surrogate_through_passes

PATCH_PRIOR = "patch_prior"   # DripModel's patch mixture, fitted by the run (see fit)
# the patch term's weights tried at each validation (the best, or none, is kept with the model):
# the sample models' runs (80 components) chose 3e-3 for blur and tomography and 1e-2 for
# inpainting; on the first held-out set tomography scored within 0.02 dB from 2e-3 to 1e-2
PATCH_WEIGHTS = (3e-4, 1e-3, 3e-3, 1e-2)


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as ``config.json`` in the run folder."""

    data: str
    out: str
    epochs: int = 100
    max_minutes: float | None = None
    batch_size: int = 8
    lr: float = 3e-3
    # "cosine": the learning rate falls from lr to LR_FLOOR * lr over the run's budget (epochs or
    # --max-minutes, whichever ends it first); "constant": lr throughout
    lr_schedule: str = "cosine"
    # weights of the upper-level loss terms (relative squared errors): the solution E z against
    # x, the pre-projection iterate E (z - t grad R(z)) against x, and the predicted data A E z
    # against the clean data A x. The paper weighs all three 1; here, after 60 steps from the
    # same start (blur, 1-5%), validation PSNR was 31.49 dB with (1, 0, 0) and 31.36 with
    # (1, 1, 1): what reconstruct returns is the solution, so only its error counts by default.
    loss_weights: tuple[float, float, float] = (1.0, 0.0, 0.0)
    # (A, B): fresh noise of A..B percent for every batch; None: the file's own measurements
    noise_percent: tuple[float, float] | None = (1.0, 5.0)
    tau: float = 1.0
    val_fraction: float = 0.1
    val_max_samples: int = 32
    seed: int = 0
    # The implicit solve runs up to 50 projected preconditioned CG iterations: at the trained
    # sample model, 20 gave a parameter gradient at cosine 0.36-0.41 to the exact one; 50 with
    # the closed-form Hessian take 0.33 s for 8 crops, less than the 0.42 s of the earlier 20
    # plain ones (see .implicit).
    cg_iterations: int = 50
    # Training solves stop at a relative change of 1e-3 (inference: 1e-4): on 8 crops at 1-5%
    # blur noise that cut a step from 4.1 to 1.6 s. Sharp models need tighter solves: with
    # eps 0.001 on limited-angle tomography, 1e-3 / 150 iterations left solutions 1.2% from the
    # converged ones (0.23-0.32 dB below them), and a 10-minute run with 3e-4 / 300 (the CLI's
    # --solver-tolerance / --solver-iterations) ended 0.09-0.16 dB higher on held-out crops.
    # On blur it gained nothing: validation 31.57 against 31.56 dB (453 steps instead of 478),
    # held out -0.04 to +0.00 dB.
    train_solver_iterations: int = 150
    train_solver_tolerance: float = 1e-3
    max_steps: int | None = None   # stop after this many optimiser steps in this invocation
    # with reweighting: differentiate through each pass's pixel weights too, back through the
    # earlier pass whose solution set them (False: the weights held constant)
    guide_gradient: bool = False
    # start from this model's weights (run folder or model file; its architecture is adopted)
    # instead of the untrained start; the file's sha256 is recorded in init_sha256
    init: str | None = None
    init_sha256: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)

    def validate(self) -> None:
        """Refuse inconsistent settings with one line naming the command-line option."""
        m = self.model
        for option, value in (("--lr", self.lr), ("--tau", self.tau),
                              ("--max-minutes", self.max_minutes),   # None: no time limit
                              ("--eps", m.eps), ("--solver-tolerance", self.train_solver_tolerance)):
            if value is not None:
                require_positive(option, value)
        require_setting_value("--eps", "eps", m.eps)   # as a model file's eps is checked
        for option, value, least in (("--epochs", self.epochs, 1),
                                     ("--batch-size", self.batch_size, 1),
                                     ("--cg-iterations", self.cg_iterations, 1),
                                     ("--solver-iterations", self.train_solver_iterations, 1),
                                     ("val_max_samples", self.val_max_samples, 0)):
            if value < least:
                raise DripError(f"{option} must be at least {least}, got {value}")
        if not 0 <= self.seed <= SEED_MAX:
            raise DripError(f"--seed must be between 0 and {SEED_MAX}, got {self.seed}")
        if not 0 <= self.val_fraction < 1:
            raise DripError(f"val_fraction must be at least 0 and below 1, got {self.val_fraction}")
        if m.group_size not in (1, 2):
            raise DripError(f"group_size must be 1 or 2, got {m.group_size}")
        if m.embedding_kernel_size % 2 == 0:
            raise DripError(f"embedding_kernel_size must be odd, got {m.embedding_kernel_size}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise DripError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, "
                            f"got {self.lr_schedule!r}")
        w = self.loss_weights
        if (not isinstance(w, (tuple, list)) or len(w) != 3 or not all(map(math.isfinite, w))
                or min(w) < 0 or w[0] <= 0):
            shown = ",".join(map(str, w)) if isinstance(w, (tuple, list)) else w
            raise DripError(f"--loss-weights must be three non-negative numbers, the first "
                            f"positive, as in 1,1,1; got {shown}")
        if m.architecture not in ARCHITECTURES:
            raise DripError(f"--architecture must be one of {', '.join(ARCHITECTURES)}, "
                            f"got {m.architecture!r}")
        if m.is_unrolled and w[1]:
            raise DripError("--loss-weights: the unrolled network has no pre-projection iterate "
                            "(the second weight must be 0)")
        if m.reweight and m.architecture != "convex":
            raise DripError(f"--reweight needs the convex architecture, got {m.architecture!r}")
        if m.patch_components and m.architecture != "convex":
            raise DripError(f"--patch-components needs the convex architecture, got "
                            f"{m.architecture!r}")
        if m.kernel_size % 2 == 0 or m.kernel_size < 3:
            raise DripError(f"--kernel-size must be odd and at least 3, got {m.kernel_size}")
        if m.n_filters % 2:
            raise DripError(f"--filters must be even (the filters come in pairs), got {m.n_filters}")
        if m.dilation_levels > m.n_filters // 2:
            raise DripError(f"--dilation-levels must be at most the number of filter pairs "
                            f"({m.n_filters // 2}), got {m.dilation_levels}")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["noise_percent"] = None if self.noise_percent is None else list(self.noise_percent)
        values["loss_weights"] = list(self.loss_weights)
        return values


# the options that shape a model's parameters: --init takes them from the model it starts from
ARCHITECTURE_FIELDS = ("architecture", "latent_channels", "n_filters", "kernel_size",
                       "embedding_kernel_size", "embedding_boundary", "eps", "group_size",
                       "potential_scales", "dilation_levels", "layers", "width")


def unused_settings(config: TrainConfig, given: set[str]) -> dict[str, list[str]]:
    """The ``given`` settings that ``config`` ignores, by why (the end of a warning line): those
    its architecture has no use for (model fields first), and ``--guide-gradient`` where there
    are no reweighting passes to differentiate through."""
    model = config.model
    by_architecture = model.unused_fields()
    if model.is_unrolled:   # trained by backpropagation: no solve, no KKT system
        by_architecture += ("cg_iterations", "train_solver_iterations", "train_solver_tolerance")
    convex = model.architecture == "convex"
    if not convex:   # reweighting passes need a convex regularizer
        by_architecture += ("guide_gradient",)
    reasons = {f"not used by --architecture {model.architecture}": by_architecture,
               "not used without reweighting passes (--reweight 0)":
                   ("guide_gradient",) if convex and not model.reweight else ()}
    return {why: named for why, names in reasons.items()
            if (named := [name for name in names if name in given])}


# Settings whose best value depends on the operator, or on how sharp the model is. A fresh run
# takes them from here where they are not given (--resume takes the run's, --init the starting
# model's eps), so that `drip train DATA --noise-percent 1:5 --max-minutes 10` follows the
# sample models' recipes (sample_data/README.md). Measured with such 10-minute runs on 1000
# crops of five photographs, tested on 32 crops of four others:
# - eps: sharp potentials on limited-angle tomography (0.001; the TV pair's smoothing at 0.001 /
#   0.003 / 0.01 gave 28.42 / 28.37 / 28.20 dB on its training crops), 0.01 elsewhere (on blur
#   the best of 0.003 / 0.01 / 0.03 for the untrained smoothed TV term);
# - sharp models (eps <= SHARP_EPS) need tighter training solves: with eps 0.001 on tomography
#   the loose ones left solutions 0.23-0.32 dB below the converged ones, and the model trained
#   with the tight ones ended 0.09-0.16 dB higher on held-out crops;
# - one edge-adaptive reweighting pass for convex models (regularizers/adaptive.py): the blur
#   model trained with it scores 33.37 / 32.56 / 31.15 / 29.92 dB at 1 / 2 / 5 / 10% noise
#   where the one trained without it scored 33.07 / 32.30 / 31.00 / 29.73 (docs/quality.md);
#   on inpainting see sample_data/README.md;
# - a periodic embedding for periodic operators (blur, denoise): A E is then a circulant and
#   the solver's projections are exact in the Fourier basis (solvers.projection), the same
#   quality at 0.67 times the solve's time on blur at 2% noise and a fourteenth at 0.03%.
OPERATOR_EPS = {"tomography": 0.001}
SHARP_EPS = 0.003
SHARP_SOLVES = {"train_solver_tolerance": 3e-4, "train_solver_iterations": 300}
TRAIN_REWEIGHT = 1
# convex models get a patch mixture of this many components where the training images determine
# them (regularizers.patches.supported_components), none where they determine fewer than
# MIN_DEFAULT_COMPONENTS: on the held-out crops 80 gave 0.05-0.12 dB more than 20 on blur and
# tomography (0.16-0.36 on inpainting), 160 no more than 80 (docs/quality.md, *80 components*)
DEFAULT_PATCH_COMPONENTS = 80
MIN_DEFAULT_COMPONENTS = 20


def operator_defaults(config: TrainConfig, operator_kind: str, given: set[str],
                      periodic: bool = False) -> dict:
    """Set, for a fresh run, the settings above that the user did not give (``given``, field
    names): ``eps`` and, for a ``periodic`` operator, ``embedding_boundary`` (neither with
    ``--init``, whose model brings its own), the training solves' tolerance and cap where the
    model is sharp, and ``reweight`` for convex models. Returns the settings chosen, by field
    name, to be reported."""
    model = config.model
    if model.is_unrolled:   # no regularizer, no solve
        return {}
    chosen = {}
    if "eps" not in given and config.init is None:
        chosen["eps"] = OPERATOR_EPS.get(operator_kind, ModelConfig.eps)
    if periodic and config.init is None:
        chosen["embedding_boundary"] = "periodic"
    if chosen.get("eps", model.eps) <= SHARP_EPS:
        chosen.update({name: value for name, value in SHARP_SOLVES.items() if name not in given})
    if model.architecture == "convex" and "reweight" not in given:
        chosen["reweight"] = TRAIN_REWEIGHT
    for name, value in chosen.items():
        setattr(model if name in ModelConfig.__dataclass_fields__ else config, name, value)
    return chosen


def patch_default(config: TrainConfig, shape: tuple[int, ...], given: set[str]) -> dict:
    """For a fresh convex run without ``--patch-components``: ``DEFAULT_PATCH_COMPONENTS``
    components, or started from a model (``--init``, which set ``patch_components`` to its
    own) as many as that model has (none where it has none), in either case at most as many as
    training images of ``shape`` ``(N, C, H, W)`` determine and none below
    ``MIN_DEFAULT_COMPONENTS``. Returns the setting, to be reported, where it chose one other
    than the model's or none where it wanted some (the images determine too few: a run that
    leaves the mixture out says so)."""
    model = config.model
    if "patch_components" in given or model.architecture != "convex":
        return {}
    wanted = DEFAULT_PATCH_COMPONENTS if config.init is None else model.patch_components
    components = min(wanted, supported_components(shape))
    if components < MIN_DEFAULT_COMPONENTS:
        components = 0
    if components == model.patch_components and (components or not wanted):
        return {}
    model.patch_components = components
    return {"patch_components": components}


# the run's budget: --resume takes it from the run's config.json unless given anew
BUDGET_FIELDS = ("epochs", "max_minutes")
# the options that set a run's course: --resume takes them from the run's config.json
RUN_FIELDS = ("batch_size", "lr", "lr_schedule", "loss_weights", "noise_percent", "tau",
              "val_fraction", "val_max_samples", "seed", "cg_iterations",
              "train_solver_iterations", "train_solver_tolerance", "guide_gradient")
# what a checkpoint's state must hold (besides its optional "kernel_choices")
CHECKPOINT_STATE_KEYS = ("optimizer", "epoch", "step_in_epoch", "global_step", "permutation",
                         "generator", "best_psnr", "elapsed", "torch_rng")


def _plain(value):
    """A setting as ``config.json`` holds it (tuples as lists), for comparisons."""
    return list(value) if isinstance(value, tuple) else value


def options_changed(config: TrainConfig) -> set[str]:
    """The settings of ``config`` (its own and its model's) that differ from the defaults: what
    counts as given when the caller does not say (library use of :class:`Trainer`)."""
    defaults = TrainConfig(data=config.data, out=config.out,
                           model=ModelConfig(architecture=config.model.architecture))
    defaults.model.architecture = ModelConfig.architecture
    return ({name for name in RUN_FIELDS
             if _plain(getattr(config, name)) != _plain(getattr(defaults, name))}
            | {name for name in ModelConfig.__dataclass_fields__
               if getattr(config.model, name) != getattr(defaults.model, name)})


def differences(target, source: dict, names, given: set[str], labels: tuple[str, str]) -> list[str]:
    """``"name (label0: source's value, label1: target's)"`` for each of the ``given`` options
    among ``names`` whose value in ``target`` differs from ``source``'s."""
    current = {name: _plain(getattr(target, name)) for name in names}
    return [f"{name} ({labels[0]}: {source.get(name)}, {labels[1]}: {current[name]})"
            for name in names if name in given and current[name] != source.get(name)]


def take_options(target, source: dict, names) -> None:
    """Set the options ``names`` of ``target`` to ``source``'s values."""
    for name in names:
        value = source[name]
        setattr(target, name, tuple(value) if isinstance(value, list) else value)


def adopt_initial_model(config: TrainConfig, image_channels: int,
                        given: set[str]) -> dict[str, torch.Tensor]:
    """``--init``: set ``config.model``'s architecture to the starting model's and return its
    weights. Architecture options not given take the model's values; given ones that differ
    from the model's are refused, naming them. A single-channel convex model starts a run on
    images of more channels as itself on each channel (:func:`widened_model`), the filters
    that mix the channels at zero."""
    model, info, sha = load_model(config.init)
    start, widened = info.config, ""
    if start.image_channels == 1 < image_channels and getattr(model, "widens_per_channel", False):
        try:
            model = widened_model(model, image_channels)
        except ValueError as error:   # its filter groups split unevenly over its dilations
            raise DripError(f"--init: the single-channel model cannot start a run on "
                            f"{image_channels}-channel images: {error}", config.init) from None
        start, widened = model.config, f" (the model on each of {image_channels} channels)"
    if start.image_channels != image_channels:
        raise DripError(f"--init: the model is for {start.image_channels}-channel images, the "
                        f"training data has {image_channels}", config.init)
    differ = differences(config.model, start.to_dict(), ARCHITECTURE_FIELDS, given,
                         ("model", "given"))
    if differ:
        raise DripError(f"--init: options differ from the model's (leave them out to take the "
                        f"model's): {', '.join(differ)}{widened}", config.init)
    take_options(config.model, start.to_dict(), ARCHITECTURE_FIELDS)
    if "patch_components" not in given:   # its count, fitted afresh (patch_default)
        config.model.patch_components = info.config.patch_components
    config.init_sha256 = sha
    # a patch mixture is fitted to each run's own training images: the start's is not taken
    return {name: value for name, value in model.state_dict().items()
            if not name.startswith(PATCH_PRIOR + ".")}


def adopt_run_options(config: TrainConfig, image_channels: int, given: set[str]) -> str | None:
    """``--resume``: the run's settings (its ``config.json``: the model's and those that set the
    run's course) replace the ones not given, and given ones must equal them; a run started with
    ``--init`` keeps its record of the starting model without reading that file again (the
    checkpoint holds the weights). ``--epochs`` and ``--max-minutes`` may change; left out,
    they too are the run's, so that a run interrupted and resumed as the interruption's message
    says (``--resume`` alone) keeps its budget and its learning-rate schedule. The data's
    channel count may not change. Returns the sha256 of the data the run started on, as its
    ``config.json`` records it (``None`` for a run from before that was recorded)."""
    path = Path(config.out) / CONFIG
    if not path.exists():
        raise DripError("no checkpoint to resume from", config.out)
    defaults = TrainConfig(data="", out="")
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
        model = saved.get("model")
        ModelConfig.from_dict(model)  # checks each setting's type and value
        if "image_channels" not in model:   # (read as "trained on None-channel images")
            raise ValueError("the model settings lack image_channels")
        problem = next(filter(None, (setting_type_problem(name, saved[name], getattr(defaults, name))
                                     for name in RUN_FIELDS if name in saved)), None)
        if problem:
            raise ValueError(problem)
        budget = {name: saved[name] for name in BUDGET_FIELDS
                  if name in saved and name not in given}
        if "epochs" in budget and type(budget["epochs"]) is not int:   # its range: validate()
            raise ValueError(f"epochs = {budget['epochs']!r} is not an integer")
        minutes = budget.get("max_minutes")
        if minutes is not None and not (is_finite_number(minutes) and minutes > 0):
            raise ValueError(f"max_minutes = {minutes!r} is not a positive number of minutes")
        started_on = saved.get("data_sha256")
        if started_on is not None and not isinstance(started_on, str):
            raise ValueError(f"data_sha256 = {started_on!r} is not a sha256")
    except (OSError, ValueError) as exc:
        raise DripError(f"cannot read the run's settings ({exc})", path) from exc
    if model.get("image_channels") != image_channels:
        raise DripError(f"--resume: the run was trained on {model.get('image_channels')}-channel "
                        f"images, the data has {image_channels}", config.out)
    model_names = [name for name in model
                   if name in ModelConfig.__dataclass_fields__ and name != "image_channels"]
    run_names = [name for name in RUN_FIELDS if name in saved]
    differ = (differences(config.model, model, model_names, given, ("run", "now"))
              + differences(config, saved, run_names, given, ("run", "now")))
    if differ:
        raise DripError(f"--resume: options differ from the run's config.json (leave them out "
                        f"to take the run's): {', '.join(differ)}", config.out)
    take_options(config.model, model, model_names)
    take_options(config, saved, run_names)
    take_options(config, budget, budget)
    try:   # the values, now that they are the run's (a damaged file's lr = -1, batch_size = 0)
        config.validate()
    except DripError as exc:
        raise DripError(f"cannot read the run's settings ({exc.message})", path) from exc
    if (config.init is not None
            and file_sha256(resolve_model_path(config.init)) != saved.get("init_sha256")):
        raise DripError(f"--resume: --init names another model than the run started from "
                        f"(sha256 {str(saved.get('init_sha256'))[:12]}...; leave --init out)",
                        config.init)
    config.init, config.init_sha256 = saved.get("init"), saved.get("init_sha256")
    return started_on


def require_the_runs_data(out, recorded: str | None, sha256: str, data) -> None:
    """``--resume`` continues a run on the data it started on, known by content (``recorded``,
    the sha256 in its ``config.json``; for a run from before that was recorded, the one its
    model file records), not by name: on other data it would not continue the run, and the
    model would name data it was not trained on."""
    if recorded is None and (Path(out) / MODEL_FILE).exists():
        try:
            recorded = load_model(Path(out) / MODEL_FILE)[1].training_data_sha256 or None
        except DripError:   # a damaged model file: the checkpoint is what resumes
            recorded = None
    if recorded is not None and recorded != sha256:
        raise DripError(f"--resume: the run in {out} was trained on other data (sha256 "
                        f"{recorded[:12]}..., this file's {sha256[:12]}...): resume it with its "
                        f"own data file, or start a new run from its model with --init {out}",
                        data)


LR_FLOOR = 0.05
LR_SCHEDULES = ("cosine", "constant")


def _drop_rows_after(history: Path, step: int) -> None:
    """Drop the rows of a run's ``history.csv`` written after its checkpoint at ``step``: a run
    stopped between a row and its checkpoint (a full disk, Ctrl-C) writes them again when it
    resumes. Rows whose step cannot be read are kept."""
    with open(history, newline="", errors="replace") as handle:   # keep its \r\n
        lines = handle.read().splitlines(keepends=True)

    def row_step(line: str) -> int | None:
        fields = next(csv.reader([line]), [])
        try:
            return int(fields[1])
        except (IndexError, ValueError):
            return None

    kept = lines[:1] + [line for line in lines[1:] if (row_step(line) or 0) <= step]
    if len(kept) < len(lines):
        write_text(history, "".join(kept))


def learning_rate(base: float, schedule: str, progress: float) -> float:
    """The learning rate at ``progress`` (0 to 1) of the run's budget."""
    if schedule == "constant":
        return base
    progress = min(max(progress, 0.0), 1.0)
    return base * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


def relative_error(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||estimate - target||^2 / ||target||^2`` per sample."""
    return (estimate - target).flatten(1).pow(2).sum(1) / target.flatten(1).pow(2).sum(1).clamp_min(1e-12)


def image_error(op, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The relative squared error of images ``u`` against ``x`` on the pixels quality is
    measured on (``op.scored``)."""
    return relative_error(op.scored_part(u), op.scored_part(x))


def reconstruction_loss(op, u: torch.Tensor, x: torch.Tensor, w_solution: float,
                        w_data: float) -> torch.Tensor:
    """Per sample: ``w_solution`` times the relative squared error of the image ``u`` against
    ``x`` (:func:`image_error`), plus ``w_data`` times that of the predicted data ``A u``
    against ``A x``."""
    loss = w_solution * image_error(op, u, x)
    if w_data:
        loss = loss + w_data * relative_error(op(u), op(x))
    return loss


def upper_loss(model: DripModel, op, z: torch.Tensor, x: torch.Tensor,
               weights: tuple[float, float, float]) -> torch.Tensor:
    """The training loss at the lower-level solution ``z``: weighted relative squared errors of
    the solution ``E z``, of the pre-projection iterate ``E (z - t grad R(z))`` (``t = 1 /
    curvature``, the step the solver starts from; at a solution the projection of that iterate
    is ``z`` again, so this term asks the regularizer's own descent direction there to point
    towards the truth) against ``x``, and of the predicted data ``A E z`` against ``A x``
    (the paper's three terms). A function of ``z`` and the parameters only."""
    w_solution, w_pre, w_data = weights
    embedding, regularizer = model.embedding, model.regularizer
    loss = reconstruction_loss(op, embedding(z), x, w_solution, w_data)
    if w_pre:
        step = 1.0 / regularizer.curvature_and_lipschitz_bound()[0].to(z.dtype)
        loss = loss + w_pre * image_error(op, embedding(z - step * regularizer.gradient(z)), x)
    return loss.mean()


class Trainer:
    def __init__(self, config: TrainConfig, device: torch.device, progress=None, log=None,
                 resume: bool = False, given: set[str] | None = None):
        """``resume``: continue the run in ``config.out`` (:meth:`fit` loads its checkpoint).
        ``given``: the settings (field names of ``config`` and its model) the user set; the
        others are taken from the run (``resume``), the starting model (``config.init``) or the
        operator (:func:`operator_defaults`). Default: those that differ from the defaults, so
        a setting of :func:`operator_defaults` left at its dataclass default takes the
        operator's value (name it in ``given`` to keep it)."""
        given = options_changed(config) if given is None else set(given)
        self.config = config
        self.resume = resume
        self.device = device
        self.progress = progress or (lambda **kw: None)
        self.log = log or (lambda message: None)
        self.out = Path(config.out)
        if not resume:
            self._refuse_to_overwrite()
        # With fresh noise only the ground truth and the operator are needed (the file's noise
        # levels are not even checked); otherwise the measurements and their noise levels too.
        fresh = config.noise_percent is not None
        with MeasurementFile(config.data, require_ground_truth=True,
                             noise_levels="ignored" if fresh else "optional") as data:
            if not fresh and data.noise_std is None:   # drip train has no --noise-std to offer
                raise DripError("has no dataset 'noise_std' for its measurements; train on "
                                "fresh noise instead, with --noise-percent A:B (say 1:5)",
                                config.data)
            self.op = data.operator.to(device)
            batches = list(data.batches(1024))
        truth = np.concatenate([batch.ground_truth for batch in batches])
        self.file_measurements = None if fresh else (
            torch.from_numpy(np.concatenate([batch.measurements for batch in batches])),
            torch.from_numpy(np.concatenate([batch.noise_std for batch in batches]).astype(np.float64)))
        if resume:
            started_on = adopt_run_options(config, truth.shape[1], given)
        initial_weights = (None if config.init is None or resume
                           else adopt_initial_model(config, truth.shape[1], given))
        # settings left to the operator (after --init: a starting model's eps stays)
        self.operator_defaults = ({} if resume else
                                  operator_defaults(config, self.op.kind, given, self.op.periodic))
        config.model.image_channels = truth.shape[1]
        if 0 < config.model.latent_channels < truth.shape[1]:
            raise DripError(f"--latent-channels must be at least the images' channel count "
                            f"({truth.shape[1]}), got {config.model.latent_channels}", config.data)
        config.model.latent_channels = config.model.latent_channels or truth.shape[1]
        self.truth = torch.from_numpy(truth)
        if fresh:   # fresh noise is a percent of mean |A x|: it needs A x != 0, and its
            # lowest level must stay within float32's reach, as a file's noise levels must
            one_percent = self._one_percent_noise(self.truth).cpu().double().numpy()
            require_measurable(one_percent, config.data)
            require_resolvable_noise(config.noise_percent[0] * one_percent,
                                     "the noise std at --noise-percent's low end",
                                     "raise --noise-percent, or scale the images to [0, 1]",
                                     config.data)
            require_representable_radius(config.noise_percent[1] * one_percent,
                                         self.op.measured_count,
                                         "the noise std at --noise-percent's high end",
                                         "lower --noise-percent", config.data)
        n = len(truth)
        n_val = min(config.val_max_samples, max(1, int(round(config.val_fraction * n)))) if n > 1 else 0
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
        self.val_index, self.train_index = order[:n_val], order[n_val:]
        if len(self.train_index) == 0:
            raise DripError("too few samples to train on", config.data)
        if not resume:
            self.operator_defaults.update(
                patch_default(config, tuple(self.truth[self.train_index].shape), given))
        self.data_sha256 = file_sha256(config.data)
        if resume:
            require_the_runs_data(config.out, started_on, self.data_sha256, config.data)

        torch.manual_seed(config.seed)
        self.model = build_model(config.model)
        if initial_weights is not None:
            strict = getattr(self.model, PATCH_PRIOR, None) is None
            self.model.load_state_dict(initial_weights, strict=strict)
        self.model.to(device)
        reach = self.model.reach
        if reach > min(truth.shape[-2:]):
            raise DripError(f"images of {truth.shape[-2]}x{truth.shape[-1]} pixels are smaller "
                            f"than the filters' reach ({reach} pixels): use a smaller "
                            f"--kernel-size or --dilation-levels", config.data)
        if config.model.patch_components and min(truth.shape[-2:]) < PATCH_SIZE:
            raise DripError(f"--patch-components: images of {truth.shape[-2]}x{truth.shape[-1]} "
                            f"pixels are smaller than the mixture's {PATCH_SIZE}x{PATCH_SIZE} "
                            f"patches", config.data)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.permutation = self._new_permutation()
        self.best_psnr = -math.inf
        self.elapsed = 0.0
        self._validation_noise = self._fixed_validation_noise()
        self.noise_range = self._noise_range()

    def _new_permutation(self) -> torch.Tensor:
        return self.train_index[torch.randperm(len(self.train_index), generator=self.generator)]

    def _fixed_validation_noise(self):
        """Noise percents and noise draws for validation, fixed for the whole run."""
        if self.file_measurements is not None:
            return None
        gen = torch.Generator().manual_seed(self.config.seed + 2)
        low, high = self.config.noise_percent
        percent = low + (high - low) * torch.rand(len(self.val_index), generator=gen, dtype=torch.float64)
        noise = torch.randn((len(self.val_index), *self.op.measurement_shape), generator=gen,
                            dtype=torch.float64)
        return percent, noise

    # -- data ----------------------------------------------------------------------------------
    def _from_file(self, index: torch.Tensor, x: torch.Tensor):
        """``(b, sigma)``: the file's own measurements and noise levels for these samples."""
        measurements, noise_std = self.file_measurements
        b = measurements[index].to(device=self.device, dtype=x.dtype)
        return b, noise_std[index].to(device=self.device, dtype=x.dtype)

    def _simulate(self, x: torch.Tensor, percent: torch.Tensor, noise: torch.Tensor):
        """``(b, sigma)``: fresh measurements of ``x`` at these noise percents."""
        clean = self.op(x)
        sigma = noise_std_for(self.op, clean, percent.to(self.device))
        b = add_noise(self.op, clean, sigma, noise.to(device=self.device, dtype=x.dtype))
        return b, sigma

    def _training_batch(self):
        cfg = self.config
        start = self.step_in_epoch * cfg.batch_size
        index = self.permutation[start:start + cfg.batch_size]
        x = self.truth[index].to(self.device)
        if self.file_measurements is not None:
            return (x, *self._from_file(index, x))
        low, high = cfg.noise_percent
        percent = low + (high - low) * torch.rand(len(index), generator=self.generator, dtype=torch.float64)
        noise = torch.randn((len(index), *self.op.measurement_shape), generator=self.generator,
                            dtype=torch.float64)
        return (x, *self._simulate(x, percent, noise))

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_index) / self.config.batch_size)

    # -- one optimisation step -----------------------------------------------------------------
    def _implicit_part(self, b, solution, z, dloss_dz):
        """The implicit surrogate through the last pass's solution ``z`` (pixel weights held
        constant), or with ``guide_gradient`` through every pass
        (:func:`surrogate_through_passes`)."""
        cfg, model = self.config, self.model
        common = (self.op, model.embedding, model.regularizer, b)
        if cfg.guide_gradient and solution.guide_latents:
            return surrogate_through_passes(
                *common, [*solution.guide_latents, z], dloss_dz, model.pass_weights,
                cfg.cg_iterations)
        return implicit_surrogate(*common, z, dloss_dz, cfg.cg_iterations,
                                  pixel_weights=solution.pixel_weights)

    def train_step(self) -> float:
        cfg = self.config
        x, b, sigma = self._training_batch()
        self.model.train()
        if cfg.model.is_unrolled:   # the baseline: plain backpropagation through its K steps
            w_solution, _, w_data = cfg.loss_weights
            loss = reconstruction_loss(self.op, self.model(self.op, b), x, w_solution, w_data).mean()
            objective = loss
        else:
            radius = discrepancy_radius(self.op, sigma, cfg.tau)
            # the patch pass is not trained through: its weight is chosen at validation
            with self._overflow_as_divergence("its solve failed", self.global_step + 1):
                solution = self.model.solve(self.op, b, radius, patch_weight=0,
                                            max_iterations=cfg.train_solver_iterations,
                                            tolerance=cfg.train_solver_tolerance)
            z = solution.latent.detach().requires_grad_(True)
            loss = upper_loss(self.model, self.op, z, x, cfg.loss_weights)
            (dloss_dz,) = torch.autograd.grad(loss, z, retain_graph=True)
            # direct dependence on E, plus the implicit part through the solution
            objective = loss + self._implicit_part(b, solution, z, dloss_dz)
        if not bool(torch.isfinite(objective.detach()).all()):
            value = float(loss.detach())
            raise self._diverged(f"the training loss is {value}" if not math.isfinite(value)
                                 else "the implicit gradient's surrogate is not finite",
                                 self.global_step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        self.optimizer.step()
        # one test (one host synchronisation on a GPU), not one per parameter
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()):
            raise self._diverged("the model's weights are no longer finite", self.global_step + 1)
        return float(loss.detach())

    def _diverged(self, what: str, step: int) -> DripError:
        """The error that ends a run whose arithmetic overflowed, as a learning rate far too
        large makes it: said at once. (Such a run went on with NaN weights, read its NaN
        validation PSNR as "no validation" and kept the NaN model as its best.) At step 0, before
        any step, it is the start that overflows: ``--init``'s model."""
        if step == 0:
            return DripError(f"the starting model's weights are out of range for this data: "
                             f"{what}", self.config.init or self.out)
        return DripError(f"training diverged at step {step}: {what}. Start again with a smaller "
                         f"--lr than {self.config.lr:g}; {MODEL_FILE} holds the best model "
                         "validated before", self.out)

    @contextlib.contextmanager
    def _overflow_as_divergence(self, what: str, step: int):
        """Turn a linear-algebra failure in a solve (weights so large that the step bound's
        Lanczos products overflow) into :meth:`_diverged`."""
        try:
            yield
        except LINALG_FAILURES as exc:
            raise self._diverged(f"{what} ({str(exc).rstrip('.')})", step) from exc

    # -- validation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        if len(self.val_index) == 0:
            return {"val_psnr": float("nan"), "val_fit_fraction": float("nan")}
        self.model.eval()
        x = self.truth[self.val_index].to(self.device)
        if self.file_measurements is not None:
            b, sigma = self._from_file(self.val_index, x)
        else:
            b, sigma = self._simulate(x, *self._validation_noise)
        radius = discrepancy_radius(self.op, sigma, self.config.tau)
        choose = getattr(self.model, "has_patch_mixture", False)   # (unrolled: no solve)

        def mean_psnr(result):
            return float(psnr(self.op.scored_part(result.solution).cpu().numpy(),
                              self.op.scored_part(x).cpu().numpy()).mean())

        metrics = {}
        with self._overflow_as_divergence("the validation solve failed", self.global_step):
            solution = self.model.solve(self.op, b, radius,
                                        **({"patch_weight": 0} if choose else {}))
            if choose:   # the patch term's weight: the best of PATCH_WEIGHTS here, or none
                best, weight = mean_psnr(solution), 0.0
                for candidate in PATCH_WEIGHTS:
                    result = self.model.patch_pass(self.op, b, radius, solution, candidate)
                    if (score := mean_psnr(result)) > best:
                        best, weight, chosen = score, candidate, result
                self.model.config.patch_weight = weight
                solution = chosen if weight else solution
                metrics["val_patch_weight"] = weight
        ratio = discrepancy_ratio(self.op, solution.solution, b, sigma)
        return {"val_psnr": mean_psnr(solution),
                "val_fit_fraction": float((ratio <= self.config.tau).double().mean()),
                "val_iterations": float(solution.iterations.double().mean()), **metrics}

    # -- files ---------------------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        return ModelInfo(config=self.config.model, operator_kind=self.op.kind,
                         image_shape=self.op.image_shape,
                         noise_percent=self.noise_range,
                         training_data_sha256=self.data_sha256,
                         extra={"epoch": self.epoch, "global_step": self.global_step,
                                "val_psnr": self.best_psnr,
                                **({} if self.config.init_sha256 is None
                                   else {"init_model_sha256": self.config.init_sha256})})

    def _noise_range(self) -> tuple[float, float]:
        """The noise range the model sees: the configured one, or the file's (in percent)."""
        if self.file_measurements is None:
            return tuple(self.config.noise_percent)
        _, noise_std = self.file_measurements
        one_percent = self._one_percent_noise(self.truth[self.train_index])
        seen = one_percent > 0   # a black image has no percent: its noise is all there is
        if not bool(seen.any()):
            require_measurable(one_percent.cpu(), self.config.data)
        percent = noise_std[self.train_index].to(one_percent.device)[seen] / one_percent[seen]
        return float(percent.min()), float(percent.max())

    @torch.no_grad()
    def _one_percent_noise(self, truth: torch.Tensor) -> torch.Tensor:
        """Per image, the noise std that 1% noise means (``mean |A x| / 100``), computed 256
        images at a time."""
        return torch.cat([noise_std_for(self.op, self.op(chunk.to(self.device)),
                                        torch.ones(len(chunk), dtype=torch.float64))
                          for chunk in truth.split(256)])

    def save_checkpoint(self) -> None:
        weights = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        state = {"optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                 "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                 "permutation": self.permutation, "generator": self.generator.get_state(),
                 "best_psnr": self.best_psnr, "elapsed": self.elapsed,
                 "torch_rng": torch.get_rng_state(),
                 # so that a resumed run convolves with the same CPU kernels, bit for bit
                 "kernel_choices": cpu_kernel_choices()}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        # the two files as one: a full disk must not leave one step's weights beside another
        # step's optimiser state, which --resume would take for a checkpoint
        write_bytes({self.out / CHECKPOINT_WEIGHTS: save(weights),
                     self.out / CHECKPOINT_STATE: buffer.getvalue()})

    def load_checkpoint(self) -> None:
        weights_path, state_path = self.out / CHECKPOINT_WEIGHTS, self.out / CHECKPOINT_STATE
        if not weights_path.exists() or not state_path.exists():
            raise DripError("no checkpoint to resume from", self.out)
        # any failure here means a damaged checkpoint: name the file that is
        try:
            weights = load_file(str(weights_path))
            # checked before they are loaded, as load_model checks a model file's (NaN weights
            # had the run "diverge" at its first step; integers were copied in as they are)
            problem = weights_problem(weights)
            if problem is None:
                self.model.load_state_dict(weights)
        except Exception as exc:  # noqa: BLE001
            raise DripError(f"cannot read checkpoint ({exc})", weights_path) from exc
        if problem is not None:
            raise DripError(f"damaged checkpoint: {problem}", weights_path)
        try:
            state = torch.load(state_path, weights_only=True)
        except pickle.UnpicklingError as exc:   # (PyTorch's message is a page long)
            raise DripError("cannot read checkpoint: it holds objects other than tensors and "
                            "numbers, and drip loads checkpoints without pickle", state_path) from exc
        except Exception as exc:  # noqa: BLE001
            reason = str(exc).split(". ")[0]   # (a truncated zip: a paragraph on miniz)
            raise DripError(f"cannot read checkpoint: not one drip wrote, or a truncated one "
                            f"({reason})", state_path) from exc
        try:
            problem = self._checkpoint_state_problem(state)
            if problem is None:
                self.optimizer.load_state_dict(state["optimizer"])
                self.generator.set_state(state["generator"])
                torch.set_rng_state(state["torch_rng"])
                adopt_cpu_kernel_choices(state.get("kernel_choices", []))
        except Exception as exc:  # noqa: BLE001
            raise DripError(f"cannot read checkpoint ({exc})", state_path) from exc
        if problem is not None:
            raise DripError(f"damaged checkpoint: {problem}", state_path)
        history = self.out / HISTORY   # the run appends to it: refuse what is not its own
        if history.exists():
            try:
                with open(history, errors="replace") as handle:
                    header = handle.readline()
            except OSError as exc:   # (a folder of that name was an unexpected IsADirectoryError)
                raise DripError(f"cannot read the run's history ({exc.strerror})", history) \
                    from exc
            if not header.startswith("epoch,step,"):
                raise DripError("is not this run's history (its header is not epoch,step,...): "
                                "restore it, or remove it (the run then starts a new one)", history)
            _drop_rows_after(history, state["global_step"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.permutation = state["global_step"], state["permutation"]
        self.best_psnr, self.elapsed = state["best_psnr"], state["elapsed"]

    def _checkpoint_state_problem(self, state: dict) -> str | None:
        """Why a checkpoint's counters, best PSNR, time or sample order cannot be this run's
        (they would fail later, as an unexpected error); None when they can."""
        if not isinstance(state, dict):
            return "it holds no checkpoint state"
        missing = [key for key in CHECKPOINT_STATE_KEYS if key not in state]
        if missing:
            return f"it has no {', '.join(missing)}"
        for key in ("epoch", "step_in_epoch", "global_step"):
            value = state[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                return f"{key} = {value!r} is not a count"
        if not isinstance(state["best_psnr"], float):   # NaN without a validation set
            return f"best_psnr = {state['best_psnr']!r} is not a number"
        if not is_finite_number(state["elapsed"]) or state["elapsed"] < 0:
            return f"elapsed = {state['elapsed']!r} is not a time"
        order = state["permutation"]
        if not (torch.is_tensor(order) and order.dtype == self.train_index.dtype
                and order.shape == self.train_index.shape
                and torch.equal(order.sort().values, self.train_index.sort().values)):
            return "its sample order is not a permutation of this run's training samples"
        return None

    def _append_history(self, row: dict) -> None:
        path = self.out / HISTORY
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(row))
        if not path.exists():
            writer.writeheader()
        writer.writerow(row)
        append_text(path, text.getvalue())

    def _refuse_to_overwrite(self) -> None:
        """Never discard a trained model without being told to."""
        held = [name for name in (MODEL_FILE, CHECKPOINT_WEIGHTS) if (self.out / name).exists()]
        if held:
            raise DripError(f"already holds a training run ({held[0]}): continue it with --resume, "
                            "or choose another --out (or remove this folder to start over)",
                            self.out)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train, holding the run folder: a second ``drip train`` on it, started while this one
        runs, is refused, where it deleted this run's history and checkpoints and wrote its
        own among them. A run that fails before its first model leaves no folder it made."""
        made = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            with run_folder_lock(self.out):
                if not self.resume:   # again, now that no other run can be writing here
                    self._refuse_to_overwrite()
                return self._fit()
        except BaseException:
            if made and not any(self.out.iterdir()):
                self.out.rmdir()
            raise

    def _fit(self) -> dict:
        cfg = self.config
        if self.resume:
            self.load_checkpoint()
        else:
            for name in (HISTORY, CHECKPOINT_WEIGHTS, CHECKPOINT_STATE):
                (self.out / name).unlink(missing_ok=True)
            try:
                write_json(self.out / CONFIG, {**cfg.to_dict(), "data_sha256": self.data_sha256,
                                               "drip_version": __version__})
                self._fit_patch_prior()
                # the untrained model (smoothed TV) validated, as a reference
                self._end_epoch([], label="start")
            except BaseException:
                # a start that overflows, or is interrupted, leaves no run to resume or use,
                # so no config.json of one
                for name in (CONFIG, HISTORY):
                    (self.out / name).unlink(missing_ok=True)
                raise
        started = time.perf_counter() - self.elapsed
        steps_here, stopped_early, losses = 0, False, []
        total_steps = cfg.epochs * self.steps_per_epoch
        while self.epoch < cfg.epochs:
            while self.step_in_epoch < self.steps_per_epoch:
                if cfg.max_steps is not None and steps_here >= cfg.max_steps:
                    stopped_early = True
                    break
                seconds = time.perf_counter() - started
                if cfg.max_minutes is not None and seconds >= 60 * cfg.max_minutes:
                    stopped_early = True
                    break
                self._set_learning_rate(seconds, total_steps)
                losses.append(self.train_step())
                self.step_in_epoch += 1
                self.global_step += 1
                steps_here += 1
                seconds = time.perf_counter() - started
                self.progress(step=self.global_step, total=total_steps, loss=losses[-1],
                              epoch=self.epoch, best=self.best_psnr,
                              fraction=min(1.0, self._budget_spent(seconds, total_steps,
                                                                   steps_here)))
            if stopped_early:
                break
            self.elapsed = time.perf_counter() - started
            self._end_epoch(losses)
            losses = []
            self.epoch += 1
            self.step_in_epoch = 0
            self.permutation = self._new_permutation()
            self.save_checkpoint()
        self.elapsed = time.perf_counter() - started
        if (stopped_early and self.step_in_epoch > 0) or not (self.out / MODEL_FILE).exists():
            # a run stopped mid-epoch validates where it stopped, so its last steps are not lost
            self._end_epoch(losses, label=f"stop (epoch {self.epoch})")
        if stopped_early:
            self.save_checkpoint()
        return {"epochs_done": self.epoch, "global_step": self.global_step,
                "best_val_psnr": self.best_psnr, "seconds": self.elapsed,
                "stopped_early": stopped_early}

    def _fit_patch_prior(self) -> None:
        """Fit the model's patch mixture, if it has one, to the training images (the time
        counts against ``--max-minutes``)."""
        mixture = getattr(self.model, PATCH_PRIOR, None)
        if mixture is None:
            return
        images = self.truth[self.train_index]
        self._stage("fitting the patch mixture")
        shortfall = mixture.fit_shortfall(tuple(images.shape))
        if shortfall is not None:
            warnings.warn(DripWarning(f"--patch-components: {shortfall}"))
        started = time.perf_counter()
        mixture.fit(images, seed=self.config.seed)
        self.elapsed += time.perf_counter() - started

    def _budget_spent(self, seconds: float, total_steps: int, steps_here: int | None = None):
        """The share of the run's budget spent after ``seconds`` of training: the further of
        the epochs' steps and ``--max-minutes``, and with ``steps_here`` (the steps of this
        process) of ``--max-steps`` too, whichever ends the run first."""
        cfg = self.config
        spent = self.global_step / total_steps
        if cfg.max_minutes is not None:
            spent = max(spent, seconds / (60 * cfg.max_minutes))
        if steps_here is not None and cfg.max_steps is not None:
            spent = max(spent, steps_here / cfg.max_steps)
        return spent

    def _set_learning_rate(self, seconds: float, total_steps: int) -> None:
        """Place the run on its schedule: the further of the step and the time budgets
        (``--max-steps``, a limit for tests and trials, leaves the schedule alone)."""
        progress = self._budget_spent(seconds, total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.config.lr, self.config.lr_schedule, progress)

    def _stage(self, what: str) -> None:
        """Tell the progress display what the run is doing between steps (``stage``), where
        no step advances for a while."""
        self.progress(step=self.global_step, total=None, loss=None, epoch=self.epoch,
                      best=self.best_psnr, fraction=None, stage=what)

    def _end_epoch(self, losses: list[float], label: str | None = None) -> None:
        if len(self.val_index):
            self._stage("validating the untrained model" if label == "start" else "validating")
        metrics = self.validate()
        if len(self.val_index) and math.isnan(metrics["val_psnr"]):
            raise self._diverged("its validation reconstructions are not finite",
                                 self.global_step)
        row = {"epoch": self.epoch if label is None else label, "step": self.global_step,
               "train_loss": float(np.mean(losses)) if losses else float("nan"), **metrics,
               "seconds": round(self.elapsed, 2)}
        self._append_history(row)
        self.log(row)
        if not (metrics["val_psnr"] <= self.best_psnr):  # also true for NaN (no validation set)
            self.best_psnr = metrics["val_psnr"]
            save_model(self.out / MODEL_FILE, self.model, self.model_info())
