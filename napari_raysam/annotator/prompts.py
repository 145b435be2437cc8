"""SAM prompts from what the user drew: point and box layers' data as SAM's arrays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

POSITIVE, NEGATIVE = "positive", "negative"
"""A point on the object, a point off it (micro-sam shows them green and red)."""


@dataclass(frozen=True)
class Prompts:
    """What ``SamSession.segment`` takes, in pixel coordinates of the annotated slice.

    Attributes:
        points: ``(N, 2)`` float YX, or None.
        labels: ``(N,)`` int, 1 positive / 0 negative, or None.
        box: ``[y0, x0, y1, x1]`` of the last box drawn, or None.
    """

    points: np.ndarray | None
    labels: np.ndarray | None
    box: np.ndarray | None


def prompts_from_layers(
    points: np.ndarray, kinds: Sequence[str], shapes: Sequence[np.ndarray]
) -> Prompts:
    """Prompts from a points layer's ``(N, 2)`` YX data with a ``POSITIVE``/``NEGATIVE`` kind per
    point, and a shapes layer's rectangles (each ``(4, 2)`` YX corners; the last one is used)."""
    point_array = np.asarray(points, dtype=float).reshape(-1, 2)
    labels = (np.asarray(kinds, dtype=object) == POSITIVE).astype(int)
    box = None
    if len(shapes):
        corners = np.asarray(shapes[-1], dtype=float)
        box = np.concatenate([corners.min(axis=0), corners.max(axis=0)])
    if not len(point_array):
        return Prompts(None, None, box)
    return Prompts(point_array, labels, box)
