"""Property-based tests of the file readers: a valid file damaged in arbitrary ways (an attribute
or a model setting given any value, a dataset deleted, retyped, reshaped or given an extreme
value) is read, or refused with a :class:`DripError`, never anything else. Fuzzing of this kind
found an ``n_detectors = inf`` that raised an ``OverflowError`` and an ``image_shape`` whose
operator took a minute (or all the memory) to build before the shapes were compared."""

from __future__ import annotations

import itertools
import json
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import KINDS, OPERATOR_CASES, make_operator
from drip_cli.errors import DripError
from drip_cli.io import MeasurementFile
from drip_cli.io.models import load_model
from helpers import write_small_file

# derandomized: the same examples on every run, so CI never meets a new one by chance
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# values an attribute or a setting may be damaged to
ODD_VALUES = st.one_of(
    st.integers(-3, 70),
    # drip flushes denormals (runtime.py), so hypothesis must not draw subnormal floats
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False),
    st.sampled_from(["", "blur", "1", "periodic"]), st.booleans(),
    st.lists(st.integers(-2, 40), max_size=4), st.none(),
)
EXTREMES = [np.nan, np.inf, -np.inf, -1.0, 0.0, 1e30, -1e30]


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("valid")
    files = {}
    for kind in OPERATOR_CASES:
        files[kind] = folder / f"{kind}.h5"
        write_small_file(files[kind], make_operator(kind, (1, 12, 14)), n=5)
    return files


def _objects(handle: h5py.File) -> list:
    found = [("", handle)]
    handle.visititems(lambda name, obj: found.append((name, obj)))
    return found


def _rewrite(handle, name, values) -> None:
    """Replace dataset ``name`` by ``values``, keeping its attributes."""
    attrs = dict(handle[name].attrs)
    del handle[name]
    handle[name] = values
    handle[name].attrs.update(attrs)


def _damage(handle, choice: int, which: int, value, extreme: float, shape_change: int) -> None:
    name, obj = (objects := _objects(handle))[which % len(objects)]
    dataset = isinstance(obj, h5py.Dataset)
    if choice == 0 and len(obj.attrs):
        key = sorted(obj.attrs)[which % len(obj.attrs)]
        obj.attrs[key] = ("null" if value is None else value if isinstance(value, str)
                          else np.asarray(value))
    elif choice == 1 and name:
        del handle[name]
    elif choice == 2 and dataset:
        values = np.asarray(obj[()])
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                retyped = values.astype([np.float16, np.float64, np.int32, np.bool_, np.complex64,
                                         "S4"][which % 6])
        except ValueError:   # strings an earlier damage made, such as b'2.0', as integers
            return
        _rewrite(handle, name, retyped)
    elif choice == 3 and dataset:
        values = np.asarray(obj[()])
        if values.ndim == 0:
            values = values[None]
        _rewrite(handle, name, [values[..., :-1], values[None], values.reshape(-1),
                                values[:0]][shape_change])
    elif choice == 4 and dataset and obj.size and obj.dtype.kind == "f":
        obj[tuple(which % s for s in obj.shape)] = extreme


DAMAGE = st.tuples(st.integers(0, 4), st.integers(0, 1000), ODD_VALUES,
                   st.sampled_from(EXTREMES), st.integers(0, 3))


@SETTINGS
@given(kind=st.sampled_from(OPERATOR_CASES), damages=st.lists(DAMAGE, min_size=1, max_size=3))
def test_a_damaged_measurement_file_is_read_or_refused(valid_files, tmp_path, kind, damages):
    path = tmp_path / "damaged.h5"
    shutil.copy(valid_files[kind], path)
    with h5py.File(path, "a") as handle:
        for damage in damages:
            _damage(handle, *damage)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # a ground truth outside [0, 1] is only a warning
            with MeasurementFile(path) as data:
                for batch in data.batches(2):
                    data.operator.adjoint(torch.from_numpy(batch.measurements))
    except DripError:
        pass


@settings(SETTINGS, max_examples=100)
@given(kind=st.sampled_from(OPERATOR_CASES), damages=st.lists(DAMAGE, min_size=1, max_size=3),
       dataset=st.sampled_from(["ground_truth", "measurements"]), tiff=st.booleans())
def test_a_damaged_file_is_exported_or_refused(valid_files, tmp_path, kind, damages, dataset,
                                               tiff):
    """``drip export`` reads the image datasets itself, not through :class:`MeasurementFile`:
    whatever the damage, it writes its PNG files (or its TIFF) or refuses the file with a
    :class:`DripError`, and leaves no folder (or file) then."""
    from drip_cli.export import export_pngs, export_tiff

    path, out = tmp_path / "damaged.h5", tmp_path / ("images.tif" if tiff else "png")
    shutil.copy(valid_files[kind], path)
    shutil.rmtree(out, ignore_errors=True)
    out.unlink(missing_ok=True)
    with h5py.File(path, "a") as handle:
        for damage in damages:
            _damage(handle, *damage)
    try:
        export_tiff(path, out, dataset) if tiff else export_pngs(path, out, dataset)
    except DripError:
        assert not out.exists()


FIXED_ODD_VALUES = [np.inf, -np.inf, np.nan, 2.5, -1, 0, 10**9, "text", "", np.zeros(0),
                    np.array([1.0, np.inf, 2.0]), np.arange(7), True]


@pytest.mark.parametrize("kind", OPERATOR_CASES)
def test_every_attribute_at_every_odd_value_is_read_or_refused(valid_files, tmp_path, kind):
    """Exhaustively: each attribute of the file (root, operator and datasets) at each odd value
    (the random search above meets a given attribute at a given value rarely)."""
    path = tmp_path / "damaged.h5"
    with h5py.File(valid_files[kind]) as handle:
        targets = [(name, key) for name, obj in _objects(handle) for key in obj.attrs]
    for (name, key), value in itertools.product(targets, FIXED_ODD_VALUES):
        shutil.copy(valid_files[kind], path)
        with h5py.File(path, "a") as handle:
            (handle[name] if name else handle).attrs[key] = value
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with MeasurementFile(path) as data:
                    for batch in data.batches(5):
                        data.operator.adjoint(torch.from_numpy(batch.measurements))
        except DripError:
            pass


@pytest.fixture(scope="module")
def shipped_model():
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(__file__).resolve().parent.parent / "sample_data" / "drip_blur.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata(), load_file(str(path))


@SETTINGS
@given(entries=st.lists(st.tuples(st.booleans(), st.integers(0, 1000), ODD_VALUES),
                        min_size=1, max_size=3),
       tensor=st.integers(0, 1000), reshape=st.integers(0, 3))
def test_a_damaged_model_file_is_loaded_or_refused(shipped_model, tmp_path, entries, tensor,
                                                   reshape):
    from safetensors.torch import save_file

    meta, weights = dict(shipped_model[0]), dict(shipped_model[1])
    for in_config, which, value in entries:
        config = json.loads(meta["config"])
        if in_config and isinstance(config, dict):
            config[sorted(config)[which % len(config)]] = value
            meta["config"] = json.dumps(config)
        else:
            meta[sorted(meta)[which % len(meta)]] = json.dumps(value)
    name = sorted(weights)[tensor % len(weights)]
    t = weights[name]
    weights[name] = [t, t[..., :1].contiguous(), t.flatten().contiguous(), t.double()][reshape]
    path = tmp_path / "damaged.safetensors"
    save_file(weights, str(path), metadata=meta)
    try:
        load_model(path)
    except DripError:
        pass


# each kind's measurement shape S for the arrays of the test below
_IMPORT_SHAPES = {"denoise": [16, 20], "blur": [16, 20], "inpainting": [16, 20],
                  "tomography": [10, 23], "matrix": [150]}


# odd arrays (booleans, constant ones) may well look clipped: drip import's warning is expected
@pytest.mark.filterwarnings("ignore::drip_cli.errors.DripWarning")
@settings(SETTINGS, max_examples=100)
@given(kind=st.sampled_from(KINDS),
       shape=st.one_of(st.lists(st.sampled_from([0, 1, 2, 3, 8, 12, 16, 20, 23, 150]), max_size=5),
                       st.lists(st.sampled_from([1, 2, 3]), max_size=2)),
       own_shape=st.booleans(),
       dtype=st.sampled_from(["float32", "float64", "uint8", "int16", "bool", "complex64"]),
       extreme=st.sampled_from([None, *EXTREMES]),
       noise=st.sampled_from([("noise_std", 0.01), ("noise_percent", 2.0), ("estimate", True)]),
       hdf5=st.booleans(), axis=st.sampled_from([0.0, None]),
       layout=st.sampled_from([{}, {"projections": True}, {"slices": slice(1, 3)},
                               {"projections": True, "slices": slice(0, 1)}]))
def test_an_odd_array_is_imported_or_refused(tmp_path, kind, shape, own_shape, dtype, extreme,
                                              noise, hdf5, axis, layout):
    """``drip import`` of a ``.npy`` array or an HDF5 dataset (``FILE.h5::DATASET``, the mask
    too) of any shape (or of the kind's measurement shape after up to two axes of any length),
    dtype and values, for every operator kind (tomography's axis given, or estimated: ``auto``;
    its measurements as sinograms or projections, whole or some of their slices): a
    measurement file, or a :class:`DripError` and no file."""
    from drip_cli.data import OperatorSpec
    from drip_cli.data.measured import NoiseChoice, import_measurements

    if own_shape:
        shape = shape[:2] + _IMPORT_SHAPES[kind]

    assume(np.prod(shape) <= 100_000)
    values = np.random.default_rng(0).random(shape).astype(dtype)
    if extreme is not None and values.size and values.dtype.kind == "f":
        values.flat[values.size // 2] = extreme
    mask_values = np.random.default_rng(1).random(tuple(shape[-2:])) < 0.5
    if hdf5:
        with h5py.File(tmp_path / "b.h5", "w") as f:
            f["scan/data"], f["scan/mask"] = values, mask_values
        source, mask = f"{tmp_path / 'b.h5'}::scan/data", f"{tmp_path / 'b.h5'}::scan/mask"
    else:
        np.save(tmp_path / "b.npy", values)
        np.save(tmp_path / "mask.npy", mask_values)
        source, mask = tmp_path / "b.npy", tmp_path / "mask.npy"
    matrix = tmp_path / "A.npz"
    if not matrix.exists():
        import scipy.sparse
        scipy.sparse.save_npz(matrix, scipy.sparse.random(150, 64, 0.1, format="csr",
                                                          random_state=0))
    out = tmp_path / "m.h5"
    out.unlink(missing_ok=True)
    spec = OperatorSpec(kind=kind, blur_sigma=1.0, angles=None, matrix_file=matrix,
                        mask_file=mask, center_offset=axis)
    try:
        import_measurements(Path(source), out, spec, None, NoiseChoice(**{noise[0]: noise[1]}),
                            **layout)
        with MeasurementFile(out) as data:   # what it wrote is a valid file
            assert data.n_samples >= 1
    except DripError:
        assert not out.exists()
