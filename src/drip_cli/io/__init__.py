"""The HDF5 contract: measurement and reconstruction files, atomic outputs."""

from .atomic import (append_text, atomic_folder, atomic_h5, atomic_path, check_folder_writable,
                     check_writable, json_text, write_bytes, write_json, write_text)
from .measurements import (MeasurementBatch, MeasurementFile, MeasurementWriter, file_format,
                           open_h5, overflows_float32, unit_range_doubt, write_measurement_file)
from .reconstructions import ReconstructionWriter, read_reconstruction_file

__all__ = [
    "append_text", "atomic_folder", "atomic_h5", "atomic_path", "check_folder_writable",
    "check_writable", "json_text", "write_bytes", "write_json", "write_text", "MeasurementBatch",
    "MeasurementFile", "MeasurementWriter", "file_format", "open_h5", "overflows_float32",
    "unit_range_doubt", "write_measurement_file",
    "ReconstructionWriter", "read_reconstruction_file",
]
