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

Modules: ``samples`` (what a sample is, validated), ``sam_input`` (intensities to SAM's
input), ``reading`` (``open_dataset``, ``Dataset``), ``writing`` (``write_samples``,
``write_embedding``), ``crops`` (``TrainingCrops`` for full and LoRA modes; imported from
``backend.dataset.crops`` itself, since it loads PyTorch and napari's reader imports this package).
"""

from backend.dataset.reading import Dataset, open_dataset
from backend.dataset.sam_input import to_sam_rgb
from backend.dataset.samples import (
    DATASET_FORMAT,
    DATASET_VERSION,
    EMBEDDING_SHAPE,
    SPLITS,
    DatasetError,
    SampleEmbedding,
    SampleInput,
    content_sha256,
    non_finite_count,
)
from backend.dataset.writing import write_embedding, write_samples

__all__ = [
    "DATASET_FORMAT", "DATASET_VERSION", "EMBEDDING_SHAPE", "SPLITS", "Dataset", "DatasetError", "SampleEmbedding",
    "SampleInput", "content_sha256", "non_finite_count", "open_dataset", "to_sam_rgb",
    "write_embedding", "write_samples",
]
