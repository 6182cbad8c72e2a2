"""What ``drip info`` knows about a file: a few titled sections of key/value pairs."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import h5py
import numpy as np
import torch

from .data.axis import estimate_axis
from .errors import DripError, require_regular_file
from .io import MeasurementFile, read_reconstruction_file
from .io.datasets import (DATASET_SEPARATOR, is_hdf5_file, listed_datasets, names_dataset,
                          open_dataset, split_dataset)
from .io.measurements import file_format, not_hdf5, open_failure, reading
from .io.models import (CHECKPOINT_STATE, CHECKPOINT_WEIGHTS, CONFIG, HISTORY, MODEL_FILE,
                        folder_holds, resolve_model_path, run_in_progress)
from .operators import adjointness_error, estimate_norm
from .solvers import LINALG_FAILURES


def _range(values: np.ndarray) -> str:
    """``"min .. max (mean m)"`` of the finite values, one value where they all agree to the
    digits shown, ``"-"`` where there are none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return "-"
    span = _span(values.min(), values.max())
    return span if ".." not in span else f"{span} (mean {values.mean():.4g})"


def _span(low: float, high: float) -> str:
    """``"low .. high"``, or one value where the two agree to the digits shown."""
    low, high = f"{low:.4g}", f"{high:.4g}"
    return low if low == high else f"{low} .. {high}"


def operator_section(op) -> dict:
    """The operator's parameters plus a measured ``||A||`` and adjointness error (float64)."""
    norm = estimate_norm(op, keep_conversions=True)   # the float64 test below uses them
    section = {k: (str(v) if isinstance(v, (list, tuple)) else v) for k, v in op.describe().items()}
    section["measured entries M"] = op.measured_count
    section["||A|| (power iteration)"] = f"{norm:.6g}"
    for dtype in (torch.float64, torch.float32):
        error = adjointness_error(op, dtype=dtype, norm=norm)
        section[f"adjointness error ({str(dtype)[6:]})"] = f"{error:.2e}"
    return section


def measurement_info(path: Path, say=lambda message: None):
    """The file's sections as they are ready: its datasets once it is open (and its operator
    built), then the operator with its measured norm and adjointness, which take a while for a
    large matrix. ``say(message)`` hears what is being done."""
    with MeasurementFile(path, noise_levels="optional") as data, reading(path):
        handle = data._handle
        general = {"format": "drip measurements v1", "samples": data.n_samples,
                   "image shape (C, H, W)": str(data.image_shape),
                   "measurement shape": str(data.operator.measurement_shape),
                   "ground truth": "yes" if data.has_ground_truth else "no",
                   "noise std": ("not stored (reconstruct needs --noise-std)"
                                 if data.noise_std is None else _range(data.noise_std))}
        if "noise_percent" in handle:
            general["noise percent"] = _range(handle["noise_percent"][()])
        for key, value in handle.attrs.items():
            if key not in ("drip_format", "format_version"):
                general[key] = str(_attribute(value))
        yield f"{path.name}", general
        say(f"measuring the {data.operator.kind} operator's norm and adjointness")
        section = operator_section(data.operator)
        if data.operator.kind == "tomography":   # where the data put the axis: a check
            with reading(path):   # every sinogram, as import estimates it, a block at a time
                estimate = estimate_axis(handle["measurements"], data.operator.angles_deg)
            section["center offset, from the sinograms"] = (
                f"not estimated: {estimate}" if isinstance(estimate, str) else
                estimate.describe())
        yield "operator", section


def _attribute(value):
    """An HDF5 attribute as shown: text decoded, arrays as lists (``[1, 64, 64]``, not numpy's
    ``[ 1 64 64]``), anything else as it is."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def reconstruction_info(path: Path) -> tuple[list[tuple[str, dict]], dict[str, np.ndarray]]:
    attrs, columns = read_reconstruction_file(path)
    general = {"format": "drip reconstructions v1"}
    for key, value in attrs.items():
        if key not in ("drip_format", "format_version"):
            value = _attribute(value)
            general[key] = str(value) if not isinstance(value, (int, float, np.floating)) else value
    tau = float(attrs.get("tau", 1.0))
    stats = {}
    if "discrepancy_ratio" in columns:
        ratio = columns["discrepancy_ratio"]
        stats["fit fraction (ratio <= tau)"] = f"{np.mean(ratio <= tau):.3f}"
        stats["discrepancy ratio"] = _range(ratio)
    # (each sample's seconds are its batch's wall time shared out: one figure per batch)
    for name, label in (("psnr", "psnr"), ("ssim", "ssim"),
                        ("regularizer_value", "regularizer value"), ("iterations", "iterations"),
                        ("seconds", "seconds per image")):
        if name in columns:
            stats[label] = _range(columns[name])
    return [(path.name, general), ("per-sample summary", stats)], columns


def model_info(path: Path) -> list[tuple[str, dict]]:
    """A model file or run folder: its header metadata and a few derived figures."""
    from .data import format_noise_percent
    from .io.models import load_model, resolve_model_path

    model, info, sha = load_model(path)
    general = {"format": "drip model v1 (safetensors)", "file": str(resolve_model_path(path)),
               "sha256": sha, "operator kind": info.operator_kind,
               "image shape (C, H, W)": str(tuple(info.image_shape)),
               "other images": _other_images(model, info, sha),
               "training noise percent": format_noise_percent(*info.noise_percent),
               "training data sha256": info.training_data_sha256 or "-",
               "drip version": info.drip_version,
               "architecture": info.config.architecture,
               "parameters": sum(p.numel() for p in model.parameters())}
    if not info.config.is_unrolled:
        general["Lipschitz bound of grad R"] = _lipschitz_bounds(model, info.image_shape)
    general.update({k: _shown(v) for k, v in info.extra.items()})
    unused = info.config.unused_fields()
    config = {k: v for k, v in info.config.to_dict().items() if k not in unused}
    sections = [(Path(path).name, general), ("config", config)]
    if Path(path).is_dir():
        sections.insert(1, ("training run", run_section(Path(path))))
    return sections


def _other_images(model, info, sha: str) -> str:
    """How the model serves images of another shape (drip reconstruct and evaluate)."""
    from .methods import LearnedMethod

    smallest, needs = LearnedMethod(model, info, sha).smallest_side()
    ways = [f"other sizes with --any-size (at least {smallest}x{smallest}, for its {needs})"]
    if not info.config.is_unrolled and model.widens_per_channel:
        ways.append("colour with --each-channel, or train on colour from it with drip train "
                    "--init")
    return "; ".join(ways)


def run_section(folder: Path) -> dict:
    """What a ``drip train`` run folder says besides its model: the data and budget of
    ``config.json``, the validations of ``history.csv``, and whether it can be resumed. A file
    that cannot be read is shown as such; the model itself was read already."""
    section: dict = {}
    try:
        config = json.loads((folder / CONFIG).read_text())
        section["data"] = str(config["data"])
        epochs = config.get("epochs")
        budget = [f"{epochs} epoch{'s' * (epochs != 1)}" if epochs is not None else None,
                  f"{config['max_minutes']:g} minutes" if config.get("max_minutes") is not None
                  else None]
        section["budget"] = " or ".join(b for b in budget if b) or "-"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        section[CONFIG] = f"unreadable ({type(exc).__name__}: {exc})"
        config = None
    try:
        with open(folder / HISTORY, newline="") as handle:
            rows = list(csv.DictReader(handle))
        last = rows[-1]
        section["validations"] = (f"{len(rows)} rows, the last at step {last['step']} "
                                  f"({float(last['seconds']) / 60:.3g} minutes): "
                                  f"PSNR {float(last['val_psnr']):.4g} dB")
    except (OSError, ValueError, KeyError, TypeError, IndexError, csv.Error) as exc:
        section[HISTORY] = f"unreadable ({type(exc).__name__}: {exc})"
    if run_in_progress(folder):
        section["resume"] = "a drip train runs in this folder now"
    elif (folder / CHECKPOINT_STATE).exists() and (folder / CHECKPOINT_WEIGHTS).exists():
        data = config["data"] if config else "DATA.h5"
        section["resume"] = f"drip train {data} --out {folder} --resume"
        try:
            state = torch.load(folder / CHECKPOINT_STATE, weights_only=True)
            minutes = config.get("max_minutes") if config else None
            if (config and state["epoch"] >= config["epochs"]
                    or minutes is not None and state["elapsed"] >= 60 * minutes):
                section["resume"] += (" (its budget is spent: give a larger --epochs or "
                                      "--max-minutes)")
        except Exception:  # noqa: BLE001 -- only the hint is lost; --resume says what is wrong
            pass
    else:
        section["resume"] = "no checkpoint (written at the end of each epoch)"
    return section


def _shown(value) -> str:
    """A header entry as text, a decimal fraction to 6 significant digits (``val_psnr`` is
    stored with all of float64's)."""
    text = str(value)
    if "." not in text:
        return text
    try:
        return f"{float(text):.6g}"
    except ValueError:
        return text


def _lipschitz_bounds(model, image_shape) -> str:
    """The bound the solver steps by on the model's images, and the one for any size (convex
    regularizers; the leapfrog variant has none and backtracks)."""
    regularizer = model.regularizer
    if not regularizer.convex:
        return "none (non-convex: the solver backtracks)"
    shape = (model.embedding.latent_channels, *image_shape[1:])
    try:
        with torch.no_grad():
            own = float(regularizer.curvature_and_lipschitz_bound(shape=shape)[1])
            anywhere = float(regularizer.lipschitz_bound())
    except LINALG_FAILURES:
        # (drip reconstruct refuses such a model: "the model's weights are out of range")
        return "not finite: the weights overflow the arithmetic"
    return f"{own:.4g} at {'x'.join(map(str, image_shape[1:]))} (any size: {anywhere:.4g})"


def file_kind(path: str | os.PathLike) -> str:
    """``measurements``, ``reconstructions`` or ``model`` (raises :class:`DripError` otherwise)."""
    path = Path(path)
    if not path.exists():
        raise DripError("no such file", path)
    require_regular_file(path, "a drip file or a run folder")
    if path.is_dir() and not (path / MODEL_FILE).exists():   # a folder of drip files, say
        raise DripError(f"a folder without {MODEL_FILE} (expected a drip file, a drip train run "
                        "folder or a folder of pictures)"
                        + folder_holds(path, (".h5", ".hdf5", ".safetensors")), path)
    if path.is_dir() or path.suffix == ".safetensors" or path.name == CHECKPOINT_STATE:
        resolve_model_path(path)   # refuses checkpoints
        return "model"
    if path.stat().st_size == 0:
        raise DripError("an empty file", path)
    if not h5py.is_hdf5(path):
        raise not_hdf5(path, "not a file drip knows (measurements, reconstructions or a model)")
    try:
        with h5py.File(path, "r") as handle, reading(path):
            fmt = file_format(handle)
            datasets = listed_datasets(handle) if fmt is None else ""
            scan = _data_exchange_import(handle, path.name) if fmt is None else None
    except OSError as exc:
        raise open_failure(exc, path) from exc
    if fmt is None:
        hint = (f"; a scan in the Data Exchange layout, which drip import reads: {scan}" if scan
                else f"; its datasets: {datasets} (drip import reads one as "
                     f"{path.name}{DATASET_SEPARATOR}DATASET)" if datasets else "")
        raise DripError("not a drip file (it has no drip_format attribute), nor images that drip "
                        "simulate reads (it has no 'images' or 'ground_truth' dataset)" + hint,
                        path)
    if fmt not in ("measurements", "reconstructions"):
        raise DripError(f"unknown drip_format {fmt!r} (expected measurements or reconstructions)", path)
    return fmt


def _data_exchange_import(handle: h5py.File, name: str) -> str | None:
    """The ``drip import`` command of a scan stored in the Data Exchange layout (projections
    ``exchange/data``, with its angles ``exchange/theta`` and flat and dark fields where it
    has them), or None for another file."""
    def has(dataset: str) -> bool:
        return isinstance(handle.get(f"exchange/{dataset}"), h5py.Dataset)

    if not has("data"):
        return None
    sep = DATASET_SEPARATOR
    parts = [f"drip import {name}{sep}exchange/data OUT.h5 --operator tomography --projections"]
    if has("theta"):
        parts.append(f"--angle-file {name}{sep}exchange/theta")
    if has("data_white"):
        parts.append(f"--flat {name}{sep}exchange/data_white")
        if has("data_dark"):
            parts.append(f"--dark {name}{sep}exchange/data_dark")
    return " ".join(parts) + " --center-offset auto --estimate-noise"


_STORED_AS = {"uint8": "8-bit integers", "uint16": "16-bit integers", "float32": "32-bit floats"}
_INPUT_USE = ("drip import makes a measurement file of measurements you took; drip simulate "
              "measures true images")


def _is_image_stack(path: Path) -> bool:
    """Whether ``path`` is an HDF5 file of images for ``drip simulate``: no ``drip_format``,
    and an ``images`` or ``ground_truth`` entry."""
    from .data.sources import IMAGE_STACKS

    if not is_hdf5_file(path):
        return False
    try:
        with h5py.File(path, "r") as handle:
            return file_format(handle) is None and any(name in handle for name in IMAGE_STACKS)
    except OSError:   # unreadable or damaged: file_kind says what is wrong with it
        return False


def is_input_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an input that ``drip simulate`` or ``drip import`` reads rather than
    a drip file: a ``.npy`` array, a picture, a folder of pictures (not a run folder), an HDF5
    file of images, or a dataset of any HDF5 file (``FILE::DATASET``)."""
    from .data.sources import IMAGE_SUFFIXES
    from .io.models import MODEL_FILE

    path = Path(path)
    if path.is_dir():
        try:
            return (not any((path / name).exists() for name in (MODEL_FILE, CONFIG, HISTORY))
                    and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()))
        except OSError:   # not readable: file_kind says what is wrong with it
            return False
    return (path.suffix.lower() in (".npy", *IMAGE_SUFFIXES) or names_dataset(path)
            or _is_image_stack(path))


def _read_as(dtype) -> str:
    """How drip reads stored values of ``dtype`` (``data.sources.UNIT_SCALE``), in words."""
    from .data.sources import UNIT_SCALE

    scale = UNIT_SCALE.get(np.dtype(dtype))
    return "as they are" if scale is None else f"divided by {scale:g}, to [0, 1]"


def _value_range(blocks) -> tuple[str, int]:
    """``"low .. high"`` (one value where they agree to the digits shown, ``"-"`` where there
    are none) of the finite values of the arrays ``blocks`` as drip reads them
    (uint8 and uint16 scaled), and how many values are not finite; one block at a time, so
    that a memory-mapped array is never copied whole."""
    from .data.sources import UNIT_SCALE

    low, high, bad = np.inf, -np.inf, 0
    for block in blocks:
        block = np.asarray(block)
        finite = np.isfinite(block)
        bad += int(block.size - np.count_nonzero(finite))
        if finite.any():
            scale = UNIT_SCALE.get(block.dtype, 1.0)
            low = min(low, float(block[finite].min()) / scale)
            high = max(high, float(block[finite].max()) / scale)
    return ("-" if low > high else _span(low, high)), bad


def _array_info(values, what: str, use: str) -> dict:
    """The rows of an array (a memory-mapped ``.npy`` or an HDF5 dataset), read 64 samples at a
    time."""
    blocks = (values[i:i + 64] for i in range(0, len(values), 64)) if values.ndim else [values]
    value_range, bad = _value_range(blocks)
    return {"format": what, "shape": str(values.shape), "dtype": str(values.dtype),
            "values read": _read_as(values.dtype), "values as read": value_range,
            "NaN or Inf": str(bad), "drip": use}


def input_info(path: Path) -> list[tuple[str, dict]]:
    """What ``drip simulate`` and ``drip import`` read from ``path`` (a ``.npy`` array, a
    picture, a folder of pictures, an HDF5 file of images, or ``FILE::DATASET``): shapes, how
    the stored values are scaled, and their range as read."""
    from .data.simulate import read_npy
    from .data.sources import (PICTURE_KINDS, PICTURES, image_file_dataset, iter_pictures,
                               picture_paths)

    path = Path(path)
    if names_dataset(path):
        handle, values = open_dataset(path, "values")
        file, name = split_dataset(path)
        with handle, reading(file):
            return [(f"{file.name}{DATASET_SEPARATOR}{name}",
                     _array_info(values, f"HDF5 dataset ({values.ndim} axes)", _INPUT_USE))]
    if not path.exists():
        raise DripError("no such file or folder", path)
    require_regular_file(path, f"a .npy array, a {PICTURES} picture or a folder of them")
    if path.suffix.lower() == ".npy":
        values = read_npy(path, "an array", mmap=True)
        return [(path.name, _array_info(values, ".npy array (read without pickle)", _INPUT_USE))]
    if is_hdf5_file(path):
        handle, images = image_file_dataset(path)   # refuses what simulate would refuse
        try:
            with reading(path):
                return [(path.name, _array_info(
                    images, f"HDF5 images (dataset '{images.name.lstrip('/')}'; no drip_format)",
                    "drip simulate measures them"))]
        finally:
            handle.close()
    files = picture_paths(path)
    seen = []   # each frame's (shape, dtype), noted as the frames pass one at a time

    def frames():
        for f in files:
            for frame in iter_pictures(f, finite=False):
                seen.append((frame.shape, frame.dtype))
                yield frame

    value_range, bad = _value_range(frames())
    sizes = sorted({shape[:2] for shape, _ in seen})
    dtypes = sorted({str(dtype) for _, dtype in seen})
    kinds = sorted({PICTURE_KINDS[f.suffix.lower()] for f in files})
    shown = ", ".join(f"{h}x{w}" for h, w in sizes[:4]) + (" ..." if len(sizes) > 4 else "")
    return [(path.name, {
        "format": (f"folder of {len(files)} pictures ({', '.join(kinds)})" if path.is_dir()
                   else f"{kinds[0]} picture"),
        "images": str(len(seen)) + (" (the pages of multi-page files)"
                                    if len(seen) > len(files) else ""),
        "size (H x W)": shown + (", of several sizes: drip simulate takes crops (--crop-size)"
                                 if len(sizes) > 1 else ""),
        "channels": " and ".join(sorted({"3 (colour)" if len(shape) == 3 else "1 (grayscale)"
                                         for shape, _ in seen})),
        "stored as": ", ".join(_STORED_AS[d] for d in dtypes),
        "values read": (_read_as(dtypes[0]) if len(dtypes) == 1 else
                        "; ".join(f"{_STORED_AS[d]} {_read_as(d)}" for d in dtypes)),
        "values as read": value_range,
        "NaN or Inf": str(bad),
        "drip": _INPUT_USE,
    })]
