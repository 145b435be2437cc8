"""Exporting what the annotator holds into a dataset (contract 1), each image exactly once.

An image (each slice of a stack) is identified by its content (``image_sha256``). Exporting
again adds what is new, replaces an image whose objects changed (in the same step, so it is
never in the dataset twice nor in both splits), and leaves unchanged ones as they are. One
export is all-or-nothing. When the model that will be fine-tuned has the annotator's image
encoder, the annotator's cached embeddings go into the dataset with their images, so a
decoder-mode job computes none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backend.dataset import DatasetError, SampleInput, content_sha256, open_dataset, write_samples
from napari_raysam.annotator.annotations import AnnotationStore
from napari_raysam.annotator.image_source import ImageChannels, content_key, sam_rgb
from napari_raysam.annotator.session import read_cached_embedding

VAL_FRACTION = 0.2
"""Of the images a fine-tune export adds, about this fraction goes to validation (at least one)."""


@dataclass(frozen=True)
class AnnotatedImage:
    """An image the annotator has worked on: where its pixels are and how they feed SAM.

    Attributes:
        channels: the image (all slices of a stack); its planes are read on export.
        name: the napari layer name(s), for the dataset's ``source``.
        sam_channels: the 1 or 3 channel indices fed to SAM's RGB input.
    """

    channels: ImageChannels
    name: str
    sam_channels: tuple[int, ...]


@dataclass(frozen=True)
class EmbeddingSource:
    """Where the annotator's embeddings are cached, and the image encoder they must come from."""

    cache_dir: Path
    encoder_fingerprint: str


@dataclass(frozen=True)
class ExportResult:
    """What an export did to the dataset at ``path``."""

    path: Path
    added: int
    replaced: int
    unchanged: int
    with_embeddings: int
    """Written images that carry the annotator's embedding."""
    train: int
    """Annotated images in the train split after the export (the whole dataset)."""
    val: int

    @property
    def written(self) -> int:
        return self.added + self.replaced

    def summary(self) -> str:
        """One line for a status bar."""
        return (
            f"{self.added} new, {self.replaced} updated, {self.unchanged} unchanged image"
            f"{'s' if self.unchanged != 1 else ''}; {self.path.name} now has {self.train} train and "
            f"{self.val} val images"
        )


def export_annotations(
    images: Sequence[AnnotatedImage],
    dataset: str | Path,
    store: AnnotationStore,
    *,
    split: str | None = None,
    embeddings: EmbeddingSource | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ExportResult:
    """Write every annotated plane of ``images`` that the dataset lacks or holds with other objects.

    Args:
        images: the annotator's images; each plane's committed objects are read from ``store``
            (so the caller autosaves the shown plane first).
        dataset: the ``.zarr`` folder, created when missing.
        split: ``"train"`` or ``"val"`` for every written image (the annotator's Export button);
            None keeps a stored image's split and sends about ``VAL_FRACTION`` of the new ones,
            at least one, to validation (the fine-tune dock).
        embeddings: where to find the annotator's embeddings for the model to be trained.
        progress: ``progress(done, total)`` while writing.

    Raises:
        DatasetError: nothing is annotated, or the images do not fit the dataset (channels,
            SAM channels); the dataset is unchanged then.
    """
    dataset = Path(dataset)
    stored = _stored_images(dataset)
    planned: list[_Plane] = []
    seen: set[str] = set()
    unchanged = 0
    for image in images:
        for index in _plane_indices(image.channels):
            plane = image.channels.plane(index)
            key = content_key(plane)
            if key in seen:
                continue
            labels = store.load(key, image.channels.shape)
            if labels is None or not labels.any():
                continue
            seen.add(key)
            previous = stored.get(key)
            if previous is not None and previous[1] == content_sha256(labels) and split in (None, previous[0]):
                unchanged += 1
                continue
            source = f"{image.name} slice {index[0]}" if index else image.name
            planned.append(_Plane(plane, labels, key, source, split or (previous[0] if previous else None), image))
    if not planned and not unchanged:
        raise DatasetError("no committed objects to export: Commit [C] some objects first")
    counts = {"train": 0, "val": 0}
    for sample_split, _ in stored.values():
        counts[sample_split] += 1
    replaced = sum(1 for planned_plane in planned if planned_plane.key in stored)
    samples = []
    for item in planned:
        sample_split = item.split or _split_for_new(counts)
        if item.key in stored:
            counts[stored[item.key][0]] -= 1
        counts[sample_split] += 1
        embedding = None
        if embeddings is not None:
            embedding = read_cached_embedding(
                embeddings.cache_dir, embeddings.encoder_fingerprint, sam_rgb(item.plane, item.image.sam_channels)
            )
        samples.append(SampleInput(item.plane, item.labels, split=sample_split, source=item.source, embedding=embedding))
    if samples:
        first = images[0]
        write_samples(
            dataset, samples,
            channel_names=None if dataset.exists() else list(first.channels.names),
            sam_channels=list(first.sam_channels),
            replace_same_image=True,
            progress=progress,
        )
    return ExportResult(
        path=dataset, added=len(samples) - replaced, replaced=replaced, unchanged=unchanged,
        with_embeddings=sum(sample.embedding is not None for sample in samples),
        train=counts["train"], val=counts["val"],
    )


@dataclass(frozen=True)
class _Plane:
    """One annotated plane to write."""

    plane: np.ndarray
    labels: np.ndarray
    key: str
    source: str
    split: str | None
    """None: a new image whose split is chosen when it is written."""
    image: AnnotatedImage


def _plane_indices(channels: ImageChannels) -> list[tuple[int, ...]]:
    return [(z,) for z in range(channels.stack_shape[0])] if channels.stack_shape else [()]


def _stored_images(dataset: Path) -> dict[str, tuple[str, str]]:
    """image_sha256 -> (split, labels_sha256) of the annotated samples already in ``dataset``."""
    if not dataset.exists():
        return {}
    try:
        opened = open_dataset(dataset)
    except DatasetError as error:
        if "has no samples" in str(error):
            return {}
        raise
    return {
        opened.image_sha256(sid): (opened.split(sid), opened.labels_sha256(sid))
        for sid in opened.sample_ids() if opened.n_objects(sid) > 0
    }


def _split_for_new(counts: dict[str, int]) -> str:
    """Validation for the second image, then whenever val falls below ``VAL_FRACTION`` of all."""
    total = counts["train"] + counts["val"] + 1
    wanted = max(1, int(total * VAL_FRACTION)) if total >= 2 else 0
    return "val" if counts["val"] < wanted else "train"
