"""What a dataset sample is: its inputs, validated, and the checks every reader and writer shares.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


DATASET_FORMAT = "napari-raysam/dataset"
DATASET_VERSION = 1
SPLITS = ("train", "val")
EMBEDDING_SHAPE = (256, 64, 64)


class DatasetError(ValueError):
    """A problem with a dataset or its inputs, described in plain words with the fix."""


@dataclass(frozen=True)
class SampleEmbedding:
    """A sample's image embedding, computed by the model with ``model_fingerprint``.

    Attributes:
        values: ``(256, 64, 64)`` image-encoder output (any float dtype; stored float16).
        model_fingerprint: the encoder that computed it (``LoadedModel.encoder_fingerprint``).
        input_size: ``(h, w)`` of the resized image inside SAM's 1024 input.
        original_size: ``(H, W)`` of the sample image.
    """

    values: np.ndarray
    model_fingerprint: str
    input_size: tuple[int, int]
    original_size: tuple[int, int]


@dataclass(frozen=True)
class SampleInput:
    """One image and its instance labels, validated, ready for :func:`write_samples`.

    Attributes:
        image: ``(C, H, W)`` raw intensities, any integer or float dtype. A ``(H, W)`` image
            is accepted and stored as ``(1, H, W)``.
        labels: ``(H, W)`` instance ids, 0 = background, any integer dtype; converted to
            ``uint32``.
        split: ``"train"`` or ``"val"``.
        source: where the sample came from (file path, napari layer name), for messages.
        embedding: optional embedding stored with the sample (contract 1), e.g. the one the
            annotator computed, so that decoder-mode training computes none.
    """

    image: np.ndarray
    labels: np.ndarray
    split: str = "train"
    source: str = ""
    embedding: SampleEmbedding | None = None

    def __post_init__(self) -> None:
        where = f" ({self.source})" if self.source else ""
        image = np.asarray(self.image)
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3 or 0 in image.shape:
            raise DatasetError(
                f"image{where} must have shape (C, H, W) or (H, W); got {image.shape}"
            )
        if not np.issubdtype(image.dtype, np.integer) and not np.issubdtype(
            image.dtype, np.floating
        ):
            raise DatasetError(
                f"image{where} has dtype {image.dtype}; intensities must be integers or "
                f"floats: convert it, e.g. image.astype(np.float32)"
            )
        n_bad = non_finite_count(image)
        if n_bad:
            raise DatasetError(
                f"image{where} has {n_bad} NaN or infinite pixels: replace them "
                f"(e.g. np.nan_to_num(image)) before exporting"
            )
        labels = np.asarray(self.labels)
        height, width = image.shape[1:]
        if labels.shape != (height, width):
            shape = "x".join(map(str, labels.shape))
            raise DatasetError(
                f"labels{where} are {shape} but the image is {height}x{width}: "
                f"pair each image with the label image drawn on it"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(
                f"labels{where} have dtype {labels.dtype}; they must be integer instance ids "
                f"(0 = background). A binary mask must be split into objects first, e.g. "
                f"skimage.measure.label(mask)"
            )
        if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.uint32).max):
            raise DatasetError(
                f"labels{where} must be ids between 0 and {np.iinfo(np.uint32).max}; "
                f"got values from {labels.min()} to {labels.max()}"
            )
        if self.split not in SPLITS:
            raise DatasetError(f"split{where} must be 'train' or 'val'; got {self.split!r}")
        if self.embedding is not None:
            _check_embedding(self.embedding, (height, width), where)
        object.__setattr__(self, "image", image)
        object.__setattr__(self, "labels", labels.astype(np.uint32, copy=False))


@dataclass(frozen=True)
class _SampleMeta:
    """What a reader knows about a stored sample without reading pixels."""

    split: str
    source: str
    n_objects: int
    image_sha256: str
    labels_sha256: str
    intensity_range: tuple[tuple[float, float], ...]  # (low, high) per channel
    image_shape: tuple[int, int, int]  # (C, H, W)


def non_finite_count(array: np.ndarray) -> int:
    """How many NaN or infinite values ``array`` holds (0 for integer arrays)."""
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    return int(np.count_nonzero(~np.isfinite(array)))


def content_sha256(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and C-order bytes."""
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    # the array's own buffer, not a tobytes() copy: hashlib hashes it without holding the GIL, so a
    # large image hashed in a worker does not freeze napari's event loop (the copy held it 0.5 s)
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def _check_embedding(embedding: SampleEmbedding, image_size: tuple[int, int], where: str) -> None:
    values = np.asarray(embedding.values)
    if values.shape != EMBEDDING_SHAPE:
        raise DatasetError(
            f"embedding{where} has shape {values.shape}; SAM's image encoder gives "
            f"{EMBEDDING_SHAPE} (drop the batch axis: embedding[0])"
        )
    if not np.isfinite(values).all():
        raise DatasetError(f"embedding{where} has NaN or infinite values")
    if tuple(embedding.original_size) != tuple(image_size):
        raise DatasetError(
            f"embedding{where}: original_size {tuple(embedding.original_size)} does not match the "
            f"image, which is {image_size[0]}x{image_size[1]}: compute the embedding on that image"
        )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"split must be 'train' or 'val'; got {split!r}")


def _check_same(name: str, given: Sequence | None, stored: list, path: Path) -> None:
    """When appending, a given layout argument must equal the stored one."""
    if given is not None and list(given) != stored:
        raise DatasetError(
            f"{path} already has {name} {stored}, but {list(given)} was given: leave "
            f"{name} out to append, or export into a new dataset"
        )


def _check_layout(
    channel_names: list[str], sam_channels: list[int], n_channels: int, doing: str
) -> None:
    if len(channel_names) != n_channels:
        raise DatasetError(
            f"{doing}: {len(channel_names)} channel names {channel_names} for images with "
            f"{n_channels} channels: give one name per channel"
        )
    _check_sam_channels(sam_channels, n_channels, doing)


def _check_sam_channels(sam_channels: list[int], n_channels: int, doing: str) -> None:
    if len(sam_channels) not in (1, 3) or not all(0 <= c < n_channels for c in sam_channels):
        raise DatasetError(
            f"{doing}: sam_channels {sam_channels} must be 1 or 3 channel indices between 0 "
            f"and {n_channels - 1} (the images have {n_channels} channels), e.g. "
            f"{[0, 1, 2] if n_channels >= 3 else [0]}"
        )
