"""`make bench`: speed figures on this machine (never asserted in unit tests).

1. Forward + adjoint throughput of each operator on 64 images of 64x64 (float32).
2. CGLS, converged constrained TV, DRIP and the unrolled baseline on 64 held-out 64x64 photo
   crops, Gaussian blur sigma 2, 2% noise: seconds, images per second, PSNR and the largest
   discrepancy ratio. The times are medians of ``--rounds`` rounds (default 3), each of which
   runs every method once, in another order each round; "x TV" is the median over the rounds
   of a method's time over TV's in the same round, so methods are compared by solves run at
   the same moment (this machine's speed drifts within a run). DRIP uses ``--model``
   (default: the pretrained sample model when present, else an untrained model, i.e. the
   regularizer's starting point, reported as such), and a model with a patch pass also runs
   without it (``--patch-weight 0``), and one with more than one pass as a single solve
   (``--reweight 0 --patch-weight 0``); the unrolled baseline uses ``--unrolled`` (default:
   its sample model, skipped when absent). The same for limited-angle tomography (32 angles
   over 120 degrees) with ``--tomography-model`` (default: its sample model; no unrolled
   network). ``--reconstruct blur`` (or ``tomography``) runs one of the two.
3. Training throughput: images per second of ``drip train``'s optimisation step (default
   settings for blur data, so one reweighting pass for DRIP; batch 8, fresh 1-5% noise) for
   DRIP and the unrolled baseline, from untrained models on the same crops, after one warm-up
   step.
4. Low noise: TV and DRIP (``--model``) on the first ``--low-noise-images`` crops (default 4)
   blurred at ``--low-noise-percent`` (default 0.03%), timed in rounds as in 2. There the
   constraint is tight, DRIP's projections take some 20-30 Krylov steps where they take 2-3 at
   2%, and its small working sets make every step's overhead count (the regime where threads
   contending for the cores went unseen until session 59: ``docs/design.md``, *The subspace
   problems' SVD*).
5. Memory of ``drip reconstruct`` on large files: the peak resident memory of the command
   (CGLS, blur) on phantom files of two sizes, 8 times apart. The command streams a file batch
   by batch, so its peak should not grow with the file (Linux: read from ``/proc``). And the
   same for DRIP (``--model``, both passes where it has them) on 128 blurred photo crops, two
   batches.

``--device cuda`` runs the first four on a GPU (the fifth stays on the CPU). Prints rich tables and writes bench_out/bench.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from drip_cli.console import console
from drip_cli.data import SourceOptions, add_noise, load_images, noise_std_for
from drip_cli.evaluation import psnr
from drip_cli.io import write_measurement_file
from drip_cli.io.models import ModelInfo
from drip_cli.methods import CGLSMethod, LearnedMethod, TVMethod
from drip_cli.reconstruct import resolve_device
from drip_cli.operators import (Blur, Denoise, Inpainting, SparseMatrixOperator, Tomography,
                                gaussian_psf, limited_angles)
from drip_cli.regularizers.model import ModelConfig, build_model
from drip_cli.solvers import discrepancy_radius, discrepancy_ratio
from drip_cli.training import TrainConfig, Trainer

SHAPE = (1, 64, 64)
SAMPLES = Path(__file__).resolve().parent.parent / "sample_data"


def learned_method(path: Path | None, architecture: str, operator_kind: str = "blur"):
    """The learned method from a model file, an untrained DRIP model when there is none, or
    None (an unrolled network is only benchmarked trained)."""
    if path is not None and path.exists():
        method = LearnedMethod.load(path)
        method.label = f"{method.kind} ({path.name})"
        return method
    if architecture != "convex":
        return None
    config = ModelConfig()
    info = ModelInfo(config=config, operator_kind=operator_kind, image_shape=SHAPE,
                     noise_percent=(1, 5))
    method = LearnedMethod(build_model(config).eval(), info, "")
    method.label = "drip (untrained)"
    return method


def fewer_passes(path: Path | None, drip, operator_kind: str) -> list[LearnedMethod]:
    """The same model without its patch pass (``--patch-weight 0``), where it has one, and as a
    single solve (``--reweight 0``, and ``--patch-weight 0``), where it has more than one pass."""
    config = drip.model.config
    patch = drip.model.runs_patch_pass()
    variants = []
    if patch:
        variants.append(({"patch_weight": 0.0}, "drip --patch-weight 0"))
    if config.reweight:
        variants.append(({"reweight": 0, "patch_weight": 0.0},
                         "drip --reweight 0" + (" --patch-weight 0" if patch else "")))
    methods = []
    for settings, label in variants:
        method = learned_method(path, "convex", operator_kind)
        method.set_reweight(settings.get("reweight"))
        method.set_patch_weight(settings["patch_weight"])
        method.label = label
        methods.append(method)
    return methods


def reconstruction_methods(model: Path | None, operator_kind: str, unrolled: Path | None):
    """CGLS, TV, the DRIP model (and with fewer passes, where it has more than one) and the
    unrolled network where there is one."""
    drip = learned_method(model, "convex", operator_kind)
    methods = [CGLSMethod(), TVMethod(), drip, *fewer_passes(model, drip, operator_kind),
               learned_method(unrolled, "unrolled")]
    return [m for m in methods if m is not None]


def operators() -> dict:
    rng = np.random.default_rng(0)
    side, half = 64, 32
    rows = np.repeat(np.arange(half * half), 4)
    r, c = np.divmod(np.arange(half * half), half)
    cols = np.stack([(2 * r + dr) * side + 2 * c + dc for dr in (0, 1) for dc in (0, 1)], 1).ravel()
    return {
        "denoise": Denoise(SHAPE),
        "blur (13x13 PSF)": blur(),
        "inpainting (50%)": Inpainting.random(SHAPE, 0.5, rng),
        "tomography (32 angles, 120 deg)": tomography(),
        "tomography (180 angles)": Tomography(SHAPE, np.arange(180.0)),
        "matrix (2x2 downsampling CSR)": SparseMatrixOperator.from_csr(
            SHAPE, np.full(rows.size, 0.25), cols, np.arange(0, rows.size + 1, 4),
            (half * half, side * side)),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (caches, allocator)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def table(title: str, *headers: str) -> Table:
    result = Table(title=title, title_justify="left")
    for i, header in enumerate(headers):
        result.add_column(header, justify="left" if i == 0 else "right")
    return result


def bench_operators(n: int, device: torch.device, where: str) -> tuple[Table, dict]:
    x = torch.rand(n, *SHAPE, device=device)
    out = table(f"forward + adjoint, {n} images of 64x64, float32, {where}",
                "operator", "ms per batch", "images/s")
    figures = {}
    for name, op in operators().items():
        op = op.to(device)
        seconds = time_it(lambda: op.adjoint(op(x)), 20, device)
        figures[name] = {"ms_per_batch": seconds * 1e3, "images_per_s": n / seconds}
        out.add_row(name, f"{seconds * 1e3:.2f}", f"{n / seconds:,.0f}")
    return out, figures


def blur() -> Blur:
    return Blur(SHAPE, gaussian_psf(2.0))


def tomography() -> Tomography:
    return Tomography(SHAPE, limited_angles(32, 120.0))


def measured(op, truth: np.ndarray, percent: float = 2.0):
    """``op`` and the crops' measurements by it at ``percent`` noise (fixed seed), for the
    reconstruction and training sections (each gets its own operator: ``Module.to`` moves in
    place)."""
    clean = op(torch.from_numpy(truth))
    sigma = noise_std_for(op, clean, torch.full((len(truth),), percent))
    b = add_noise(op, clean, sigma, torch.randn(clean.shape, generator=torch.Generator().manual_seed(0)))
    return op, b, sigma


def ratio_text(ratio: float) -> str:
    """A time ratio with two significant digits below 0.1 (CGLS's 0.004 of TV's time), two
    decimals above."""
    return f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.2g}"


def bench_reconstruction(op, what: str, truth: np.ndarray, methods, device: torch.device,
                         where: str, rounds: int = 3, percent: float = 2.0) -> tuple[Table, dict]:
    """Each method's solve of the crops, timed in ``rounds`` rounds that run every method once,
    each round in another order: the median of its times, their range, and the median of its
    time over TV's in the same round (this machine's speed drifts within a run, so methods are
    compared round by round, not by single runs at different moments)."""
    op, b, sigma = measured(op, truth, percent)
    op, b, sigma = op.to(device), b.to(device), sigma.to(device)
    radius = discrepancy_radius(op, sigma, 1.0)
    out = table(f"reconstruction of {len(truth)} photo crops 64x64, {what}, {percent:g}% noise, tau = 1, "
                f"{where} float32; median of {rounds} rounds", "method", "seconds", "range",
                "images/s", "x TV", "PSNR", "max ratio", "iters", "solved")
    labels = [getattr(method, "label", method.name) for method in methods]
    for method in methods:
        method.solve(op, b[:1], radius[:1])   # warm-up (kernels, allocator)
    seconds = {label: [] for label in labels}
    figures = {}
    pairs = list(zip(labels, methods))
    for round_ in range(rounds):
        shift = round_ % len(pairs)
        for label, method in pairs[shift:] + pairs[:shift]:
            synchronize(device)
            start = time.perf_counter()
            result = method.solve(op, b, radius)
            synchronize(device)
            seconds[label].append(time.perf_counter() - start)
            if label in figures:   # the same solve again: its figures are the first round's
                continue
            figures[label] = {
                "psnr": float(psnr(result.solution.detach().cpu().numpy(), truth).mean()),
                "max_ratio": float(discrepancy_ratio(op, result.solution.detach(), b, sigma).max()),
                "iterations_mean": float(result.iterations.double().mean()),
                # the share of samples the solver finished by its own criterion, not at its cap
                "solver_converged_fraction": float(result.converged.double().mean())}
    tv = seconds.get("tv")
    for label in labels:
        times, row = seconds[label], figures[label]
        median = float(np.median(times))
        over_tv = [t / reference for t, reference in zip(times, tv)] if tv else []
        row.update({"seconds": median, "seconds_rounds": times,
                    "images_per_s": len(truth) / median,
                    "over_tv": float(np.median(over_tv)) if over_tv else None,
                    "over_tv_rounds": over_tv})
        out.add_row(label, f"{median:.2f}", f"{min(times):.2f}-{max(times):.2f}",
                    f"{len(truth) / median:.1f}",
                    ratio_text(row["over_tv"]) if over_tv else "-", f"{row['psnr']:.2f}",
                    f"{row['max_ratio']:.4f}", f"{row['iterations_mean']:.0f}",
                    f"{row['solver_converged_fraction']:.2f}")
    return out, figures   # in the methods' order: the first round runs them unrotated


def bench_training(truth: np.ndarray, steps: int, device: torch.device, where: str,
                   batch_size: int = 8) -> tuple[Table, dict]:
    """Images per second of the training step, DRIP and unrolled, from untrained models."""
    op, b, sigma = measured(blur(), truth)
    out = table(f"training step, batch {batch_size} of 64x64 photo crops, blur sigma 2, 1-5% noise, "
                f"{where} float32", "architecture", "steps", "s/step", "images/s")
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "train.h5"
        write_measurement_file(data, op, b.numpy(), sigma.numpy(), truth)
        for architecture in ("convex", "unrolled"):
            config = TrainConfig(data=str(data), out=str(Path(folder) / architecture),
                                 noise_percent=(1.0, 5.0), batch_size=batch_size,
                                 model=ModelConfig(architecture=architecture))
            trainer = Trainer(config, device)   # with drip train's defaults for blur data
            trainer.train_step()   # warm-up
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            synchronize(device)
            per_step = (time.perf_counter() - start) / steps
            name = "drip (convex)" if architecture == "convex" else architecture
            passes = config.model.reweight   # drip train's default: one for convex models
            figures[name] = {"seconds_per_step": per_step,
                             "images_per_s": config.batch_size / per_step, "reweight": passes}
            label = f"{name}, reweight {passes}" if architecture == "convex" else name
            out.add_row(label, str(steps), f"{per_step:.3f}", f"{config.batch_size / per_step:.1f}")
    return out, figures


# Runs the CLI, then prints the process's peak resident memory (Linux's VmHWM). The child's
# ru_maxrss would not do: it counts the benchmark process it was forked from.
RUN_AND_REPORT_PEAK = """
import sys
from drip_cli.cli import app
try:
    app(sys.argv[1:])
finally:
    sys.stderr.write(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def peak_memory(*args) -> tuple[float, float]:
    """Run ``drip ARGS`` in a fresh process: its seconds and peak resident memory in MiB."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUN_AND_REPORT_PEAK, *map(str, args), "-q"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"drip {' '.join(map(str, args))} failed: {done.stderr}")
    kib = int(done.stderr.rsplit("VmHWM:", 1)[1].split()[0])
    return time.perf_counter() - start, kib / 1024


def bench_memory(sizes: list[int], drip_model: Path, drip_images: int) -> tuple[Table, dict]:
    """Peak memory of ``drip reconstruct --method cgls`` on blurred phantom files of ``sizes``,
    and of ``--method drip`` with ``drip_model`` (a blur model; skipped when absent or
    ``drip_images`` is 0) on that many blurred photo crops."""
    out = table("drip reconstruct on large files (64x64, blur, CPU)",
                "method", "images", "file MiB", "seconds", "peak MiB")
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        def measure(method: str, n: int, data: Path, *options) -> dict:
            seconds, peak = peak_memory("reconstruct", data, "--out", Path(folder) / "r.h5",
                                        "--method", method, "--device", "cpu", *options)
            size = data.stat().st_size / 2**20
            out.add_row(method, str(n), f"{size:.0f}", f"{seconds:.1f}", f"{peak:.0f}")
            return {"file_mib": size, "seconds": seconds, "peak_mib": peak}

        for n in sizes:
            data = Path(folder) / f"m{n}.h5"
            peak_memory("simulate", "phantom:ellipses", data, "--operator", "blur",
                        "--noise-percent", 2, "--num-images", n)
            figures[str(n)] = measure("cgls", n, data)
        if drip_images > 0 and drip_model.exists():
            data = Path(folder) / "photos.h5"
            per_photo = max(1, drip_images // 4)
            peak_memory("simulate", "skimage:camera,coffee,astronaut,chelsea", data,
                        "--operator", "blur", "--noise-percent", 2, "--crop-size", 64,
                        "--crops-per-image", per_photo, "--seed", 1)
            figures["drip"] = measure("drip", 4 * per_photo, data, "--model", drip_model)
    return out, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--model", type=Path, default=SAMPLES / "drip_blur.safetensors")
    parser.add_argument("--unrolled", type=Path, default=SAMPLES / "unrolled_blur.safetensors")
    parser.add_argument("--tomography-model", type=Path,
                        default=SAMPLES / "drip_tomography.safetensors")
    parser.add_argument("--reconstruct", default="blur,tomography",
                        help="the operators of the reconstruction sections (comma-separated)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed rounds of the reconstruction sections (the median is reported)")
    parser.add_argument("--train-steps", type=int, default=10,
                        help="timed training steps per architecture (0: skip)")
    parser.add_argument("--train-batch", type=int, default=8,
                        help="the training section's batch size (drip train's default: 8)")
    parser.add_argument("--low-noise-images", type=int, default=4,
                        help="crops of the low-noise section (0: skip)")
    parser.add_argument("--low-noise-percent", type=float, default=0.03,
                        help="the low-noise section's noise percent")
    parser.add_argument("--memory-images", type=int, default=4096,
                        help="the larger file of the memory section, in images (the smaller one "
                             "has an eighth; 0: skip)")
    parser.add_argument("--memory-drip-images", type=int, default=128,
                        help="photo crops for the memory section's DRIP run (--model; 0: skip)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    kinds = set(args.reconstruct.split(",")) - {""}
    if not kinds <= {"blur", "tomography"}:
        parser.error(f"--reconstruct: blur and/or tomography, not {args.reconstruct}")
    device = resolve_device(args.device)   # as the CLI sets it up
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU ({torch.get_num_threads()} threads)")
    results = {"machine": platform.processor() or platform.machine(), "device": where,
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__}

    out, results["operators"] = bench_operators(args.images, device, where)
    console.print(out)
    options = SourceOptions(channels=1, crop_size=64, crops_per_image=max(1, args.images // 4))
    truth = load_images("skimage:camera,coffee,astronaut,chelsea", options, np.random.default_rng(0))
    # kind: (bench.json key, operator, its description, DRIP model, unrolled model)
    sections = {"blur": ("reconstruction", blur, "blur sigma 2", args.model, args.unrolled),
                "tomography": ("reconstruction_tomography", tomography,
                               "tomography 32 angles over 120 deg", args.tomography_model, None)}
    for kind, (key, make_op, what, model, unrolled) in sections.items():
        if kind in kinds:
            out, results[key] = bench_reconstruction(
                make_op(), what, truth, reconstruction_methods(model, kind, unrolled), device,
                where, args.rounds)
            console.print(out)
    if args.low_noise_images > 0:
        methods = [TVMethod(), learned_method(args.model, "convex")]
        out, results["reconstruction_low_noise"] = bench_reconstruction(
            blur(), "blur sigma 2", truth[:args.low_noise_images], methods, device, where,
            args.rounds, args.low_noise_percent)
        results["low_noise_percent"] = args.low_noise_percent
        console.print(out)
    if args.train_steps > 0:
        out, results["training"] = bench_training(truth, args.train_steps, device, where,
                                                  args.train_batch)
        console.print(out)
    if args.memory_images > 0:
        out, results["memory"] = bench_memory([max(1, args.memory_images // 8), args.memory_images],
                                              args.model, args.memory_drip_images)
        console.print(out)
    args.out.mkdir(exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"written {args.out / 'bench.json'}")


if __name__ == "__main__":
    main()
