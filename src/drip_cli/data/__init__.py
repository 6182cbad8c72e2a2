"""Ground-truth sources and the simulation of noisy measurements."""

from .simulate import (OperatorSpec, add_noise, build_operator, draw_noise_percent,
                       format_noise_percent, noise_std_for, parse_noise_percent,
                       require_measurable, simulate_batch)
from .sources import (SourceOptions, image_file_dataset, is_phantom_source, iter_file_images,
                      load_images)

__all__ = [
    "OperatorSpec", "SourceOptions", "add_noise", "build_operator", "draw_noise_percent",
    "format_noise_percent", "image_file_dataset", "is_phantom_source", "iter_file_images",
    "load_images",
    "noise_std_for", "parse_noise_percent", "require_measurable", "simulate_batch",
]
