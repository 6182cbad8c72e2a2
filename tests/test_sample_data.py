"""The shipped sample models serve their sample files: every sample fits its data, and DRIP
scores above converged TV on them (the figures of sample_data/README.md; a retrained or damaged
model file that lost its edge would fail here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli

SAMPLES = Path(__file__).resolve().parent.parent / "sample_data"


# DRIP's least lead over TV on each sample file (measured with `make demo`: +1.27 / +1.08 / +1.84
# / +1.13 dB)
@pytest.mark.parametrize("name, margin", [("blur", 0.6), ("tomography", 0.5),
                                          ("inpainting", 0.5), ("denoise", 0.5)])
def test_a_sample_model_beats_tv_on_its_sample_file(tmp_path, name, margin):
    reports = {}
    for method, options in (("drip", ["--model", SAMPLES / f"drip_{name}.safetensors"]),
                            ("tv", [])):
        report = tmp_path / f"{method}.json"
        result = run_cli("reconstruct", SAMPLES / f"{name}.h5", "--method", method, *options,
                         "--out", tmp_path / f"{method}.h5", "--report", report, "--device",
                         "cpu", "--quiet")
        assert result.exit_code == 0, result.stderr
        assert "warning" not in result.stderr, result.stderr   # the model's own operator
        reports[method] = json.loads(report.read_text())
    for summary in reports.values():
        assert summary["fit_fraction"] == 1.0 and summary["discrepancy_ratio_max"] <= 1.0
    assert reports["drip"]["psnr_mean"] > reports["tv"]["psnr_mean"] + margin, reports
