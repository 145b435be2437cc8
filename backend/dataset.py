"""Annotation dataset (design contract 1): a zarr v3 group of images and instance labels.

Layout on disk::

    <name>.zarr/                 attrs: format, version, channel_names, sam_channels
      samples/<id>/              attrs: split, source, n_objects, image_sha256, labels_sha256,
                                        intensity_range ([[low, high], ...] per channel)
      samples/<id>/image         (C, H, W) raw intensities, integer or float dtype
      samples/<id>/labels        (H, W) uint32 instance ids, 0 = background
      samples/<id>/embedding     optional (256, 64, 64) float16, attrs: model_fingerprint,
                                 input_size, original_size

      manifest.json              {"samples": [ids]}: the samples that are part of the dataset

Writes are atomic as a group. New samples are built under ``<name>.zarr/.staging-<random>/``
(same filesystem, outside ``samples/``), renamed into ``samples/`` under new ids, and become
part of the dataset in one step: ``manifest.json`` is replaced by a file listing them (and no
longer listing the samples they replace). A killed writer leaves folders that no manifest
lists; readers never see them and the next writer removes them. Writers take a lock file
(``.lock``) so that two exports into one dataset cannot lose each other's samples. A new
dataset is built in a hidden sibling folder and renamed into place. Datasets written before
the manifest existed are read by listing ``samples/<digits>``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from filelock import FileLock

from backend.atomic import write_text

DATASET_FORMAT = "napari-raysam/dataset"
DATASET_VERSION = 1
SPLITS = ("train", "val")
EMBEDDING_SHAPE = (256, 64, 64)

_CHUNK_SIZE = 512  # (1, 512, 512) image chunks: a 512 training crop touches at most 4 per channel
_PERCENTILES = (1.0, 99.8)  # lower/upper intensity percentiles, as micro-sam's normalisation
_SAMPLE_ID_DIGITS = 6
_STAGING_PREFIX = ".staging-"
_MAX_CROP_TRIES = 10
_MANIFEST = "manifest.json"
_LOCK = ".lock"
_EXPORT_HINT = "create one with `napari-raysam export IMAGE... --labels LABEL... -o {path}`"


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


def write_samples(
    path: str | Path,
    samples: Sequence[SampleInput],
    *,
    channel_names: Sequence[str] | None = None,
    sam_channels: Sequence[int] | None = None,
    replace_same_image: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Create a dataset at ``path`` from ``samples``, or append them to the one there.

    All of ``samples`` become part of the dataset together, or none of them does.

    Args:
        path: the ``.zarr`` folder. Missing parent folders are created.
        samples: the samples to add; all must have the dataset's channel count.
        channel_names: one name per channel; default ``["channel_0", ...]``. When appending,
            ``None`` or the dataset's own names.
        sam_channels: 1 or 3 channel indices fed to SAM's RGB input; default ``[0, 1, 2]``
            with 3 or more channels, else ``[0]``. When appending, ``None`` or the dataset's.
        replace_same_image: a stored sample whose image has the same content (``image_sha256``)
            as one of ``samples`` is replaced by it, in the same step: an image is never in
            the dataset twice, nor in both splits.
        progress: called as ``progress(done, total)`` after each sample is written.

    Returns:
        The new sample ids (zero-padded increasing numbers, e.g. ``"000007"``).

    Raises:
        DatasetError: no samples, a layout that does not fit the samples or the existing
            dataset, or ``path`` exists and is not a dataset. Nothing is changed then, and a
            failure while writing leaves the previous dataset as it was.
    """
    path = Path(path)
    if len(samples) == 0:
        raise DatasetError(f"no samples to write to {path}: give at least one image with labels")
    n_channels = samples[0].image.shape[0]
    if path.exists():
        stored_names, stored_sam = _read_root(path)
        _check_same("channel_names", channel_names, stored_names, path)
        _check_same("sam_channels", sam_channels, stored_sam, path)
        _check_layout(stored_names, stored_sam, n_channels, f"appending to {path}")
        with FileLock(path / _LOCK):
            live = _live_sample_ids(path)
            _remove_unlisted(path, live)
            if not (path / _MANIFEST).exists():  # written before manifests: list what is there first
                _write_manifest(path, live)
            replaced = _same_image_ids(path, live, samples, n_channels) if replace_same_image else []
            staging = path / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
            try:
                staged = _stage_samples(staging, samples, n_channels, progress)
                new_ids = _commit_samples(path / "samples", staged)  # not part of the dataset yet ...
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            _write_manifest(path, [i for i in live if i not in replaced] + new_ids)  # ... now they are
            for sample_id in replaced:
                shutil.rmtree(path / "samples" / sample_id, ignore_errors=True)
        return new_ids

    names = [f"channel_{i}" for i in range(n_channels)] if channel_names is None else [
        str(name) for name in channel_names
    ]
    sam = ([0, 1, 2] if n_channels >= 3 else [0]) if sam_channels is None else [
        int(c) for c in sam_channels
    ]
    _check_layout(names, sam, n_channels, f"creating {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    building = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        root = zarr.create_group(
            store=str(building),
            attributes={
                "format": DATASET_FORMAT,
                "version": DATASET_VERSION,
                "channel_names": names,
                "sam_channels": sam,
            },
        )
        root.create_group("samples")
        staged = _stage_samples(building / ".staging", samples, n_channels, progress)
        sample_ids = _commit_samples(building / "samples", staged)
        _write_manifest(building, sample_ids)
        (building / ".staging").rmdir()
        try:
            os.rename(building, path)
        except OSError as error:
            raise DatasetError(
                f"could not create {path}: {error.strerror}. Something else created it while "
                f"exporting; export again to append to it"
            ) from error
        return sample_ids
    finally:
        shutil.rmtree(building, ignore_errors=True)


def write_embedding(
    path: str | Path,
    sample_id: str,
    embedding: np.ndarray,
    *,
    model_fingerprint: str,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
) -> None:
    """Store a sample's image embedding, replacing any earlier one, atomically.

    Args:
        path: the dataset folder.
        sample_id: an existing sample id.
        embedding: ``(256, 64, 64)`` image-encoder output (any float dtype; stored float16).
        model_fingerprint: identifies the model that computed it; :meth:`Dataset.embedding`
            returns the embedding only for the same fingerprint.
        input_size: ``(h, w)`` of the resized image inside SAM's 1024 input.
        original_size: ``(H, W)`` of the sample image.
    """
    path = Path(path)
    dataset = open_dataset(path)
    _, height, width = dataset.image_shape(sample_id)
    sample_embedding = SampleEmbedding(
        np.asarray(embedding), model_fingerprint, tuple(input_size), tuple(original_size)
    )
    _check_embedding(sample_embedding, (height, width), f" (sample {sample_id})")
    staging = path / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
    target = path / "samples" / sample_id / "embedding"
    try:
        _write_embedding(zarr.create_group(store=str(staging)), sample_embedding)
        if target.exists():
            # An absent embedding is harmless (it is a cache); a mixed one is not.
            os.rename(target, staging / "replaced")
        os.rename(staging / "embedding", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def open_dataset(path: str | Path) -> Dataset:
    """Open the dataset at ``path`` for reading.

    Reads every sample's metadata (not its pixels) once.

    Raises:
        DatasetError: ``path`` is missing, not a zarr v3 group, not a napari-raysam dataset
            of a supported version, has unreadable metadata, or has no samples.
    """
    path = Path(path)
    channel_names, sam_channels = _read_root(path)
    samples = {
        sample_id: _read_sample_meta(path, sample_id, len(channel_names))
        for sample_id in _live_sample_ids(path)
    }
    if not samples:
        raise DatasetError(
            f"{path} has no samples: export annotated images into it "
            f"(`napari-raysam export IMAGE... --labels LABEL... -o {path}`)"
        )
    return Dataset(path, channel_names, sam_channels, samples)


class Dataset:
    """Read-only view of a dataset; create it with :func:`open_dataset`.

    Holds only the path and metadata, so it pickles cheaply into data-loader workers and
    Ray workers; arrays are opened on each read.

    Attributes:
        path: the dataset folder.
        channel_names: one name per image channel.
        sam_channels: the 1 or 3 channel indices that feed SAM's RGB input.
    """

    def __init__(
        self,
        path: Path,
        channel_names: list[str],
        sam_channels: list[int],
        samples: dict[str, _SampleMeta],
    ) -> None:
        self.path = path
        self.channel_names = channel_names
        self.sam_channels = sam_channels
        self._samples = samples

    def __repr__(self) -> str:
        return f"Dataset({str(self.path)!r}, {len(self._samples)} samples)"

    def sample_ids(self, split: str | None = None) -> list[str]:
        """Sample ids in increasing order, all or only those of ``split``."""
        if split is not None:
            _check_split(split)
        return [sid for sid, meta in self._samples.items() if split in (None, meta.split)]

    def image(self, sample_id: str) -> np.ndarray:
        """``(C, H, W)`` raw intensities, in the dtype they were written with."""
        return self._read(sample_id, "image", ...)

    def labels(
        self, sample_id: str, window: tuple[slice, slice] | None = None
    ) -> np.ndarray:
        """``(H, W)`` uint32 instance ids, or only the ``(rows, columns)`` ``window``."""
        return self._read(sample_id, "labels", window or ...)

    def sam_image(
        self, sample_id: str, window: tuple[slice, slice] | None = None
    ) -> np.ndarray:
        """``(3, H, W)`` float32 SAM input in [0, 255], as :func:`to_sam_rgb` gives it.

        With ``window`` (``(rows, columns)`` slices) only that region is read, normalised
        with the whole image's intensity range so crops match whole-image inference.
        """
        rows, columns = window or (slice(None), slice(None))
        ranges = self._meta(sample_id).intensity_range
        channels = np.stack(
            [self._read(sample_id, "image", (c, rows, columns)) for c in self.sam_channels]
        )
        return _scale_to_sam(channels, [ranges[c] for c in self.sam_channels])

    def image_shape(self, sample_id: str) -> tuple[int, int, int]:
        """``(C, H, W)`` of the sample's image, without reading it."""
        return self._meta(sample_id).image_shape

    def split(self, sample_id: str) -> str:
        """``"train"`` or ``"val"``."""
        return self._meta(sample_id).split

    def n_objects(self, sample_id: str) -> int:
        """Number of distinct non-zero label ids."""
        return self._meta(sample_id).n_objects

    def source(self, sample_id: str) -> str:
        """Where the sample came from (file path or napari layer name), possibly empty."""
        return self._meta(sample_id).source

    def image_sha256(self, sample_id: str) -> str:
        """``content_sha256`` of the stored ``(C, H, W)`` image."""
        return self._meta(sample_id).image_sha256

    def labels_sha256(self, sample_id: str) -> str:
        """``content_sha256`` of the stored ``(H, W)`` uint32 labels."""
        return self._meta(sample_id).labels_sha256

    def embedding(
        self, sample_id: str, model_fingerprint: str
    ) -> tuple[np.ndarray, dict] | None:
        """The stored ``(256, 64, 64)`` float16 embedding and its attrs, or ``None``.

        ``None`` unless an embedding exists and was computed by ``model_fingerprint``. The
        attrs dict holds ``model_fingerprint``, ``input_size`` and ``original_size``
        (``(h, w)`` tuples).
        """
        self._meta(sample_id)
        location = self.path / "samples" / sample_id / "embedding"
        if not location.exists():
            return None
        try:
            array = zarr.open_array(str(location), mode="r")
            attrs = dict(array.attrs)
            if attrs.get("model_fingerprint") != model_fingerprint:
                return None
            values = array[...]
        except Exception as error:  # any zarr/codec failure means a damaged file
            raise _corrupt(self.path, sample_id, "embedding", error) from error
        return values, {
            "model_fingerprint": attrs["model_fingerprint"],
            "input_size": tuple(attrs["input_size"]),
            "original_size": tuple(attrs["original_size"]),
        }

    def fingerprint(self) -> str:
        """sha256 hex digest identifying the training content, from metadata only.

        Covers ``sam_channels`` and, per sample, its id, split and the stored image and
        labels content hashes: it changes when samples are added or differ, and is stable
        across reopening.
        """
        content = {
            "sam_channels": self.sam_channels,
            "samples": [
                [sid, meta.split, meta.image_sha256, meta.labels_sha256]
                for sid, meta in self._samples.items()
            ],
        }
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()

    def require_objects(self, split: str) -> list[str]:
        """Ids of the ``split`` samples that have at least one object.

        Raises:
            DatasetError: no sample of that split has an object.
        """
        sample_ids = [sid for sid in self.sample_ids(split) if self.n_objects(sid) > 0]
        if not sample_ids:
            hint = (
                " or export with --val-fraction so that some annotated images go to 'val'"
                if split == "val"
                else ""
            )
            raise DatasetError(
                f"the '{split}' split of {self.path.name} has no annotated objects: annotate "
                f"at least one object in a {split} image{hint}"
            )
        return sample_ids

    def _meta(self, sample_id: str) -> _SampleMeta:
        try:
            return self._samples[sample_id]
        except KeyError:
            raise DatasetError(
                f"{self.path} has no sample {sample_id!r}; its samples are "
                f"{', '.join(self._samples)}"
            ) from None

    def _read(self, sample_id: str, name: str, selection) -> np.ndarray:
        self._meta(sample_id)
        try:
            array = zarr.open_array(str(self.path / "samples" / sample_id / name), mode="r")
            return array[selection]
        except Exception as error:  # any zarr/codec failure means a damaged file
            raise _corrupt(self.path, sample_id, name, error) from error


def to_sam_rgb(image: np.ndarray, sam_channels: Sequence[int]) -> np.ndarray:
    """Turn raw intensities into SAM's input: ``(3, H, W)`` float32 in [0, 255].

    Each selected channel is scaled so its 1st..99.8th percentile maps to [0, 255]
    (clipped), like micro-sam's percentile normalisation; SAM itself normalises this
    0..255 input. One selected channel is repeated three times. A constant channel gives
    zeros; if the percentiles coincide, the channel's min..max is used instead.

    Args:
        image: ``(C, H, W)`` (or ``(H, W)``, as C = 1) raw intensities, any real dtype.
        sam_channels: 1 or 3 channel indices, in RGB order.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise DatasetError(f"image must have shape (C, H, W) or (H, W); got {image.shape}")
    _check_sam_channels(list(sam_channels), image.shape[0], "to_sam_rgb")
    channels = image[list(sam_channels)]
    return _scale_to_sam(channels, [_intensity_range(channel) for channel in channels])


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


def _intensity_range(channel: np.ndarray) -> tuple[float, float]:
    """``(low, high)`` of one ``(H, W)`` channel used to scale it to SAM's input range."""
    low, high = np.percentile(channel, _PERCENTILES)
    if high <= low:
        low, high = channel.min(), channel.max()
    return float(low), float(high)


def _scale_to_sam(
    channels: np.ndarray, ranges: Sequence[tuple[float, float]]
) -> np.ndarray:
    """``(1 | 3, H, W)`` raw channels and their ``(low, high)`` -> ``(3, H, W)`` float32 0..255."""
    scaled = np.zeros(channels.shape, np.float32)
    for k, (low, high) in enumerate(ranges):
        if high > low:
            scaled[k] = np.clip(
                (channels[k].astype(np.float32) - np.float32(low)) / np.float32(high - low), 0, 1
            ) * np.float32(255)
    return np.repeat(scaled, 3, axis=0) if len(scaled) == 1 else scaled


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


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunk shape: whole leading axes, at most 512 x 512 in the last two."""
    return (1,) * (len(shape) - 2) + tuple(min(size, _CHUNK_SIZE) for size in shape[-2:])


def _write_array(
    group: zarr.Group,
    name: str,
    data: np.ndarray,
    chunks: tuple[int, ...],
    attributes: dict | None = None,
) -> None:
    """Write ``data`` as array ``name`` of ``group`` (zarr's default compressor)."""
    group.create_array(name, data=data, chunks=chunks, attributes=attributes)


def _write_sample(location: Path, sample: SampleInput) -> None:
    """Write one complete sample group at ``location`` (a staging folder)."""
    ids = np.unique(sample.labels)
    group = zarr.create_group(
        store=str(location),
        attributes={
            "split": sample.split,
            "source": sample.source,
            "n_objects": int(np.count_nonzero(ids)),
            "image_sha256": content_sha256(sample.image),
            "labels_sha256": content_sha256(sample.labels),
            "intensity_range": [list(_intensity_range(channel)) for channel in sample.image],
        },
    )
    _write_array(group, "image", sample.image, _chunks(sample.image.shape))
    _write_array(group, "labels", sample.labels, _chunks(sample.labels.shape))
    if sample.embedding is not None:
        _write_embedding(group, sample.embedding)


def _write_embedding(group: zarr.Group, embedding: SampleEmbedding) -> None:
    """Write ``embedding`` as the ``embedding`` array of ``group`` (float16, one chunk)."""
    _write_array(
        group,
        "embedding",
        np.asarray(embedding.values).astype(np.float16),
        chunks=EMBEDDING_SHAPE,
        attributes={
            "model_fingerprint": embedding.model_fingerprint,
            "input_size": [int(s) for s in embedding.input_size],
            "original_size": [int(s) for s in embedding.original_size],
        },
    )


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


def _stage_samples(
    staging: Path,
    samples: Sequence[SampleInput],
    n_channels: int,
    progress: Callable[[int, int], None] | None,
) -> list[Path]:
    """Write every sample into its own folder under ``staging``; return those folders."""
    staging.mkdir()
    staged = []
    for index, sample in enumerate(samples):
        if sample.image.shape[0] != n_channels:
            where = f" ({sample.source})" if sample.source else ""
            raise DatasetError(
                f"sample {index}{where} has {sample.image.shape[0]} channels but the dataset "
                f"has {n_channels}: every image of a dataset needs the same channels"
            )
        location = staging / str(index)
        _write_sample(location, sample)
        staged.append(location)
        if progress is not None:
            progress(index + 1, len(samples))
    return staged


def _commit_samples(samples_dir: Path, staged: Sequence[Path]) -> list[str]:
    """Rename complete staged sample folders into ``samples_dir`` under new ids."""
    existing = _stored_sample_ids(samples_dir)
    number = int(existing[-1]) + 1 if existing else 0
    sample_ids = []
    for location in staged:
        while True:
            sample_id = f"{number:0{_SAMPLE_ID_DIGITS}d}"
            number += 1
            try:
                os.rename(location, samples_dir / sample_id)
                break
            except OSError as error:
                # Another writer took this id meanwhile: renaming onto a non-empty folder fails.
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        sample_ids.append(sample_id)
    return sample_ids


def _stored_sample_ids(samples_dir: Path) -> list[str]:
    """Sample folders (all-digit names) in ``samples_dir``, listed or not, in increasing order."""
    with os.scandir(samples_dir) as entries:
        names = [e.name for e in entries if e.name.isdigit() and e.is_dir()]
    return sorted(names, key=int)


def _live_sample_ids(path: Path) -> list[str]:
    """The samples that are part of the dataset at ``path``: its manifest, else every sample folder."""
    manifest = path / _MANIFEST
    if not manifest.exists():
        return _stored_sample_ids(path / "samples")
    try:
        listed = [str(sample_id) for sample_id in json.loads(manifest.read_text())["samples"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError(f"{manifest} is damaged ({error}): export the dataset again") from error
    # a deleted sample folder drops that sample (what the damaged-sample message advises)
    return [sample_id for sample_id in listed if (path / "samples" / sample_id).is_dir()]


def _write_manifest(path: Path, sample_ids: Sequence[str]) -> None:
    """Make exactly ``sample_ids`` the dataset's samples, in one atomic rename."""
    write_text(path / _MANIFEST, json.dumps({"samples": sorted(sample_ids, key=int)}))


def _remove_unlisted(path: Path, live: Sequence[str]) -> None:
    """Remove what a killed writer left: sample folders no manifest lists (call under the lock)."""
    if not (path / _MANIFEST).exists():
        return
    for sample_id in set(_stored_sample_ids(path / "samples")) - set(live):
        shutil.rmtree(path / "samples" / sample_id, ignore_errors=True)


def _same_image_ids(
    path: Path, live: Sequence[str], samples: Sequence[SampleInput], n_channels: int
) -> list[str]:
    """The stored samples whose image content equals that of one of ``samples``."""
    new = {content_sha256(sample.image) for sample in samples}
    return [sid for sid in live if _read_sample_meta(path, sid, n_channels).image_sha256 in new]


def _read_root(path: Path) -> tuple[list[str], list[int]]:
    """Validate the dataset root at ``path``; return ``(channel_names, sam_channels)``."""
    if not path.exists():
        raise DatasetError(
            f"no dataset at {path}: check the path, or {_EXPORT_HINT.format(path=path)}"
        )
    if not (path / "zarr.json").is_file():
        raise DatasetError(
            f"{path} is not a zarr v3 group (it has no zarr.json), so it is not a napari-raysam "
            f"dataset: give the .zarr folder that export wrote, or "
            f"{_EXPORT_HINT.format(path=path)}"
        )
    try:
        attrs = dict(zarr.open_group(str(path), mode="r", use_consolidated=False).attrs)
    except Exception as error:  # unparsable zarr.json, or an array instead of a group
        raise DatasetError(
            f"{path} is not a readable zarr v3 group ({error}): "
            f"{_EXPORT_HINT.format(path=path)}"
        ) from error
    if attrs.get("format") != DATASET_FORMAT:
        raise DatasetError(
            f"{path} is a zarr group but not a napari-raysam dataset (its format attribute is "
            f"{attrs.get('format')!r}): {_EXPORT_HINT.format(path=path)}"
        )
    version = attrs.get("version")
    if version != DATASET_VERSION:
        raise DatasetError(
            f"{path} is dataset version {version!r}, but this napari-raysam reads version "
            f"{DATASET_VERSION}: use the napari-raysam version that wrote it, or export again"
        )
    try:
        channel_names = [str(name) for name in attrs["channel_names"]]
        sam_channels = [int(c) for c in attrs["sam_channels"]]
        _check_layout(channel_names, sam_channels, len(channel_names), f"reading {path}")
    except (KeyError, TypeError, ValueError) as error:
        raise DatasetError(
            f"{path} has damaged attributes ({error}): export the dataset again"
        ) from error
    if not (path / "samples" / "zarr.json").is_file():
        raise DatasetError(f"{path} has no samples group: export the dataset again")
    return channel_names, sam_channels


def _read_sample_meta(path: Path, sample_id: str, n_channels: int) -> _SampleMeta:
    """Read and check one sample's attrs and array metadata (no pixels)."""
    location = path / "samples" / sample_id
    try:
        attrs = dict(zarr.open_group(str(location), mode="r", use_consolidated=False).attrs)
        image = zarr.open_array(str(location / "image"), mode="r")
        labels = zarr.open_array(str(location / "labels"), mode="r")
        meta = _SampleMeta(
            split=attrs["split"],
            source=attrs["source"],
            n_objects=int(attrs["n_objects"]),
            image_sha256=attrs["image_sha256"],
            labels_sha256=attrs["labels_sha256"],
            intensity_range=tuple((float(lo), float(hi)) for lo, hi in attrs["intensity_range"]),
            image_shape=tuple(int(s) for s in image.shape),
        )
        if (
            len(meta.image_shape) != 3
            or meta.image_shape[0] != n_channels
            or len(meta.intensity_range) != n_channels
            or labels.shape != meta.image_shape[1:]
            or labels.dtype != np.uint32
            or meta.split not in SPLITS
        ):
            raise ValueError(
                f"image {image.shape} {image.dtype}, labels {labels.shape} {labels.dtype}, "
                f"split {meta.split!r} do not fit the dataset's {n_channels} channels"
            )
    except Exception as error:  # any zarr/JSON/key failure means a damaged sample
        raise _corrupt(path, sample_id, "metadata", error) from error
    return meta


def _corrupt(path: Path, sample_id: str, what: str, error: Exception) -> DatasetError:
    return DatasetError(
        f"sample {sample_id} of {path} is damaged: its {what} cannot be read ({error}). "
        f"Export the dataset again, or delete {path / 'samples' / sample_id} to drop that sample"
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
