"""Writing a dataset atomically: ``write_samples`` and ``write_embedding`` (the package's docstring
says how).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import zarr
from filelock import FileLock

from backend.atomic import write_text
from backend.dataset.reading import (
    _MANIFEST,
    open_dataset,
    _live_sample_ids,
    _read_root,
    _read_sample_meta,
    _stored_sample_ids,
)
from backend.dataset.sam_input import _intensity_range
from backend.dataset.samples import (
    DATASET_FORMAT,
    DATASET_VERSION,
    EMBEDDING_SHAPE,
    DatasetError,
    SampleEmbedding,
    SampleInput,
    content_sha256,
    _check_embedding,
    _check_layout,
    _check_same,
)


_CHUNK_SIZE = 512  # (1, 512, 512) image chunks: a 512 training crop touches at most 4 per channel
_SAMPLE_ID_DIGITS = 6
_STAGING_PREFIX = ".staging-"
_LOCK = ".lock"


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
