"""Reading a dataset: ``open_dataset`` and the read-only ``Dataset`` view."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import zarr

from backend.dataset.sam_input import _scale_to_sam
from backend.dataset.samples import (
    DATASET_FORMAT,
    DATASET_VERSION,
    SPLITS,
    DatasetError,
    _SampleMeta,
    _check_layout,
    _check_split,
)


_MANIFEST = "manifest.json"
_EXPORT_HINT = "create one with `napari-raysam export IMAGE... --labels LABEL... -o {path}`"


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
