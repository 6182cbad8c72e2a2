"""``drip evaluate``: every method on the same re-simulated measurements at several noise levels.

The ground truth of ``DATA.h5`` is measured again at each noise percent with a seed fixed per
level (``seed`` and the level itself: adding a level leaves the others' noise unchanged), through
the file's operator or, for an operator-transfer study, the operator of another file. Each method
reconstructs the same measurements, in batches, through
:func:`drip_cli.reconstruct.reconstruct_batch` (the code behind ``drip reconstruct``), so the
figures are those ``reconstruct`` would report. With several discrepancy constants every method
is run at each (rows named ``method@tau``), so that methods can be compared each at its best.

Besides one summary row per method and level (:func:`drip_cli.reconstruct.summarize`), it keeps one
record per sample, each method's paired comparison with a reference method (TV, else CGLS, or the
one asked for) on those samples (:mod:`.comparison`), the reconstructions of a few samples at one
level for the previews, and, for each DRIP model, ``R`` of the ground truth's best latent
representation, ``min R(z) s.t. E z = x`` (solved as the DRIP problem with the identity operator and
a radius of ``TRUTH_RADIUS ||x||``), to set next to ``R`` at the reconstructions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..data import simulate_batch
from ..errors import DripError, with_article
from ..io import MeasurementFile
from ..io.models import MODEL_FILE, resolve_model_path
from ..methods import (CLASSICAL_METHODS, LearnedMethod, ReconstructionMethod,
                       warn_if_each_channel_unused)
from ..operators import Denoise, LinearOperator
from ..reconstruct import concatenate_rows, default_batch_size, reconstruct_batch, summarize
from .comparison import paired_differences

TRUTH_RADIUS = 1e-4      # E z matches x to this relative accuracy in the truth's R
SIMULATION_CHUNK = 256   # images simulated at a time (the noise stream does not depend on it)


@dataclass
class Evaluation:
    """What :func:`evaluate` measured; :mod:`.report` writes it out."""

    data: str
    operator_kind: str
    operator_from: str | None
    taus: list[float]
    seed: int
    levels: list[float]
    preview_level: float
    rows: list[dict] = field(default_factory=list)        # one per method and level
    samples: list[dict] = field(default_factory=list)     # one per sample, method and level
    # each method against the reference (TV, else CGLS, or the one asked for) on the same
    # samples (:mod:`.comparison`)
    paired: list[dict] = field(default_factory=list)
    training_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    # models used on images of another shape (--any-size, --each-channel): the shape they
    # were trained on
    model_shapes: dict[str, list[int]] = field(default_factory=dict)
    previews: dict[str, np.ndarray] = field(default_factory=dict)   # name -> (n, C, H, W)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "paired": self.paired, "data": self.data,
                "operator_kind": self.operator_kind, "operator_from": self.operator_from,
                "tau": self.taus[0] if len(self.taus) == 1 else self.taus, "seed": self.seed,
                "noise_percent": self.levels,
                "training_noise_percent": {k: list(v) for k, v in self.training_ranges.items()},
                "model_image_shape": self.model_shapes}


METHOD_KINDS = ("drip", "cgls", "tv", "unrolled")


def _model_label(path) -> str:
    """How a model is told from others of its kind: its run folder's name (the folder, or
    the folder of a ``model.safetensors``), else its file's stem."""
    path = Path(path)
    if path.is_dir() or path.name == MODEL_FILE:
        return (path if path.is_dir() else path.parent).resolve().name
    return path.stem


def choose_methods(model_paths: list, wanted: list[str] | None,
                   warn=None) -> list[ReconstructionMethod]:
    """The methods to compare: ``wanted`` kinds (default: CGLS, TV and every model), ``drip``
    and ``unrolled`` standing for the models of that kind. Several models of one kind are named
    ``kind:label``, the label the run folder's name or the model file's stem. ``warn(message)``
    hears of models that no wanted method uses."""
    files = [resolve_model_path(path) for path in model_paths]
    resolved = [file.resolve() for file in files]
    if len(set(resolved)) < len(resolved):
        twice = next(p for p in resolved if resolved.count(p) > 1)
        raise DripError("given twice to --model", twice)
    learned = [LearnedMethod.load(file) for file in files]
    for method, path in zip(learned, model_paths):
        if sum(m.kind == method.kind for m in learned) > 1:
            method.name = f"{method.kind}:{_model_label(path)}"
    if len({m.name for m in learned}) < len(learned):
        clash = next(m.name for m in learned if [n.name for n in learned].count(m.name) > 1)
        raise DripError(f"--model: two models are both named {clash} (by their run folders, or "
                        "their files where not model.safetensors); rename one")
    if wanted is None:
        wanted = ["cgls", "tv", *(m.kind for m in learned)]
    wanted = list(dict.fromkeys(w.strip().lower() for w in wanted if w.strip()))
    unknown = [w for w in wanted if w not in METHOD_KINDS]
    if unknown or not wanted:
        problem = f"unknown {', '.join(unknown)}" if unknown else "no method named"
        raise DripError(f"--methods: {problem} (choose from {', '.join(METHOD_KINDS)})")
    chosen: list[ReconstructionMethod] = []
    for name in wanted:
        if name in CLASSICAL_METHODS:
            chosen.append(CLASSICAL_METHODS[name]())
            continue
        of_kind = [m for m in learned if m.kind == name]
        if not of_kind:
            raise DripError(f"--methods {name} needs {with_article(name)} model: --model RUN_DIR")
        chosen.extend(of_kind)
    unused = [m for m in learned if m.kind not in wanted]
    if unused and warn is not None:
        warn(f"--model: {', '.join(m.name for m in unused)} not compared: --methods "
             f"{','.join(wanted)} leaves out {', '.join(sorted({m.kind for m in unused}))}")
    return chosen


def load_ground_truth(path: str | os.PathLike, operator_from: str | os.PathLike | None):
    """``(ground truth (N, C, H, W), operator)``: the truth of ``path`` and the operator of
    ``operator_from`` (default: of ``path`` itself), which must act on images of that shape."""
    with MeasurementFile(path, require_ground_truth=True, noise_levels="ignored") as data:
        truth = np.empty((data.n_samples, *data.image_shape), np.float32)   # filled in place
        for batch in data.batches(1024):
            truth[batch.start:batch.stop] = batch.ground_truth
        op = data.operator
    if operator_from is not None:
        with MeasurementFile(operator_from, noise_levels="ignored") as other:
            op = other.operator
        if tuple(op.image_shape) != tuple(truth.shape[1:]):
            raise DripError(f"its operator acts on images of shape {tuple(op.image_shape)}, "
                            f"the ground truth of {path} has {tuple(truth.shape[1:])}",
                            operator_from)
    return truth, op


def simulate_level(op: LinearOperator, truth: np.ndarray, percent: float, seed: int,
                   source=None):
    """``(measurements, noise_std)`` of every image at ``percent``, reproducible per level;
    ``source``: the file the ground truth came from (named by errors)."""
    rng = np.random.default_rng([seed, int(round(percent * 1e6))])
    measurements = np.empty((len(truth), *op.measurement_shape), np.float32)  # filled in place
    noise_std = np.empty(len(truth), np.float32)
    for i in range(0, len(truth), SIMULATION_CHUNK):
        part = slice(i, i + SIMULATION_CHUNK)
        measurements[part], noise_std[part] = simulate_batch(
            op, truth[part], np.full(len(truth[part]), percent), rng, source, i)
    return measurements, noise_std


@torch.no_grad()
def truth_regularizer_values(method: LearnedMethod, truth: np.ndarray, batch_size: int,
                             device: torch.device) -> np.ndarray:
    """``min_z R(z) s.t. E z = x`` per ground-truth image (DRIP models only)."""
    identity = Denoise(truth.shape[1:]).to(device)
    values = []
    for i in range(0, len(truth), batch_size):
        x = torch.from_numpy(truth[i:i + batch_size]).to(device)
        radius = TRUTH_RADIUS * x.flatten(1).norm(dim=1)
        # the method's solve: weights that overflow are refused as in the reconstructions
        values.append(method.solve(identity, x, radius).regularizer_value.double().cpu().numpy())
    return np.concatenate(values)


def naive_reconstruction(op: LinearOperator, b: np.ndarray) -> np.ndarray:
    """The scaled adjoint ``s A^T b`` (zero-filled for inpainting), ``s`` by exact line search."""
    from ..regularizers.unrolled import steepest_descent_step

    b = torch.from_numpy(b).double()
    zero = b.new_zeros((b.shape[0], *op.image_shape))
    with torch.no_grad():
        return steepest_descent_step(op, zero, op.project_measurements(b)).float().numpy()


def evaluate(data: str | os.PathLike, methods: list[ReconstructionMethod], levels: list[float],
             tau: float | list[float] = 1.0, seed: int = 0, batch_size: int | None = None,
             device: torch.device = torch.device("cpu"), operator_from=None,
             max_samples: int | None = None, n_previews: int = 4,
             preview_level: float | None = None, progress=None, warn=None,
             reference: str | None = None) -> Evaluation:
    """Run every method at every level (see the module docstring); ``progress(done, total,
    what)`` counts solved batches (and fractions of the one being solved), ``what`` naming the
    method and noise level at work; ``warn(message)`` receives the methods' doubts about the
    data.
    ``tau``: one discrepancy constant or several (each method at each). ``reference``: the
    method the others are paired with (one of ``methods``' names; by default TV, else CGLS)."""
    if reference is not None and reference not in [method.name for method in methods]:
        raise DripError(f"--reference {reference} is not one of the methods evaluated: "
                        + ", ".join(method.name for method in methods))
    taus = sorted({float(t) for t in np.atleast_1d(tau)})
    truth, op = load_ground_truth(data, operator_from)
    if max_samples is not None:
        truth = truth[:max_samples]
    description = SimpleNamespace(image_shape=tuple(truth.shape[1:]), operator=op,
                                  path=Path(operator_from or data))
    warn = warn or (lambda message: None)
    checked = {method.name: method.check(description, warn) for method in methods}
    warn_if_each_channel_unused(methods, description.image_shape[0], warn)
    preview_level = levels[len(levels) // 2] if preview_level is None else preview_level
    if preview_level not in levels:
        raise DripError(f"--preview-noise {preview_level:g} is not one of the evaluated levels")
    result = Evaluation(data=str(data), operator_kind=op.kind,
                        operator_from=None if operator_from is None else str(operator_from),
                        taus=taus, seed=seed, levels=list(levels), preview_level=preview_level,
                        model_shapes={name: extra["model_image_shape"]
                                      for name, extra in checked.items()
                                      if "model_image_shape" in extra})
    shown = slice(0, min(n_previews, len(truth)))
    # the previews show (and score) what the tables score: op.scored_part
    result.previews["ground truth"] = op.scored_part(truth[shown])
    result.previews["naive"] = None   # its place in the figure, filled at its level
    op = op.to(device)
    batch_size = batch_size or default_batch_size(device, truth.shape[1:])
    truth_values = {}
    for method in methods:
        if isinstance(method, LearnedMethod):
            result.training_ranges[method.name] = tuple(method.info.noise_percent)
            if method.kind == "drip":
                truth_values[method.name] = truth_regularizer_values(method, truth, batch_size, device)
    n_batches = -(-len(truth) // batch_size)
    total, done = len(levels) * len(methods) * len(taus) * n_batches, 0
    if progress is not None:
        progress(done, total, "simulating")
    for percent in levels:
        # one level's measurements at a time (memory), simulated from CPU arrays in float64,
        # so the same on every device (an operator applies on its input's device, whichever
        # device it was moved to); the noise is fixed by the seed and the level
        measurements, noise_std = simulate_level(op, truth, percent, seed, data)
        if percent == preview_level:
            result.previews["naive"] = op.scored_part(naive_reconstruction(op, measurements[shown]))
        for method, tau in ((m, t) for m in methods for t in taus):
            name = method.name if len(taus) == 1 else f"{method.name}@{tau:g}"
            at = f"{name} at {percent:g}% noise"
            rows, previews = [], []
            for i in range(0, len(truth), batch_size):
                part = slice(i, i + batch_size)
                within = None if progress is None else \
                    (lambda f, done=done: progress(done + f, total, at))
                row = reconstruct_batch(method, op, measurements[part], noise_std[part], tau,
                                        truth[part], device, within)
                images = row.pop("reconstructions")   # only the previews' are kept
                if percent == preview_level and i < shown.stop:
                    previews.append(op.scored_part(images[:shown.stop - i]))
                rows.append(row)
                done += 1
                if progress is not None:
                    progress(done, total, at)
            merged = concatenate_rows(rows)
            if percent == preview_level and previews:
                result.previews[name] = np.concatenate(previews)
            result.rows.append(_row(name, method.name, percent, merged, tau,
                                    truth_values.get(method.name),
                                    result.training_ranges.get(method.name)))
            result.samples.extend(_sample_records(name, percent, merged, tau))
    result.paired = paired_differences(result.rows, result.samples, reference)
    return result


def best_taus(evaluation: Evaluation) -> list[dict]:
    """Per method and level, its row with the highest mean PSNR over the constants tried."""
    best: dict[tuple[str, float], dict] = {}
    for row in evaluation.rows:
        key = (row["base_method"], row["noise_percent"])
        if key not in best or row["psnr_mean"] > best[key]["psnr_mean"]:
            best[key] = row
    return list(best.values())


def _row(name, base_method, percent, columns, tau, truth_values, training_range) -> dict:
    row = {"method": name, "base_method": base_method, "noise_percent": float(percent),
           "tau": float(tau), **summarize(columns, tau)}
    row["in_training_range"] = (None if training_range is None
                                else bool(training_range[0] <= percent <= training_range[1]))
    if truth_values is not None:
        row["regularizer_value_truth_mean"] = float(np.mean(truth_values))
        row["truth_more_regular_fraction"] = float(np.mean(truth_values < columns["regularizer_value"]))
    return row


def _sample_records(name: str, percent: float, columns: dict, tau: float) -> list[dict]:
    return [{"method": name, "noise_percent": float(percent), "tau": float(tau), "sample": i,
             "psnr": float(columns["psnr"][i]), "ssim": float(columns["ssim"][i]),
             "discrepancy_ratio": float(columns["discrepancy_ratio"][i]),
             "fits": bool(columns["discrepancy_ratio"][i] <= tau),
             "solver_converged": bool(columns["solver_converged"][i]),
             "regularizer_value": float(columns["regularizer_value"][i]),
             "iterations": int(columns["iterations"][i]),
             "seconds": float(columns["seconds"][i])}
            for i in range(len(columns["psnr"]))]
