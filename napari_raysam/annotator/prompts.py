"""SAM prompts from what the user drew: point and box layers' data as SAM's arrays, and which
objects they ask for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

POSITIVE, NEGATIVE = "positive", "negative"
"""A point on the object, a point off it (micro-sam shows them green and red)."""


class PromptError(ValueError):
    """The prompts do not say which objects to segment; the message says what to change."""


@dataclass(frozen=True)
class Prompts:
    """What the user drew on the annotated slice, in its pixel coordinates.

    Attributes:
        points: ``(N, 2)`` float YX, or None.
        labels: ``(N,)`` int, 1 positive / 0 negative, or None.
        boxes: ``(K, 4)`` float ``[y0, x0, y1, x1]``, in drawing order (``K`` may be 0).
    """

    points: np.ndarray | None
    labels: np.ndarray | None
    boxes: np.ndarray


@dataclass(frozen=True)
class ObjectPrompt:
    """The prompts of one object, as ``SamSession.segment`` takes them.

    Attributes:
        points: ``(N, 2)`` float YX, or None.
        labels: ``(N,)`` int, 1 positive / 0 negative, or None.
        box: ``(4,)`` float ``[y0, x0, y1, x1]``, or None.
    """

    points: np.ndarray | None
    labels: np.ndarray | None
    box: np.ndarray | None


def prompts_from_layers(
    points: np.ndarray, kinds: Sequence[str], shapes: Sequence[np.ndarray]
) -> Prompts:
    """Prompts from a points layer's ``(N, 2)`` YX data with a ``POSITIVE``/``NEGATIVE`` kind per
    point, and a shapes layer's rectangles (each ``(4, 2)`` YX corners, in any order)."""
    point_array = np.asarray(points, dtype=float).reshape(-1, 2)
    labels = (np.asarray(kinds, dtype=object) == POSITIVE).astype(int)
    corners = [np.asarray(shape, dtype=float) for shape in shapes]
    boxes = np.array([np.concatenate([c.min(axis=0), c.max(axis=0)]) for c in corners]).reshape(-1, 4)
    if not len(point_array):
        return Prompts(None, None, boxes)
    return Prompts(point_array, labels, boxes)


def object_prompts(prompts: Prompts, batched: bool) -> list[ObjectPrompt]:
    """Which objects the prompts ask for, each with its own prompts.

    As micro-sam's 2D annotator reads them:

    - ``batched``: every box and every positive point is an object of its own (boxes first, in
      drawing order, then the points); the negative points go with every object.
    - not batched: boxes without points are one object each; otherwise all the points (with the
      one box, if any) are one object.

    Returns:
        The objects, ``[]`` when nothing is drawn.

    Raises:
        PromptError: not batched, with points and more than one box; batched, with negative
            points only.
    """
    points, labels, boxes = prompts.points, prompts.labels, prompts.boxes
    if points is None:
        return [ObjectPrompt(None, None, box) for box in boxes]
    if not batched:
        if len(boxes) > 1:
            raise PromptError(
                f"{len(boxes)} boxes and {len(points)} points: with points, draw one box per object, "
                "or tick Batched to segment each box and each positive point as an object of its own"
            )
        return [ObjectPrompt(points, labels, boxes[0] if len(boxes) else None)]
    negative = points[labels == 0]
    if not len(boxes) and len(negative) == len(points):
        raise PromptError("only negative points: add a positive point or a box for each object")
    negative_labels = np.zeros(len(negative), int)
    by_box = [ObjectPrompt(negative, negative_labels, box) if len(negative) else ObjectPrompt(None, None, box) for box in boxes]
    by_point = [
        ObjectPrompt(np.concatenate([point[None], negative]), np.r_[1, negative_labels], None)
        for point in points[labels == 1]
    ]
    return by_box + by_point
