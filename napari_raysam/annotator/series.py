"""Going through a series of images: which plane comes next, which planes are annotated, the next one ready.

A series is the planes of one :class:`ImageChannels`: the ``Z`` slices of a ``(Z, H, W)`` stack
(a folder of HPA fields reads as one, a field per slice), or the single plane of a 2D image. A
plane counts as annotated when its autosaved labels (:class:`AnnotationStore`, keyed by the
plane's pixels) hold at least one object. The *suggested* plane is the one not annotated yet that
the current model is least sure of (``SamSession.uncertainty``): annotating it, then fine-tuning,
teaches the model what it does not know yet. Everything here that reads planes reads and hashes
whole planes: call it from a worker thread, never from napari's event loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from napari_raysam.annotator.annotations import AnnotationStore
from napari_raysam.annotator.image_source import ImageChannels, check_plane, content_key, sam_rgb
from napari_raysam.annotator.progress import ProgressCallback


@dataclass(frozen=True)
class PreparedPlane:
    """One plane of an image, read and turned into SAM's input, ready to be annotated.

    Attributes:
        index: the plane: ``()`` for a 2D image, ``(z,)`` for a slice of a stack.
        sam_channels: the channels ``rgb`` was made from (1 or 3 indices).
        plane: ``(C, H, W)`` raw intensities, in the image's dtype.
        rgb: ``(H, W, 3)`` uint8 SAM input.
        key: ``content_key(plane)``, the key of the plane's autosaved labels.
    """

    index: tuple[int, ...]
    sam_channels: tuple[int, ...]
    plane: np.ndarray
    rgb: np.ndarray
    key: str


def prepare_plane(channels: ImageChannels, index: tuple[int, ...], sam_channels: Sequence[int], name: str) -> PreparedPlane:
    """Read plane ``index`` of ``channels``, check that SAM can segment it and make its SAM input and key.

    Args:
        name: what the image is called (the layer name), for messages.

    Raises:
        ImageError: the plane does not exist, has NaN or infinite pixels, is smaller than SAM
            can segment, or ``sam_channels`` do not fit it.
    """
    plane = channels.plane(index)
    check_plane(plane, f"layer '{name}'" + (f", slice {index[0]}" if index else ""))
    return PreparedPlane(tuple(index), tuple(sam_channels), plane, sam_rgb(plane, sam_channels), content_key(plane))


def series_length(channels: ImageChannels) -> int:
    """How many planes the series has: the stack's length, 1 for a 2D image."""
    return channels.stack_shape[0] if channels.stack_shape else 1


def step_index(index: tuple[int, ...], length: int, step: int) -> tuple[int, ...] | None:
    """The plane ``step`` planes away from ``index`` (+1 the next, -1 the previous) in a series of
    ``length`` planes; None past either end, and for a 2D image (``index == ()``)."""
    if not index:
        return None
    target = index[0] + step
    return (target,) if 0 <= target < length else None


def annotated_planes(
    channels: ImageChannels, store: AnnotationStore, progress: ProgressCallback | None = None
) -> list[bool]:
    """For each plane of the series, in order, whether its autosaved labels hold an object.

    Reads and hashes every plane (a lazy series reads each file once): seconds for a folder
    of large fields, so run it in a worker.

    Args:
        progress: called as ``progress(done, total)`` after each plane (``total`` = planes).
    """
    length = series_length(channels)
    indices = [(z,) for z in range(length)] if channels.stack_shape else [()]
    annotated = []
    for done, index in enumerate(indices, 1):
        saved = store.load(content_key(channels.plane(index)), channels.shape)
        annotated.append(saved is not None and bool(saved.any()))
        if progress is not None:
            progress(done, length)
    return annotated


def series_summary(index: tuple[int, ...], annotated: Sequence[bool]) -> str:
    """What the series panel says: ``"image 2 of 3 · 1 of 3 annotated"`` (no position for a 2D image).

    Args:
        index: the shown plane (``()`` for a 2D image).
        annotated: per plane whether it is annotated (:func:`annotated_planes`).
    """
    count = f"{sum(annotated)} of {len(annotated)} annotated"
    return f"image {index[0] + 1} of {len(annotated)} · {count}" if index else count


def suggested_plane(uncertainties: Mapping[int, float], annotated: Sequence[bool], current: int | None) -> int | None:
    """The plane to annotate next: of the planes with an uncertainty that are not annotated and not
    ``current``, the most uncertain (the first of equals); None if there is none.

    Args:
        uncertainties: plane -> the model's uncertainty about it (``SamSession.uncertainty``).
        annotated: per plane whether it is annotated (:func:`annotated_planes`).
        current: the plane shown, or None.
    """
    candidates = [z for z in sorted(uncertainties) if not annotated[z] and z != current]
    return max(candidates, key=lambda z: uncertainties[z], default=None)
