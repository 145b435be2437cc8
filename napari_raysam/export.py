"""Build an annotation dataset (design contract 1) from image and label files.

Backs ``napari-raysam export IMAGE... --labels LABEL... -o data.zarr``. Supported files:
``.tif``/``.tiff`` (tifffile), ``.png``/``.jpg``/``.jpeg`` (imageio) and ``.npy`` (loaded
without unpickling).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile

from backend.dataset import SPLITS, DatasetError, SampleInput, write_samples

MAX_CHANNELS = 8
_TIFF_SUFFIXES = (".tif", ".tiff")
_PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")  # imageio returns these channels last


def read_image_file(path: str | Path) -> np.ndarray:
    """Read a 2D image, optionally multichannel, as ``(C, H, W)`` in its file dtype.

    A 2D file gives ``(1, H, W)``; PNG/JPEG colour (``(H, W, 3|4)``) is moved channels
    first; a 3D TIFF/NPY is read as channels first when its first axis has at most 8
    entries, else as channels last when its last axis has.

    Raises:
        DatasetError: unreadable or unsupported file, or a stack that is not 2D channels
            (e.g. a ``(20, 700, 1100)`` time series).
    """
    path = Path(path)
    array = _read_array(path)
    if array.ndim > 3:
        array = np.squeeze(array)
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3:
        channels_last = path.suffix.lower() in _PICTURE_SUFFIXES or (
            array.shape[0] > MAX_CHANNELS and array.shape[-1] <= MAX_CHANNELS
        )
        if channels_last:
            array = np.moveaxis(array, -1, 0)
        if array.shape[0] <= MAX_CHANNELS:
            return array
    raise DatasetError(
        f"{path} has shape {array.shape}, which is not one 2D image: only 2D images are "
        f"accepted, optionally with up to {MAX_CHANNELS} channels first (C, H, W) or last "
        f"(H, W, C). For a stack of time points or z-slices, save each frame as its own file "
        f"(e.g. tifffile.imwrite(f'frame_{{t}}.tif', stack[t])) and export those"
    )


def read_labels_file(path: str | Path) -> np.ndarray:
    """Read an ``(H, W)`` integer label image (instance ids, 0 = background).

    Float files are accepted when every value is a whole number.

    Raises:
        DatasetError: unreadable file, not a single 2D plane, or non-integer values.
    """
    path = Path(path)
    array = _read_array(path)
    if array.ndim > 2:
        array = np.squeeze(array)
    if array.ndim != 2:
        raise DatasetError(
            f"{path} has shape {array.shape}; a label image must be one 2D plane (H, W) of "
            f"instance ids, not a colour rendering or a stack"
        )
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise DatasetError(
                f"{path} holds non-integer values; labels must be whole-number instance ids "
                f"(0 = background)"
            )
        array = array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise DatasetError(
            f"{path} has dtype {array.dtype}; labels must be integer instance ids. A binary "
            f"mask must be split into objects first, e.g. skimage.measure.label(mask)"
        )
    return array


def export_files(
    images: Sequence[str | Path],
    labels: Sequence[str | Path],
    output: str | Path,
    *,
    sam_channels: Sequence[int] | None = None,
    channel_names: Sequence[str] | None = None,
    split: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Write image/label file pairs into the dataset at ``output`` (created or appended to).

    Every pair is read and checked before anything is written, and the write itself is
    atomic, so a bad file leaves ``output`` untouched. Files are read again while writing,
    so memory holds one pair at a time.

    Args:
        images: image files; ``images[i]`` is annotated by ``labels[i]``.
        labels: label files, same count and order.
        output: the dataset folder (``.zarr``).
        sam_channels, channel_names: see :func:`backend.dataset.write_samples`.
        split: ``"train"`` or ``"val"`` for all pairs; ``None`` draws a ``val_fraction`` of
            them for validation (at least one when there are 2 or more pairs and
            ``val_fraction > 0``; never all), reproducibly for a given ``seed``.
        progress: called as ``progress(done, total)`` after each written sample.

    Returns:
        The new sample ids, in the order of ``images``.
    """
    images = [Path(p) for p in images]
    labels = [Path(p) for p in labels]
    if not images:
        raise DatasetError("no images given: pass at least one image file and its labels")
    if len(images) != len(labels):
        raise DatasetError(
            f"{len(images)} image files but {len(labels)} label files: give one label file per "
            f"image, in the same order"
        )
    pairs = _FilePairs(images, labels, _assign_splits(len(images), split, val_fraction, seed))
    n_channels = pairs[0].image.shape[0]
    for index in range(1, len(pairs)):
        channels = pairs[index].image.shape[0]
        if channels != n_channels:
            raise DatasetError(
                f"{images[index]} has {channels} channels but {images[0]} has {n_channels}: "
                f"every image of a dataset needs the same channels"
            )
    return write_samples(
        output, pairs, channel_names=channel_names, sam_channels=sam_channels, progress=progress
    )


class _FilePairs(Sequence[SampleInput]):
    """Image/label file pairs read on access, so only one pair is in memory at a time."""

    def __init__(self, images: list[Path], labels: list[Path], splits: list[str]) -> None:
        self._images, self._labels, self._splits = images, labels, splits

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> SampleInput:
        image_path, labels_path = self._images[index], self._labels[index]
        return SampleInput(
            image=read_image_file(image_path),
            labels=read_labels_file(labels_path),
            split=self._splits[index],
            source=f"{image_path} with labels {labels_path}",
        )


def _assign_splits(n: int, split: str | None, val_fraction: float, seed: int) -> list[str]:
    """One split per pair: ``split`` for all, else a seeded random ``val_fraction``."""
    if split is not None:
        if split not in SPLITS:
            raise DatasetError(f"split must be 'train' or 'val'; got {split!r}")
        return [split] * n
    if not 0 <= val_fraction < 1:
        raise DatasetError(f"val_fraction must be at least 0 and below 1; got {val_fraction}")
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, n - 1)  # keep at least one training image
    val = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    return ["val" if i in val else "train" for i in range(n)]


def _read_array(path: Path) -> np.ndarray:
    """Read a whole file as an array, by suffix, never unpickling."""
    suffix = path.suffix.lower()
    if suffix not in _TIFF_SUFFIXES + _PICTURE_SUFFIXES + (".npy",):
        raise DatasetError(
            f"{path}: unsupported file type {suffix!r}; use .tif, .tiff, .png, .jpg or .npy"
        )
    if not path.is_file():
        raise DatasetError(f"{path} does not exist: check the path")
    try:
        if suffix in _TIFF_SUFFIXES:
            return tifffile.imread(path)
        if suffix in _PICTURE_SUFFIXES:
            return iio.imread(path)
        return np.load(path, allow_pickle=False)
    except Exception as error:  # each reader raises its own types for a damaged file
        raise DatasetError(f"cannot read {path}: {error}") from error
