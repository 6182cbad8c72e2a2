"""The ``drip`` command line: parses options, calls the library, prints tables.

Bad input ends with exit status 1 and one line on stderr naming the file and the problem
(``--debug`` shows the traceback instead); usage errors exit with 2.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import signal
import sys
import threading
import time
import warnings
from enum import Enum
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.table import Table

from . import __version__
from .console import (console, error_line, fmt, key_value_table, progress_bar, status,
                      titled_table, warning_line)
from .errors import (SEED_MAX, SIGNALS_RECEIVED, DripError, DripWarning, OutputError,
                     Terminated, require_positive, with_article)

app = typer.Typer(
    name="drip",
    help="Learned regularization of inverse problems (DRIP): simulate measurements, train "
         "models, reconstruct with a guaranteed data fit, compare methods across noise levels, "
         "inspect files.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def flag(*names: str, **settings):
    """A switch (off unless given). Its metavar is empty: typer 0.2x labels a switch
    ``<bool>`` in ``--help``, which reads as if it took a value (``--quiet true``)."""
    return typer.Option(False, *names, metavar="", **settings)


def _seed_in_range(value: int) -> int:
    if value > SEED_MAX:
        raise typer.BadParameter(f"{value} is above 2^63 - 1, the largest seed")
    return value


def seed_option(help: str):
    """``--seed``: 0 to 2^63 - 1, the top checked by a callback, since a ``max`` shows in
    ``--help`` as ``[0<=x<=9223372036854775807]``, wrapped over two lines."""
    return typer.Option(0, "--seed", min=0, callback=_seed_in_range, help=help)


def choices(kinds: type[Enum]) -> str:
    """The metavar of an option taking one of ``kinds``: their values with spaces between, so
    that ``--help`` wraps its column between them (typer 0.2x writes ``<a|b|c>``, which at 80
    columns broke inside a word: ``<denoise|blur|inpaint`` over ``ing|tomography|matrix>``)."""
    return " | ".join(kind.value for kind in kinds)


QUIET = flag("--quiet", "-q", help="No progress display (results are still written).")
DEBUG = flag("--debug", help="Show Python tracebacks on errors.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
BATCH_SIZE = typer.Option(
    None, "--batch-size", min=1,
    help="Samples solved together. Default: on the CPU 64, or as many as hold 8 images of "
         "256x256 (512K values) where that is fewer; on a GPU 512 images of 64x64 (2M values, "
         "fewer of larger images), where larger batches run faster.")
REWEIGHT = typer.Option(
    None, "--reweight", min=0,
    help="drip: solve this many more times with each pixel's regularizer terms weighted down "
         "at the edges of the previous solution (convex models; every pass fits the data). "
         "Default: the model's (0 unless trained with --reweight).")
EDGE_SCALE = typer.Option(
    None, "--edge-scale", min=1e-6,
    help="With reweighting: gradient magnitude at which a pixel's weight halves (intensities "
         "in [0, 1]). Default: the model's (0.05).")
MAX_ITERATIONS = typer.Option(
    None, "--max-iterations", min=1,
    help="Iteration cap of the solver (evaluate: of every method's but the unrolled network's "
         "fixed steps). Default: the model's (1000 for new models), 5000 for tv, 1000 for cgls.")
PATCH_WEIGHT = typer.Option(
    None, "--patch-weight", min=0.0,
    help="drip: weight of the patch-mixture pass after the others (models trained with "
         "--patch-components; 0 skips it). Default: the model's, chosen in training.")
ANY_SIZE = flag(
    "--any-size",
    help="Use the model on images of another height and width than it was trained on (its "
         "filters are convolutional). Without it such data is refused.")
EACH_CHANNEL = flag(
    "--each-channel",
    help="Use a single-channel (grayscale) drip model on images of several channels (colour): "
         "its regularizer acts on each channel, the data fit on the whole sample. Without it "
         "such data is refused.")


def _serve_other_shapes(methods, any_size: bool, each_channel: bool) -> None:
    """--any-size and --each-channel: the models among ``methods`` serve images of other sizes
    or channel counts (:meth:`~drip_cli.methods.LearnedMethod.check`)."""
    for flag, given, attribute in (("--any-size", any_size, "any_size"),
                                   ("--each-channel", each_channel, "each_channel")):
        if not given:
            continue
        models = [m for m in methods if hasattr(m, attribute)]
        if not models:
            raise DripError(f"{flag} applies to models (--model), not "
                            f"{', '.join(m.name for m in methods)}")
        for method in models:
            setattr(method, attribute, True)


# examples shown under each command's --help (blank lines keep them on lines of their own)
EXAMPLES = {
    "simulate": [
        "drip simulate skimage:camera,coffee blur.h5 --operator blur --blur-sigma 2 "
        "--crop-size 64 --crops-per-image 8",
        "drip simulate phantom:shepp-logan ct.h5 --operator tomography --angles 32 "
        "--angle-range 120 --noise-percent 1:5",
        "drip simulate my_pngs/ mine.h5 --operator matrix --matrix A.npz --noise-percent 2",
    ],
    "train": [
        "drip train train_blur.h5 --out run --noise-percent 1:5 --max-minutes 10",
        "drip train train_blur.h5 --out run --resume --max-minutes 20",
        "drip train mine.h5 --out tuned --init sample_data/drip_blur.safetensors "
        "--noise-percent 1:5 --max-minutes 5",
    ],
    "reconstruct": [
        "drip reconstruct sample_data/blur.h5 --model sample_data/drip_blur.safetensors "
        "--out blur_drip.h5",
        "drip reconstruct sample_data/blur.h5 --method tv --out blur_tv.h5 --report blur_tv.json",
        "drip reconstruct mine.h5 --method cgls --noise-std 0.01 --tau 1.2 --out mine_cgls.h5",
        "drip reconstruct photo_512.h5 --model sample_data/drip_blur.safetensors --any-size "
        "--each-channel --out photo_drip.h5",
    ],
    "evaluate": [
        "drip evaluate sample_data/tomography.h5 --model sample_data/drip_tomography.safetensors "
        "--out report",
        "drip evaluate test.h5 --model run_a --model run_b --methods drip,tv "
        "--noise-percent 1,5,20 --out report",
        "drip evaluate test.h5 --model run --tau 0.95,0.98,1 --out report",
    ],
    "import": [
        "drip import photos/ mine.h5 --operator blur --blur-sigma 2 --blur-boundary valid "
        "--estimate-noise",
        "drip import photo.png mine.h5 --operator blur --psf psf.npy --noise-std 0.01",
        "drip import holes.npy mine.h5 --operator inpainting --mask mask.png --noise-percent 1",
        "drip import sinograms.npy mine.h5 --operator tomography --angle-range 120 "
        "--estimate-noise",
        "drip import scans.npy mine.h5 --operator tomography --image-size 96 --noise-std 0.1",
        "drip import scan.h5::exchange/data mine.h5 --operator tomography --projections "
        "--angle-file scan.h5::exchange/theta --center-offset auto --estimate-noise",
        "drip import sinograms.npy mine.h5 --like sample_data/tomography.h5 --noise-std 0.05",
    ],
    "export": [
        "drip export blur_drip.h5 pictures/",
        "drip export sample_data/blur.h5 truth/ --bits 16",
        "drip export sample_data/blur.h5 blurred/ --dataset measurements --max-samples 4",
        "drip export sample_data/tomography.h5 sinograms.npy --dataset measurements",
        "drip export blur_drip.h5 blur_drip.tif",
    ],
    "info": [
        "drip info sample_data/blur.h5",
        "drip info run",
        "drip info blur_drip.h5 --samples 20",
        "drip info scans/",
    ],
}


# An example's lines in --help: an 80-column terminal less the help's margins. Newer typer
# (0.29 here) keeps an epilog's line breaks (its rich_utils._fix_linebreaks); older releases
# (0.18, the oldest drip allows) join the lines of a paragraph, so there an example stays one
# line, which the terminal wraps.
EXAMPLE_WIDTH = 76
_EPILOG_KEEPS_LINES = hasattr(importlib.import_module("typer.rich_utils"), "_fix_linebreaks")


def example_lines(example: str, width: int = EXAMPLE_WIDTH) -> list[str]:
    """``example`` as shell lines of at most ``width`` characters where it can be, continued
    with `` \\`` and indented: broken before an option, which keeps its value, so that a
    command copied from ``--help`` at 80 columns runs as one (typer wrapped it into lines that
    a shell reads as two commands)."""
    units: list[str] = []
    for word in example.split():
        if units and not word.startswith("-") and units[-1].startswith("-") \
                and " " not in units[-1]:
            units[-1] += " " + word   # an option and its value stay together
        elif units and not word.startswith("-") and not units[-1].startswith("-"):
            units[-1] += " " + word   # the command and its arguments
        else:
            units.append(word)
    lines = [units[0]]
    for i, unit in enumerate(units[1:], 2):
        room = width - 2 * (i < len(units))   # the last line needs no " \\"
        if len(lines[-1]) + 1 + len(unit) <= room:
            lines[-1] += " " + unit
        else:
            lines.append("    " + unit)
    return [line + " \\" for line in lines[:-1]] + lines[-1:]


def _examples(command: str) -> str:
    shown = ["\n".join(example_lines(e)) if _EPILOG_KEEPS_LINES else e
             for e in EXAMPLES[command]]
    return "Examples:\n\n" + "\n\n".join(shown)


def command(name: str | None = None):
    """Register a command of ``app`` with its examples, its docstring's paragraphs each made
    one line: typer 0.2x keeps the line breaks of every paragraph after the first, which the
    terminal then wraps again into ragged lines."""
    def register(function):
        paragraphs = inspect.cleandoc(function.__doc__).split("\n\n")
        return app.command(name, help="\n\n".join(" ".join(text.split()) for text in paragraphs),
                           epilog=_examples(name or function.__name__))(function)
    return register


@contextlib.contextmanager
def _on_signals(handler):
    """``handler`` for SIGINT and SIGTERM while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, handler)
                for number in (signal.SIGINT, signal.SIGTERM)}
    unraisable = sys.unraisablehook

    def quiet_interruptions(report):
        # an interruption raised in a destructor is lost, and raised again later: no
        # "Exception ignored" traceback for it
        if not (isinstance(report.exc_value, KeyboardInterrupt) and SIGNALS_RECEIVED):
            unraisable(report)

    sys.unraisablehook = quiet_interruptions
    try:
        yield
    finally:
        sys.unraisablehook = unraisable
        for number, handler_before in previous.items():
            signal.signal(number, handler_before)


@contextlib.contextmanager
def _warnings_as_lines():
    with warnings.catch_warnings():   # restores the filters and showwarning afterwards
        warnings.simplefilter("always", DripWarning)
        default = warnings.showwarning

        def show(message, category, *args, **kwargs):
            if issubclass(category, DripWarning):
                warning_line(str(message))
            else:
                default(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


def _out_of_memory(exc: Exception) -> bool:
    """NumPy's MemoryError, CUDA's OutOfMemoryError, or the RuntimeError of PyTorch's CPU
    allocator."""
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)))


@contextlib.contextmanager
def _errors(debug: bool, interrupted=lambda cause: f"{cause}; no output was written"):
    """Map every failure to one stderr line and exit status 1, unless ``--debug``; Ctrl-C and
    SIGTERM to the line ``interrupted("interrupted" or "terminated")`` returns and exit status
    130 or 143 (128 + the signal's number, as shells report). A :class:`DripWarning` raised on
    the way is printed as one ``drip: warning:`` line. A SIGTERM that a library turned into an
    error of its own (h5py, caught creating a dataset, raised a TypeError) is a termination too,
    and one whose exception was lost (raised in a destructor) is raised again before any output
    appears (:func:`~drip_cli.errors.raise_if_signalled`)."""
    SIGNALS_RECEIVED.clear()

    def terminate(signum, frame):
        SIGNALS_RECEIVED.append(signum)
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    def stop(terminated: bool):
        error_line(interrupted("terminated" if terminated else "interrupted"))
        return typer.Exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))

    try:
        with _on_signals(terminate), _warnings_as_lines():
            yield
    except (typer.Exit, typer.Abort):
        raise
    except DripError as exc:
        if debug:
            raise
        error_line(str(exc))
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:
        raise stop(isinstance(exc, Terminated)) from None
    except Exception as exc:  # noqa: BLE001 - a last line of defence: never a bare traceback
        if SIGNALS_RECEIVED:
            raise stop(SIGNALS_RECEIVED[-1] == signal.SIGTERM) from None
        if debug:
            raise
        from .io.atomic import write_errno

        refused = write_errno(exc)   # a full disk met outside the atomic writers
        if _out_of_memory(exc):
            error_line(f"out of memory ({exc}): a smaller --batch-size, or smaller images, "
                       "need less")
        elif refused is not None:
            where = getattr(exc, "filename", None)
            error_line(f"{f'{where}: ' if where else ''}cannot write: {os.strerror(refused)}")
        else:
            error_line(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the "
                       "traceback)")
        raise typer.Exit(1) from None
    finally:
        SIGNALS_RECEIVED.clear()   # the next command in this process starts afresh


def _warn_if_tau_is_low(tau: float) -> None:
    """A discrepancy constant below 1 asks every method to fit the data closer than the noise
    in it: a little below (0.95 and 0.98, as in a sweep for each method's best) can pay off,
    further below the solves fit the noise. Measured on sample_data/blur.h5 with its DRIP
    model: 33.35 dB in 6.0 s at tau 1, 31.97 dB in 6.0 s at 0.95, 20.10 dB in 24.9 s at 0.9,
    and more than 300 s at 0.8."""
    if tau < 0.95:
        warning_line(f"--tau {tau:g} asks for a fit closer than the noise level (tau = 1): "
                     "solves fit the noise, and take longer (below 0.95 they degrade "
                     "quickly); give tau < 1 only if the noise level is overstated")


def _positive_numbers(text: str, option: str) -> list[float]:
    """A comma-separated option (``1,2,5``) as its distinct values, sorted; each must be a
    positive finite number."""
    try:
        values = sorted({float(part) for part in text.split(",")})
    except ValueError:
        raise DripError(f"{option} must be numbers separated by commas, got {text!r}") from None
    if not all(np.isfinite(values)) or min(values) <= 0:
        raise DripError(f"{option} must be positive, got {text!r}")
    return values


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"drip {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = flag("--version", callback=_version_callback, is_eager=True,
                               help="Print the version and exit.")) -> None:
    """drip: Deep Regularizers for Inverse Problems."""


class BlurBoundary(str, Enum):
    periodic = "periodic"
    valid = "valid"


# operator options that simulate and import share
PSF = typer.Option(None, "--psf", help="blur: PSF from a .npy file or an HDF5 dataset "
                   "(FILE.h5::DATASET), odd sizes.")
ANGLE_RANGE = typer.Option(180.0, "--angle-range",
                           help="tomography: angular range in degrees (<180: limited angle).")
ANGLE_START = typer.Option(0.0, "--angle-start", help="tomography: first angle (degrees).")
_CENTER_OFFSET_HELP = ("tomography: where the rotation axis meets the detector line, in "
                       "detectors from its centre (fractions allowed), for a scanner whose "
                       "axis is off centre.")
CENTER_OFFSET = typer.Option(0.0, "--center-offset", help=_CENTER_OFFSET_HELP)
ANGLE_FILE = typer.Option(None, "--angle-file", help="tomography: the angles themselves, in "
                          "degrees, one per sinogram row, in place of --angles, --angle-range "
                          "and --angle-start: a .npy array, an HDF5 dataset (FILE.h5::DATASET) "
                          "or a text file of numbers.")
BLUR_BOUNDARY = typer.Option(
    BlurBoundary.periodic, "--blur-boundary", case_sensitive=False,
    metavar=choices(BlurBoundary),
    help="blur: periodic (the contract's circular convolution, measurements the image's size) "
    "or valid (the pixels whose PSF stays inside the image, as a camera sees a scene beyond "
    "its frame: measurements smaller by the PSF's size less one).")


class OperatorKind(str, Enum):
    denoise = "denoise"
    blur = "blur"
    inpainting = "inpainting"
    tomography = "tomography"
    matrix = "matrix"


@command()
def simulate(
    ctx: typer.Context,
    images: str = typer.Argument(..., help="HDF5 file (dataset 'images' or 'ground_truth', "
                                 "or FILE.h5::DATASET for another), .npy array, PNG/JPEG/TIFF "
                                 "picture or folder of them (every "
                                 "page of a multi-page TIFF), phantom:ellipses, "
                                 "phantom:shepp-logan, or skimage:NAME[,NAME] / skimage:photos."),
    out: Path = typer.Argument(..., help="Measurement file to write (HDF5)."),
    operator: OperatorKind = typer.Option(..., "--operator", help="Forward operator kind.",
                                          case_sensitive=False, metavar=choices(OperatorKind)),
    noise_percent: str = typer.Option("2", "--noise-percent",
                                      help="Noise percent P, or a range A:B drawn per sample."),
    seed: int = seed_option("Seed for images, mask and noise (reproducible)."),
    blur_sigma: float = typer.Option(2.0, "--blur-sigma", help="blur: Gaussian PSF std (pixels)."),
    blur_size: Optional[int] = typer.Option(None, "--blur-size", help="blur: odd PSF size "
                                            "(default 2*ceil(3 sigma)+1)."),
    psf: Optional[Path] = PSF,
    blur_boundary: BlurBoundary = BLUR_BOUNDARY,
    keep_fraction: float = typer.Option(0.5, "--keep-fraction", help="inpainting: observed share."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="inpainting: picture, .npy array "
                                        "or HDF5 dataset of the observed pixels (non-zero) "
                                        "instead of a random mask."),
    angles: int = typer.Option(32, "--angles", help="tomography: number of projection angles."),
    angle_range: float = ANGLE_RANGE,
    angle_start: float = ANGLE_START,
    angle_file: Optional[Path] = ANGLE_FILE,
    center_offset: float = CENTER_OFFSET,
    detectors: Optional[int] = typer.Option(
        None, "--detectors", min=1, help="tomography: detectors per angle, centred. Default: "
        "the image's diagonal (the contract's); fewer measure an object wider than they are."),
    matrix: Optional[Path] = typer.Option(
        None, "--matrix",
        help="matrix: .npz from scipy.sparse.save_npz (CSR, CSC or COO), shape (m, H*W)."),
    channels: Optional[int] = typer.Option(None, "--channels", min=1, max=3,
                                           help="1 (grayscale) or 3 (colour); default: 1, or "
                                           "the image file's own."),
    image_size: int = typer.Option(64, "--image-size", min=4, help="phantoms: image side."),
    num_images: int = typer.Option(64, "--num-images", min=1, help="phantoms: number of images."),
    crop_size: Optional[int] = typer.Option(None, "--crop-size", min=4,
                                            help="photographs: take random square crops."),
    crops_per_image: int = typer.Option(8, "--crops-per-image", min=1,
                                        help="photographs: crops per picture."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images simulated at a time."),
    quiet: bool = QUIET,
    debug: bool = DEBUG,
) -> None:
    """Simulate noisy measurements b = A x + sigma e of ground-truth images."""
    from .data import (OperatorSpec, SourceOptions, build_operator, draw_noise_percent,
                       format_noise_percent, image_file_dataset, is_phantom_source,
                       iter_file_images, load_images, parse_noise_percent, simulate_batch)
    from .io import MeasurementWriter, atomic_h5, check_writable, unit_range_doubt
    from .io.datasets import names_dataset, split_dataset

    with _errors(debug):
        if channels == 2:
            raise DripError("--channels must be 1 or 3")
        try:
            low, high = parse_noise_percent(noise_percent)
        except ValueError as exc:
            raise DripError(f"--noise-percent: {exc}") from exc
        named = names_dataset(images)   # FILE.h5::DATASET
        source_file = split_dataset(images)[0] if named or Path(images).is_file() else None
        check_writable(out, keep={"the images file": source_file, "the --psf file": psf,
                                  "the --matrix file": matrix, "the --mask file": mask,
                                  "the --angle-file file": angle_file})
        rng = np.random.default_rng(seed)
        opened = image_file_dataset(images) if source_file else None
        try:
            if opened is not None:
                dset = opened[1]
                n = dset.shape[0]
                file_channels = 1 if dset.ndim == 3 else dset.shape[1]
                channels = channels or file_channels
                image_shape = (channels, *dset.shape[-2:])
                batches = iter_file_images(dset, channels, batch_size, images)
            else:
                options = SourceOptions(channels=channels or 1, image_size=image_size,
                                        num_images=num_images, crop_size=crop_size,
                                        crops_per_image=crops_per_image)
                everything = load_images(images, options, rng)
                n, image_shape = len(everything), everything.shape[1:]
                batches = (everything[i:i + batch_size] for i in range(0, n, batch_size))
            spec = OperatorSpec(kind=operator.value, blur_sigma=blur_sigma, blur_size=blur_size,
                                psf_file=psf, blur_boundary=blur_boundary.value,
                                keep_fraction=keep_fraction, mask_file=mask,
                                angles=angles, angle_range=angle_range,
                                angle_start=angle_start, angle_file=angle_file,
                                detectors=detectors, center_offset=center_offset,
                                matrix_file=matrix)
            with status(f"building the {operator.value} operator", quiet):
                op = build_operator(spec, tuple(image_shape), rng)
            # once the images and the operator are known to be good (a bad input is one line)
            source = (("from a .npy array" if images.lower().endswith(".npy") and not named
                       else "from an HDF5 file") if opened is not None else
                      "phantoms" if is_phantom_source(images) else "photographs")
            for why, unused in _simulate_unused(_given_parameters(ctx), operator.value,
                                                source).items():
                warning_line(f"{', '.join(map(_option_name, unused))}: {why} (ignored)")
            percent = draw_noise_percent(n, low, high, rng)
            attrs = {"drip_version": __version__, "source": str(images), "seed": seed,
                     "noise_percent_range": format_noise_percent(low, high, digits=6)}
            with atomic_h5(out) as handle, progress_bar("simulate", n, quiet) as update:
                writer = MeasurementWriter(handle, op, n, with_ground_truth=True, attrs=attrs)
                start, low_value, high_value = 0, np.inf, -np.inf
                for block in batches:
                    stop = start + len(block)
                    low_value = min(low_value, float(block.min()))
                    high_value = max(high_value, float(block.max()))
                    b, sigma = simulate_batch(op, block, percent[start:stop], rng, images, start)
                    writer.write(start, measurements=b, noise_std=sigma, ground_truth=block,
                                 noise_percent=percent[start:stop].astype(np.float32))
                    start = stop
                    update(stop)
        finally:
            if opened is not None:
                opened[0].close()
        doubt = unit_range_doubt(low_value, high_value)  # pictures, uint8/16 are scaled already
        if doubt is not None:
            warning_line(f"{images}: {doubt}")
        console.print(key_value_table(f"wrote {out}", {
            "samples": n, "image shape": str(tuple(image_shape)), "operator": op.kind,
            "measurement shape": str(op.measurement_shape),
            "noise percent": format_noise_percent(low, high)}))


@command("import")
def import_measurements(
    ctx: typer.Context,
    measured: Path = typer.Argument(..., help="The measurements: a .npy array or an HDF5 "
                                    "dataset (FILE.h5::DATASET; FILE.h5 where it is the file's "
                                    "only one) shaped S, (N, *S) or (N, C, *S) (S the "
                                    "operator's measurement shape), or a PNG/JPEG/TIFF picture "
                                    "or folder of them, a sample per picture or TIFF page "
                                    "(denoise, blur, inpainting; sinograms as 32-bit float "
                                    "TIFFs)."),
    out: Path = typer.Argument(..., help="Measurement file to write (HDF5)."),
    operator: Optional[OperatorKind] = typer.Option(None, "--operator", case_sensitive=False,
                                                    metavar=choices(OperatorKind),
                                                    help="Forward operator kind (or --like)."),
    like: Optional[Path] = typer.Option(None, "--like", help="Take the operator, image shape "
                                        "included, from this measurement file (any kind)."),
    noise_std: Optional[float] = typer.Option(None, "--noise-std", help="The noise's standard "
                                              "deviation (intensities in [0, 1])."),
    noise_percent: Optional[float] = typer.Option(None, "--noise-percent", help="The noise "
                                                  "std as a percent of each sample's mean |b|."),
    estimate_noise: bool = flag("--estimate-noise", help="Estimate each sample's noise std: "
                                "from the measurement components the operator removes (blur, "
                                "tomography, matrix), or from the image's patches (denoise, "
                                "inpainting)."),
    blur_sigma: Optional[float] = typer.Option(None, "--blur-sigma",
                                               help="blur: Gaussian PSF std (pixels)."),
    blur_size: Optional[int] = typer.Option(None, "--blur-size", help="blur: odd PSF size "
                                            "(default 2*ceil(3 sigma)+1)."),
    psf: Optional[Path] = PSF,
    blur_boundary: BlurBoundary = BLUR_BOUNDARY,
    mask: Optional[Path] = typer.Option(None, "--mask", help="inpainting: picture, .npy array "
                                        "or HDF5 dataset of the observed pixels (non-zero)."),
    angles: Optional[int] = typer.Option(None, "--angles", min=1, help="tomography: number of "
                                         "angles. Default: the sinogram's rows."),
    angle_range: float = ANGLE_RANGE,
    angle_start: float = ANGLE_START,
    angle_file: Optional[Path] = ANGLE_FILE,
    center_offset: str = typer.Option(
        "0", "--center-offset", metavar="D|auto", help=_CENTER_OFFSET_HELP[:-1] + ", or auto: "
        "estimated from the sinograms' centres of mass (each projection must see the whole "
        "object)."),
    projections: bool = flag(
        "--projections", help="tomography: the measurements are a scanner's "
        "projections, one (slices, detectors) image per angle (an array (angles, slices, "
        "detectors), as Data Exchange's exchange/data, or a 32-bit float TIFF per angle or "
        "page), not sinograms: each slice's sinogram becomes a sample."),
    flat: Optional[Path] = typer.Option(
        None, "--flat", help="tomography: the measurements are a detector's counts, and this "
        "its flat field (the open beam; a (slices, detectors) image or a stack of them, "
        "averaged, as the measurements are stored): they are turned into line integrals, "
        "-log((counts - dark) / (flat - dark))."),
    dark: Optional[Path] = typer.Option(
        None, "--dark", help="tomography, with --flat: the dark field (no beam), as --flat; "
        "default 0."),
    slices: Optional[str] = typer.Option(
        None, "--slices", metavar="START:STOP", help="tomography: only these slices of a "
        "stack (the samples, or the projections' slices; counted from 0, STOP excluded), and "
        "of --flat, --dark and --ground-truth; from a .npy array or an HDF5 dataset only "
        "they are read, as of a scan too large to read whole."),
    image_size: Optional[int] = typer.Option(
        None, "--image-size", min=1, help="tomography: the square image's side. Default: the "
        "one whose diagonal the detectors span; larger for an object wider than they are."),
    matrix: Optional[Path] = typer.Option(
        None, "--matrix", help="matrix: .npz from scipy.sparse.save_npz, shape (m, H*W) for "
        "square images (other shapes: --like)."),
    channels: Optional[int] = typer.Option(None, "--channels", min=1, max=3, help="pictures: 1 "
                                           "(grayscale) or 3 (colour); default: their own."),
    ground_truth: Optional[Path] = typer.Option(None, "--ground-truth", help="The true images, "
                                                "where you have them (pictures, .npy or an HDF5 "
                                                "dataset, as the measurements): reconstruct then "
                                                "gives PSNR, SSIM."),
    quiet: bool = QUIET,
    debug: bool = DEBUG,
) -> None:
    """Make a measurement file of measurements you took (pictures, .npy arrays or HDF5 datasets).

    Give the operator that made them and their noise level (or estimate it).
    """
    from .data.measured import NoiseChoice, import_measurements as write_file
    from .io.datasets import split_dataset
    from .data import OperatorSpec, format_noise_percent
    from .io import check_writable

    with _errors(debug):
        if channels == 2:
            raise DripError("--channels must be 1 or 3")
        if (operator is None) == (like is None):
            raise DripError("give the operator: --operator KIND with its options, or --like "
                            "FILE.h5 (a measurement file with the same operator)")
        check_writable(out, keep={"the measurements": measured, "the --like file": like,
                                  "the --psf file": psf, "the --mask file": mask,
                                  "the --matrix file": matrix,
                                  "the --angle-file file": angle_file,
                                  "the --flat file": flat, "the --dark file": dark,
                                  "the --ground-truth file": ground_truth})
        spec = None
        if operator is not None:
            if operator.value == "blur" and psf is None and blur_sigma is None:
                raise DripError("blur needs its PSF: --blur-sigma S (a Gaussian) or --psf FILE.npy")
            spec = OperatorSpec(kind=operator.value, blur_sigma=blur_sigma or 2.0,
                                blur_size=blur_size, psf_file=psf,
                                blur_boundary=blur_boundary.value, mask_file=mask, angles=angles,
                                angle_range=angle_range, angle_start=angle_start,
                                angle_file=angle_file,
                                center_offset=_center_offset(center_offset),
                                image_side=image_size, matrix_file=matrix)
        for why, unused in _import_unused(_given_parameters(ctx), operator, like).items():
            warning_line(f"{', '.join(map(_option_name, unused))}: {why} (ignored)")
        choice = NoiseChoice(noise_std, noise_percent, estimate_noise)
        with status(f"reading {split_dataset(measured)[0].name or measured}", quiet):
            summary = write_file(measured, out, spec, like, choice, channels,
                                 attrs={"drip_version": __version__}, ground_truth=ground_truth,
                                 **_scan_layout(operator, projections=projections,
                                                flat=flat, dark=dark,
                                                slices=_slices(slices)))
        op, sigma = summary["operator"], summary["noise_std"]
        percent = summary["noise_percent"]
        console.print(key_value_table(f"wrote {out}", {
            "samples": summary["samples"], "image shape": str(op.image_shape),
            "ground truth": "yes" if ground_truth is not None else "no",
            "operator": op.kind, "measurement shape": str(op.measurement_shape),
            f"noise std ({choice.how})": (f"{sigma.min():.4g}" if sigma.min() == sigma.max()
                                          else f"{sigma.min():.4g} to {sigma.max():.4g}"),
            "noise percent of mean |b|": format_noise_percent(float(percent.min()),
                                                              float(percent.max())),
            **({} if summary["estimate"] is None else
               {"estimated from": summary["estimate"].basis()}),
            **({} if summary["axis"] is None else
               {"center offset (estimated)": summary["axis"].describe()}),
        }))


# import's options that say how a scan's measurements are stored, not which operator made them
_SCAN_LAYOUT = ("projections", "flat", "dark", "slices")


def _scan_layout(operator: OperatorKind | None, **given) -> dict:
    """import's ``_SCAN_LAYOUT`` options as given, for tomography or a --like file (which
    refuses them unless it is tomography's); with another --operator they are warned of as
    unused and left out."""
    if operator is not None and operator.value != "tomography":
        return {}
    return given


def _slices(text: str | None) -> slice | None:
    """import's ``--slices START:STOP`` (or one slice, ``START``) as a slice."""
    if text is None:
        return None
    parts = text.split(":")
    try:
        start, stop = ((int(parts[0]), int(parts[0]) + 1) if len(parts) == 1 else
                       (int(parts[0] or 0), int(parts[1])) if len(parts) == 2 else (-1, -1))
    except ValueError:
        start, stop = -1, -1
    if not 0 <= start < stop:
        raise DripError(f"--slices must be START:STOP (counted from 0, STOP excluded and "
                        f"larger than START) or one slice, got {text[:40]!r}")
    return slice(start, stop)


def _center_offset(text: str) -> float | None:
    """import's ``--center-offset``: a number of detectors, or None for ``auto``."""
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise DripError(f"--center-offset must be a number of detectors or auto, got "
                        f"{text[:40]!r}") from None


def _import_unused(given: set[str], operator: OperatorKind | None,
                   like: Path | None) -> dict[str, list[str]]:
    """import's operator options in ``given`` that the operator does not read, by the reason."""
    options = {**_OPERATOR_OPTIONS, "inpainting": ("mask",),
               "tomography": ("angles", "angle_range", "angle_start", "angle_file",
                              "center_offset", "image_size", *_SCAN_LAYOUT)}
    if like is not None:   # a layout, not an operator: it reads them still
        names = [name for names in options.values() for name in names
                 if name in given and name not in _SCAN_LAYOUT]
        return {"not used with --like, which gives the operator": names} if names else {}
    return _simulate_unused(given, operator.value, "measurements", options, sources=False)


# simulate's options that only some operators, or only some sources of images, read
_OPERATOR_OPTIONS = {"blur": ("blur_sigma", "blur_size", "psf", "blur_boundary"),
                     "inpainting": ("keep_fraction", "mask"),
                     "tomography": ("angles", "angle_range", "angle_start", "angle_file",
                                    "center_offset", "detectors"),
                     "matrix": ("matrix",)}
_SOURCE_OPTIONS = {"phantoms": ("image_size", "num_images"),
                   "photographs": ("crop_size", "crops_per_image")}
_SOURCE_NAMES = {"phantoms": "phantom:NAME sources",
                 "photographs": "photographs (a folder of pictures, or skimage:NAME)"}


def _simulate_unused(given: set[str], operator: str, source: str,
                     options: dict | None = None, sources: bool = True) -> dict[str, list[str]]:
    """simulate's options in ``given`` that ``operator`` or the kind of ``source`` ("from an HDF5
    file", "from a .npy array", "phantoms" or "photographs") does not read, by the reason; a
    user who types ``--blur-sigma`` with ``--operator tomography`` hears of it. ``options``: each
    operator's own options (default: simulate's); ``sources``: whether the sources' options are
    checked too (import has none)."""
    unused: dict[str, list[str]] = {}
    for kind, names in (options or _OPERATOR_OPTIONS).items():
        if kind != operator and given & set(names):
            unused.setdefault(f"not used by --operator {operator}", []).extend(
                name for name in names if name in given)
    if operator == "blur" and "psf" in given and given & {"blur_sigma", "blur_size"}:
        unused["not used with --psf, which gives the PSF"] = [
            name for name in ("blur_sigma", "blur_size") if name in given]
    if operator == "tomography" and "angle_file" in given:
        spaced = [name for name in ("angles", "angle_range", "angle_start") if name in given]
        if spaced:
            unused["not used with --angle-file, which gives the angles"] = spaced
    if operator == "inpainting" and {"mask", "keep_fraction"} <= given:
        unused["not used with --mask, which gives the observed pixels"] = ["keep_fraction"]
    for kind, names in (_SOURCE_OPTIONS.items() if sources else ()):
        if kind != source and given & set(names):
            unused[f"used only with {_SOURCE_NAMES[kind]}, and these images are {source}"] = [
                name for name in names if name in given]
    return unused


def _given_parameters(ctx: typer.Context) -> set[str]:
    """The names of the parameters given on the command line (or by the environment), not left
    at their defaults."""
    # by name: typer >= 0.2x vendors click, so its ParameterSource enum is not importable alike
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    return {name for name, source in sources.items()
            if source is not None and source.name != "DEFAULT"}


def _option_name(parameter: str) -> str:
    """The command-line option of a parameter (``--blur-sigma`` for ``blur_sigma``)."""
    return "--" + parameter.replace("_", "-")


# train's options that set a config field of another name (the others share their field's name)
TRAIN_OPTION_FIELDS = {"filters": "n_filters", "solver_tolerance": "train_solver_tolerance",
                       "solver_iterations": "train_solver_iterations"}
_TRAIN_FIELD_OPTIONS = {field: option for option, field in TRAIN_OPTION_FIELDS.items()}


def _options_given(ctx: typer.Context) -> set[str]:
    """The config fields whose options were given on the command line (or by the environment),
    not left at their defaults."""
    return {TRAIN_OPTION_FIELDS.get(name, name) for name in _given_parameters(ctx)}


def _train_option(field: str) -> str:
    """The drip train option that sets a config field (``--filters`` for ``n_filters``)."""
    return _option_name(_TRAIN_FIELD_OPTIONS.get(field, field))


def _given_values(**options) -> dict:
    """The options that were given (``None``: left to a default that depends on the data)."""
    return {name: value for name, value in options.items() if value is not None}


# The defaults of `train` repeat those of TrainConfig and ModelConfig, so that `--help` does not
# import torch; tests/test_cli.py checks that the two agree. The options that default to None
# take their values from the operator (training.trainer.operator_defaults), as their help says.
@command()
def train(
    ctx: typer.Context,
    data: Path = typer.Argument(..., help="Measurement file with ground_truth (HDF5)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (model, checkpoint, history)."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes",
                                                help="Stop cleanly after this long, keeping the best model."),
    epochs: int = typer.Option(100, "--epochs", min=1, help="Passes over the training images."),
    noise_percent: Optional[str] = typer.Option(
        None, "--noise-percent",
        help="Draw fresh noise of A:B percent per sample and batch from the ground truth "
             "(recommended: 1:5, for a model robust to the noise level). "
             "Default: train on the file's own measurements."),
    batch_size: int = typer.Option(8, "--batch-size", min=1,
                                   help="Training images per optimiser step (each solved to "
                                   "--solver-tolerance)."),
    lr: float = typer.Option(3e-3, "--lr", help="Adam learning rate (at the start)."),
    lr_schedule: str = typer.Option(
        "cosine", "--lr-schedule",
        help="cosine: decay to 5% of --lr over the budget (--epochs or --max-minutes); constant."),
    latent_channels: Optional[int] = typer.Option(
        None, "--latent-channels", min=1,
        help="Channels of the latent variable z. Default: the images' channel count."),
    architecture: str = typer.Option(
        "convex", "--architecture",
        help="convex: a convex lower-level problem (default); leapfrog: a deeper, non-convex "
             "regularizer (a leapfrog network on the filter responses; no convexity guarantee); "
             "unrolled: the paper's baseline, a learned proximal-gradient network (no "
             "regularizer value, no data-fit guarantee)."),
    layers: Optional[int] = typer.Option(
        None, "--layers", min=1,
        help="Leapfrog layers (default 3) or unrolled steps (default 6)."),
    width: int = typer.Option(32, "--width", min=1,
                              help="Channels of each residual CNN (--architecture unrolled)."),
    filters: int = typer.Option(16, "--filters", min=2, help="Regularizer filters (in pairs)."),
    kernel_size: int = typer.Option(5, "--kernel-size", help="Regularizer filter size (odd)."),
    eps: Optional[float] = typer.Option(
        None, "--eps", min=1e-4,
        help="Starting smoothing of the potentials (learned; smaller is closer to exact TV). "
             "Default: 0.001 for tomography, 0.01 for other operators."),
    potential_scales: int = typer.Option(
        1, "--potential-scales", min=1,
        help="Learned mix of this many smoothed norms per filter group (smoothing eps, 4 eps, ...)."),
    dilation_levels: int = typer.Option(
        2, "--dilation-levels", min=1,
        help="Multi-scale filter bank: the filters are split over dilations 1, 2, 4, ..."),
    loss_weights: str = typer.Option(
        "1,0,0", "--loss-weights",
        help="Weights of the loss terms: solution, pre-projection iterate, predicted data "
             "(the paper uses 1,1,1)."),
    cg_iterations: int = typer.Option(50, "--cg-iterations", min=1,
                                      help="CG iterations of the implicit-gradient KKT solve."),
    solver_tolerance: Optional[float] = typer.Option(
        None, "--solver-tolerance", min=1e-8,
        help="Relative change at which a training solve stops (inference uses the model's "
             "1e-4). Default: 0.0003 for sharp models (--eps at most 0.003), else 0.001."),
    solver_iterations: Optional[int] = typer.Option(
        None, "--solver-iterations", min=1,
        help="Iteration cap of each training solve. Default: 300 for sharp models, else 150."),
    max_iterations: int = typer.Option(
        1000, "--max-iterations", min=1,
        help="The model's solver cap, in validation and in drip reconstruct."),
    reweight: Optional[int] = typer.Option(
        None, "--reweight", min=0,
        help="Train (and by default reconstruct) with this many edge-adaptive reweighting "
             "passes after each solve (see drip reconstruct --reweight). Default: 1 for the "
             "convex architecture, 0 for the others."),
    patch_components: Optional[int] = typer.Option(
        None, "--patch-components", min=0,
        help="Fit a mixture of this many Gaussians to the training images' 8x8 patches and "
             "reconstruct with one more pass that adds it to the regularizer, its weight chosen "
             "on the validation split (convex models; 0: none). Default: 80 for convex "
             "models where the training images give 640 patches per component (C = 1; about "
             "230 crops of 64x64), fewer where they give fewer, none below 20. On held-out "
             "photographs 0.10-0.95 dB more (most for inpainting), at 1.5-2.8 times the "
             "reconstruction time (drip reconstruct --patch-weight 0 skips it)."),
    guide_gradient: bool = flag(
        "--guide-gradient",
        help="With reweighting: differentiate through each pass's pixel weights back into the "
             "pass before it (exact where the passes have converged; the earlier ones stop at the "
             "model's looser guide tolerance; default: the weights held constant)."),
    tau: float = typer.Option(1.0, "--tau", help="Discrepancy constant used in training."),
    seed: int = seed_option("Seed of the validation split, the sample order, the noise draws "
                            "and the start's random filters."),
    device: str = DEVICE,
    resume: bool = flag(
        "--resume",
        help="Continue the run in --out exactly: options left out take the run's values "
             "(config.json), given ones must equal them, but for --epochs and --max-minutes, "
             "which may change the run's budget."),
    init: Optional[Path] = typer.Option(
        None, "--init",
        help="Start from this model's weights (run folder or model file) instead of the "
             "untrained start, e.g. to fine-tune a model on your data; its architecture is "
             "used (leave the architecture options out). A grayscale drip model starts a run "
             "on colour images as itself on each channel."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1,
                                            help="Stop after this many optimiser steps (this call)."),
    quiet: bool = QUIET,
    debug: bool = DEBUG,
) -> None:
    """Train a DRIP model on ground-truth images (or the unrolled baseline).

    Bi-level: learns the regularizer and embedding whose constrained solutions best fit the truth.
    """
    from .data import parse_noise_percent
    from .reconstruct import resolve_device
    from .regularizers.model import ModelConfig
    from .training import TrainConfig, Trainer
    from .io import check_folder_writable
    from .io.models import CHECKPOINT_STATE
    from .training.trainer import MIN_DEFAULT_COMPONENTS, unused_settings

    def interrupted(cause: str) -> str:
        if (out / CHECKPOINT_STATE).exists():
            return (f"{cause}; {out} keeps the last checkpoint (written at the end of each "
                    f"epoch): continue with drip train {data} --out {out} --resume")
        return (f"{cause}; no checkpoint yet (one is written at the end of each epoch): "
                "nothing to resume")

    with _errors(debug, interrupted):
        try:
            noise_range = None if noise_percent is None else parse_noise_percent(noise_percent)
        except ValueError as exc:
            raise DripError(f"--noise-percent: {exc}") from exc
        try:
            weights = tuple(float(w) for w in loss_weights.split(","))
        except ValueError:
            raise DripError(f"--loss-weights must be three numbers, as in 1,1,1; "
                            f"got {loss_weights!r}") from None
        check_folder_writable(out)
        config = TrainConfig(data=str(data), out=str(out), epochs=epochs, max_minutes=max_minutes,
                             batch_size=batch_size, lr=lr, lr_schedule=lr_schedule,
                             loss_weights=weights,
                             noise_percent=noise_range, tau=tau,
                             seed=seed, cg_iterations=cg_iterations, max_steps=max_steps,
                             guide_gradient=guide_gradient,
                             **_given_values(train_solver_tolerance=solver_tolerance,
                                             train_solver_iterations=solver_iterations),
                             init=None if init is None else str(init),
                             model=ModelConfig(architecture=architecture, layers=layers or 0,
                                               latent_channels=latent_channels or 0,
                                               n_filters=filters,
                                               kernel_size=kernel_size,
                                               potential_scales=potential_scales,
                                               dilation_levels=dilation_levels, width=width,
                                               max_iterations=max_iterations,
                                               **_given_values(eps=eps, reweight=reweight,
                                                               patch_components=patch_components)))
        config.validate()
        _warn_if_tau_is_low(tau)
        given = _options_given(ctx)
        trainer = Trainer(config, resolve_device(device), resume=resume, given=given,
                          log=(lambda row: None) if quiet else _print_epoch)
        if trainer.operator_defaults and not quiet:
            chosen = ", ".join(f"a {value} embedding" if name == "embedding_boundary"   # no option
                               else f"{_train_option(name)} {value:g}"
                               for name, value in trainer.operator_defaults.items())
            console.print(f"defaults for {trainer.op.kind} data: {chosen}")
            if trainer.operator_defaults.get("patch_components") == 0:
                console.print("no patch mixture: the training images determine fewer than "
                              f"{MIN_DEFAULT_COMPONENTS} components (--patch-components K "
                              "fits K anyway)")
        if trainer.config.noise_percent is None and not quiet:
            from .data import format_noise_percent

            console.print(f"training on the file's own measurements (noise percent "
                          f"{format_noise_percent(*trainer.noise_range)}): "
                          "--noise-percent A:B (say 1:5) draws fresh noise over a range for "
                          "every batch instead, so that the model holds up when the noise "
                          "level changes")
        for why, unused in unused_settings(trainer.config, given).items():
            warning_line(f"{', '.join(map(_train_option, unused))}: {why} (ignored)")
        if len(trainer.val_index) == 0:
            warning_line(f"{data}: one sample, so no validation split: the model kept is the last, "
                         f"not the best by validation PSNR")
        # the bar shows the share of the budget (--epochs, --max-minutes or --max-steps,
        # whichever ends the run first): the epochs' steps alone put a 10-minute run's end
        # hours away
        with progress_bar("train", 1.0, quiet, percent=True) as update:
            trainer.progress = lambda step, fraction, best, stage=None, **_: update(
                fraction, description=_train_status(step, best, stage))
            try:
                result = trainer.fit()
            except OutputError as exc:   # a full disk: say what the run folder still holds
                raise OutputError(interrupted(exc.message), exc.path) from exc
        console.print(key_value_table(f"run {out}", {
            "epochs done": result["epochs_done"], "steps": result["global_step"],
            "best validation PSNR": result["best_val_psnr"], "minutes": result["seconds"] / 60,
            "stopped by time or step limit": result["stopped_early"],
            "model": str(out / "model.safetensors")}))


def _train_status(step: int, best: float, stage: str | None = None) -> str:
    """The train bar's description: what the run does between steps (``stage``), or the step
    and the best validation PSNR so far."""
    if stage is not None:
        return f"train, {stage}"
    shown = f", best validation {best:.2f} dB" if np.isfinite(best) else ""
    return f"train, step {step}{shown}"


def _print_epoch(row: dict) -> None:
    """One line per epoch of drip train (the start has no loss; one sample, no validation)."""
    parts = [] if np.isnan(row["train_loss"]) else [f"loss {row['train_loss']:.4g}"]
    parts.append("no validation" if np.isnan(row["val_psnr"]) else
                 f"validation PSNR {row['val_psnr']:.2f} dB, fit {row['val_fit_fraction']:.2f}")
    if row.get("val_patch_weight") is not None and not np.isnan(row["val_patch_weight"]):
        parts.append(f"patch weight {row['val_patch_weight']:g}")
    console.print(f"epoch {row['epoch']}: {', '.join(parts)}")


class Method(str, Enum):
    drip = "drip"
    cgls = "cgls"
    tv = "tv"
    unrolled = "unrolled"


@command()
def reconstruct(
    measurements: Path = typer.Argument(..., help="Measurement file (HDF5)."),
    out: Path = typer.Option(..., "--out", "-o", help="Reconstruction file to write (HDF5)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m",
                                         help="Run folder or model file (a drip or unrolled model)."),
    method: Optional[Method] = typer.Option(None, "--method", case_sensitive=False,
                                            metavar=choices(Method),
                                            help="drip (learned; needs --model), cgls "
                                            "(discrepancy-stopped CGLS), tv (constrained total "
                                            "variation) or unrolled (the baseline network; needs "
                                            "--model). Default: the model's with --model, else tv."),
    noise_std: Optional[float] = typer.Option(
        None, "--noise-std",
        help="Noise std for every sample (overrides the file's; recorded in the output)."),
    tau: float = typer.Option(1.0, "--tau", help="Discrepancy constant: fit means "
                              "||A u - b|| <= tau sigma sqrt(M)."),
    device: str = DEVICE,
    batch_size: Optional[int] = BATCH_SIZE,
    max_iterations: Optional[int] = MAX_ITERATIONS,
    reweight: Optional[int] = REWEIGHT,
    edge_scale: Optional[float] = EDGE_SCALE,
    patch_weight: Optional[float] = PATCH_WEIGHT,
    any_size: bool = ANY_SIZE,
    each_channel: bool = EACH_CHANNEL,
    max_samples: Optional[int] = typer.Option(
        None, "--max-samples", min=1, help="Reconstruct the first N samples only (to try a "
        "method or a model on part of a large file)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the summary as JSON."),
    quiet: bool = QUIET,
    debug: bool = DEBUG,
) -> None:
    """Reconstruct images from measurements; every sample must fit the data."""
    from .io import check_writable, write_json
    from .methods import CLASSICAL_METHODS
    from .reconstruct import reconstruct_file, resolve_device

    with _errors(debug):
        require_positive("--tau", tau)
        _warn_if_tau_is_low(tau)
        # fail before the model is loaded and anything solved (reconstruct_file checks --out
        # again for library callers; --report is the command's alone)
        inputs = {"the measurement file": measurements, "the model": model}
        check_writable(out, keep=inputs)
        if report is not None:
            check_writable(report, keep={**inputs, "the --out file": out})
        if model is not None and method in (None, Method.drip, Method.unrolled):
            from .methods import LearnedMethod

            chosen = LearnedMethod.load(model)
            if method is not None and chosen.kind != method.value:
                wanted, found = with_article(method.value), with_article(chosen.kind)
                raise DripError(f"--method {method.value} needs {wanted} model; this one is "
                                f"{found} model", model)
        elif method in (Method.drip, Method.unrolled):
            raise DripError(f"--method {method.value} needs --model RUN_DIR (train one with "
                            f"drip train)")
        else:
            chosen = CLASSICAL_METHODS[(method or Method.tv).value]()
            if model is not None:   # a classical method: the model would be loaded for nothing
                warning_line(f"--model: not used by --method {chosen.name} (ignored)")
        if max_iterations is not None:
            chosen.set_max_iterations(max_iterations)
        if reweight is not None or edge_scale is not None:
            if not hasattr(chosen, "set_reweight"):
                raise DripError(f"--reweight and --edge-scale apply to --method drip, not "
                                f"{chosen.name}")
            chosen.set_reweight(reweight, edge_scale)
        if patch_weight is not None:
            if not hasattr(chosen, "set_patch_weight"):
                raise DripError(f"--patch-weight applies to --method drip, not {chosen.name}")
            chosen.set_patch_weight(patch_weight)
        _serve_other_shapes([chosen], any_size, each_channel)
        start = time.perf_counter()
        with progress_bar(f"reconstruct ({chosen.name})", 1, quiet) as update:
            summary = reconstruct_file(measurements, out, chosen, tau=tau, noise_std=noise_std,
                                       batch_size=batch_size, device=resolve_device(device),
                                       progress=update, warn=warning_line,
                                       keep={"the model": model}, max_samples=max_samples)
        summary["seconds_total"] = time.perf_counter() - start
        if report is not None:
            write_json(report, summary)
        console.print(summary_table(f"{summary['method']} on {measurements.name}", [summary]))
        for note in _fit_notes(summary, out, tau):
            console.print(f"[yellow]{note}[/yellow]")


# why a drip solve stops a sample short of its own criterion but at its cap (solvers.drip)
DRIP_STALLED = ("where it stalled, its iterate no longer moving (at very low noise, or on a nearly "
                "flat image)")


def _fit_notes(summary: dict, out: Path, tau: float) -> list[str]:
    """``drip reconstruct``'s notes on the samples that do not fit the data, and on those whose
    solver stopped short of its own criterion, with what each method's user can do about it."""
    notes, method = [], summary["method"]
    unfit, capped = summary["n_unfit"], summary["n_unfit_at_cap"]
    if unfit:
        note = (f"{unfit} sample(s) do not fit the data (converged = false in {out}); the largest "
                f"discrepancy ratio is {summary['discrepancy_ratio_max']:.3g} against tau = "
                f"{tau:g}.")
        which = "All" if capped == unfit else capped
        if method == "unrolled":   # (its --max-iterations is refused: a fixed number of steps)
            note += (" The unrolled network runs its fixed number of steps and does not enforce "
                     "the fit (a drip model or --method tv does).")
        else:
            note += " If the noise level is underestimated, give --noise-std or raise --tau."
            if capped and method == "drip":   # out of reach of its CGLS start (solve_drip)
                from .solvers.drip import CGLS_ITERATIONS

                note += (f" {which} of them were out of reach of the {CGLS_ITERATIONS} CGLS "
                         f"iterations that start and end DRIP's solve.")
            elif capped:
                note += (f" {which} of them stopped at the solver's iteration cap: "
                         f"--max-iterations raises it.")
        notes.append(note)
    if summary["n_stopped_at_cap"]:
        notes.append(f"{summary['n_stopped_at_cap']} sample(s) fit the data but the solver stopped "
                     f"before converging (solver_converged = false in {out}): at its iteration "
                     f"cap (raise it with --max-iterations), or for drip {DRIP_STALLED}.")
    return notes


@command()
def evaluate(
    data: Path = typer.Argument(..., help="Measurement file with ground_truth (HDF5)."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder (created if needed)."),
    model: Optional[list[Path]] = typer.Option(
        None, "--model", "-m", help="Run folder or model file; repeat to compare several "
        "(DRIP or unrolled models)."),
    noise_percent: str = typer.Option("1,2,5,10", "--noise-percent",
                                      help="Comma-separated noise percents to evaluate."),
    methods: Optional[str] = typer.Option(
        None, "--methods", help="Comma-separated subset of drip, cgls, tv, unrolled "
        "(drip and unrolled use the --model files of that kind). Default: cgls, tv and every model."),
    operator_from: Optional[Path] = typer.Option(
        None, "--operator-from", help="Measure with the operator of this file instead (operator "
        "transfer, e.g. a blur model on inpainting)."),
    tau: str = typer.Option("1", "--tau", help="Discrepancy constant; several, comma-separated "
                            "(e.g. 0.95,0.98,1), run every method at each and show each "
                            "method's best."),
    seed: int = seed_option("Seed of the re-simulated noise."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1,
                                              help="Evaluate only the first N images."),
    preview_noise: Optional[float] = typer.Option(
        None, "--preview-noise", help="Noise percent shown in previews.png (default: the "
        "middle level)."),
    reference: Optional[str] = typer.Option(
        None, "--reference", help="The method every other is paired with, sample by sample, "
        "as named in the tables (default: tv, else cgls)."),
    device: str = DEVICE,
    batch_size: Optional[int] = BATCH_SIZE,
    max_iterations: Optional[int] = MAX_ITERATIONS,
    reweight: Optional[int] = REWEIGHT,
    edge_scale: Optional[float] = EDGE_SCALE,
    patch_weight: Optional[float] = PATCH_WEIGHT,
    any_size: bool = ANY_SIZE,
    each_channel: bool = EACH_CHANNEL,
    quiet: bool = QUIET,
    debug: bool = DEBUG,
) -> None:
    """Compare methods across noise levels: PSNR, SSIM, data fit, regularizer values.

    Re-simulates the measurements at each level; writes tables, a plot and previews.
    """
    from .evaluation.report import (best_tau_table, console_table, paired_table,
                                    regularizer_table, write_report)
    from .evaluation.robustness import choose_methods
    from .evaluation.robustness import evaluate as run_evaluation
    from .io import check_folder_writable
    from .reconstruct import resolve_device

    with _errors(debug):
        levels = _positive_numbers(noise_percent, "--noise-percent")
        taus = _positive_numbers(tau, "--tau")
        _warn_if_tau_is_low(min(taus))
        check_folder_writable(out)
        chosen = choose_methods(model or [], None if methods is None else methods.split(","),
                                warn=warning_line)
        drip_models = [m for m in chosen if getattr(m, "kind", None) == "drip"]
        if max_iterations is not None:   # every solver (the unrolled network has none)
            for method in chosen:
                if getattr(method, "kind", None) != "unrolled":
                    method.set_max_iterations(max_iterations)
        if reweight is not None or edge_scale is not None:   # for every drip model compared
            if not drip_models:
                raise DripError("--reweight and --edge-scale apply to drip models (--model)")
            for method in drip_models:
                method.set_reweight(reweight, edge_scale)
        if patch_weight is not None:
            if not drip_models:
                raise DripError("--patch-weight applies to drip models (--model)")
            for method in drip_models:
                method.set_patch_weight(patch_weight)
        _serve_other_shapes(chosen, any_size, each_channel)
        with progress_bar("evaluate", 1, quiet) as update:
            evaluation = run_evaluation(data, chosen, levels, tau=taus, seed=seed,
                                        batch_size=batch_size, device=resolve_device(device),
                                        operator_from=operator_from, max_samples=max_samples,
                                        preview_level=preview_noise,
                                        progress=lambda done, total, what: update(
                                            done, total, f"evaluate, {what}"),
                                        warn=warning_line, reference=reference)
        # the tables first: if the report cannot be written (a full disk), its figures were shown
        console.print(console_table(evaluation))
        for extra in (best_tau_table(evaluation), paired_table(evaluation),
                      regularizer_table(evaluation)):
            if extra is not None:
                console.print(extra)
        for note in _stopped_short(evaluation.rows):
            warning_line(note)
        written = write_report(evaluation, out)
        console.print(f"wrote {', '.join(p.name for p in written)} to {out}")


def _stopped_short(rows: list[dict]) -> list[str]:
    """One line per method of ``drip evaluate``'s rows whose solver stopped at its iteration
    cap on some samples (``n_stopped_at_cap``: they fit the data, but short of the solver's own
    criterion; ``n_unfit_at_cap``: not even that), at which levels: a comparison with such a
    baseline is not with its converged solutions. (A drip model also stops a sample
    ``DRIP_STALLED``.)"""
    short: dict[str, list[str]] = {}
    learned = set()
    for row in rows:
        count = row["n_stopped_at_cap"] + row["n_unfit_at_cap"]
        if count and row.get("base_method") != "unrolled":
            short.setdefault(row["method"], []).append(
                f"{count}/{row['n_samples']} at {row['noise_percent']:g}%")
            if row.get("base_method") == "drip":
                learned.add(row["method"])
    return [f"{method} stopped short of converging on {', '.join(where)} noise: its figures "
            f"there are of unconverged solutions (--max-iterations raises the cap"
            + (f"; or {DRIP_STALLED})" if method in learned else ")")
            for method, where in short.items()]


def summary_table(title: str, summaries: list[dict]) -> Table:
    """One row per summary: quality, data fit, iterations and time."""
    table = titled_table(title)
    columns = [("method", "method"), ("samples", "n_samples"), ("PSNR", "psnr_mean"),
               ("SSIM", "ssim_mean"), ("fit", "fit_fraction"),
               ("max ratio", "discrepancy_ratio_max"), ("mean ratio", "discrepancy_ratio_mean"),
               ("R mean", "regularizer_value_mean"), ("iters", "iterations_mean"),
               ("s/image", "seconds_per_image")]
    for header, _ in columns:
        table.add_column(header, justify="left" if header == "method" else "right")
    for s in summaries:
        table.add_row(*(fmt(s.get(key)) for _, key in columns))
    return table


@command()
def info(
    file: Path = typer.Argument(..., help="A measurement file, reconstruction file, model file "
                                "or training run folder; or an input of simulate and import "
                                "(a .npy array, a picture, a folder of pictures, an HDF5 "
                                "file of images, or FILE.h5::DATASET)."),
    samples: int = typer.Option(10, "--samples", min=0,
                                help="Reconstruction files: rows of the per-sample table."),
    quiet: bool = QUIET,
    debug: bool = DEBUG,
) -> None:
    """Summarize a drip file: measurements, reconstructions or a model.

    Datasets, operator (||A||, adjointness), data fit and PSNR, or a model's metadata. Of an
    array, pictures or an HDF5 file of images: shapes, and how drip scales their values when
    it reads them.
    """
    from .info import (file_kind, input_info, is_input_file, measurement_info, model_info,
                       reconstruction_info)

    with _errors(debug):
        if is_input_file(file):
            with status(f"reading {file.name}", quiet):
                sections = input_info(file)
            for title, rows in sections:
                console.print(key_value_table(title, rows))
            return
        kind = file_kind(file)
        if kind == "measurements":
            with status(f"reading {file.name} (building its operator)", quiet) as say:
                for title, rows in measurement_info(file, say):
                    console.print(key_value_table(title, rows))
            return
        if kind == "model":
            for title, rows in model_info(file):
                console.print(key_value_table(title, rows))
            return
        sections, columns = reconstruction_info(file)
        for title, rows in sections:
            console.print(key_value_table(title, rows))
        shown = [c for c in ("discrepancy_ratio", "relative_residual", "psnr", "ssim",
                             "regularizer_value", "iterations", "converged") if c in columns]
        n = len(next(iter(columns.values()))) if columns else 0
        if samples and n:
            table = titled_table(f"first {min(samples, n)} of {n} samples")
            table.add_column("sample", justify="right")
            for name in shown:
                table.add_column(name.replace("_", " "), justify="right")
            for i in range(min(samples, n)):
                table.add_row(str(i), *(fmt(columns[c][i].item()) for c in shown))
            console.print(table)


class ImageDataset(str, Enum):
    reconstructions = "reconstructions"
    ground_truth = "ground_truth"
    measurements = "measurements"


@command()
def export(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="A reconstruction or measurement file."),
    out: Path = typer.Argument(..., help="Folder for the PNG files (made if needed), NAME.png "
                               "for a single image (one sample, or --max-samples 1), a .npy "
                               "file for the whole dataset as one array, or a .tif file for "
                               "grayscale images or sinograms as a stack of float pages."),
    dataset: Optional[ImageDataset] = typer.Option(
        None, "--dataset", metavar=choices(ImageDataset),
        help="What to write. Default: a reconstruction file's "
        "reconstructions, a measurement file's ground_truth. Measurements as PNG files where "
        "they are images (denoise, blur, inpainting), as a TIFF where they have two axes "
        "(sinograms too), as a .npy array for any operator."),
    bits: int = typer.Option(8, "--bits", help="PNG: 8, or 16 for grayscale images (drip "
                             "simulate reads either back)."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1,
                                              help="Write the first N samples only."),
    quiet: bool = QUIET,
    debug: bool = DEBUG,
) -> None:
    """Write a drip file's images as PNG files, a TIFF stack, or a dataset as a .npy array.

    PNG intensities are clipped to [0, 1]; the folder gets every file or none, and a name
    ending in .png one image. A .npy array keeps the values as stored, shaped (N, C, ...); so
    does a TIFF (.tif, .tiff), a 32-bit float page per grayscale image or sinogram, as ImageJ /
    Fiji reads a stack.
    """
    from .export import BITS, export_array, export_pngs, export_tiff

    if bits not in BITS:
        raise typer.BadParameter(f"{bits} is not one of {', '.join(map(str, BITS))}",
                                 param_hint="'--bits'")
    name = None if dataset is None else dataset.value
    with _errors(debug):
        suffix = out.suffix.lower()
        one_file = {".npy": "a .npy array", ".tif": "a TIFF", ".tiff": "a TIFF"}
        if suffix in one_file and "bits" in _given_parameters(ctx):
            warning_line(f"--bits: {one_file[suffix]} keeps the values as stored (ignored)")
        if suffix in (".tif", ".tiff"):
            with progress_bar(f"writing {out.name}", 0, quiet) as update:
                summary = export_tiff(file, out, name, max_samples, progress=update)
            console.print(key_value_table(f"wrote {summary['pages']} samples as one TIFF", {
                "file": summary["file"],
                "dataset": summary["dataset"],
                "page shape (rows, columns)": str(tuple(summary["page shape"])),
                "values": "32-bit float, as stored",
            }))
            return
        if suffix == ".npy":
            with progress_bar(f"writing {out.name}", 0, quiet) as update:
                summary = export_array(file, out, name, max_samples, progress=update)
            console.print(key_value_table(f"wrote {summary['shape'][0]} samples as one array", {
                "file": summary["file"],
                "dataset": summary["dataset"],
                "shape (N, C, ...)": str(summary["shape"]),
                "dtype": summary["dtype"],
            }))
            return
        with progress_bar(f"writing {out.name or out}", 0, quiet) as update:
            summary = export_pngs(file, out, name, bits, max_samples, progress=update)
        files = summary["files"]
        console.print(key_value_table(f"wrote {len(files)} PNG file{'s' * (len(files) > 1)}", {
            "folder": summary["folder"],
            "dataset": summary["dataset"],
            "files": files[0] if len(files) == 1 else f"{files[0]} ... {files[-1]}",
            "bits": str(bits),
            "channels": "1 (grayscale)" if summary["channels"] == 1 else "3 (colour)",
            "clipped to [0, 1]": f"{100 * summary['clipped']:.2f}% of values",
        }))


def main() -> None:
    app()
