"""The README's Python examples run as they are written (so they cannot drift from the API)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from drip_cli.io import MeasurementFile
from drip_cli.operators import gaussian_psf

ROOT = Path(__file__).resolve().parent.parent


def _python_example(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    matching = [block for block in blocks if containing in block]
    assert len(matching) == 1, f"{len(matching)} README examples contain {containing!r}"
    return matching[0]


def test_the_measurement_file_example_writes_a_file_drip_reads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save("my_blurred.npy", np.random.default_rng(0).random((3, 1, 24, 24)))
    np.save("my_psf.npy", np.asarray(gaussian_psf(1.0)))
    exec(_python_example("write_measurement_file"), {})
    with MeasurementFile(tmp_path / "mine.h5") as file:
        assert file.operator.kind == "blur" and file.image_shape == (1, 24, 24)


def test_the_library_example_fits_every_sample(monkeypatch):
    monkeypatch.chdir(ROOT)   # it loads sample_data/drip_blur.safetensors
    names: dict = {}
    exec(_python_example("load_model"), names)
    assert bool(names["tv"].converged.all()) and bool(names["drip"].converged.all())
    op, b, radius = names["op"], names["b"], names["radius"]
    misfit = torch.linalg.vector_norm((op(names["drip"].solution) - b).flatten(1), dim=1)
    assert bool((misfit <= radius).all())
    assert names["drip"].regularizer_value.shape == (4,)


def test_the_shell_examples_name_real_options():
    """Every ``drip`` command in the shell blocks of the README and of sample_data/README.md
    parses (its options exist and take the values given; parsed, not run), as the --help
    examples do, so that the documented commands cannot drift from the CLI."""
    import shlex

    import typer

    from drip_cli.cli import app

    group = typer.main.get_command(app)
    commands = []
    for readme in ("README.md", "sample_data/README.md"):
        blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", (ROOT / readme).read_text(), re.S)
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                if line.lstrip().startswith("drip "):
                    commands.append(shlex.split(line, comments=True))
    assert len(commands) >= 20, commands
    for words in commands:
        assert words[1] in group.commands, words
        group.commands[words[1]].make_context(words[1], words[2:])   # raises where it drifted
