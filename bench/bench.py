"""`make bench`: speed figures on this machine (never asserted in unit tests).

1. Forward + adjoint throughput of each operator on 64 images of 64x64 (float32).
2. CGLS, converged constrained TV and DRIP on 64 held-out 64x64 photo crops, Gaussian blur
   sigma 2, 2% noise: seconds, PSNR and the largest discrepancy ratio. DRIP uses ``--model``
   (default: the pretrained sample model when present, else an untrained model, i.e. the
   regularizer's starting point: smoothed TV plus a weak random filter bank, reported as such).

Prints rich tables and writes bench_out/bench.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from drip_cli.data import SourceOptions, load_images, noise_std_for, add_noise
from drip_cli.evaluation import psnr
from drip_cli.methods import CGLSMethod, DripMethod, TVMethod
from drip_cli.operators import (Blur, Denoise, Inpainting, SparseMatrixOperator, Tomography,
                                gaussian_psf, limited_angles)
from drip_cli.regularizers.model import DripModel, ModelConfig
from drip_cli.solvers import discrepancy_radius, discrepancy_ratio

SHAPE = (1, 64, 64)
SAMPLE_MODEL = Path(__file__).resolve().parent.parent / "sample_data" / "drip_blur.safetensors"


def drip_method(path: Path):
    """The DRIP method from a model file, or an untrained one when there is none."""
    if path.exists():
        method = DripMethod.load(path)
        method.label = f"drip ({path.name})"
    else:
        model = DripModel(ModelConfig())
        method = DripMethod(model.eval(), None, "")
        method.label = "drip (untrained)"
    return method


def operators() -> dict:
    rng = np.random.default_rng(0)
    side, half = 64, 32
    rows = np.repeat(np.arange(half * half), 4)
    r, c = np.divmod(np.arange(half * half), half)
    cols = np.stack([(2 * r + dr) * side + 2 * c + dc for dr in (0, 1) for dc in (0, 1)], 1).ravel()
    return {
        "denoise": Denoise(SHAPE),
        "blur (13x13 PSF)": Blur(SHAPE, gaussian_psf(2.0)),
        "inpainting (50%)": Inpainting.random(SHAPE, 0.5, rng),
        "tomography (32 angles, 120 deg)": Tomography(SHAPE, limited_angles(32, 120.0)),
        "tomography (180 angles)": Tomography(SHAPE, np.arange(180.0)),
        "matrix (2x2 downsampling CSR)": SparseMatrixOperator.from_csr(
            SHAPE, np.full(rows.size, 0.25), cols, np.arange(0, rows.size + 1, 4),
            (half * half, side * side)),
    }


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up (caches, allocator)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--model", type=Path, default=SAMPLE_MODEL)
    args = parser.parse_args()
    console = Console()
    results = {"machine": platform.processor() or platform.machine(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__}

    x = torch.rand(args.images, *SHAPE)
    table = Table(title=f"forward + adjoint, {args.images} images of 64x64, float32, CPU "
                        f"({torch.get_num_threads()} threads)", title_justify="left")
    for header in ("operator", "ms per batch", "images/s"):
        table.add_column(header, justify="left" if header == "operator" else "right")
    results["operators"] = {}
    for name, op in operators().items():
        seconds = time_it(lambda: op.adjoint(op(x)), repeats=20)
        results["operators"][name] = {"ms_per_batch": seconds * 1e3, "images_per_s": args.images / seconds}
        table.add_row(name, f"{seconds * 1e3:.2f}", f"{args.images / seconds:,.0f}")
    console.print(table)

    options = SourceOptions(channels=1, crop_size=64, crops_per_image=args.images // 4)
    truth = load_images("skimage:camera,coffee,astronaut,chelsea", options, np.random.default_rng(0))
    op = Blur(SHAPE, gaussian_psf(2.0))
    x = torch.from_numpy(truth)
    clean = op(x)
    sigma = noise_std_for(op, clean, torch.full((len(x),), 2.0))
    b = add_noise(op, clean, sigma, torch.randn(clean.shape, generator=torch.Generator().manual_seed(0)))
    radius = discrepancy_radius(op, sigma, 1.0)
    table = Table(title=f"reconstruction of {len(x)} photo crops 64x64, blur sigma 2, 2% noise, "
                        "tau = 1, CPU float32", title_justify="left")
    for header in ("method", "seconds", "s/image", "PSNR", "max ratio", "iters (mean)"):
        table.add_column(header, justify="left" if header == "method" else "right")
    results["reconstruction"] = {}
    for method in (CGLSMethod(), TVMethod(), drip_method(args.model)):
        label = getattr(method, "label", method.name)
        start = time.perf_counter()
        result = method.solve(op, b, radius)
        seconds = time.perf_counter() - start
        quality = float(psnr(result.solution.numpy(), truth).mean())
        ratio = float(discrepancy_ratio(op, result.solution, b, sigma).max())
        iters = float(result.iterations.double().mean())
        results["reconstruction"][label] = {"seconds": seconds, "psnr": quality,
                                                  "max_ratio": ratio, "iterations_mean": iters}
        table.add_row(label, f"{seconds:.2f}", f"{seconds / len(x):.4f}", f"{quality:.2f}",
                      f"{ratio:.4f}", f"{iters:.0f}")
    console.print(table)
    args.out.mkdir(exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"written {args.out / 'bench.json'}")


if __name__ == "__main__":
    main()
