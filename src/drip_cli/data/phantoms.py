"""Built-in synthetic images: random ellipses and the Shepp-Logan phantom."""

from __future__ import annotations

import numpy as np


REDRAWS = 100


def random_ellipses(n: int, height: int, width: int, channels: int = 1,
                    rng: np.random.Generator | None = None, max_ellipses: int = 8) -> np.ndarray:
    """``(n, channels, H, W)`` float32 images in [0, 1]: a sum of random filled ellipses
    (random centre, axes, rotation and intensity; one intensity per channel, negative ones
    darken), clipped to [0, 1]. An image the clipping leaves all black is drawn again (up to
    ``REDRAWS`` times; on a grid of a pixel or two the ellipses may never cover one): nothing
    can be measured of it, and ``drip simulate`` would refuse it."""
    rng = np.random.default_rng() if rng is None else rng
    yy, xx = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    out = np.zeros((n, channels, height, width), dtype=np.float32)
    for i in range(n):
        for _ in range(REDRAWS):
            image = np.zeros((channels, height, width))
            for _ in range(int(rng.integers(2, max_ellipses + 1))):
                cy, cx = rng.uniform(-0.6, 0.6, size=2)
                ay, ax = rng.uniform(0.08, 0.6, size=2)
                angle = rng.uniform(0, np.pi)
                c, s = np.cos(angle), np.sin(angle)
                u = ((xx - cx) * c + (yy - cy) * s) / ax
                v = (-(xx - cx) * s + (yy - cy) * c) / ay
                inside = (u * u + v * v) <= 1.0
                image[:, inside] += rng.uniform(-0.4, 0.8, size=(channels, 1))
            out[i] = np.clip(image, 0.0, 1.0)
            if out[i].any():
                break
    return out


def shepp_logan(height: int, width: int, channels: int = 1) -> np.ndarray:
    """The (modified) Shepp-Logan phantom from scikit-image, resized, ``(1, C, H, W)``."""
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    image = resize(shepp_logan_phantom(), (height, width), anti_aliasing=True)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    return np.repeat(image[None, None], channels, axis=1)
