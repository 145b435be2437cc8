"""Random, augmented training crops of a dataset's images (full and LoRA modes)."""

from __future__ import annotations

import numpy as np
import torch

from backend.dataset.reading import Dataset
from backend.dataset.samples import DatasetError


_MAX_CROP_TRIES = 10


class TrainingCrops(torch.utils.data.Dataset):
    """Random, augmented training crops from one split of a dataset.

    Item ``i`` is ``(x, y)``: ``x`` a ``(3, h, w)`` float32 tensor in [0, 255] (SAM input,
    normalised with the whole image's intensity range) and ``y`` a ``(1, h, w)`` float32
    tensor of instance ids (not relabelled), with ``(h, w) = patch_shape``. A sample is
    picked with probability proportional to its area; crops are drawn until one holds at
    least ``min_objects`` objects of at least ``min_object_pixels`` pixels each (partly cut
    objects count), else the crop with the most objects of 10 tries is used. Images
    smaller than the patch are zero-padded at the bottom and right, and ``x`` and ``y``
    get the same random flip and 90-degree rotation.

    Items are a function of ``(seed, epoch, i)`` only; call :meth:`set_epoch` before each
    epoch (data-loader workers see it when they are not persistent).

    Raises:
        DatasetError: at construction, when no sample of ``split`` has objects, or for
            invalid arguments.
    """

    def __init__(
        self,
        dataset: Dataset,
        split: str,
        patch_shape: tuple[int, int] = (512, 512),
        min_objects: int = 1,
        length: int | None = None,
        seed: int = 0,
        *,
        min_object_pixels: int = 25,
        augment: bool = True,
    ) -> None:
        if len(patch_shape) != 2 or min(patch_shape) < 1:
            raise DatasetError(f"patch_shape must be two positive sizes; got {patch_shape}")
        if min_objects < 1:
            raise DatasetError(
                f"min_objects must be at least 1 (SAM is trained by prompting objects); "
                f"got {min_objects}"
            )
        self.dataset = dataset
        self.sample_ids = dataset.require_objects(split)
        self.patch_shape = (int(patch_shape[0]), int(patch_shape[1]))
        self.min_objects = min_objects
        self.min_object_pixels = min_object_pixels
        self.length = len(self.sample_ids) if length is None else length
        if self.length < 1:
            raise DatasetError(f"length must be at least 1; got {self.length}")
        self.seed = seed
        self.augment = augment
        self.epoch = 0
        areas = np.array(
            [np.prod(dataset.image_shape(sid)[1:]) for sid in self.sample_ids], dtype=float
        )
        self._sample_weights = areas / areas.sum()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops ``__getitem__`` returns."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"crop index {index} out of range for {self.length} crops")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        sample_id = self.sample_ids[rng.choice(len(self.sample_ids), p=self._sample_weights)]
        window, labels = self._choose_window(rng, sample_id)
        image = self.dataset.sam_image(sample_id, window)
        height, width = self.patch_shape
        x = np.zeros((3, height, width), np.float32)
        y = np.zeros((height, width), np.float32)
        x[:, : image.shape[1], : image.shape[2]] = image
        y[: labels.shape[0], : labels.shape[1]] = labels
        if self.augment:
            x, y = _flip_rotate(rng, x, y)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(
            np.ascontiguousarray(y[None])
        )

    def _choose_window(
        self, rng: np.random.Generator, sample_id: str
    ) -> tuple[tuple[slice, slice], np.ndarray]:
        """Crop window ``(rows, columns)`` with enough objects, and its labels."""
        _, image_height, image_width = self.dataset.image_shape(sample_id)
        height = min(self.patch_shape[0], image_height)
        width = min(self.patch_shape[1], image_width)
        tries = 1 if (height, width) == (image_height, image_width) else _MAX_CROP_TRIES
        best = None
        for _ in range(tries):
            top = int(rng.integers(image_height - height + 1))
            left = int(rng.integers(image_width - width + 1))
            window = (slice(top, top + height), slice(left, left + width))
            labels = self.dataset.labels(sample_id, window)
            _, counts = np.unique(labels[labels > 0], return_counts=True)
            n_objects = int(np.count_nonzero(counts >= self.min_object_pixels))
            if best is None or n_objects > best[0]:
                best = (n_objects, window, labels)
            if n_objects >= self.min_objects:
                break
        return best[1], best[2]


def _flip_rotate(
    rng: np.random.Generator, image: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The same random rot90 and left-right flip of ``(3, h, w)`` image and ``(h, w)`` labels.

    Non-square patches rotate only by 0 or 180 degrees so their shape is kept.
    """
    square = labels.shape[0] == labels.shape[1]
    quarter_turns = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
    image = np.rot90(image, quarter_turns, axes=(1, 2))
    labels = np.rot90(labels, quarter_turns)
    if rng.random() < 0.5:
        image, labels = image[:, :, ::-1], labels[:, ::-1]
    return image, labels
