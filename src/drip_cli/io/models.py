"""Model files: weights in ``safetensors`` (no pickle), metadata as JSON in the same header.

A model file records the model config, the operator kind and image shape it was trained for, the
training noise range, a hash of the training data and the drip version. ``--model`` accepts the
file itself or a training run folder (which holds ``model.safetensors``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .. import __version__
from ..errors import DripError, is_finite_number, require_regular_file
from ..regularizers.model import ModelConfig, build_model
from .atomic import write_bytes

MODEL_FILE = "model.safetensors"
# what drip train keeps beside the model in a run folder: the checkpoint it resumes from (not
# models themselves), the validation history and the run's settings
CHECKPOINT_WEIGHTS = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint_state.pt"
HISTORY = "history.csv"
CONFIG = "config.json"


@dataclass
class ModelInfo:
    """What a model file says about the model besides its weights."""

    config: ModelConfig
    operator_kind: str
    image_shape: tuple[int, int, int]
    noise_percent: tuple[float, float]
    training_data_sha256: str = ""
    drip_version: str = __version__
    extra: dict = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        return {"drip_format": "model", "format_version": "1",
                "config": json.dumps(self.config.to_dict()), "operator_kind": self.operator_kind,
                "image_shape": json.dumps(list(self.image_shape)),
                "noise_percent": json.dumps(list(self.noise_percent)),
                "training_data_sha256": self.training_data_sha256,
                "drip_version": self.drip_version, "extra": json.dumps(self.extra)}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> ModelInfo:
        """Read the header's entries, checking each (``ValueError`` names the one that is wrong)."""
        image_shape = json.loads(meta["image_shape"])
        if not (isinstance(image_shape, list) and len(image_shape) == 3
                and all(is_finite_number(v) and v == int(v) and v >= 1 for v in image_shape)):
            raise ValueError(f"image_shape {meta['image_shape']} is not [C, H, W]")
        noise = json.loads(meta["noise_percent"])
        if not (isinstance(noise, list) and len(noise) == 2 and all(is_finite_number(v) for v in noise)):
            raise ValueError(f"noise_percent {meta['noise_percent']} is not [low, high]")
        extra = json.loads(meta.get("extra", "{}"))
        if not isinstance(extra, dict):
            raise ValueError("extra is not a JSON object")
        return cls(config=ModelConfig.from_dict(json.loads(meta["config"])),
                   operator_kind=meta["operator_kind"],
                   image_shape=tuple(int(v) for v in image_shape),
                   noise_percent=tuple(float(v) for v in noise),
                   training_data_sha256=meta.get("training_data_sha256", ""),
                   drip_version=meta.get("drip_version", ""), extra=extra)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def save_model(path: str | os.PathLike, model: torch.nn.Module, info: ModelInfo) -> None:
    """Write ``model`` atomically as safetensors with ``info`` in the header."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_bytes({path: save(tensors, metadata=info.to_metadata())})


def folder_holds(folder: Path, suffixes: tuple[str, ...]) -> str:
    """``: it holds a.h5, b.h5, ... (give one of them)``, naming the first few files of
    ``folder`` with one of ``suffixes`` (a run's checkpoints left out: they are not models),
    or nothing where it holds none: the hint where a folder was given for a file (``--model
    sample_data/``)."""
    try:
        names = sorted(p.name for p in folder.iterdir() if p.suffix in suffixes and p.is_file()
                       and p.name not in (CHECKPOINT_WEIGHTS, CHECKPOINT_STATE))
    except OSError:   # a folder that cannot be listed: no hint
        return ""
    if not names:
        return ""
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f": it holds {shown} (give one of them)"


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The model file that ``path`` names: itself, or a run folder's ``model.safetensors``.
    A folder without one (its model files named, if it has others), and the checkpoint files
    beside it, are refused by name."""
    path = Path(path)
    if path.is_dir():
        if not (path / MODEL_FILE).exists():
            raise DripError(f"a folder without {MODEL_FILE} (expected a drip train run folder "
                            "or a .safetensors model file)"
                            + folder_holds(path, (".safetensors",)), path)
        path = path / MODEL_FILE
    if not path.exists():
        raise DripError("no such model file (expected a run folder or a .safetensors file)", path)
    require_regular_file(path, "a run folder or a .safetensors model file")
    if path.name in (CHECKPOINT_WEIGHTS, CHECKPOINT_STATE):
        raise DripError(f"a training checkpoint, which drip train --resume reads, not a model: "
                        f"give the run folder or its {MODEL_FILE}", path)
    return path


@contextlib.contextmanager
def run_folder_lock(folder: Path):
    """Hold a ``drip train`` run folder for this process while the block runs, or refuse it,
    naming it, when another process holds it. An advisory ``flock`` on the folder itself:
    nothing is written, and the system releases it when the process ends, however it ends.
    Where the file system has no such locks the run goes on unguarded."""
    handle = _try_lock(folder)
    if handle is False:
        raise DripError("is in use by another drip train, running now: wait for it to end, "
                        "or choose another --out", folder)
    try:
        yield
    finally:
        if handle is not None:
            os.close(handle)


def run_in_progress(folder: Path) -> bool:
    """Whether a ``drip train`` runs in ``folder`` now (holds its lock)."""
    handle = _try_lock(folder)
    if handle is not None and handle is not False:   # a descriptor, 0 included
        os.close(handle)
    return handle is False


def _try_lock(folder: Path):
    """A descriptor of ``folder`` holding its lock; ``False`` when another process holds it;
    ``None`` where locks cannot be taken (not a POSIX system, or a file system without them)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:   # not readable: no lock to take
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return handle
    except BlockingIOError:
        os.close(handle)
        return False
    except OSError:
        os.close(handle)
        return None


def weights_problem(weights: dict[str, torch.Tensor]) -> str | None:
    """Why these tensors cannot be a model's weights (integers would be copied into its float
    parameters as they are: an all-zero embedding that fits no data), or None."""
    for test, what in ((torch.Tensor.is_floating_point, "are not floating-point"),
                       (lambda w: bool(torch.isfinite(w).all()), "contain NaN or Inf")):
        failing = sorted(name for name, w in weights.items() if not test(w))
        if failing:
            return f"weights {', '.join(failing)} {what}"
    return None


def load_model(path: str | os.PathLike) -> tuple[torch.nn.Module, ModelInfo, str]:
    """Load a model (DRIP or unrolled) without pickle; returns ``(model, info, sha256 of the file)``."""
    path = resolve_model_path(path)
    if path.is_file() and h5py.is_hdf5(path):   # a measurement or reconstruction file
        raise DripError("is an HDF5 file, not a model (--model and --init take a run folder or "
                        "its model.safetensors)", path)
    try:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
        except SafetensorError as exc:
            raise DripError(f"not a readable safetensors model file ({exc})", path) from exc
        if meta.get("drip_format") != "model":
            raise DripError("not a drip model file (no drip_format = model in its header)", path)
        info = ModelInfo.from_metadata(meta)
        model = build_model(info.config)
        height, width = info.image_shape[1:]
        if model.reach > min(height, width):   # as drip train refuses to make
            raise DripError(f"the model's filters reach {model.reach} pixels, more than its "
                            f"{height}x{width} images hold (kernel_size, dilation_levels)", path)
        weights = load_file(str(path))
        problem = weights_problem(weights)
        if problem is not None:
            raise DripError(f"the model's {problem}", path)
        model.load_state_dict(weights)
    except DripError:
        raise
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
        raise DripError(f"cannot load model ({exc})", path) from exc
    return model.eval(), info, file_sha256(path)
