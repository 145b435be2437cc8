"""Automatic segmentation of a whole image from its embeddings: micro-sam's two methods.

``AIS``: micro-sam's instance segmentation decoder (when the model carries one); ``AMG``: segment-anything's
automatic mask generator, a grid of point prompts. Both run per tile for an image embedded tile-wise.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from micro_sam.instance_segmentation import (
    AutomaticMaskGenerator,
    InstanceSegmentationWithDecoder,
    TiledAutomaticMaskGenerator,
    TiledInstanceSegmentationWithDecoder,
)
from segment_anything import SamPredictor

from napari_raysam.annotator.progress import MicroSamProgress, ProgressCallback

# micro-sam's names of its automatic segmentation methods.
AIS = "ais"  # automatic instance segmentation with the model's instance segmentation decoder
AMG = "amg"  # automatic mask generation from a grid of point prompts


def segment_automatically(
    predictor: SamPredictor,
    embeddings: dict[str, Any],
    image_shape: tuple[int, int],
    *,
    tiling: tuple[tuple[int, int], tuple[int, int]] | None,
    decoder: torch.nn.Module | None,
    progress: ProgressCallback | None = None,
    points_per_side: int = 32,
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
    box_nms_thresh: float = 0.7,
    min_mask_region_area: int = 0,
    center_distance_threshold: float = 0.5,
    boundary_distance_threshold: float = 0.5,
    min_object_size: int = 0,
) -> np.ndarray:
    """Segment every object of an image without prompts, from its embeddings: ``AIS`` with a ``decoder``, else ``AMG``.

    ``AIS`` (the model carries micro-sam's instance segmentation decoder): the decoder predicts
    foreground, center and boundary distance maps from the image's embeddings (per tile for a
    tiled image), and a seeded watershed on them gives the objects; the arguments and defaults are
    those of ``InstanceSegmentationWithDecoder.generate``, as micro-sam's
    ``automatic_instance_segmentation`` runs it (a tiled image is post-processed tile-wise too).

    ``AMG`` (every other model): a ``points_per_side`` x ``points_per_side`` grid of point
    prompts (per tile for a tiled image) on the image's embeddings; the thresholds are those of
    ``AutomaticMaskGenerator.generate`` with micro-sam's annotator defaults. The largest object
    is removed as background, as micro-sam does.

    Args:
        predictor: the model's predictor (its image need not be set: the embeddings are used).
        embeddings: micro-sam's embeddings of the image (``precompute_image_embeddings``), per tile when tiled.
        image_shape: ``(H, W)`` of the image.
        tiling: ``(tile_shape, halo)`` the embeddings were computed with, or None for one whole-image embedding.
        decoder: micro-sam's instance segmentation decoder of the model (``DecoderAdapter``), or None.
        progress: called as ``progress(done, total)`` from the calling thread, at the start,
            per batch of grid points (AMG) or per tile (tiled image) and at the end.
        points_per_side, pred_iou_thresh, stability_score_thresh, box_nms_thresh,
            min_mask_region_area: AMG only.
        center_distance_threshold, boundary_distance_threshold: AIS only; seeds are where both
            predicted distances are below them.
        min_object_size: objects of fewer pixels are removed (AIS: by micro-sam's ``min_size``;
            AMG: afterwards, the others renumbered from 1).

    Returns:
        ``(H, W)`` uint32 instance ids, 0 = background; all zeros if nothing was found.
    """
    report = MicroSamProgress(progress)
    # The image only gives the segmenters its size: the embeddings are reused, not recomputed.
    image = np.zeros((*image_shape, 3), np.uint8)
    initialize = {
        "image_embeddings": embeddings,
        "verbose": True,  # micro-sam calls pbar_init/pbar_update only when verbose
        "pbar_init": report.init,
        "pbar_update": report.update,
    }
    if decoder is not None:
        segmenter_class = TiledInstanceSegmentationWithDecoder if tiling else InstanceSegmentationWithDecoder
        segmenter = segmenter_class(predictor, decoder)
        segmenter.initialize(image, **initialize)
        tiles = {"tile_shape": tiling[0], "halo": tiling[1]} if tiling else {}
        segmentation = segmenter.generate(
            center_distance_threshold=center_distance_threshold,
            boundary_distance_threshold=boundary_distance_threshold,
            min_size=min_object_size,
            output_mode="instance_segmentation",
            **tiles,
        )
    else:
        generator_class = TiledAutomaticMaskGenerator if tiling else AutomaticMaskGenerator
        # micro-sam keeps every grid mask as Python lists and deep-copies them; the cyclic garbage
        # collector rescans those lists while holding the GIL, which froze napari's event loop for
        # up to 1.1 s (bench/annotator.py). Reference counting frees them when the generator goes,
        # before collection resumes, so the collector never sees them; and freed one mask at a
        # time (``_free_grid_masks``), since freeing them all at once held the GIL for 108 ms.
        with _garbage_collection_paused():
            generator = generator_class(predictor, points_per_side=points_per_side)
            generator.initialize(image, **initialize)
            segmentation = generator.generate(
                pred_iou_thresh=pred_iou_thresh,
                stability_score_thresh=stability_score_thresh,
                box_nms_thresh=box_nms_thresh,
                min_mask_region_area=min_mask_region_area,
                output_mode="instance_segmentation",
            )
            _free_grid_masks(generator)
        segmentation = _without_small_objects(np.asarray(segmentation, dtype=np.uint32), min_object_size)
    report.finish()
    return np.asarray(segmentation, dtype=np.uint32)


@contextlib.contextmanager
def _garbage_collection_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector (process-wide) inside the block; objects freed by
    reference counting are still freed at once."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _free_grid_masks(generator: AutomaticMaskGenerator | TiledAutomaticMaskGenerator) -> None:
    """Free ``generator``'s run-length encoded grid masks (hundreds of lists of thousands of ints)
    one at a time: each ``pop`` is short, and Python hands the GIL to the event loop between them,
    where dropping the whole list is one C call that holds it throughout."""
    for mask_data in generator.crop_list or []:  # one per crop, or per tile for a tiled image
        rles = mask_data["rles"]
        while rles:
            rles.pop()


def _without_small_objects(labels: np.ndarray, min_size: int) -> np.ndarray:
    """``(H, W)`` uint32 ``labels`` without the objects of fewer than ``min_size`` pixels, renumbered 1..N."""
    if min_size <= 0:
        return labels
    ids, counts = np.unique(labels, return_counts=True)
    kept = ids[(counts >= min_size) & (ids != 0)]
    lookup = np.zeros(int(ids.max()) + 1, np.uint32)
    lookup[kept] = np.arange(1, len(kept) + 1, dtype=np.uint32)
    return lookup[labels]
