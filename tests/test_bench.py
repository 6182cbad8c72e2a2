"""`make bench` stays runnable: a tiny run writes each kind of section of bench.json (no timing is
asserted; speed figures live in the benchmark, not in tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench.py"


def test_bench_runs_each_kind_of_section(tmp_path):
    # as `make bench > log`: no terminal and no $COLUMNS (pytest sets it to 80)
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    result = subprocess.run([sys.executable, str(BENCH), "--images", "4", "--train-steps", "1",
                             "--memory-images", "16", "--memory-drip-images", "4", "--rounds", "2",
                             # the low-noise section on 2 crops, at a noise level that solves fast
                             # (TV took 7-8 s per round at 0.5%, 2.4-2.7 s at 2%)
                             "--low-noise-images", "2", "--low-noise-percent", "2",
                             # one reconstruction section: the tomography one runs the same
                             # code with another operator and model (both tested elsewhere), and
                             # with it, and warm-ups on two crops, this test took 99 s alone on 2
                             # cores; 41 s without it and with warm-ups on one
                             "--reconstruct", "blur", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "…" not in result.stdout   # the tables are printed whole
    figures = json.loads((tmp_path / "bench.json").read_text())
    assert len(figures["operators"]) == 6
    assert figures["low_noise_percent"] == 2.0
    assert "reconstruction_tomography" not in figures   # --reconstruct blur
    for section in ("reconstruction", "reconstruction_low_noise"):
        methods = figures[section]
        expected = {"tv"} if section == "reconstruction_low_noise" else {"cgls", "tv"}
        assert expected <= set(methods) and any(m.startswith("drip") for m in methods)
        assert all(row["images_per_s"] > 0 for row in methods.values())
        assert all(0.0 <= row["solver_converged_fraction"] <= 1.0 for row in methods.values())
        # two timed rounds per method; each method's time against TV's in the same round
        assert all(len(row["seconds_rounds"]) == 2 for row in methods.values())
        assert methods["tv"]["over_tv"] == 1.0
        assert all(row["over_tv"] > 0 for row in methods.values())
        # every method but the unrolled network guarantees the data fit
        assert all(row["max_ratio"] <= 1.0 for name, row in methods.items()
                   if "unrolled" not in name)
    assert set(figures["training"]) == {"drip (convex)", "unrolled"}
    assert all(row["images_per_s"] > 0 for row in figures["training"].values())
    assert set(figures["memory"]) == {"2", "16", "drip"}   # drip: the sample blur model
    assert all(row["peak_mib"] > 0 for row in figures["memory"].values())
