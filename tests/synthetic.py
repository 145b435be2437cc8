"""Synthetic cell images with instance labels, for unit tests (real images are for demos and benchmarks)."""

from __future__ import annotations

import numpy as np
import skimage.draw

from backend.dataset import SampleInput


def synthetic_cells(
    rng: np.random.Generator,
    shape: tuple[int, int] = (96, 96),
    n_channels: int = 3,
    n_cells: int = 8,
    first_id: int = 1,
    region: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Bright ellipses on a noisy background.

    Returns a ``(C, H, W)`` uint16 image and its ``(H, W)`` uint32 instance labels, ids
    ``first_id, first_id + 1, ...`` (later cells may hide earlier ones). ``region`` limits
    the cell centres to the top-left ``(h, w)`` of the image.
    """
    height, width = region or shape
    labels = np.zeros(shape, np.uint32)
    for k in range(n_cells):
        radii = rng.uniform(5, 9, size=2)
        row, col = rng.uniform(radii, [height - radii[0], width - radii[1]])
        rr, cc = skimage.draw.ellipse(
            row, col, radii[0], radii[1], shape=shape, rotation=rng.uniform(0, np.pi)
        )
        labels[rr, cc] = first_id + k
    image = rng.normal(100, 10, (n_channels, *shape))
    image += (labels > 0) * rng.uniform(300, 1000, n_channels)[:, None, None]
    return np.clip(image, 0, 65535).astype(np.uint16), labels


def cell_samples(n: int, split: str = "train", seed: int = 0, **kwargs) -> list[SampleInput]:
    rng = np.random.default_rng(seed)
    return [
        SampleInput(*synthetic_cells(rng, **kwargs), split=split, source=f"{split}_{i}")
        for i in range(n)
    ]
