"""Where ``drip simulate`` gets its ground-truth images.

``IMAGES`` may be

- an HDF5 file with a dataset ``images`` or ``ground_truth`` (or the dataset that
  ``FILE.h5::DATASET`` names) shaped ``(N, H, W)`` or ``(N, C, H, W)``, of floats or integers
  (uint8 and uint16 are scaled to [0, 1]; other values are kept, and simulate warns about
  values outside [0, 1]);
- a ``.npy`` array (``numpy.save``, read without pickle and memory-mapped) shaped ``(H, W)``,
  ``(N, H, W)`` or ``(N, C, H, W)``, its values as an HDF5 file's (``drip export OUT.npy``
  writes such arrays);
- a PNG, JPEG or TIFF picture, or a folder of them (8-bit, or 16-bit grayscale, scaled by
  65535; 32-bit float TIFFs kept as they are); every frame of a multi-page TIFF is an image;
- ``phantom:ellipses`` (random ellipses) or ``phantom:shepp-logan``;
- ``skimage:NAME[,NAME...]`` photographs bundled with scikit-image (``skimage:photos`` = all of
  the natural photographs below), read from the installed package, never downloaded.

Images that are not all of one size need ``crop_size``: random crops are then taken
(``crops_per_image`` of them per image). Colour is converted to grayscale for ``channels = 1``
(ITU-R 601 luma) and grayscale is repeated for ``channels = 3``.
"""

from __future__ import annotations

import numbers
import os
import struct
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import DripError, require_regular_file
from ..io.datasets import is_hdf5_file, names_dataset, open_dataset, split_dataset
from ..io.measurements import first_sample_where
from .phantoms import random_ellipses, shepp_logan

# the pictures drip reads, by suffix; IMAGE_SUFFIXES and the messages' PICTURES come from it
PICTURE_KINDS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}
IMAGE_SUFFIXES = set(PICTURE_KINDS)
_KINDS = list(dict.fromkeys(PICTURE_KINDS.values()))
PICTURES = f"{', '.join(_KINDS[:-1])} or {_KINDS[-1]}"   # "PNG, JPEG or TIFF"
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "grass",
                  "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle_left",
                  "motorcycle_right", "page", "retina", "rocket", "text", "microaneurysms")
_SKIMAGE_FILES = {"immunohistochemistry": "ihc.png", "hubble_deep_field": "hubble_deep_field.jpg",
                  "retina": "retina.jpg", "rocket": "rocket.jpg"}


@dataclass
class SourceOptions:
    channels: int = 1
    image_size: int = 64            # phantoms: side of the generated images
    num_images: int = 64            # phantoms: how many
    crop_size: int | None = None    # photographs: crop side (None: use whole images)
    crops_per_image: int = 8

    def __post_init__(self):
        """``ValueError`` for settings no image has (the CLI's options are bounded already):
        ``crop_size=0`` from Python said its crops "were all black"."""
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        for name in ("image_size", "num_images", "crop_size", "crops_per_image"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, numbers.Integral) and value >= 1
                                          and not isinstance(value, bool)):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


# the datasets of an HDF5 file of images that drip simulate reads, the first found
IMAGE_STACKS = ("images", "ground_truth")
# the unsigned integer images that are scaled to [0, 1] (pictures and HDF5 images alike);
# other values are kept as they are
UNIT_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def _as_float32(values: np.ndarray, scaled: bool = True) -> np.ndarray:
    """Image values as float32: uint8 and uint16 scaled to [0, 1] (``UNIT_SCALE``) unless not
    ``scaled`` (a detector's counts), others kept."""
    scale = UNIT_SCALE.get(values.dtype) if scaled else None
    values = values.astype(np.float32)
    return values if scale is None else values / np.float32(scale)


def _to_channels(image: np.ndarray, channels: int, scaled: bool = True) -> np.ndarray:
    """``(H, W)``, ``(H, W, 3|4)`` or ``(C, H, W)`` -> ``(channels, H, W)`` float32 in [0, 1]
    (its values as they are, not ``scaled``: :func:`_as_float32`)."""
    image = _as_float32(np.asarray(image), scaled)
    if image.ndim == 3 and image.shape[-1] in (3, 4) and image.shape[0] not in (1, 3):
        image = np.moveaxis(image[..., :3], -1, 0)
    if image.ndim == 2:
        image = image[None]
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 3 and channels == 1:
        return (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]
    if image.shape[0] == 1 and channels == 3:
        return np.repeat(image, 3, axis=0)
    raise ValueError(f"cannot convert {image.shape[0]} channels to {channels}")


# A crop that is black everywhere is drawn again, at most this many times (see _crops).
CROP_DRAWS = 100


def _crops(images: list[np.ndarray], options: SourceOptions, rng: np.random.Generator,
           source: str) -> np.ndarray:
    """The pictures themselves (all of one size) or ``crops_per_image`` random crops of each.
    A crop that is black everywhere is drawn again: its measurements would be zero, and so its
    noise level, a percent of them (CONTRACT.md), which simulate refuses by the image's index,
    an index the user cannot leave out of a crop source. A picture with no crop other than
    black in ``CROP_DRAWS`` draws is refused. Where no crop is black, the draws are those of
    one crop each, so a seed gives the crops it always gave."""
    if options.crop_size is None:
        shapes = {im.shape for im in images}
        if len(shapes) != 1:
            raise DripError("images differ in size; choose --crop-size to take crops", source)
        return np.stack(images)
    size = options.crop_size
    out = []
    for image in images:
        _, h, w = image.shape
        if h < size or w < size:
            raise DripError(f"an image of size {h}x{w} is smaller than --crop-size {size}", source)
        for _ in range(options.crops_per_image):
            for _ in range(CROP_DRAWS):
                i, j = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
                crop = image[:, i:i + size, j:j + size]
                if crop.any():
                    break
            else:
                raise DripError(f"{CROP_DRAWS} random crops of {size}x{size} of picture "
                                f"{len(out) // options.crops_per_image} were all black "
                                "(they measure nothing): choose a larger --crop-size or leave "
                                "the picture out", source)
            out.append(crop)
    return np.stack(out)


# Pillow's modes for 16-bit grayscale (PNG, TIFF): converting them to "RGB" clips every value
# above 255, so they are read as they are and scaled by 65535 like uint16 HDF5 images
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _frame_values(frame, path: Path) -> np.ndarray:
    """One frame of a picture as an array: uint8 or uint16 (scaled later, ``UNIT_SCALE``), or
    float32 for a 32-bit float TIFF (mode ``F``), whose values are kept as they are."""
    if frame.mode in _SIXTEEN_BIT_MODES:
        return np.asarray(frame).astype(np.uint16)
    if frame.mode == "F":
        return np.asarray(frame, dtype=np.float32)
    if frame.mode == "I":   # 32-bit integers: how some Pillow versions open 16-bit PNGs
        values = np.asarray(frame)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DripError("32-bit integer image with values outside 0..65535", path)
        return values.astype(np.uint16)
    if frame.mode not in ("L", "RGB"):
        frame = frame.convert("RGB")
    return np.asarray(frame)


@contextmanager
def _pillow(path: Path) -> Iterator[None]:
    """Pillow's work on the picture ``path``: its errors as :class:`DripError`, and its warnings
    silenced. (Only around Pillow's calls, never across a ``yield`` of frames: the warning
    filters are the process's, and a generator left suspended would restore them late.)"""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow warns of pictures over MAX_IMAGE_PIXELS as of a possible attack; these are
            # the user's own, and their size is no news to them
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # nor its notes on metadata drip does not read ("Corrupt EXIF data", a cut TIFF's):
            # where the pixels cannot be read either, the error says so in one line
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            yield
    except Image.DecompressionBombError as exc:   # refused over twice that: too large to read
        raise DripError("cannot read image: it has more pixels than Pillow reads (twice "
                        f"{Image.MAX_IMAGE_PIXELS}); cut it into smaller pictures", path) from exc
    except (OSError, UnidentifiedImageError, ValueError, TypeError, EOFError, KeyError,
            SyntaxError, struct.error) as exc:   # what Pillow raises on a damaged file: a cut
        # TIFF's missing tags are a TypeError where its pages are counted or sought
        raise DripError(f"cannot read image ({exc or type(exc).__name__})", path) from exc


def _opened_picture(path: Path):
    """The picture file ``path`` opened by Pillow (a context manager that closes it), and how
    many frames it holds (a multi-page TIFF's pages), none decoded."""
    from PIL import Image

    require_regular_file(path, f"a {PICTURES} picture")
    with _pillow(path):
        picture = Image.open(path)
        try:
            return picture, getattr(picture, "n_frames", 1)
        except BaseException:
            picture.close()
            raise


def picture_sizes(path: Path) -> list[tuple[int, int]]:
    """Each frame's ``(H, W)`` in a picture file (one for most, a multi-page TIFF's pages),
    read from its headers, no frame decoded."""
    picture, total = _opened_picture(path)
    with picture, _pillow(path):
        sizes = []
        for number in range(total):
            picture.seek(number)
            sizes.append(picture.size[::-1])
    return sizes


def iter_pictures(path: Path, finite: bool = True, frames: range | None = None,
                  rows: slice | None = None) -> Iterator[np.ndarray]:
    """Every frame of a picture file, one at a time: one for most, a stack's for a multi-page
    TIFF; with ``finite``, a float frame holding NaN or Inf is refused. ``frames``: only those
    (counted from 0) are decoded; ``rows``: of each, only those rows are kept, so that a few
    slices of a large stack take their own memory, not the stack's."""
    picture, total = _opened_picture(path)
    with picture:
        for number in range(total) if frames is None else frames:
            with _pillow(path):
                picture.seek(number)
                frame = _frame_values(picture, path)
            frame = frame if rows is None else np.ascontiguousarray(frame[rows])
            if finite and frame.dtype.kind == "f" and not np.all(np.isfinite(frame)):
                raise DripError("holds NaN or Inf" + f" (page {number + 1})" * (total > 1),
                                path)   # (a float TIFF can hold them)
            yield frame


def read_pictures(path: Path, finite: bool = True) -> list[np.ndarray]:
    """Every frame of a picture file (:func:`iter_pictures`), as a list."""
    return list(iter_pictures(path, finite))


def read_picture(path: Path) -> np.ndarray:
    """A picture file's one image (a mask, a bundled photograph); a stack is refused."""
    frames = read_pictures(path)
    if len(frames) != 1:
        raise DripError(f"holds {len(frames)} images (a multi-page file); one is expected",
                        path)
    return frames[0]


def picture_paths(path: Path) -> list[Path]:
    """The picture files at ``path``: the file itself, or a folder's in the order of their
    names (other files in the folder are left out)."""
    if not path.is_dir():
        return [path]
    paths = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                   and p.is_file())
    if not paths:
        raise DripError(f"folder holds no {PICTURES} files", path)
    return paths


def _skimage_picture(name: str) -> np.ndarray:
    import skimage

    filename = _SKIMAGE_FILES.get(name, f"{name}.png")
    path = Path(skimage.__file__).parent / "data" / filename
    if name not in SKIMAGE_PHOTOS or not path.exists():
        raise DripError(f"unknown scikit-image photograph {name!r} "
                        f"(available: {', '.join(SKIMAGE_PHOTOS)})", f"skimage:{name}")
    return read_picture(path)


def is_phantom_source(source: str) -> bool:
    """Whether ``source`` names generated phantoms (``phantom:NAME``) rather than photographs
    (or an HDF5 image file)."""
    return source.startswith("phantom:")


def load_images(source: str, options: SourceOptions, rng: np.random.Generator) -> np.ndarray:
    """All ground-truth images of ``source`` as ``(N, C, H, W)`` float32.

    Sources are read whole: they are image collections (a folder, a few photographs, generated
    phantoms). HDF5 image files are the exception, see :func:`iter_hdf5_images`.
    """
    if is_phantom_source(source):
        kind = source.split(":", 1)[1]
        size = options.image_size
        if kind == "ellipses":
            return random_ellipses(options.num_images, size, size, options.channels, rng)
        if kind in ("shepp-logan", "shepp_logan"):
            return np.repeat(shepp_logan(size, size, options.channels), options.num_images, axis=0)
        raise DripError("unknown phantom (use phantom:ellipses or phantom:shepp-logan)", source)
    if source.startswith("skimage:"):
        names = [n.strip() for n in source.split(":", 1)[1].split(",")]
        if names == ["photos"]:
            names = list(SKIMAGE_PHOTOS)
        if "" in names:   # was "skimage:: unknown scikit-image photograph ''"
            raise DripError("a photograph name is empty (give skimage:NAME[,NAME...] or "
                            "skimage:photos)", source)
        pictures = [_to_channels(_skimage_picture(n), options.channels) for n in names]
        return _crops(pictures, options, rng, source)
    path = Path(source)
    if not path.exists():
        raise DripError("no such file or folder", path)
    require_regular_file(path, "a folder, picture, HDF5 file or built-in source")
    if path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES:
        pictures = []
        for f in picture_paths(path):
            try:
                pictures += [_to_channels(frame, options.channels) for frame in read_pictures(f)]
            except ValueError as exc:
                raise DripError(str(exc), f) from exc
        return _crops(pictures, options, rng, source)
    raise DripError(f"not a folder, {PICTURES} picture, HDF5 file, .npy array or built-in "
                    "source", path)


def _image_stack_problem(shape: tuple, dtype: np.dtype) -> str | None:
    """What is wrong with an ``(N, H, W)`` or ``(N, C, H, W)`` stack of images of this shape
    and dtype, or None."""
    if len(shape) not in (3, 4) or dtype.kind not in "fui" or shape[0] < 1 or 0 in shape:
        return f"has shape {shape} and dtype {dtype}"
    if len(shape) == 4 and shape[-1] in (3, 4) and shape[1] not in (1, 3, 4):
        # (N, H, W, 3) as NumPy and PIL store colour: read as (N, C, H, W) it would pass as
        # H channels of H x 3 images, and simulate without a word
        return (f"has shape {shape}, which looks channels-last (N, H, W, C); store it as "
                "(N, C, H, W), e.g. numpy.moveaxis(images, -1, 1)")
    return None


class _Unopened:
    """What :func:`image_file_dataset` returns to close for a memory-mapped array: nothing."""

    def close(self) -> None:
        pass


def image_file_dataset(source: str | os.PathLike):
    """``(handle, dataset)`` of an image file after checking it: a ``.npy`` array (memory-mapped;
    one ``(H, W)`` image becomes a stack of one), an HDF5 file's ``images`` or ``ground_truth``
    dataset, or the dataset ``FILE::DATASET`` names; None for any other file. Close ``handle``
    when done."""
    path = split_dataset(source)[0]
    if path.suffix.lower() == ".npy" and not names_dataset(source):
        from .simulate import read_npy   # simulate reads its sources from here

        values = read_npy(path, "images", mmap=True)
        values = values[None] if values.ndim == 2 else values
        problem = _image_stack_problem(values.shape, values.dtype)
        if problem is None:
            return _Unopened(), values
        raise DripError(f"the array must hold images shaped (H, W), (N, H, W) or (N, C, H, W) "
                        f"(N >= 1); it {problem}", path)
    if not (names_dataset(source) or is_hdf5_file(path)):
        return None
    # (the dtype is checked with the shape, below)
    handle, dset = open_dataset(source, "images", defaults=IMAGE_STACKS, kinds=None)
    problem = _image_stack_problem(dset.shape, dset.dtype)
    if problem is None:
        return handle, dset
    message = (f"'{dset.name.lstrip('/')}' must be an (N, H, W) or (N, C, H, W) dataset of "
               f"floating-point or integer values (N >= 1); it {problem}")
    handle.close()  # after the message is made: a closed file's dataset has no shape
    raise DripError(message, path)


def iter_file_images(dset, channels: int, batch_size: int, path) -> Iterator[np.ndarray]:
    """Batches ``(n, channels, H, W)`` float32 from an image file's dataset
    (:func:`image_file_dataset`)."""
    for start in range(0, dset.shape[0], batch_size):
        try:
            block = np.asarray(dset[start:start + batch_size])
        except OSError as exc:
            raise DripError(f"cannot read file ({exc})", path) from exc
        if block.ndim == 3:
            block = block[:, None]
        block = _as_float32(block)
        if not np.all(np.isfinite(block)):
            raise DripError(f"images contain NaN or Inf "
                            f"({first_sample_where(~np.isfinite(block), start)})", path)
        if block.shape[1] != channels:
            try:
                block = np.stack([_to_channels(im, channels) for im in block])
            except ValueError as exc:
                raise DripError(str(exc), path) from exc
        yield block
