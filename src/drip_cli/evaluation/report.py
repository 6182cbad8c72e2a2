"""The files and the console table of ``drip evaluate`` (the report written as a whole or not at
all).

``robustness.json`` (CONTRACT.md: ``{"rows": [...]}`` plus the settings and ``"paired"``, each
method against a reference on the same samples), ``robustness.csv`` (the rows), ``robustness.md``
(PSNR and fit fraction per method and level, with several discrepancy constants each method's
best, the paired comparison, then every figure),
``robustness.png`` (PSNR and fit fraction against the noise percent, training ranges shaded),
``samples.csv`` (one record per sample, method and level) and ``previews.png`` (a few samples:
ground truth, the naive scaled adjoint and every method, PSNR in each title).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

import numpy as np
from rich.table import Table

from ..console import fmt, titled_table
from ..io import atomic_folder, json_text
from .metrics import psnr
from .comparison import CONFIDENCE
from .robustness import Evaluation, best_taus

ROW_FIELDS = ("method", "noise_percent", "tau", "n_samples", "psnr_mean", "ssim_mean",
              "fit_fraction", "discrepancy_ratio_max", "discrepancy_ratio_mean",
              "regularizer_value_mean", "regularizer_value_truth_mean",
              "truth_more_regular_fraction", "iterations_mean", "solver_converged_fraction",
              "seconds_per_image", "in_training_range")
SAMPLE_FIELDS = ("method", "noise_percent", "tau", "sample", "psnr", "ssim", "discrepancy_ratio",
                 "fits", "solver_converged", "regularizer_value", "iterations", "seconds")
BEST_TAU = "best tau (highest mean PSNR of those tried)"
BEST_TAU_HEADERS = ("method", "noise %", "best tau", "PSNR", "SSIM", "fit")
PAIRED_HEADERS = ("method", "noise %", "PSNR diff", f"{CONFIDENCE:.0%} CI", "SSIM diff", "ahead")
FILES = ("robustness.json", "robustness.csv", "robustness.md", "robustness.png", "samples.csv",
         "previews.png")


def method_names(evaluation: Evaluation) -> list[str]:
    return list(dict.fromkeys(row["method"] for row in evaluation.rows))


def _cell(row: dict | None) -> str:
    return "-" if row is None else f"{row['psnr_mean']:.2f} ({row['fit_fraction']:.2f})"


def _lookup(evaluation: Evaluation):
    table = {(r["method"], r["noise_percent"]): r for r in evaluation.rows}
    return lambda name, level: table.get((name, float(level)))


def _level_label(evaluation: Evaluation, level: float) -> str:
    trained = any(lo <= level <= hi for lo, hi in evaluation.training_ranges.values())
    return f"{level:g}" + (" *" if trained else "")


def _ranges_text(evaluation: Evaluation) -> str:
    if not evaluation.training_ranges:
        return "no learned model"
    return ", ".join(f"{name} trained on {lo:g}-{hi:g}%"
                     for name, (lo, hi) in evaluation.training_ranges.items())


def _title(evaluation: Evaluation) -> str:
    source = Path(evaluation.data).name
    operator = evaluation.operator_kind
    if evaluation.operator_from:
        operator += f" operator of {Path(evaluation.operator_from).name} (transfer)"
    return f"{source}, {operator}, tau {', '.join(f'{t:g}' for t in evaluation.taus)}"


def best_tau_table(evaluation: Evaluation) -> Table | None:
    """With several discrepancy constants: each method's best per level (None with one)."""
    if len(evaluation.taus) < 2:
        return None
    table = titled_table(f"each method at its {BEST_TAU}")
    for header in BEST_TAU_HEADERS:
        table.add_column(header, justify="left" if header == "method" else "right")
    for cells in _best_tau_cells(evaluation):
        table.add_row(*cells)
    return table


def _best_tau_cells(evaluation: Evaluation) -> list[tuple[str, ...]]:
    """The cells of the best-tau table (console and Markdown), one tuple per method and level."""
    return [(r["base_method"], f"{r['noise_percent']:g}", f"{r['tau']:g}", f"{r['psnr_mean']:.2f}",
             fmt(r["ssim_mean"], ".3f"), f"{r['fit_fraction']:.2f}")
            for r in best_taus(evaluation)]


def console_table(evaluation: Evaluation) -> Table:
    """PSNR (fit fraction) per level and method; ``*`` marks levels inside a training range."""
    get = _lookup(evaluation)
    names = method_names(evaluation)
    table = titled_table(f"robustness: {_title(evaluation)}",
                         caption=f"PSNR dB (fit fraction); * inside the training noise range "
                                 f"({_ranges_text(evaluation)})")
    table.add_column("noise %", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for level in evaluation.levels:
        table.add_row(_level_label(evaluation, level), *(_cell(get(n, level)) for n in names))
    return table


def _paired_title(evaluation: Evaluation) -> str:
    reference = evaluation.paired[0]["reference"].split("@")[0]
    return (f"paired with {reference} (the same samples): mean PSNR difference dB, its "
            f"{CONFIDENCE:.0%} confidence interval, mean SSIM difference, share of samples ahead")


def _paired_cells(evaluation: Evaluation) -> list[tuple[str, ...]]:
    """The cells of the paired comparison (console and Markdown), one tuple per row; with
    several discrepancy constants the method's name carries its own (``drip@0.98``)."""
    cells = []
    for r in evaluation.paired:
        interval = ("-" if r["psnr_difference_ci_low"] is None else
                    f"{r['psnr_difference_ci_low']:+.2f} to {r['psnr_difference_ci_high']:+.2f}")
        cells.append((r["method"], f"{r['noise_percent']:g}",
                      fmt(r["psnr_difference_mean"], "+.2f"), interval,
                      fmt(r["ssim_difference_mean"], "+.3f"), fmt(r["ahead_fraction"], ".2f")))
    return cells


def paired_table(evaluation: Evaluation) -> Table | None:
    """Each method against the reference on the same samples (None without one)."""
    if not evaluation.paired:
        return None
    table = titled_table(_paired_title(evaluation))
    for header in PAIRED_HEADERS:
        table.add_column(header, justify="left" if header == "method" else "right")
    for cells in _paired_cells(evaluation):
        table.add_row(*cells)
    return table


def regularizer_table(evaluation: Evaluation) -> Table | None:
    """Mean ``R`` at the reconstructions and at the truth's best latent, per DRIP model and level."""
    rows = [r for r in evaluation.rows if r.get("regularizer_value_truth_mean") is not None]
    if not rows:
        return None
    table = titled_table("learned regularizer: mean R at the reconstructions and at the truth")
    for header in ("model", "noise %", "R reconstructions", "R truth", "truth ranked more regular"):
        table.add_column(header, justify="left" if header == "model" else "right")
    for r in rows:
        table.add_row(r["method"], f"{r['noise_percent']:g}", f"{r['regularizer_value_mean']:.4g}",
                      f"{r['regularizer_value_truth_mean']:.4g}",
                      f"{r['truth_more_regular_fraction']:.2f}")
    return table


def markdown(evaluation: Evaluation) -> str:
    get = _lookup(evaluation)
    names = method_names(evaluation)
    lines = [f"# drip evaluate: {_title(evaluation)}", "",
             f"PSNR in dB (fit fraction: share of samples with discrepancy ratio <= tau); "
             f"`*` marks noise levels inside the training range ({_ranges_text(evaluation)}).", "",
             "| noise % | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for level in evaluation.levels:
        lines.append(f"| {_level_label(evaluation, level)} | "
                     + " | ".join(_cell(get(n, level)) for n in names) + " |")
    if len(evaluation.taus) > 1:
        lines += ["", f"Each method at its {BEST_TAU}:", "",
                  "| " + " | ".join(BEST_TAU_HEADERS) + " |", "|---" * len(BEST_TAU_HEADERS) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in _best_tau_cells(evaluation)]
    if evaluation.paired:
        lines += ["", f"Each method {_paired_title(evaluation)}:", "",
                  "| " + " | ".join(PAIRED_HEADERS) + " |", "|---" * len(PAIRED_HEADERS) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in _paired_cells(evaluation)]
    lines += ["", "| method | noise % | samples | PSNR | SSIM | fit | max ratio | R mean "
              "| R truth mean | R truth < R share | s/image |", "|---" * 11 + "|"]

    for name in names:
        for level in evaluation.levels:
            r = get(name, level)
            lines.append(f"| {name} | {level:g} | {r['n_samples']} | {r['psnr_mean']:.2f} | "
                         f"{fmt(r['ssim_mean'], '.3f')} | {r['fit_fraction']:.2f} | "
                         f"{r['discrepancy_ratio_max']:.3f} | "
                         f"{fmt(r['regularizer_value_mean'], '.4g')} | "
                         f"{fmt(r.get('regularizer_value_truth_mean'), '.4g')} | "
                         f"{fmt(r.get('truth_more_regular_fraction'), '.2f')} | "
                         f"{r['seconds_per_image']:.3f} |")
    lines += ["", "`R truth`: the learned regularizer at the ground truth's best latent "
              "representation (min R(z) subject to E z = x); `R truth < R share`: the share of "
              "samples whose truth the regularizer ranks as more regular than their reconstruction.",
              ""]
    return "\n".join(lines)


def _csv(rows: list[dict], fields) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed).

    The first import on a machine builds matplotlib's font cache; where that cache cannot be
    saved (a full disk) matplotlib logs it, and the line came before drip's own one-line error
    about the same disk. Not saving it costs only its rebuilding next time, so matplotlib's log
    is held to errors while it loads."""
    log = logging.getLogger("matplotlib")
    level = log.level
    log.setLevel(max(level, logging.ERROR))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    finally:
        log.setLevel(level)
    return plt


def _save_figure(figure, path: Path) -> None:
    try:
        figure.savefig(path, format="png", dpi=110, bbox_inches="tight")
    finally:
        _pyplot().close(figure)


def robustness_plot(evaluation: Evaluation, path: Path) -> None:
    plt = _pyplot()
    get = _lookup(evaluation)
    figure, (ax_psnr, ax_fit) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (lo, hi) in set(evaluation.training_ranges.values()):
        for ax in (ax_psnr, ax_fit):
            ax.axvspan(lo, hi, color="0.85", zorder=0)
    for i, name in enumerate(method_names(evaluation)):
        levels = [lv for lv in evaluation.levels if get(name, lv) is not None]
        marker = "osD^v<>p"[i % 8]
        ax_psnr.plot(levels, [get(name, lv)["psnr_mean"] for lv in levels], marker=marker,
                     label=name)
        # each later method drawn thinner, so that lines which coincide (every fit fraction
        # is 1 as a rule) all show
        ax_fit.plot(levels, [get(name, lv)["fit_fraction"] for lv in levels], marker=marker,
                    markersize=max(3, 10 - 2 * i), linewidth=max(1.0, 4.0 - i), label=name)
    for ax, label in ((ax_psnr, "mean PSNR (dB)"), (ax_fit, "fit fraction")):
        ax.set_xscale("log")
        ax.set_xticks(evaluation.levels, [f"{lv:g}" for lv in evaluation.levels])
        ax.minorticks_off()
        ax.set_xlabel("noise percent")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_fit.set_ylim(-0.05, 1.05)
    ax_psnr.legend(title="grey band: training noise" if evaluation.training_ranges else None)
    figure.suptitle(_title(evaluation))
    _save_figure(figure, path)


def previews_plot(evaluation: Evaluation, path: Path) -> None:
    plt = _pyplot()
    columns = list(evaluation.previews)
    truth = evaluation.previews["ground truth"]
    n = len(truth)
    # constrained: the suptitle keeps clear of the titles even with one row
    figure, axes = plt.subplots(n, len(columns), figsize=(2.1 * len(columns), 2.3 * n),
                                squeeze=False, layout="constrained")
    for j, name in enumerate(columns):
        images = evaluation.previews[name]
        scores = psnr(images, truth)
        for i in range(n):
            image = np.clip(images[i], 0, 1)
            image = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
            ax = axes[i, j]
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(name if name == "ground truth" else f"{name}\n{scores[i]:.2f} dB",
                         fontsize=9)
    figure.suptitle(f"{_title(evaluation)}, {evaluation.preview_level:g}% noise", fontsize=10)
    _save_figure(figure, path)


def write_report(evaluation: Evaluation, out: str | os.PathLike) -> list[Path]:
    """Write every file of the report into the folder ``out`` (created if needed): all of them,
    or, when one cannot be written, none."""
    out = Path(out)
    with atomic_folder(out) as staging:
        (staging / "robustness.json").write_text(json_text(evaluation.to_dict()))
        (staging / "robustness.csv").write_text(_csv(evaluation.rows, ROW_FIELDS))
        (staging / "robustness.md").write_text(markdown(evaluation))
        (staging / "samples.csv").write_text(_csv(evaluation.samples, SAMPLE_FIELDS))
        robustness_plot(evaluation, staging / "robustness.png")
        previews_plot(evaluation, staging / "previews.png")
    return [out / name for name in FILES]
