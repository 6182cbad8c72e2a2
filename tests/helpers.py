"""Running the CLI in-process, and building small measurement files for tests."""

from __future__ import annotations

import numpy as np
import torch
from typer.testing import CliRunner

from drip_cli.cli import app
from drip_cli.data import add_noise, noise_std_for
from drip_cli.io import write_measurement_file

_runner = CliRunner()


def run_cli(*args: str):
    """Invoke ``drip ARGS``; the result has ``exit_code``, ``stdout`` and ``stderr``."""
    return _runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, message: str, not_written) -> None:
    """A bad-input failure: exit status 1, ``message`` in the one line on stderr (no blank line
    above it), no traceback, and no output at ``not_written``."""
    assert result.exit_code == 1 and message in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr and not not_written.exists()


def write_small_file(path, op, n: int = 4, percent: float = 2.0, seed: int = 0,
                     with_truth: bool = True) -> np.ndarray:
    """A valid measurement file of smooth random images; returns the ground truth."""
    rng = np.random.default_rng(seed)
    truth = rng.random((n, *op.image_shape)).astype(np.float32)
    clean = op(torch.from_numpy(truth).double())
    sigma = noise_std_for(op, clean, torch.full((n,), percent, dtype=torch.float64))
    b = add_noise(op, clean, sigma, torch.from_numpy(rng.standard_normal(clean.shape)))
    write_measurement_file(path, op, b.numpy().astype(np.float32), sigma.numpy().astype(np.float32),
                           truth if with_truth else None, np.full(n, percent, dtype=np.float32))
    return truth
